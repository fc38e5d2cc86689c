"""The library calls the CLI makes, one per command: usable from a notebook as they are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gqa_convert.export import DEFAULT_SHARD_BYTES, load_state_dict, write_export
from gqa_convert.mapping import plan_conversion

if TYPE_CHECKING:
    from gqa_convert.model.decoder import GQATransformer


def convert(
    src: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Convert the HF checkpoint folder `src` into an export folder `out`."""
    plan = plan_conversion(src)
    return write_export(plan, out, overwrite=overwrite, shard_bytes=shard_bytes, progress=progress)


def convert_in_memory(src: str | Path) -> GQATransformer:
    """Our model built straight from an HF checkpoint folder, source dtype, nothing written."""
    from gqa_convert.model.decoder import GQATransformer

    plan = plan_conversion(src)
    return GQATransformer.from_state_dict(plan.config, load_state_dict(plan))
