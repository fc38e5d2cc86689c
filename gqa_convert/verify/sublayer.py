"""Sub-layer streaming: a layer's big modules run in parts, each part's slices of their
weights materialised, run and released in turn (issue 28: one 405B layer is 12.8 GB fp32).

A `Split` replaces a module's `forward` (an instance attribute, so hooks on the module fire
once, on the whole call) by a loop over parts. Each part sets the module's sliced parameters
(`Piece`: which axis, in which unit), calls the module's own class `forward` on the same
arguments, releases the slices to the meta device, and folds the output into the total:

  attention     one KV head and its query heads per part (q/k/v rows, o_proj's columns;
                ours: W_Q / W_O heads, _W_K / _W_V KV heads), o_proj's outputs summed
  MLP           d_mlp in chunks (gate / up rows, down columns), the outputs summed
  unembedding   vocabulary rows in blocks, the logits concatenated
  embedding     only the rows of the tokens looked up (a copy: the same values); Gemma 4's
                per-layer input table too (its projection is held whole)

An output bias (o_proj's, down_proj's, b_O, b_out) is added by the first part only. The HF
side runs transformers' own module classes on the slices, so the reference is still its
code; slices are read from the safetensors files by a memory map (only their bytes). A
module the rule does not fit (a fused qkv_proj, a q/k norm over the whole projection;
Gemma 4's layers whose head size, KV heads or MLP width are not the model's, its k = v and
K/V-shared attention, and the dense MLP beside its experts) is held whole within the layer,
as in layer streaming.

MoE layers (`Experts`): the router and a shared expert are held with the layer, and the
routed experts are materialised, run and released one at a time. Ours: each `experts.{e}`
module reads its weights when it is called (`MoEMLP` calls only the experts it routes to).
HF's: the stacked experts module (`experts.gate_up_proj` [n_experts, ...]) has its
`forward` replaced by a loop over the experts the router chose; for each, the module holds
expert e's slice [1, ...] (`num_experts` 1) and its own class `forward` runs on the tokens
routed to e, with index 0 and weight 1 (exact: its output times 1, summed over one slot),
so the expert's arithmetic (gate / up split or interleave, biases, clamps) is
transformers'. The weighted outputs are then accumulated as its experts forward does:
transformers' default (grouped_mm, batched_mm) keeps a [tokens, top_k, d_model] product
in the weights' dtype and sums it over top_k; the eager loop index_adds each expert's
product cast to the stream's dtype, expert by expert. Llama 4's experts (a bmm over every
expert on score-scaled copies of every token) run one expert's [tokens, d_model] rows at a
time, concatenated: the same [n_experts * tokens, d_model] its MoE sums over the experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gqa_convert.checkpoint import DTYPES, TensorInfo, read_array, to_torch
from gqa_convert.memory import splits_attention, splits_mlp

Slices = dict[str, slice]  # a part: unit ("heads", "kv", "mlp", "vocab") -> its range


def read_slice(info: TensorInfo, dim: int, index: slice | Tensor) -> Tensor:
    """`tensor[..., index, ...]` (along `dim`) of a stored tensor, in its storage dtype; from
    a safetensors file only the slice's bytes are read (a memory map)."""
    where = (slice(None),) * dim + (index.numpy() if isinstance(index, Tensor) else index,)
    if info.path.suffix == ".safetensors":
        mapped = np.memmap(
            info.path, dtype=DTYPES[info.dtype][0], mode="r", offset=info.start, shape=info.shape
        )
        array = np.array(mapped[where], copy=True)  # read now, then unmapped
        del mapped
        return to_torch(array, info.dtype)
    return to_torch(read_array(info), info.dtype)[where].clone()


@dataclass(frozen=True)
class Piece:
    """One parameter of a split module: `read(index)` gives its slice along `dim` (elements
    `index` of that axis) in the compute dtype on the part's device; `dim` None: the whole
    tensor in the first part, zeros in the others (an output bias, added once)."""

    module: nn.Module
    name: str
    full: str  # the parameter's name in the model
    unit: str
    dim: int | None
    width: int  # elements of the axis per unit (d_head for HF's flattened head rows)
    read: Callable[[slice | None], Tensor]


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    module._parameters[name] = nn.Parameter(value, requires_grad=False)


class Split:
    """`module` run part by part (see the module docstring); `combine(total, out)` folds
    each part's output into the total (None before the first)."""

    def __init__(
        self,
        module: nn.Module,
        pieces: list[Piece],
        parts: list[Slices],
        combine: Callable[[Any, Any], Any],
    ):
        self.module, self.pieces, self.parts, self.combine = module, pieces, parts, combine
        self.shapes = {(id(p.module), p.name): p.module.get_parameter(p.name).shape for p in pieces}

    def names(self) -> set[str]:
        """The split parameters' names in the model."""
        return {p.full for p in self.pieces}

    def install(self) -> None:
        self.module.forward = self._run

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)
        self._release()

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        total = None
        for k, part in enumerate(self.parts):
            for piece in self.pieces:
                _set(piece.module, piece.name, self._slice(piece, part, k == 0))
            try:
                out = type(self.module).forward(self.module, *args, **kwargs)
            finally:
                self._release()
            total = self.combine(total, out)
        return total

    def _slice(self, piece: Piece, part: Slices, first: bool) -> Tensor:
        if piece.dim is None:
            whole = piece.read(None)
            return whole if first else torch.zeros_like(whole)
        units = part[piece.unit]
        return piece.read(slice(units.start * piece.width, units.stop * piece.width))

    def _release(self) -> None:
        for piece in self.pieces:
            shape = self.shapes[(id(piece.module), piece.name)]
            dtype = piece.module.get_parameter(piece.name).dtype
            _set(piece.module, piece.name, torch.empty(shape, dtype=dtype, device="meta"))


def placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor of `shape` on `device` that holds one element (stride 0): not a weight."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def is_placeholder(tensor: Tensor) -> bool:
    return tensor.numel() > 1 and all(stride == 0 for stride in tensor.stride())


class Gather(Split):
    """An embedding run on the rows of the tokens it looks up only: those rows held, the
    tokens renumbered into them (an embedding is a copy: the same values)."""

    device: torch.device | None = None

    def __init__(self, *args: Any, on_device: bool = False):
        super().__init__(*args)
        self.on_device = on_device

    def install(self) -> None:
        """`on_device` (HF's): between calls the table is a placeholder on its device (one
        element, expanded to its shape): Llama 4's forward moves the tokens to the table's
        device first. Its device is that of an empty slice read (no row read)."""
        if self.on_device:
            (piece,) = self.pieces
            self.device = piece.read(slice(0, 0)).device
        super().install()
        self._release()

    def _release(self) -> None:
        if self.device is None:
            return super()._release()
        for piece in self.pieces:
            shape = self.shapes[(id(piece.module), piece.name)]
            dtype = piece.module.get_parameter(piece.name).dtype
            _set(piece.module, piece.name, placeholder(shape, dtype, self.device))

    def _run(self, tokens: Tensor, *args: Any, **kwargs: Any) -> Any:
        rows, index = torch.unique(tokens, return_inverse=True)
        (piece,) = self.pieces
        _set(piece.module, piece.name, piece.read(rows.cpu()))
        padding = getattr(self.module, "padding_idx", None)
        if padding is not None:  # padding_idx only stops gradients; it indexes the full table
            self.module.padding_idx = None
        try:
            return type(self.module).forward(self.module, index, *args, **kwargs)
        finally:
            if padding is not None:
                self.module.padding_idx = padding
            self._release()


class Experts:
    """HF's stacked experts module run one expert at a time (see the module docstring).
    `load(e)` gives expert e's slice of each of the module's parameters ([1, ...], in the
    compute dtype); `names` are their full names in the model."""

    def __init__(
        self, module: nn.Module, names: set[str], load: Callable[[int], dict[str, Tensor]]
    ):
        self.module, self.full_names, self.load = module, names, load
        self.shapes = {n: p.shape for n, p in module.named_parameters(recurse=False)}
        self.dtypes = {n: p.dtype for n, p in module.named_parameters(recurse=False)}
        self.n_experts = next(iter(self.shapes.values()))[0]

    def names(self) -> set[str]:
        return self.full_names

    def install(self) -> None:
        self.module.forward = self._run

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)
        self._release()

    def _release(self) -> None:
        for name, shape in self.shapes.items():
            _set(self.module, name, torch.empty(shape, dtype=self.dtypes[name], device="meta"))

    def _expert(self, e: int, *args: Any) -> Tensor:
        """The module's own forward with only expert e held, as expert 0 of 1."""
        for name, value in self.load(e).items():
            _set(self.module, name, value)
        count = getattr(self.module, "num_experts", None)
        if count is not None:
            self.module.num_experts = 1
        try:
            return type(self.module).forward(self.module, *args)
        finally:
            if count is not None:
                self.module.num_experts = count
            self._release()

    def _run(self, hidden: Tensor, index: Tensor | None = None, weights: Tensor | None = None):
        if index is None:  # Llama 4: rows [n_experts * tokens, d_model], expert-major
            rows = hidden.view(self.n_experts, -1, hidden.shape[-1])
            return torch.cat([self._expert(e, rows[e]) for e in range(self.n_experts)])
        eager = getattr(getattr(self.module, "config", None), "_experts_implementation", None)
        eager = eager in (None, "eager")
        dtype = torch.result_type(hidden, weights)
        if eager:  # the module's own loop: each expert's product cast, then index_add_
            out = torch.zeros_like(hidden)
        else:  # [tokens, top_k, d_model], summed over top_k at the end
            out = hidden.new_zeros((*index.shape, hidden.shape[-1]), dtype=dtype)
        for e in index.unique().tolist():
            token, slot = torch.where(index == e)
            first = torch.zeros((len(token), 1), dtype=index.dtype, device=index.device)
            one = torch.ones((len(token), 1), dtype=weights.dtype, device=weights.device)
            product = self._expert(e, hidden[token], first, one) * weights[token, slot, None]
            if eager:
                out.index_add_(0, token, product.to(out.dtype))
            else:
                out[token, slot] = product.to(dtype)
        return out if eager else out.sum(1).to(hidden.dtype)


def add(total: Any, out: Any) -> Any:
    """Sum of the parts' outputs (a tuple's first item; the rest, attention weights, None)."""
    first = out[0] if isinstance(out, tuple) else out
    if total is not None:
        first = (total[0] if isinstance(total, tuple) else total) + first
    return (first, *(None for _ in out[1:])) if isinstance(out, tuple) else first


def concatenate(total: Tensor | None, out: Tensor) -> Tensor:
    """The parts' outputs side by side (logits of vocabulary blocks)."""
    return out if total is None else torch.cat([total, out], dim=-1)


def parts_of(cfg: Any, part_elements: int) -> dict[str, list[Slices]]:
    """The parts of each kind of split module: one KV head (with its query heads) per
    attention part; d_mlp and the vocabulary in chunks of about `part_elements` weights."""
    group = cfg.n_heads // cfg.n_key_value_heads
    attention = [
        {"heads": slice(g * group, (g + 1) * group), "kv": slice(g, g + 1)}
        for g in range(cfg.n_key_value_heads)
    ]

    def chunks(unit: str, size: int, per_row: int) -> list[Slices]:
        step = max(1, part_elements // per_row)
        return [{unit: slice(a, min(a + step, size))} for a in range(0, size, step)]

    return {
        "attention": attention,
        "mlp": chunks("mlp", cfg.d_mlp, 3 * cfg.d_model),
        "vocab": chunks("vocab", cfg.d_vocab, cfg.d_model),
    }


def ours_splits(
    cfg: Any,
    part: Any,
    modules: dict[str, nn.Module],
    read: Callable[[str, int | None, slice | Tensor | None], Tensor],
    part_elements: int,
) -> list[Split]:
    """The Splits of our part (`modules`: ours' name -> module); `read(full name, dim,
    index)` gives a slice of one of our tensors in the compute dtype."""
    parts = parts_of(cfg, part_elements)

    def pieces(prefix: str, module: nn.Module, rows: list[tuple[str, str, int | None]]):
        return [
            Piece(
                module, name, f"{prefix}{name}", unit, dim, 1, _reader(read, f"{prefix}{name}", dim)
            )
            for name, unit, dim in rows
            if module._parameters.get(name) is not None
        ]

    if part == "embed":  # each table (Gemma 4: also the per-layer inputs'), by token rows
        return [
            Gather(module, pieces(f"{prefix}.", module, [("W_E", "vocab", 0)]), [], add)
            for prefix, module in modules.items()
        ]
    if part == "final":
        unembed = modules["unembed"]
        rows = [("W_U", "vocab", 1), ("b_U", "vocab", 0)]
        return [Split(unembed, pieces("unembed.", unembed, rows), parts["vocab"], concatenate)]
    ((prefix, block),) = modules.items()
    splits = []
    if splits_attention(cfg, part):
        heads = [("W_Q", "heads", 0), ("b_Q", "heads", 0), ("W_O", "heads", 0)]
        heads += [("sinks", "heads", 0), ("b_O", "heads", None)]
        kv = [(name, "kv", 0) for name in ("_W_K", "_b_K", "_W_V", "_b_V")]
        attn = pieces(f"{prefix}.attn.", block.attn, heads + kv)
        splits.append(Split(block.attn, attn, parts["attention"], add))
    for e, expert in enumerate(getattr(block.mlp, "experts", None) or ()):  # MoE: one at a time
        rows = [(name, "expert", None) for name in ("W_gate", "W_in", "W_out", "b_gate", "b_in")]
        held = pieces(f"{prefix}.mlp.experts.{e}.", expert, [*rows, ("b_out", "expert", None)])
        splits.append(Split(expert, held, [{}], lambda total, out: out))
    # Gemma 4's MoE layers: the dense MLP beside the experts is held whole (on both sides)
    dense, name = block.mlp, "mlp"
    if splits_mlp(cfg, part) and hasattr(dense, "W_in") and not hasattr(dense, "experts"):
        rows = [("W_gate", "mlp", 1), ("W_in", "mlp", 1), ("W_out", "mlp", 0)]
        rows += [("b_gate", "mlp", 0), ("b_in", "mlp", 0), ("b_out", "mlp", None)]
        mlp = pieces(f"{prefix}.{name}.", dense, rows)
        splits.append(Split(dense, mlp, parts["mlp"], add))
    return splits


def hf_splits(
    cfg: Any,
    part: Any,
    modules: dict[str, nn.Module],
    read: Callable[[str, int | None, slice | Tensor | None], Tensor] | None,
    part_elements: int,
    sliceable: Callable[[str], bool],
    experts: Callable[[str, nn.Module], Callable[[int], dict[str, Tensor]] | None] | None = None,
) -> list[Split | Experts]:
    """The Splits of HF's part (`modules`: HF name -> module), for parameters the loader reads
    as stored (`sliceable(full name)`): `read(full name, dim, index)` as for ours.
    `experts(prefix, module)` gives a stacked experts module's `Experts.load` (None: it is
    held whole)."""
    parts = parts_of(cfg, part_elements)

    def pieces(rows: list[tuple[nn.Module | None, str, str, int | None, int]]):
        found = []
        for module, name, unit, dim, width in rows:
            if module is None or not isinstance(module._parameters.get(name), Tensor):
                continue
            full = f"{_path(modules, module)}{name}"
            if not sliceable(full):
                return None
            found.append(Piece(module, name, full, unit, dim, width, _reader(read, full, dim)))
        return found

    if part == "embed":  # each table (Gemma 4: also the per-layer inputs'), by token rows
        tables = [m for m in modules.values() if isinstance(m, nn.Embedding)]
        found = [(m, pieces([(m, "weight", "vocab", 0, 1)])) for m in tables]
        return [Gather(m, rows, [], add, on_device=True) for m, rows in found if rows]
    if part == "final":
        head = modules["lm_head"]
        found = pieces([(head, "weight", "vocab", 0, 1), (head, "bias", "vocab", 0, 1)])
        return [Split(head, found, parts["vocab"], concatenate)] if found else []
    (layer,) = modules.values()
    splits = []
    attn, d = layer.self_attn, cfg.d_head
    projections = [getattr(attn, f"{n}_proj", None) for n in ("q", "k", "v", "o")]
    if splits_attention(cfg, part) and all(isinstance(p, nn.Linear) for p in projections):
        q, k, v, o = projections
        rows = [(q, "weight", "heads", 0, d), (q, "bias", "heads", 0, d)]
        rows += [(m, n, "kv", 0, d) for m in (k, v) for n in ("weight", "bias")]
        rows += [(o, "weight", "heads", 1, d), (o, "bias", "heads", None, d)]
        rows += [(attn, "sinks", "heads", 0, 1)]
        found = pieces(rows)
        if found:
            splits.append(Split(attn, found, parts["attention"], add))
    mlp = getattr(layer, "mlp", None)
    gate, up, down = (getattr(mlp, f"{n}_proj", None) for n in ("gate", "up", "down"))
    beside_experts = hasattr(layer, "experts")  # Gemma 4's MoE layers: held whole, as ours
    if (
        splits_mlp(cfg, part)
        and not beside_experts
        and isinstance(up, nn.Linear)
        and isinstance(down, nn.Linear)
    ):
        rows = [(m, n, "mlp", 0, 1) for m in (gate, up) for n in ("weight", "bias")]
        rows += [(down, "weight", "mlp", 1, 1), (down, "bias", "mlp", None, 1)]
        found = pieces(rows)
        if found:
            splits.append(Split(mlp, found, parts["mlp"], add))
    for module in layer.modules():
        stacked = [p for p in module._parameters.values() if p is not None and p.dim() == 3]
        if experts is None or not stacked or type(module).forward is nn.Module.forward:
            continue
        prefix = _path(modules, module)
        load = experts(prefix, module) if prefix.endswith("experts.") else None
        if load is not None:
            names = {f"{prefix}{n}" for n, p in module._parameters.items() if p is not None}
            splits.append(Experts(module, names, load))
    return splits


def _path(modules: dict[str, nn.Module], module: nn.Module) -> str:
    """`module`'s name under the part's modules, with its trailing dot."""
    for prefix, root in modules.items():
        for name, sub in root.named_modules():
            if sub is module:
                return f"{prefix}.{name}." if name else f"{prefix}."
    raise KeyError(module)


def _reader(read: Callable, full: str, dim: int | None) -> Callable[[Any], Tensor]:
    return lambda index: read(full, dim, index)
