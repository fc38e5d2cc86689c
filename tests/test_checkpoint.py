"""The streaming safetensors writer against the reference reader, and its hashing."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from safetensors.torch import load_file

from gqa_convert.checkpoint import SafetensorsWriter, TensorSpec, read_header


def test_writer_output_reads_back_with_safetensors_including_odd_shapes(tmp_path):
    arrays = {
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(1.5, np.float32),
        "half": np.arange(6, dtype=np.float16).reshape(2, 3),
        "bf16-as-u16": np.arange(5, dtype=np.uint16),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not contiguous
    }
    codes = {
        "empty": "F32",
        "scalar": "F32",
        "half": "F16",
        "bf16-as-u16": "BF16",
        "transposed": "F32",
    }
    path = tmp_path / "t.safetensors"
    writer = SafetensorsWriter(path, [TensorSpec(n, codes[n], a.shape) for n, a in arrays.items()])
    for name, array in arrays.items():
        writer.write(name, array)
    writer.close()
    assert writer.sha256.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    back = load_file(path)
    for name in ("empty", "scalar", "half", "transposed"):
        assert np.array_equal(back[name].numpy(), arrays[name]), name
    assert back["bf16-as-u16"].dtype == torch.bfloat16
    assert np.array_equal(
        back["bf16-as-u16"].view(torch.int16).numpy().view(np.uint16), np.arange(5)
    )
    infos, _ = read_header(path)
    assert infos["bf16-as-u16"].dtype == "BF16" and infos["bf16-as-u16"].shape == (5,)
