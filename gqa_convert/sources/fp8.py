"""FP8 checkpoints: transformers' fine-grained `fp8` and Meta's `fbgemm_fp8`.

  fp8         `weight` e4m3 [out, in] and fp32 `weight_scale_inv`: one per block of
              `weight_block_size` [b0, b1] ([ceil(out / b0), ceil(in / b1)], DeepSeek-V3 /
              Qwen3-FP8; the last block of an axis may be partial), or, with
              `weight_block_size: null`, one per tensor ([] or [1]) or per row ([out, 1])
  fbgemm_fp8  `weight` e4m3 and `weight_scale` [out, 1] (Llama-3.1-405B-FP8)

value = e4m3 value * scale, in float32 (the scale multiplies: `_inv` names what the
quantiser divided by). Modules in `modules_to_not_convert` are stored dense. A static
`activation_scale` / `input_scale` is read by nobody: the export is dense.

transformers dequantises `fp8` on CPU (`FineGrainedFP8Config(dequantize=True)`), deriving
each tensor's block from its scale grid (rows // grid rows): the format's block only where
the block divides the axis or the axis fits in one block. Elsewhere its values differ from
the format's, so the gate could not check ours: such a checkpoint is refused (exit 4).
`fbgemm_fp8` has no CPU path in transformers (its quantizer needs a GPU and fbgemm-gpu):
refused, by name.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert.errors import BadInputError, UnsupportedModelError
from gqa_convert.sources import Source
from gqa_convert.sources.floats import E4M3FN, decode
from gqa_convert.sources.quantized import (
    Module,
    Plan,
    as_float32,
    matches,
    open_modules,
    scale_name,
)

FP8_CODES = ("F8_E4M3",)


def dequantize_fp8(
    weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None
) -> np.ndarray:
    """float32 values of an e4m3 `weight` [rows, cols] (uint8 storage) times its float32
    `scale`: one per [b0, b1] block of `block` ([ceil(rows / b0), ceil(cols / b1)], the last
    block of an axis partial), else one per tensor ([] / [1]) or per row ([rows, 1]).

    Each value is one float32 product, as transformers computes it: bit-exact."""
    out = decode(weight, E4M3FN)  # [rows, cols] float32
    if block is None:
        out *= scale.reshape(-1, 1) if scale.size > 1 else scale.reshape(())
        return out
    b0, b1 = block
    cols = out.shape[1]
    for i in range(scale.shape[0]):  # a row of blocks at a time: no full-size scale array
        out[i * b0 : (i + 1) * b0] *= np.repeat(scale[i], b1)[:cols]
    return out


def _grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _plan(module: Module, scale_part: str, block: tuple[int, int] | None, method: str) -> Plan:
    """The dense weight of one FP8 module, after checking its parts fit."""
    weight = module.parts.get("weight")
    scale = module.parts[scale_part]
    if weight is None:
        raise BadInputError(f"{module.name}: {scale_part} without its weight")
    if weight.dtype not in FP8_CODES:
        raise BadInputError(
            f"{weight.name}: dtype {weight.dtype}, expected F8_E4M3 beside {scale_part}"
        )
    if len(weight.shape) != 2:
        raise UnsupportedModelError(
            f"{weight.name}: {len(weight.shape)}-d FP8 weight {list(weight.shape)}; "
            "gqa-convert reads 2-d ones"
        )
    rows = weight.shape[0]
    if block is not None:
        want, scheme = _grid(weight.shape, block), f"{method} e4m3, blocks {block[0]}x{block[1]}"
    elif scale.shape in ((), (1,)):
        want, scheme = scale.shape, f"{method} e4m3, one scale per tensor"
    else:
        want, scheme = (rows, 1), f"{method} e4m3, one scale per row"
    if tuple(scale.shape) != tuple(want):
        raise BadInputError(
            f"{scale_name(scale)} does not fit weight {list(weight.shape)} "
            f"(expected {list(want)}: {scheme})"
        )

    def read() -> np.ndarray:
        s = as_float32(module.read(scale_part), scale.dtype)
        return dequantize_fp8(module.read("weight"), s, block)

    return tuple(weight.shape), "F32", scheme, read


def _block(config: dict[str, Any], where: Path) -> tuple[int, int] | None:
    block = config.get("weight_block_size")
    if block is None:
        return None
    if not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise BadInputError(
            f"{where}: quantization_config.weight_block_size = {block!r} is not two positive ints"
        )
    return block[0], block[1]


def _unchecked_blocks(source: Source, block: tuple[int, int] | None) -> str | None:
    """The first block-quantised tensor whose block transformers' CPU dequantisation would
    not use: an axis longer than the block and not a multiple of it (see the module)."""
    if block is None:
        return None
    for tensor in source.tensors.values():
        if tensor.scheme is None:
            continue
        shape = tensor.shape
        if any(n > b and n % b for n, b in zip(shape, block, strict=True)):
            grid = _grid(shape, block)
            derived = [n // g if n % g == 0 else "none" for n, g in zip(shape, grid, strict=True)]
            return (
                f"{tensor.name} {list(shape)} is not a multiple of the fp8 block "
                f"{list(block)} and spans more than one block: transformers' CPU "
                f"dequantisation would use blocks {derived} (from the scale grid {list(grid)}), "
                "so the gate could not check ours; gqa-convert refuses it"
            )
    return None


def _open(
    folder: Path,
    hf_config: dict[str, Any],
    check_sizes: bool,
    *,
    scale_part: str,
    block: tuple[int, int] | None,
    companions: tuple[str, ...],
    quantization: dict[str, Any],
    refusal: UnsupportedModelError | None = None,
) -> Source:
    """An FP8 checkpoint whose modules are an e4m3 `weight` and its `scale_part`."""
    method = quantization["method"]
    skip = quantization.get("modules_to_not_convert")
    return open_modules(
        folder,
        hf_config,
        check_sizes,
        quantized_by=(scale_part,),
        companions=companions,
        plan=partial(_plan, scale_part=scale_part, block=block, method=method),
        quantization={
            "format": "float8_e4m3fn",
            "weight_block_size": block and list(block),
            **quantization,
        },
        not_converted=lambda name: matches(name, skip),
        refusal=refusal,
    )


def open_fp8(folder: Path, hf_config: dict[str, Any], check_sizes: bool = True) -> Source:
    """A fine-grained FP8 checkpoint (quant_method `fp8`), see the module docstring."""
    config = hf_config["quantization_config"]
    block = _block(config, folder / "config.json")
    source = _open(
        folder,
        hf_config,
        check_sizes,
        scale_part="weight_scale_inv",
        block=block,
        companions=("activation_scale", "input_scale"),
        quantization={
            "method": "fp8",
            "activation_scheme": config.get("activation_scheme"),
            "modules_to_not_convert": config.get("modules_to_not_convert")
            or config.get("ignored_layers"),
        },
    )
    unchecked = _unchecked_blocks(source, block)
    if unchecked is not None:
        source.refusal = UnsupportedModelError(f"{folder}: {unchecked}")
    return source


def open_fbgemm_fp8(folder: Path, hf_config: dict[str, Any], check_sizes: bool = True) -> Source:
    """An fbgemm_fp8 checkpoint: read, but refused for conversion (see the module)."""
    config = hf_config["quantization_config"]
    return _open(
        folder,
        hf_config,
        check_sizes,
        scale_part="weight_scale",
        block=None,
        companions=("input_scale_ub", "input_scale"),
        quantization={
            "method": "fbgemm_fp8",
            "activation_scale_ub": config.get("activation_scale_ub"),
            "modules_to_not_convert": config.get("modules_to_not_convert"),
        },
        refusal=UnsupportedModelError(
            f"{folder}: quant_method fbgemm_fp8 is not supported: transformers has no CPU "
            "dequantisation of it (its quantizer needs a GPU and fbgemm-gpu), so the gate could "
            "not check ours"
        ),
    )
