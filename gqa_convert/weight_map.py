"""A family's weight map expanded for one config: each target tensor, the source tensor it
comes from and how its axes move (configs/*.toml's rows, with layers, experts and the
config's flags filled in). Shapes and names only: it reads no file, so the readers in
sources/ (GGUF's names) and the conversion in mapping.py both build on it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from gqa_convert.architectures import ATTN_KINDS, MLP_KINDS, Family, TensorRow, families
from gqa_convert.config import ModelConfig

# Axis letters of the layouts in configs/*.toml -> the config field giving their size.
AXES = {
    "m": "d_model",
    "v": "d_vocab",
    "f": "d_mlp",
    "h": "d_head",
    "n": "n_heads",
    "k": "n_key_value_heads",
    "e": "n_experts",
    "i": "d_expert",
    "s": "d_shared_expert",
    "g": "d_head_global",  # Gemma 4's global layers
    "j": "n_key_value_heads_global",
    "l": "n_layers",  # Gemma 4's per-layer inputs, stacked
    "p": "d_per_layer_input",
    "u": "d_vocab_per_layer",
    "d": "d_mlp_shared_kv",  # Gemma 4's K/V-shared layers' MLP width
}


@dataclass(frozen=True)
class TensorTask:
    """One target tensor: which source it comes from and how its axes move."""

    target: str
    source: str
    layout: str  # einops pattern
    source_shape: tuple[int, ...]  # the whole source tensor's, fused or not
    target_shape: tuple[int, ...]
    rows: tuple[int, int] | None = None  # [start, stop) of a fused source's first axis
    expert: int | None = None  # a stacked source's index on its first axis, taken first
    # (part, parts): an interleaved fused source's last axis, `[..., part::parts]`
    interleave: tuple[int, int] | None = None
    columns: tuple[int, int] | None = None  # [start, stop) of a fused source's last axis


def layout_shapes(layout: str, cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The source and target shapes an einops layout implies, e.g. "(n h) m -> n m h"."""

    def side(text: str) -> tuple[int, ...]:
        groups = re.findall(r"\(([^)]*)\)|(\w)", text)
        return tuple(_axis_group_size(group or single, cfg) for group, single in groups)

    left, right = layout.split("->")
    return side(left), side(right)


def _axis_group_size(group: str, cfg: ModelConfig) -> int:
    """The size of one axis group of a layout, e.g. "(k h)" -> n_key_value_heads * d_head;
    a digit is an axis of that size (xIELU's [1] parameters: "1 -> 1")."""
    return int(
        np.prod(
            [int(a) if a.isdigit() else getattr(cfg, AXES[a]) for a in group.strip("() ").split()]
        )
    )


def family_of(cfg: ModelConfig) -> Family:
    return next(f for f in families() if f.name == cfg.family)


def expected_tasks(
    cfg: ModelConfig, variant: str | None = None
) -> tuple[list[TensorTask], list[str]]:
    """Every target tensor the family's map yields for `cfg` (its default rows, or those of
    `variant` where it has them), and the droppable sources."""
    flags = {
        "qkv_bias": cfg.qkv_bias,
        "o_bias": cfg.o_bias,
        "mlp_bias": cfg.mlp_bias,
        "norm_bias": cfg.norm_bias,
        "qk_norm": cfg.qk_norm is not None,
        "xielu": cfg.act_fn == "xielu",
        "tied": cfg.tie_word_embeddings,
        "untied": not cfg.tie_word_embeddings,
        "shared_expert": cfg.has_shared_expert,
        "per_layer_input": cfg.d_per_layer_input > 0,
    }
    tasks, droppable = [], []
    for row in family_of(cfg).rows_for(variant):
        if not all(flags.get(w, True) for w in row.when):
            continue
        for layer, expert in _instances(row, cfg):
            source = row.source.replace("{l}", str(layer)).replace("{e}", str(expert))
            if row.drop:
                droppable.append(source)
                continue
            target = row.target.replace("{l}", str(layer)).replace("{e}", str(expert))
            src_shape, dst_shape = layout_shapes(row.layout, cfg)
            rows = interleave = columns = None
            if row.fused and row.interleaved:  # every len(fused)-th of the last axis
                sizes = [_axis_group_size(group, cfg) for group in row.fused]
                interleave = (row.part, len(sizes))
                src_shape = (*src_shape[:-1], sum(sizes))
            elif row.fused and row.last_axis:  # a slice of the last axis
                sizes = [_axis_group_size(group, cfg) for group in row.fused]
                start = sum(sizes[: row.part])
                columns = (start, start + sizes[row.part])
                src_shape = (*src_shape[:-1], sum(sizes))
            elif row.fused:  # a slice of the source's first axis, e.g. k of qkv_proj
                sizes = [_axis_group_size(group, cfg) for group in row.fused]
                start = sum(sizes[: row.part])
                rows = (start, start + sizes[row.part])
                src_shape = (sum(sizes), *src_shape[1:])
            if row.expert_axis:  # [n_experts, ...]: expert {e}'s slice
                src_shape = (cfg.n_experts, *src_shape)
            task = TensorTask(
                target, source, row.layout, src_shape, dst_shape, rows, interleave=interleave
            )
            task = replace(task, columns=columns) if columns else task
            tasks.append(replace(task, expert=expert) if row.expert_axis else task)
    return tasks, droppable


def _instances(row: TensorRow, cfg: ModelConfig) -> Iterator[tuple[int | None, int | None]]:
    """(layer, expert) for each tensor a row names: every layer (those whose MLP is of the
    row's kind, for `when` dense / ungated / moe), and every expert of the layer for `{e}`
    rows."""
    kinds = [w for w in row.when if w in MLP_KINDS]
    attn = [w for w in row.when if w in ATTN_KINDS]
    for layer in range(cfg.n_layers) if row.per_layer else [None]:
        if kinds and mlp_kind(cfg, layer) not in kinds:
            continue
        if attn and not set(attn) <= attn_kinds(cfg, layer):
            continue
        for expert in range(cfg.n_experts) if row.per_expert or row.expert_axis else [None]:
            yield layer, expert


def mlp_kind(cfg: ModelConfig, layer: int) -> str:
    """The kind of a layer's MLP: "moe", "dense" (gated) or "ungated"."""
    if cfg.is_moe_layer(layer):
        return "moe"
    return "dense" if cfg.gated_mlp else "ungated"


def attn_kinds(cfg: ModelConfig, layer: int) -> set[str]:
    """What a layer's attention is: its type ("local" / "global"), and "own_kv" (its own
    K projection), "own_v" (and V's: not k = v), or "shared_kv" (Gemma 4's)."""
    kinds = {cfg.attn_types[layer]}
    if cfg.kv_source(layer) is not None:
        return kinds | {"shared_kv"}
    return kinds | {"own_kv"} | ({"own_v"} if cfg.has_w_v(layer) else set())


def axis_sizes(layout: str, cfg: ModelConfig) -> dict[str, int]:
    """The sizes einops needs to split grouped axes, for the letters `layout` uses."""
    return {a: getattr(cfg, field) for a, field in AXES.items() if re.search(rf"\b{a}\b", layout)}
