"""Plan a conversion from headers alone, then stream tensors through it one at a time.

The plan is the strict accounting of the family's weight map against what the checkpoint
holds: every source tensor is mapped or explicitly dropped, every target is produced, every
shape matches the einops layout's sizes. All offenders go into one error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import numpy as np

from gqa_convert.architectures import Family, families
from gqa_convert.checkpoint import TensorInfo, read_array, read_weights
from gqa_convert.config import ModelConfig, from_hf, read_json
from gqa_convert.errors import BadInputError

log = logging.getLogger(__name__)

# Axis letters of the layouts in configs/*.toml -> the config field giving their size.
AXES = {
    "m": "d_model",
    "v": "d_vocab",
    "f": "d_mlp",
    "h": "d_head",
    "n": "n_heads",
    "k": "n_key_value_heads",
}


class TensorAccountingError(BadInputError):
    """The checkpoint's tensors do not match the family's weight map."""


@dataclass(frozen=True)
class TensorTask:
    """One target tensor: which source it comes from and how its axes move."""

    target: str
    source: str
    layout: str  # einops pattern
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]


@dataclass(frozen=True)
class ConversionPlan:
    src: Path | None
    hf_config: dict[str, Any]
    config: ModelConfig
    tasks: tuple[TensorTask, ...]
    dropped: tuple[str, ...]  # source tensors present and deliberately unused
    sources: Mapping[str, TensorInfo]  # empty for a plan built from shapes only


def layout_shapes(layout: str, cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The source and target shapes an einops layout implies, e.g. "(n h) m -> n m h"."""

    def side(text: str) -> tuple[int, ...]:
        groups = re.findall(r"\(([^)]*)\)|(\w)", text)
        return tuple(
            int(np.prod([getattr(cfg, AXES[a]) for a in (group or single).split()]))
            for group, single in groups
        )

    left, right = layout.split("->")
    return side(left), side(right)


def _family(cfg: ModelConfig) -> Family:
    return next(f for f in families() if f.name == cfg.family)


def plan_tasks(
    hf_config: dict[str, Any], source_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[ModelConfig, list[TensorTask], list[str]]:
    """Match the family's rows to the available source tensors; raise listing all problems."""
    cfg = from_hf(hf_config)
    flags = {
        "qkv_bias": cfg.qkv_bias,
        "o_bias": cfg.o_bias,
        "tied": cfg.tie_word_embeddings,
        "untied": not cfg.tie_word_embeddings,
    }
    tasks, dropped, used, problems = [], [], set(), []
    for row in _family(cfg).rows:
        if row.when and not flags[row.when]:
            continue
        for layer in range(cfg.n_layers) if row.per_layer else [None]:
            source = row.source.replace("{l}", str(layer))
            if row.drop:
                if source in source_shapes:
                    dropped.append(source)
                    used.add(source)
                continue
            target = row.target.replace("{l}", str(layer))
            src_shape, dst_shape = layout_shapes(row.layout, cfg)
            if source not in source_shapes:
                problems.append(f"missing tensor {source} (needed for {target})")
                continue
            used.add(source)
            if tuple(source_shapes[source]) != src_shape:
                problems.append(
                    f"tensor {source} has shape {list(source_shapes[source])}, config.json implies "
                    f"{list(src_shape)} (layout {row.layout})"
                )
                continue
            tasks.append(TensorTask(target, source, row.layout, src_shape, dst_shape))
    for name in sorted(set(source_shapes) - used):
        problems.append(f"unexpected tensor {name} (not in the {cfg.family} weight map)")
    if problems:
        raise TensorAccountingError(
            f"{len(problems)} tensor problem(s) for {cfg.architecture}:\n  " + "\n  ".join(problems)
        )
    return cfg, tasks, dropped


def plan_conversion(src: str | Path) -> ConversionPlan:
    """Read config.json and safetensors headers of an HF checkpoint folder; read no tensor."""
    src = Path(src)
    if not src.is_dir():
        raise BadInputError(f"{src}: not a folder")
    hf_config = read_json(src / "config.json")
    cfg = from_hf(hf_config)  # unsupported architectures fail before the weights are looked at
    sources = read_weights(src)
    cfg, tasks, dropped = plan_tasks(hf_config, {n: i.shape for n, i in sources.items()})
    problems = [
        f"{sources[t.source].path.name}: {t.source} has dtype {sources[t.source].dtype}"
        for t in tasks
        if sources[t.source].dtype not in ("F32", "F16", "BF16")
    ]
    if problems:
        raise BadInputError("non-float weights:\n  " + "\n  ".join(problems))
    log.info("planned %d tensors from %s (%d dropped)", len(tasks), src, len(dropped))
    return ConversionPlan(src, hf_config, cfg, tuple(tasks), tuple(dropped), sources)


def axis_sizes(layout: str, cfg: ModelConfig) -> dict[str, int]:
    """The sizes einops needs to split grouped axes, for the letters `layout` uses."""
    return {a: getattr(cfg, field) for a, field in AXES.items() if re.search(rf"\b{a}\b", layout)}


def apply_layout(task: TensorTask, tensor: Any, cfg: ModelConfig) -> Any:
    """Rearrange one numpy array or torch tensor (meta tensors included) into our layout."""
    return einops.rearrange(tensor, task.layout, **axis_sizes(task.layout, cfg))


def iter_arrays(plan: ConversionPlan) -> Iterator[tuple[TensorTask, np.ndarray]]:
    """Each target tensor as a C-contiguous numpy array in its storage dtype, one at a time."""
    for task in plan.tasks:
        array = apply_layout(task, read_array(plan.sources[task.source]), plan.config)
        yield task, np.ascontiguousarray(array)
