"""compressed-tensors checkpoints (llm-compressor): float8 and int weight quantisation.

quantization_config names `config_groups`, each a scheme for the modules its `targets`
match (a class such as "Linear", or a "re:" regex), and `ignore` (modules left dense).
A scheme's weights are

  float-quantized  `weight` e4m3 (8-bit float) + `weight_scale` [+ `weight_zero_point`]
  int-quantized    `weight` int8 (naive-quantized likewise)
  pack-quantized   `weight_packed` int32 (num_bits 1..8 per value, packed densely along a
                   row, low bits first, stored as value + 2^(num_bits - 1)), `weight_shape`
                   [2], `weight_scale` [+ `weight_zero_point`, packed the same way along
                   the rows]

with one scale (and zero point) per tensor ([1]), per row ([out, 1]), per group of
`group_size` columns ([out, in / group_size]) or per block of `block_structure` [b0, b1]
([ceil(out / b0), ceil(in / b1)], the last block of an axis partial).

value = (q - zero_point) * scale, computed in the scale's dtype, as compressed-tensors'
`dequantize` does (q and the zero point are small integers or e4m3 values, exact in any
float dtype; each product is exact in float32 and rounded once to the scale's dtype, as
torch rounds it): bit-exact. One exception, transformers' own: float8 MoE experts (the
per-expert tensors its loader stacks) it dequantises in float32, unrounded, and so do we.

transformers dequantises these on CPU through the compressed-tensors package
(`CompressedTensorsConfig(dequantize=True)`), which the gate's reference needs: install it
with the `compressed` extra. Static activation scales (`input_scale`) are read by nobody.
"""

from __future__ import annotations

import math
import re
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert import checkpoint
from gqa_convert.checkpoint import TensorInfo
from gqa_convert.dtypes import CODES, cast
from gqa_convert.errors import BadInputError, UnsupportedModelError
from gqa_convert.sources import Source
from gqa_convert.sources.floats import E4M3FN, decode
from gqa_convert.sources.quantized import Module, Plan, as_float32, matches, open_modules

STRATEGIES = ("tensor", "channel", "group", "block")
PER_EXPERT = re.compile(r"\.experts\.\d+\.")  # one expert's tensor, e.g. experts.3.w1
FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")


def unpack_int32(packed: np.ndarray, num_bits: int, columns: int) -> np.ndarray:
    """Signed values of a pack-quantized `packed` [rows, words] int32: `columns` values of
    `num_bits` per row, value i at bit i * num_bits of the row's little-endian bit stream,
    stored with an offset of 2^(num_bits - 1)."""
    data = np.ascontiguousarray(packed, dtype="<i4").view(np.uint8)  # [rows, 4 * words]
    if num_bits == 8:
        values = data
    elif num_bits == 4:  # two per byte, the low nibble first
        values = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(data.shape[0], -1)
    else:
        bits = np.unpackbits(data, axis=-1, bitorder="little")  # [rows, 32 * words]
        usable = bits.shape[1] // num_bits * num_bits
        grouped = bits[:, :usable].reshape(data.shape[0], -1, num_bits)
        values = (grouped << np.arange(num_bits, dtype=np.uint8)).sum(axis=-1, dtype=np.int32)
    return values[:, :columns].astype(np.int32) - (1 << (num_bits - 1))


def expand(scale: np.ndarray, shape: tuple[int, int], strategy: str, args: dict[str, Any]) -> Any:
    """A per-tensor / row / group / block array broadcast over a [rows, cols] weight (a
    view or a repeat; one value per weight element, or broadcastable to it)."""
    rows, cols = shape
    if strategy == "tensor":
        return scale.reshape(())
    if strategy == "channel":
        return scale.reshape(rows, 1)
    if strategy == "group":
        return np.repeat(scale, args["group_size"], axis=1)
    b0, b1 = args["block_structure"]
    return np.repeat(np.repeat(scale, b0, axis=0), b1, axis=1)[:rows, :cols]


def dequantize_weight(
    q: np.ndarray,
    scale: np.ndarray,
    scale_code: str,
    zero_point: np.ndarray | None,
    strategy: str,
    args: dict[str, Any],
    out_code: str | None = None,
) -> np.ndarray:
    """(q - zero_point) * scale rounded to `out_code` (default: the scale's dtype, storage of
    `scale_code`), where `q` is the float32 value of each stored weight element (see the
    module docstring)."""
    values = q if zero_point is None else q - expand(zero_point, q.shape, strategy, args)
    product = values * expand(as_float32(scale, scale_code), q.shape, strategy, args)
    return cast(product.astype(np.float32, copy=False), "F32", out_code or scale_code)


def scale_grid(shape: tuple[int, int], strategy: str, args: dict[str, Any]) -> tuple[int, ...]:
    """The shape of the scales (and zero points) of a [rows, cols] weight."""
    rows, cols = shape
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return (rows, 1)
    if strategy == "group":
        return (rows, cols // args["group_size"])
    b0, b1 = args["block_structure"]
    return (math.ceil(rows / b0), math.ceil(cols / b1))


@cache
def _small(info: TensorInfo) -> tuple[int, ...]:
    """The values of a tiny integer tensor (`weight_shape`), read once."""
    return tuple(int(x) for x in checkpoint.read_array(info).reshape(-1))


def _weight_shape(
    module: Module, packed: TensorInfo, bits: int, args: dict[str, Any]
) -> tuple[int, ...]:
    """The dense shape a `weight_shape` tensor states (16 bytes read); of a file holding only
    its header (`inspect` of a Hub repo), what the headers imply: the scales' groups of a
    group strategy, else every packed bit a value (exact when a row's bits fill its words)."""
    try:
        return _small(module.parts["weight_shape"])
    except BadInputError:
        if args["strategy"] == "group":
            return (packed.shape[0], module.parts["weight_scale"].shape[1] * args["group_size"])
        return (packed.shape[0], packed.shape[1] * 32 // bits)


def _check_args(group: str, weights: Any, fmt: str, where: Path) -> dict[str, Any]:
    if not isinstance(weights, dict):
        raise UnsupportedModelError(f"{where}: config group {group} quantises no weights")
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if fmt not in FORMATS:
        raise UnsupportedModelError(
            f"{where}: compressed-tensors format {fmt!r} (config group {group}) is not "
            f"supported (supported: {', '.join(FORMATS)})"
        )
    if strategy not in STRATEGIES:
        raise UnsupportedModelError(
            f"{where}: config group {group}: strategy {strategy!r} is not supported "
            f"(supported: {', '.join(STRATEGIES)})"
        )
    if not (kind == "float" and bits == 8 and fmt != "pack-quantized") and not (
        kind == "int" and isinstance(bits, int) and 1 <= bits <= 8
    ):
        raise UnsupportedModelError(
            f"{where}: config group {group}: {bits}-bit {kind} weights in {fmt} are not "
            "supported (float8, and int of 1 to 8 bits)"
        )
    if kind == "int" and bits != 8 and fmt != "pack-quantized":
        raise UnsupportedModelError(
            f"{where}: config group {group}: int{bits} outside pack-quantized"
        )
    if strategy == "group" and not isinstance(weights.get("group_size"), int):
        raise BadInputError(f"{where}: config group {group}: strategy group without group_size")
    if strategy == "block":
        block = weights.get("block_structure")
        if not (
            isinstance(block, list)
            and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise BadInputError(f"{where}: config group {group}: block_structure = {block!r}")
    if weights.get("actorder") == "group":
        raise UnsupportedModelError(
            f"{where}: config group {group}: actorder group (a g_idx permutation) is not supported"
        )
    return {**weights, "format": fmt}


def _scheme_of(name: str, groups: dict[str, tuple[list[str], dict[str, Any]]]) -> dict[str, Any]:
    """The config group quantising module `name`: the one whose regex target matches it,
    else the one targeting a class (e.g. "Linear": every quantised module is one)."""
    by_regex = [
        g
        for g, (targets, _) in groups.items()
        if any(t.startswith("re:") and matches(name, [t]) for t in targets)
    ]
    by_class = [
        g for g, (targets, _) in groups.items() if any(not t.startswith("re:") for t in targets)
    ]
    found = by_regex or by_class
    if len(found) != 1:
        raise BadInputError(
            f"{name}: quantised, and {'no' if not found else len(found)} config groups target it"
        )
    return groups[found[0]][1]


def _plan(module: Module, groups: dict[str, tuple[list[str], dict[str, Any]]]) -> Plan:
    args = _scheme_of(module.name, groups)
    strategy, bits, fmt = args["strategy"], args["num_bits"], args["format"]
    scale = module.parts["weight_scale"]
    if scale.dtype not in CODES.values():
        raise BadInputError(f"{scale.name}: dtype {scale.dtype}, expected F32, F16 or BF16")
    packed = fmt == "pack-quantized"
    stored = module.parts.get("weight_packed" if packed else "weight")
    if stored is None:
        raise BadInputError(
            f"{module.name}: weight_scale without its {'weight_packed' if packed else 'weight'}"
        )
    if packed:
        if stored.dtype != "I32" or "weight_shape" not in module.parts:
            raise BadInputError(f"{module.name}: weight_packed must be I32, with a weight_shape")
        shape = _weight_shape(module, stored, bits, args)
        words = math.ceil(shape[1] * bits / 32) if len(shape) == 2 else -1
        if len(shape) != 2 or stored.shape != (shape[0], words):
            raise BadInputError(
                f"{module.name}: weight_packed {list(stored.shape)} does not hold weight_shape "
                f"{list(shape)} at {bits} bits"
            )
    else:
        want = "F8_E4M3" if args["type"] == "float" else "I8"
        if stored.dtype != want or len(stored.shape) != 2:
            raise BadInputError(
                f"{stored.name}: {stored.dtype} {list(stored.shape)}, expected a 2-d {want}"
            )
        shape = stored.shape
    expected = scale_grid(shape, strategy, args)
    if strategy == "group" and shape[1] % args["group_size"]:
        raise BadInputError(
            f"{module.name}: {shape[1]} columns are not groups of {args['group_size']}"
        )
    if tuple(scale.shape) not in (expected, () if strategy == "tensor" else expected):
        raise BadInputError(
            f"{scale.name} {list(scale.shape)} does not fit weight {list(shape)} "
            f"(expected {list(expected)}: {strategy})"
        )
    zero = module.parts.get("weight_zero_point")
    scheme = f"compressed-tensors {fmt}, {args['type']}{bits}, {strategy}"
    # transformers (5.24) dequantises float8 MoE experts, the per-expert tensors its loader
    # stacks, in float32 (its own code, not compressed-tensors' decompress): so do we.
    dtype = "F32" if args["type"] == "float" and PER_EXPERT.search(module.name) else scale.dtype

    def read() -> np.ndarray:
        if packed:
            q = unpack_int32(module.read("weight_packed"), bits, shape[1]).astype(np.float32)
        elif args["type"] == "float":
            q = decode(module.read("weight"), E4M3FN)
        else:
            q = module.read("weight").astype(np.float32)
        zp = None
        if zero is not None:
            raw = module.read("weight_zero_point")
            if packed and zero.dtype == "I32" and strategy in ("group", "channel"):
                rows = scale_grid(shape, strategy, args)
                raw = unpack_int32(raw.T, bits, rows[0]).T  # packed along the rows
            zp = raw.astype(np.float32).reshape(expected)
        scales = module.read("weight_scale")
        return dequantize_weight(q, scales, scale.dtype, zp, strategy, args, dtype)

    return tuple(shape), dtype, scheme, read


def open_compressed_tensors(
    folder: Path, hf_config: dict[str, Any], check_sizes: bool = True
) -> Source:
    """A compressed-tensors checkpoint (see the module docstring)."""
    config = hf_config["quantization_config"]
    where = folder / "config.json"
    status = config.get("quantization_status")
    if status not in (None, "compressed"):
        raise UnsupportedModelError(
            f"{where}: compressed-tensors quantization_status {status!r} (reads compressed)"
        )
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if config.get(key):
            raise UnsupportedModelError(f"{where}: compressed-tensors {key} is not supported")
    raw_groups = config.get("config_groups")
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise BadInputError(f"{where}: compressed-tensors quantization_config has no config_groups")
    groups = {}
    for name, group in raw_groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("targets"), list):
            raise BadInputError(f"{where}: config group {name} has no list of targets")
        fmt = group.get("format") or config.get("format")
        groups[name] = (group["targets"], _check_args(name, group.get("weights"), fmt, where))
    ignore = config.get("ignore") or []
    return open_modules(
        folder,
        hf_config,
        check_sizes,
        quantized_by=("weight_scale",),
        companions=(
            "weight_packed",
            "weight_shape",
            "weight_zero_point",
            "input_scale",
            "input_zero_point",
        ),
        plan=partial(_plan, groups=groups),
        quantization={
            "method": "compressed-tensors",
            "format": config.get("format"),
            "config_groups": {
                name: {
                    k: args.get(k)
                    for k in (
                        "type",
                        "num_bits",
                        "strategy",
                        "group_size",
                        "block_structure",
                        "symmetric",
                        "format",
                    )
                }
                for name, (_, args) in groups.items()
            },
            "ignore": ignore,
        },
        not_converted=lambda name: matches(name, ignore),
    )
