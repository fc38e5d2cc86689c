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


def test_a_mapped_tensor_equals_the_read_one_and_holds_no_file_open(tmp_path):
    """map_array (verification's and the conversion's reader of safetensors): the bytes of
    read_array at every offset (page-aligned or not, every dtype, empty and scalar
    tensors), writable without touching the file, no descriptor kept per mapping, unmapped
    once released, and a file cut short since its header was read is bad input."""
    import gc
    import os
    from pathlib import Path

    import pytest
    from safetensors.numpy import save_file

    from gqa_convert.checkpoint import map_array, read_array, read_weights
    from gqa_convert.errors import BadInputError

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal(4099).astype(np.float16),  # pushes c off a page boundary
        "c": rng.integers(-(2**15), 2**15, (70, 300), dtype=np.int16),
        "d": np.zeros((0, 4), np.float32),
        "e": np.array(2.5, np.float64),
        "f": rng.integers(-(2**31), 2**31, 9000, dtype=np.int32),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    infos = read_weights(tmp_path)
    assert any(i.start % 4096 for i in infos.values() if i.nbytes)
    fds = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    maps = [map_array(i) for i in infos.values() for _ in range(50)]
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds
    for array, info in zip(maps[::50], infos.values(), strict=True):
        read = read_array(info)
        assert array.dtype == read.dtype and array.shape == read.shape
        assert array.tobytes() == read.tobytes(), info.name
        array[...] = 0  # a private copy of the page: the file keeps its bytes
    assert (tmp_path / "model.safetensors").read_bytes() == before
    if Path("/proc/self/maps").is_file():
        path = str(tmp_path / "model.safetensors")
        assert Path("/proc/self/maps").read_text().count(path) > 0  # (the kernel may merge)
        del maps, array
        gc.collect()
        assert Path("/proc/self/maps").read_text().count(path) == 0
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(infos["f"].end - 4)
    with pytest.raises(BadInputError, match="truncated before tensor 'f'"):
        map_array(infos["f"])


def test_sha256_file_is_hashlibs_digest_and_maps_one_chunk_at_a_time(tmp_path, monkeypatch):
    """The file is hashed through mappings of at most `chunk` bytes (a mapping's pages count
    in resident memory while it lives), and the digest is the whole file's, at every size
    around a chunk's edges."""
    import mmap

    from gqa_convert import checkpoint

    window = mmap.ALLOCATIONGRANULARITY
    lengths = []
    real_mmap = mmap.mmap

    def recording_mmap(fileno, length, *args, **kwargs):
        lengths.append(length)
        return real_mmap(fileno, length, *args, **kwargs)

    monkeypatch.setattr(checkpoint.mmap, "mmap", recording_mmap)
    rng = np.random.default_rng(0)
    for size in (0, 1, window - 1, window, window + 1, 3 * window + 5):
        lengths.clear()
        path = tmp_path / f"f{size}"
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path.write_bytes(data)
        got = checkpoint.sha256_file(path, chunk=window)
        assert got == hashlib.sha256(data).hexdigest(), size
        assert max(lengths) <= window, (size, lengths)
        if size:
            assert sum(lengths) == size, (size, lengths)
