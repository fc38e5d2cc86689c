"""The library calls the CLI makes, one per command: usable from a notebook as they are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gqa_convert.export import DEFAULT_SHARD_BYTES, load_state_dict, write_export
from gqa_convert.hub import resolve_source
from gqa_convert.mapping import plan_conversion

if TYPE_CHECKING:
    from gqa_convert.model.decoder import GQATransformer


def convert(
    src: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
    verify: bool = False,
    force: bool = False,
    verify_options: dict[str, Any] | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """Convert the HF checkpoint folder `src` into an export folder `out`.

    `src` may be a Hub repo id (`org/name`): fetched at `revision` into the HF cache with
    `token` (`hub.resolve_source`); the repo id and commit go into the manifest and card.

    `dtype` (float32 / float16 / bfloat16) casts; None keeps the source's dtype.
    A weight holding NaN or Inf is a BadInputError unless `allow_nonfinite`.
    Unverified unless `verify`: then parity with the HF model is checked first
    (`verify.verify_plan(plan, **verify_options)`); a failure raises ParityFailure and writes
    nothing, unless `force`, which writes and records the failed report in the manifest.
    """
    source = resolve_source(src, revision=revision, token=token)
    plan = plan_conversion(source.path)
    report = None
    if verify:
        from gqa_convert.export import check_output
        from gqa_convert.verify import ParityFailure, verify_plan

        check_output(Path(out), overwrite, (plan.src,))
        report = verify_plan(plan, allow_nonfinite=allow_nonfinite, **(verify_options or {}))
        if not report.passed and not force:
            raise ParityFailure(report)
    return write_export(
        plan,
        out,
        overwrite=overwrite,
        shard_bytes=shard_bytes,
        dtype=dtype,
        progress=progress,
        allow_nonfinite=allow_nonfinite,
        verification=report.to_dict() if report else None,
        source_id=source.repo_id,
        source_revision=source.revision,
    )


def convert_in_memory(src: str | Path, *, allow_nonfinite: bool = False) -> GQATransformer:
    """Our model built straight from an HF checkpoint folder, source dtype, nothing written."""
    from gqa_convert.model.decoder import GQATransformer

    plan = plan_conversion(src)
    state = load_state_dict(plan, allow_nonfinite=allow_nonfinite)
    return GQATransformer.from_state_dict(plan.config, state)
