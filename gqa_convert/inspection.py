"""`gqa-convert inspect`: what a checkpoint is, from config.json and safetensors headers only.

No tensor byte is read: a checkpoint still downloading, or one whose data is damaged, can be
inspected as long as its headers are intact (damage shows up under `problems`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from gqa_convert.checkpoint import DTYPES
from gqa_convert.mapping import ConversionPlan, plan_conversion
from gqa_convert.memory import estimate

# Rough fixed costs of the processes, measured on this project's machines (see README).
CONVERT_BASE_BYTES = 150 * 2**20  # python + numpy + our code, no torch


def inspect_checkpoint(src: str | Path, *, verify_tokens: int = 256) -> dict[str, Any]:
    """A JSON-ready description of the HF checkpoint folder `src`."""
    plan = plan_conversion(src, check_sizes=False)
    cfg = plan.config
    infos = list(plan.sources.values())
    n_params = sum(_numel(i.shape) for i in infos)
    total_bytes = sum(i.nbytes for i in infos)
    files: dict[str, dict[str, Any]] = {}
    ends: dict[Path, int] = {}
    for info in infos:
        entry = files.setdefault(info.path.name, {"bytes": info.path.stat().st_size, "tensors": 0})
        entry["tensors"] += 1
        ends[info.path] = max(ends.get(info.path, 0), info.end)
    truncated = {
        path.name: {"bytes": path.stat().st_size, "header_says": end}
        for path, end in ends.items()
        if path.stat().st_size < end
    }
    largest = max(i.nbytes for i in infos)
    # Convert, an upper bound: one source tensor and its rearranged copy at a time, up to two
    # written tensors waiting for the background sha256, or an fp32 temporary to cast.
    convert_peak = CONVERT_BASE_BYTES + 2 * largest + 2 * largest
    # Verify (float32, SRC converted in memory): whole-model and layer-streamed (memory.py).
    storage = max(DTYPES[i.dtype][0].itemsize for i in infos)
    need = estimate(cfg, dtype="float32", storage_bytes=storage, tokens=verify_tokens)
    return {
        "source": str(Path(src)),
        "architecture": cfg.architecture,
        "family": cfg.family,
        "parameters": n_params,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads,
        "group_size": cfg.group_size,
        "head_to_kv_head": [h // cfg.group_size for h in range(cfg.n_heads)],
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "rope": {k: v for k, v in vars(cfg.rope).items() if v is not None},
        "sliding_window": cfg.sliding_window,
        "local_attention_layers": [i for i, t in enumerate(cfg.attn_types) if t == "local"],
        "tied_embeddings": cfg.tie_word_embeddings,
        "qkv_bias": cfg.qkv_bias,
        "dtypes": dict(Counter(DTYPES[i.dtype][1] for i in infos)),
        "tensor_bytes": total_bytes,
        "files": files,
        "dropped_tensors": list(plan.dropped),
        "truncated_files": truncated,  # shorter than their headers say: convert refuses them
        "estimated_peak_memory_bytes": {
            "convert": convert_peak,
            "verify": need.whole,  # whole-model
            "verify_streamed": need.streamed,
        },
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_table(plan: ConversionPlan, dtype: str | None = None) -> list[dict[str, Any]]:
    """The conversion plan, one row per target tensor: what `convert --dry-run` prints."""
    rows = []
    for task in plan.tasks:
        info = plan.sources[task.source]
        rows.append(
            {
                "target": task.target,
                "shape": list(task.target_shape),
                "dtype": dtype or DTYPES[info.dtype][1],
                "source": task.source,
                "source_shape": list(task.source_shape),
                "layout": task.layout,
                "shard": info.path.name,
            }
        )
    return rows
