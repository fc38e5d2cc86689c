"""Write a converted checkpoint folder atomically, and load one back.

An export is `config.json` (our ModelConfig, plus the source's HF config for the round trip)
and safetensors files in TransformerLens names, sharded like HF's when large. It is written
into a temporary folder beside OUT and renamed into place at the end, so OUT either does not
exist, is the previous export, or is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gqa_convert.checkpoint import (
    INDEX_NAME,
    SafetensorsWriter,
    TensorSpec,
    read_array,
    read_weights,
    shard_names,
    shard_specs,
)
from gqa_convert.config import ModelConfig, read_json
from gqa_convert.errors import OutputError
from gqa_convert.mapping import ConversionPlan, iter_arrays

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9  # HF's default max_shard_size, "5GB"


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{out.parent}: cannot create the output folder ({e.strerror})") from None
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_export(
    plan: ConversionPlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Stream `plan`'s tensors into an export folder at `out`; `progress(nbytes)` per tensor."""
    out = Path(out)
    specs = [TensorSpec(t.target, plan.sources[t.source].dtype, t.target_shape) for t in plan.tasks]
    shards = shard_specs(specs, shard_bytes)
    names = shard_names(len(shards))
    with atomic_folder(out, overwrite) as tmp:
        arrays = iter_arrays(plan)
        for name, shard in zip(names, shards, strict=True):
            writer = SafetensorsWriter(tmp / name, shard)
            for spec in shard:
                task, array = next(arrays)
                writer.write(task.target, array)
                if progress:
                    progress(spec.nbytes)
            writer.close()
        if len(shards) > 1:
            weight_map = {s.name: n for n, shard in zip(names, shards, strict=True) for s in shard}
            total = sum(s.nbytes for s in specs)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_json(tmp / INDEX_NAME, index)
        _write_json(tmp / "config.json", {**plan.config.to_dict(), "hf_config": plan.hf_config})
    log.info("wrote %s (%d tensors, %d shard(s))", out, len(specs), len(shards))
    return out


def _write_json(path: Path, data: Any) -> None:
    try:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None


def to_torch(array: np.ndarray, code: str) -> torch.Tensor:
    """A numpy array in storage dtype -> torch tensor of the real dtype (shares memory)."""
    import torch  # the plain conversion path moves bytes and never needs torch

    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if code == "BF16" else tensor


def load_state_dict(plan: ConversionPlan) -> dict[str, torch.Tensor]:
    """Convert in memory: every target tensor of `plan` as a torch tensor, source dtype."""
    return {
        task.target: to_torch(array, plan.sources[task.source].dtype)
        for task, array in iter_arrays(plan)
    }


def load_export(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an export folder written by `write_export`."""
    data = read_json(folder / "config.json")
    data.pop("hf_config", None)
    cfg = ModelConfig.from_dict(data)
    state = {
        name: to_torch(read_array(info), info.dtype) for name, info in read_weights(folder).items()
    }
    return cfg, state
