"""The small float formats quantised checkpoints store, decoded to float32 by table.

Each table is built from the format's bit fields (sign, exponent, mantissa), so decoding a
stored byte is one numpy `take`: exact, since every value of these formats is a float32.

  e4m3fn  1 sign, 4 exponent (bias 7), 3 mantissa; no infinity, S.1111.111 is NaN
  e5m2    1 sign, 5 exponent (bias 15), 2 mantissa; IEEE-like infinities and NaNs
  e8m0    8 exponent bits, no sign or mantissa: 2^(byte - 127), 0xFF is NaN (MX scales)
  e2m1    1 sign, 2 exponent (bias 1), 1 mantissa, two per byte (FP4 of MXFP4)
"""

from __future__ import annotations

import numpy as np


def _minifloat(
    exponent_bits: int, mantissa_bits: int, bias: int, ieee_specials: bool
) -> np.ndarray:
    """float32 value of every code of a sign + exponent + mantissa format (2^n codes)."""
    width = 1 + exponent_bits + mantissa_bits
    codes = np.arange(1 << width, dtype=np.int64)
    sign = np.where(codes >> (width - 1), -1.0, 1.0)
    exponent = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = codes & ((1 << mantissa_bits) - 1)
    fraction = mantissa / float(1 << mantissa_bits)
    normal = np.ldexp(1.0 + fraction, (exponent - bias).astype(np.int32))
    subnormal = np.ldexp(fraction, 1 - bias)
    values = sign * np.where(exponent == 0, subnormal, normal)
    top = exponent == (1 << exponent_bits) - 1
    if ieee_specials:
        values = np.where(top & (mantissa == 0), sign * np.inf, values)
        values = np.where(top & (mantissa != 0), sign * np.nan, values)
    elif exponent_bits == 4:  # e4m3fn: only the all-ones code of each sign is NaN
        values = np.where(top & (mantissa == (1 << mantissa_bits) - 1), sign * np.nan, values)
    return values.astype(np.float32)


E4M3FN = _minifloat(4, 3, 7, ieee_specials=False)  # [256] float32
E5M2 = _minifloat(5, 2, 15, ieee_specials=True)  # [256] float32
E2M1 = _minifloat(2, 1, 1, ieee_specials=False)  # [16] float32: 0, .5, 1, 1.5, 2, 3, 4, 6
E8M0 = np.ldexp(np.float32(1), np.arange(255, dtype=np.int32) - 127)
E8M0 = np.append(E8M0, np.float32(np.nan)).astype(np.float32)  # [256] float32

# safetensors code of a 1-byte float -> its table
TABLES = {"F8_E4M3": E4M3FN, "F8_E5M2": E5M2, "F8_E8M0": E8M0}


def decode(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The float32 values of `codes` (uint8 storage of a 1-byte float), any shape."""
    return np.take(table, codes.view(np.uint8))
