"""What the safetensors-based quantised formats share: a quantised module is a `weight` (or
`weight_packed`) and companion tensors (scales, zero points, shapes) under one prefix; the
rest is stored dense. Each format names its companions and dequantises one module."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert import checkpoint
from gqa_convert.checkpoint import DTYPES, TensorInfo, read_weights
from gqa_convert.dtypes import CODES
from gqa_convert.errors import BadInputError, GQAConvertError, listing
from gqa_convert.sources import Source, SourceTensor
from gqa_convert.sources.dense import stored_files


@dataclass(frozen=True)
class Module:
    """The stored tensors of one quantised module, by their name after the prefix
    (`weight`, `weight_scale_inv`, ...)."""

    prefix: str  # e.g. "model.layers.0.self_attn.q_proj."
    parts: dict[str, TensorInfo]

    @property
    def name(self) -> str:
        return self.prefix.removesuffix(".")

    def read(self, part: str) -> np.ndarray:
        return checkpoint.read_array(self.parts[part])


# A format's module reader: (module) -> (dense shape, dense dtype code, scheme, dequantiser),
# or a BadInputError naming what is wrong with the module.
Plan = tuple[tuple[int, ...], str, str, Callable[[], np.ndarray]]


def open_modules(
    folder: Path,
    hf_config: dict[str, Any],
    check_sizes: bool,
    *,
    quantized_by: tuple[str, ...],
    companions: tuple[str, ...],
    plan: Callable[[Module], Plan],
    quantization: dict[str, Any],
    not_converted: Callable[[str], bool] = lambda name: False,
    refusal: GQAConvertError | None = None,
) -> Source:
    """A source of `folder` whose modules holding a part named in `quantized_by` (e.g.
    `weight_scale`) are quantised: their parts (those names and `companions`) make one dense
    `{prefix}weight` by `plan`. A module `not_converted` (modules_to_not_convert, ignore) must
    be stored dense. Every problem (a scale without its weight, a weight without its scale,
    a shape that does not fit) is listed in one BadInputError."""
    stored = read_weights(folder, check_sizes)
    names = quantized_by + companions  # the parts that make a module quantised, with `weight`
    modules: dict[str, Module] = {}
    for name, info in stored.items():
        prefix, dot, leaf = name.rpartition(".")
        if dot and leaf in names:
            modules.setdefault(prefix + ".", Module(prefix + ".", {})).parts[leaf] = info
    for module in modules.values():
        if module.prefix + "weight" in stored:
            module.parts["weight"] = stored[module.prefix + "weight"]
    consumed = {info.name for module in modules.values() for info in module.parts.values()}
    tensors: dict[str, SourceTensor] = {}
    readers: dict[str, Callable[[], np.ndarray]] = {}
    problems: list[str] = []
    for module in modules.values():
        if not any(part in module.parts for part in quantized_by):
            orphans = ", ".join(module.prefix + p for p in module.parts)
            problems.append(f"{orphans}: no {' / '.join(quantized_by)} beside it")
            continue
        if not_converted(module.name):
            problems.append(
                f"{module.name}: stored quantised, but quantization_config says it is not"
            )
            continue
        try:
            shape, dtype, scheme, read = plan(module)
        except BadInputError as e:
            problems.append(str(e))
            continue
        main = module.parts.get("weight") or next(iter(module.parts.values()))
        parts = tuple(module.parts.values())
        target = module.prefix + "weight"
        tensors[target] = SourceTensor(target, shape, dtype, main.path, parts, scheme)
        readers[target] = read
    for name, info in stored.items():
        if name in consumed:
            continue
        if info.dtype not in CODES.values() and name.endswith("weight"):
            problems.append(
                f"{name}: stored as {info.dtype} without its "
                f"{' / '.join(quantized_by)} (missing scale tensor)"
            )
            continue
        tensors[name] = SourceTensor(name, info.shape, info.dtype, info.path, (info,))
        readers[name] = partial(checkpoint.read_array, info)
    if problems:
        what = f"{folder}: the {quantization['method']} tensors are inconsistent"
        raise BadInputError(listing(what, problems))
    return quantized_source(folder, hf_config, stored, tensors, readers, quantization, refusal)


def quantized_source(
    folder: Path,
    hf_config: dict[str, Any],
    stored: dict[str, TensorInfo],
    tensors: dict[str, SourceTensor],
    readers: dict[str, Callable[[], np.ndarray]],
    quantization: dict[str, Any],
    refusal: GQAConvertError | None = None,
) -> Source:
    """The Source of a quantised safetensors checkpoint: the dense model's config (without
    quantization_config), transformers told to dequantise, the 2-d tensors found dense
    (embeddings, lm_head, modules left unquantised) recorded with the quantisation."""
    dense = sorted(n for n, t in tensors.items() if t.scheme is None and len(t.shape) == 2)
    return Source(
        path=folder,
        folder=folder,
        hf_config={k: v for k, v in hf_config.items() if k != "quantization_config"},
        tensors=tensors,
        files=stored_files(folder, stored),
        stored=stored,
        quantization={**quantization, "dense_matrices": dense},
        default_dtype=compute_dtype(hf_config),
        refusal=refusal,
        hf_quantization={**hf_config["quantization_config"], "dequantize": True},
        readers=readers,
    )


def compute_dtype(hf_config: dict[str, Any]) -> str:
    """The export's default dtype for a quantised checkpoint: the compute dtype config.json
    names (`dtype` / `torch_dtype`), else bfloat16."""
    named = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return named if named in CODES else "bfloat16"


def as_float32(array: np.ndarray, code: str) -> np.ndarray:
    """A stored float array (F32, F16, BF16, or a 1-byte float) as float32 values; exact."""
    from gqa_convert.sources.floats import TABLES, decode

    if code in TABLES:
        return decode(array, TABLES[code])
    if code == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if code in ("F32", "F16", "F64"):
        return array.astype(np.float32)
    raise BadInputError(f"a scale of dtype {code} (expected a float)")


def matches(name: str, patterns: list[str] | None) -> bool:
    """Whether module `name` is one of `patterns`: a name, a `re:` regex (compressed-tensors'
    spelling), or a name's suffix after a dot (transformers' modules_to_not_convert)."""
    for pattern in patterns or ():
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def scale_name(info: TensorInfo) -> str:
    return f"{info.name} {list(info.shape)} {DTYPES[info.dtype][1]}"
