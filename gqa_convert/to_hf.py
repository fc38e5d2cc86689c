"""The round trip: an export (ours, perhaps edited) back to an HF checkpoint folder.

Each row of the family's map runs backwards: the einops layout is reversed ("(n h) m ->
n m h" becomes "n m h -> (n h) m") and the HF name comes back. Bytes are only moved, so
a conversion and its round trip give tensors bit-identical to the source's.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import einops

from gqa_convert.checkpoint import TensorSpec, read_array, read_weights, write_sharded
from gqa_convert.config import ModelConfig, from_hf, read_json
from gqa_convert.errors import BadInputError
from gqa_convert.export import (
    DEFAULT_SHARD_BYTES,
    PASSTHROUGH,
    atomic_folder,
    check_export_tensors,
    write_json,
)
from gqa_convert.mapping import axis_sizes, expected_tasks

log = logging.getLogger(__name__)


def reverse_layout(layout: str) -> str:
    left, right = layout.split("->")
    return f"{right.strip()} -> {left.strip()}"


def export_to_hf(
    converted: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write `out`, an HF checkpoint (config.json + safetensors in HF names) of `converted`."""
    converted = Path(converted)
    data = read_json(converted / "config.json")
    hf_config = data.pop("hf_config", None)
    if not isinstance(hf_config, dict):
        raise BadInputError(f"{converted / 'config.json'}: no hf_config; not a gqa-convert export")
    cfg = ModelConfig.from_dict(data)
    ours = read_weights(converted)
    check_export_tensors(converted, cfg, ours)
    if from_hf(hf_config) != cfg:
        raise BadInputError(
            f"{converted / 'config.json'}: hf_config disagrees with the model config; "
            "edit tensors, not the config"
        )
    tasks, _ = expected_tasks(cfg)
    tasks = list({t.source: t for t in reversed(tasks)}.values())[::-1]  # tied: W_E wins
    specs = [TensorSpec(t.source, ours[t.target].dtype, t.source_shape) for t in tasks]

    def arrays():
        for task in tasks:
            layout = reverse_layout(task.layout)
            array = read_array(ours[task.target])
            yield task.source, einops.rearrange(array, layout, **axis_sizes(layout, cfg))

    with atomic_folder(Path(out), overwrite, (converted,)) as tmp:
        write_sharded(tmp, specs, arrays(), shard_bytes, progress)
        write_json(tmp / "config.json", hf_config)
        for name in PASSTHROUGH:
            if (converted / name).is_file():
                shutil.copy2(converted / name, tmp / name)
    log.info("wrote HF checkpoint %s (%d tensors)", out, len(specs))
    return Path(out)
