"""MXFP4 (OCP microscaling FP4), as gpt-oss stores its MoE experts.

`{name}_blocks` uint8 [E, rows, cols / 32, 16]: 32 FP4 (e2m1) values per block, two per
byte, the low nibble first; `{name}_scales` uint8 [E, rows, cols / 32]: one E8M0 scale per
block, 2^(scale - 127). The dense tensor is transformers' in-memory one: [E, cols, rows]
(`convert_moe_packed_tensors` transposes the last two axes), float32.

transformers dequantises MXFP4 only inside gpt-oss's experts (`Mxfp4Config`, on CPU with
`dequantize`): an MXFP4 gpt-oss checkpoint converts, its experts dequantised as they stream,
and the gate's reference is transformers' own dequantised model; MXFP4 in a family without
`mxfp4_experts` (configs/*.toml) is refused. The dequantiser itself is
tested bit-exact against an independent numpy one and against transformers' own function.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert import checkpoint
from gqa_convert.architectures import family_for
from gqa_convert.checkpoint import TensorInfo, read_weights
from gqa_convert.errors import BadInputError, UnsupportedModelError, listing
from gqa_convert.sources import Source, SourceTensor
from gqa_convert.sources.floats import E2M1
from gqa_convert.sources.quantized import quantized_source


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values of MXFP4 `blocks` [..., G, 16] (uint8) with E8M0 `scales` [..., G]:
    [..., G * 32], element 2k of a block from the low nibble of byte k, 2k + 1 from the
    high one, times 2^(scale - 127) (exact: a power of two)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise BadInputError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not pair"
        )
    values = np.empty((*blocks.shape[:-1], 32), dtype=np.float32)
    values[..., 0::2] = E2M1[blocks & 0x0F]
    values[..., 1::2] = E2M1[blocks >> 4]
    exponents = scales.astype(np.int32)[..., None] - 127
    return np.ldexp(values, exponents).reshape(*blocks.shape[:-2], -1)


def dense_experts(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[E, rows, G, 16] blocks -> transformers' dense [E, cols, rows] float32."""
    return np.ascontiguousarray(dequantize_mxfp4(blocks, scales).swapaxes(-1, -2))


def _read(blocks: TensorInfo, scales: TensorInfo) -> np.ndarray:
    return dense_experts(checkpoint.read_array(blocks), checkpoint.read_array(scales))


def open_mxfp4(folder: Path, hf_config: dict[str, Any], check_sizes: bool = True) -> Source:
    """An MXFP4 checkpoint: the `_blocks` / `_scales` pairs read as dense float32 tensors."""
    stored = read_weights(folder, check_sizes)
    tensors: dict[str, SourceTensor] = {}
    readers = {}
    problems = []
    for name, info in stored.items():
        if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in stored:
            continue
        if not name.endswith("_blocks"):
            if name.endswith("_scales"):
                problems.append(f"{name}: no {name.removesuffix('_scales')}_blocks beside it")
                continue
            tensors[name] = SourceTensor(name, info.shape, info.dtype, info.path, (info,))
            readers[name] = partial(checkpoint.read_array, info)
            continue
        dense = name.removesuffix("_blocks")
        scales = stored.get(dense + "_scales")
        if scales is None or info.dtype != "U8" or len(info.shape) < 3:
            problems.append(f"{name}: U8 blocks [..., G, 16] with {dense}_scales beside them")
            continue
        *lead, rows, groups, _ = info.shape
        shape = (*lead, groups * 32, rows)
        tensors[dense] = SourceTensor(dense, shape, "F32", info.path, (info, scales), "mxfp4")
        readers[dense] = partial(_read, info, scales)
    if problems:
        raise BadInputError(listing(f"{folder}: the mxfp4 tensors are inconsistent", problems))
    config = hf_config["quantization_config"]
    quantization = {
        "method": "mxfp4",
        "format": "e2m1 blocks of 32, e8m0 scales",
        "modules_to_not_convert": config.get("modules_to_not_convert"),
    }
    family = family_for(hf_config.get("architectures"), hf_config.get("model_type"))
    refusal = None
    if not family.fixed.get("mxfp4_experts"):
        refusal = UnsupportedModelError(
            f"{folder}: quant_method mxfp4: transformers dequantises MXFP4 only in gpt-oss's "
            f"experts, and this is a {family.architectures[0]}"
        )
    return quantized_source(folder, hf_config, stored, tensors, readers, quantization, refusal)
