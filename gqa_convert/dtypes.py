"""Float casts between F32, F16 and BF16 on numpy storage arrays, without torch.

bfloat16 is the top half of a float32: widening is a shift; narrowing rounds to nearest,
ties to even, as torch's `.to(torch.bfloat16)` does, and keeps NaN a NaN (payloads may
differ from torch's).
"""

from __future__ import annotations

import numpy as np

CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(f32: np.ndarray) -> np.ndarray:
    u32 = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32)
    rounded = ((u32 + 0x7FFF + ((u32 >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(f32), np.uint16(0x7FC0), rounded)


def cast(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """`array` in safetensors dtype `src` (F32/F16/BF16 storage) -> storage of `dst`."""
    if src == dst:
        return array
    f32 = _bf16_to_f32(array) if src == "BF16" else array.astype(np.float32)
    if dst == "BF16":
        return _f32_to_bf16(f32)
    with np.errstate(over="ignore"):  # out of float16 range becomes inf, as in torch
        return f32.astype(np.float16 if dst == "F16" else np.float32)
