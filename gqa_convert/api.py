"""The library calls the CLI makes, one per command: usable from a notebook as they are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gqa_convert.export import DEFAULT_SHARD_BYTES, load_state_dict, write_export
from gqa_convert.hub import resolve_source
from gqa_convert.mapping import plan_conversion

if TYPE_CHECKING:
    from gqa_convert.hub import ResolvedSource
    from gqa_convert.mapping import ConversionPlan
    from gqa_convert.model.decoder import GQATransformer
    from gqa_convert.verify import VerifyReport


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
        from gqa_convert.verify import ParityFailure

        options = verify_options or {}
        report = check_parity(
            plan, out, overwrite=overwrite, allow_nonfinite=allow_nonfinite, **options
        )
        if not report.passed and not force:
            raise ParityFailure(report)
    return write_converted(
        plan,
        source,
        out,
        report,
        overwrite=overwrite,
        shard_bytes=shard_bytes,
        dtype=dtype,
        progress=progress,
        allow_nonfinite=allow_nonfinite,
    )


def check_parity(
    plan: ConversionPlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    **verify_options: Any,
) -> VerifyReport:
    """The gate's check: that `out` can be written (seconds, so not after minutes of
    verification), then `verify.verify_plan(plan, **verify_options)`."""
    from gqa_convert.export import check_output

    check_output(Path(out), overwrite, (plan.src,))
    from gqa_convert.verify import verify_plan  # torch + transformers: seconds, so after

    return verify_plan(plan, allow_nonfinite=allow_nonfinite, **verify_options)


def write_converted(
    plan: ConversionPlan,
    source: ResolvedSource,
    out: str | Path,
    report: VerifyReport | None,
    **export_options: Any,
) -> Path:
    """`write_export` of `plan` with its provenance: the source's Hub id and commit, and the
    parity report (None: verification was skipped)."""
    return write_export(
        plan,
        out,
        verification=report.to_dict() if report else None,
        source_id=source.repo_id,
        source_revision=source.revision,
        **export_options,
    )


def convert_in_memory(src: str | Path, *, allow_nonfinite: bool = False) -> GQATransformer:
    """Our model built straight from an HF checkpoint folder, source dtype, nothing written."""
    from gqa_convert.model.decoder import GQATransformer

    plan = plan_conversion(src)
    state = load_state_dict(plan, allow_nonfinite=allow_nonfinite)
    return GQATransformer.from_state_dict(plan.config, state)
