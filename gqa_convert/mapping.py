"""Plan a conversion from headers alone, then stream tensors through it one at a time.

The plan is the strict accounting of the family's weight map against what the checkpoint
holds: every source tensor is mapped or explicitly dropped, every target is produced, every
shape matches the einops layout's sizes. All offenders go into one error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import numpy as np

from gqa_convert.checkpoint import check_finite
from gqa_convert.config import ModelConfig, from_hf
from gqa_convert.errors import BadInputError, UnsupportedModelError, listing
from gqa_convert.sources import Source, SourceTensor, open_source
from gqa_convert.weight_map import TensorTask, axis_sizes, expected_tasks, family_of

log = logging.getLogger(__name__)


class TensorAccountingError(BadInputError):
    """The checkpoint's tensors do not match the family's weight map."""


@dataclass(frozen=True)
class ConversionPlan:
    src: Path | None  # the source's path: its folder, or its .gguf file
    hf_config: dict[str, Any]  # of the dense model (no quantization_config)
    config: ModelConfig
    tasks: tuple[TensorTask, ...]
    dropped: tuple[str, ...]  # source tensors present and deliberately unused
    sources: Mapping[str, SourceTensor]  # empty for a plan built from shapes only
    source: Source | None = None  # the reader of the tensors (sources/)

    def output_dtype(self, dtype: str | None) -> str | None:
        """The export's dtype: `dtype` if given, else the source's default (a quantised
        source's compute dtype), else None: each tensor keeps its own."""
        return dtype or (self.source.default_dtype if self.source is not None else None)


def _variant(cfg: ModelConfig, source_shapes: Mapping[str, Any]) -> str | None:
    """The family's layout variant whose own sources the checkpoint holds (e.g. experts
    stacked in `experts.gate_up_proj`, transformers' in-memory layout), else None."""
    for variant in family_of(cfg).variants:
        tasks, _ = expected_tasks(cfg, variant)
        default = {t.source for t in expected_tasks(cfg)[0]}
        if any(t.source in source_shapes for t in tasks if t.source not in default):
            return variant
    return None


def extra_layer_tensors(cfg: ModelConfig, names: Iterable[str]) -> list[str]:
    """The sources of layers after the last that the family's transformers class ignores
    (`Family.extra_layers`: GLM-4.5's multi-token-prediction layer), in `names`' order."""
    prefix = family_of(cfg).extra_layers
    if prefix is None:
        return []
    pattern = re.compile(re.escape(prefix).replace(re.escape("{l}"), r"(\d+)"))
    return [n for n in names if (m := pattern.match(n)) is not None and int(m[1]) >= cfg.n_layers]


def plan_tasks(
    hf_config: dict[str, Any], source_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[ModelConfig, list[TensorTask], list[str]]:
    """Match the family's rows to the available source tensors; raise listing all problems."""
    cfg = from_hf(hf_config)
    expected, droppable = expected_tasks(cfg, _variant(cfg, source_shapes))
    dropped = [name for name in droppable if name in source_shapes]
    dropped += extra_layer_tensors(cfg, source_shapes)
    tasks, used, problems = [], set(dropped), []
    for task in expected:
        source = task.source
        if source not in source_shapes:
            problems.append(f"missing tensor {source} (needed for {task.target})")
            continue
        used.add(source)
        if tuple(source_shapes[source]) != task.source_shape:
            problems.append(
                f"tensor {source} has shape {list(source_shapes[source])}, config.json implies "
                f"{list(task.source_shape)} (layout {task.layout})"
            )
            continue
        tasks.append(task)
    for name in sorted(set(source_shapes) - used):
        problems.append(f"unexpected tensor {name} (not in the {cfg.family} weight map)")
    if problems:
        what = f"the weights do not match config.json and the {cfg.family} weight map"
        raise TensorAccountingError(listing(what, problems))
    return cfg, tasks, dropped


def plan_conversion(
    src: str | Path,
    check_sizes: bool = True,
    *,
    gguf_file: str | None = None,
    refuse: bool = True,
) -> ConversionPlan:
    """Read config.json (or a GGUF's metadata) and the tensor headers of a checkpoint; read no
    tensor. `src` is a folder or a .gguf file (`gguf_file`: which one of the folder's).

    `check_sizes=False` accepts files shorter than their headers say, and `refuse=False` a
    source whose format the gate cannot check (both for `inspect` only).
    """
    source = open_source(src, gguf_file, check_sizes=check_sizes)
    if refuse and source.refusal is not None:
        raise source.refusal
    return plan_source(source)


def plan_source(source: Source) -> ConversionPlan:
    """The plan of an opened source (see `plan_conversion`)."""
    hf_config = source.hf_config
    cfg = from_hf(hf_config)  # unsupported architectures fail before the weights are looked at
    sources = source.tensors
    cfg, tasks, dropped = plan_tasks(hf_config, {n: i.shape for n, i in sources.items()})
    odd = [t.source for t in tasks if sources[t.source].dtype not in ("F32", "F16", "BF16")]
    problems = [f"{sources[n].path.name}: {n} has dtype {sources[n].dtype}" for n in odd]
    if problems and all(sources[n].dtype.startswith("F8_") for n in odd):
        # 8-bit floats are a quantisation: without a quantization_config, of none we read
        what = "weights must be F32, F16 or BF16 (8-bit floats need a quantization_config)"
        raise UnsupportedModelError(listing(what, problems))
    if problems:
        raise BadInputError(listing("weights must be F32, F16 or BF16", problems))
    log.info("planned %d tensors from %s (%d dropped)", len(tasks), source.path, len(dropped))
    return ConversionPlan(
        source.path, hf_config, cfg, tuple(tasks), tuple(dropped), sources, source
    )


def apply_layout(task: TensorTask, tensor: Any, cfg: ModelConfig) -> Any:
    """Rearrange one numpy array or torch tensor (meta tensors included) into our layout,
    after taking the task's rows of a fused source."""
    if task.expert is not None:
        tensor = tensor[task.expert]
    if task.rows is not None:
        tensor = tensor[task.rows[0] : task.rows[1]]
    if task.interleave is not None:
        part, parts = task.interleave
        tensor = tensor[..., part::parts]
    if task.columns is not None:
        tensor = tensor[..., task.columns[0] : task.columns[1]]
    return einops.rearrange(tensor, task.layout, **axis_sizes(task.layout, cfg))


COPY_BLOCK = 16  # last-axis elements per block of `contiguous` (fastest measured, BENCHMARKS.md)


def contiguous(array: np.ndarray) -> np.ndarray:
    """`array` as a C-contiguous array; a strided last axis is copied COPY_BLOCK at a time.

    A transposed view copied in one go (`np.ascontiguousarray`) reads the source with a
    large stride for every element and runs 4-5x slower than memory allows; a few
    columns at a time keep the source rows being read in cache.
    """
    if array.ndim == 0:  # a scalar (xIELU's beta, eps): ascontiguousarray would make it [1]
        return array.copy()
    if array.ndim < 2 or array.flags.c_contiguous or array.strides[-1] == array.itemsize:
        return np.ascontiguousarray(array)
    out = np.empty(array.shape, array.dtype)
    for start in range(0, array.shape[-1], COPY_BLOCK):
        out[..., start : start + COPY_BLOCK] = array[..., start : start + COPY_BLOCK]
    return out


def iter_arrays(
    plan: ConversionPlan, *, allow_nonfinite: bool = False
) -> Iterator[tuple[TensorTask, np.ndarray]]:
    """Each target tensor as a C-contiguous numpy array in its storage dtype, one at a time.

    A source tensor holding NaN or Inf raises BadInputError unless `allow_nonfinite`.
    """
    last: tuple[str, np.ndarray] | None = None  # a stacked source serves its experts in turn
    source = array = None
    for task in plan.tasks:
        info = plan.sources[task.source]
        if last is not None and last[0] == task.source:
            source = last[1]
        else:
            # The previous source and its view go before the next read: one at a time (held
            # through the read, two stacked experts tensors were alive: 2x the largest).
            last = source = array = None
            source = plan.source.read(task.source)  # dense: dequantised if stored quantised
            if not allow_nonfinite:
                check_finite(info, source)
            last = (task.source, source) if task.expert is not None else None
        array = apply_layout(task, source, plan.config)
        yield task, contiguous(array)
