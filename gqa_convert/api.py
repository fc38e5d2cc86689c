"""The library calls the CLI makes, one per command: usable from a notebook as they are."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gqa_convert.export import (
    DEFAULT_SHARD_BYTES,
    atomic_folder,
    hashing_sources,
    load_state_dict,
    write_files,
    write_provenance,
)
from gqa_convert.hub import resolve_source
from gqa_convert.mapping import plan_conversion

if TYPE_CHECKING:
    from gqa_convert.hub import ResolvedSource
    from gqa_convert.mapping import ConversionPlan
    from gqa_convert.model.decoder import GQATransformer
    from gqa_convert.verify import VerifyReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Converted:
    """What `convert_plan` did: the export folder and the parity report of its files."""

    out: Path
    report: VerifyReport | None  # None: verification was skipped


def convert(
    src: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
    verify: bool = True,
    force: bool = False,
    verify_options: dict[str, Any] | None = None,
    revision: str | None = None,
    token: str | None = None,
    gguf_file: str | None = None,
) -> Path:
    """Convert the HF checkpoint folder `src` into an export folder `out`, gated by logit
    parity with the HF model, as `gqa-convert convert` does (`convert_plan`).

    `src` may be a Hub repo id (`org/name`): fetched at `revision` into the HF cache with
    `token` (`hub.resolve_source`); the repo id and commit go into the manifest and card.
    It may be quantised (`sources/`), or a .gguf file (`gguf_file`: which one of the folder
    or repo); the export is dense, in `dtype` or the source's compute dtype.
    A parity failure raises ParityFailure and leaves nothing at `out`; `force=True` writes
    anyway (recorded as failed-forced), `verify=False` skips the check (recorded as skipped).
    """
    source = resolve_source(src, revision=revision, token=token, gguf_file=gguf_file)
    plan = plan_conversion(source.path, gguf_file=gguf_file)
    done = convert_plan(
        plan,
        out,
        source=source,
        overwrite=overwrite,
        shard_bytes=shard_bytes,
        dtype=dtype,
        progress=progress,
        allow_nonfinite=allow_nonfinite,
        verify=verify,
        force=force,
        verify_options=verify_options,
    )
    return done.out


def convert_plan(
    plan: ConversionPlan,
    out: str | Path,
    *,
    source: ResolvedSource | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
    verify: bool = True,
    force: bool = False,
    verify_options: dict[str, Any] | None = None,
    on_verify: Callable[[], None] | None = None,
    on_report: Callable[[VerifyReport], None] | None = None,
) -> Converted:
    """The conversion, one straight line: write the export into a temporary folder beside
    `out`, verify THOSE files against the source (`verify.verify(plan.src, folder,
    **verify_options)`), write the manifest and card with the report, fsync, and rename into
    place (`export.atomic_folder`). The gate checks the bytes that are shipped.

    A failed check raises ParityFailure and removes the temporary folder, unless `force`.
    `verify_options` are `verify.verify`'s keywords; its `dtype` defaults to
    `verify_dtype(dtype)`. `source` (from `hub.resolve_source`) names a Hub source in the
    provenance. `progress(nbytes)` is called per tensor written, `on_verify()` when the check
    starts, `on_report(report)` when it ends, before the commit or the failure.
    """
    options = {
        "dtype": verify_dtype(plan.output_dtype(dtype)),
        "plan": plan,
        **(verify_options or {}),
    }
    with atomic_folder(Path(out), overwrite, (plan.src,)) as tmp, hashing_sources(plan) as hashes:
        written = write_files(
            plan,
            tmp,
            shard_bytes=shard_bytes,
            dtype=dtype,
            progress=progress,
            allow_nonfinite=allow_nonfinite,
        )
        report = None
        if verify:
            from gqa_convert.verify import ParityFailure
            from gqa_convert.verify import verify as check  # torch + transformers: seconds

            if on_verify:
                on_verify()
            report = check(plan.src, tmp, **options)
            if on_report:
                on_report(report)
            if not report.passed and not force:
                raise ParityFailure(report)  # atomic_folder removes the temporary folder
        write_provenance(
            plan,
            tmp,
            written,
            hashes.result(),
            dtype=dtype,
            verification=report.to_dict() if report else None,
            source_id=source.repo_id if source else None,
            source_revision=source.revision if source else None,
        )
    log.info("wrote %s (%d tensors)", out, len(plan.tasks))
    return Converted(Path(out), report)


def verify_dtype(export_dtype: str | None) -> str:
    """The compute dtype that checks an export: float32, unless the export is cast to
    float16 / bfloat16 (float32 cannot pass those bytes; that dtype, with its tolerances, can)."""
    return export_dtype if export_dtype in ("float16", "bfloat16") else "float32"


def convert_in_memory(
    src: str | Path, *, allow_nonfinite: bool = False, gguf_file: str | None = None
) -> GQATransformer:
    """Our model built straight from an HF checkpoint folder (or .gguf file), in the source's
    dtype (a quantised source: dequantised, in the dtype of its dequantisation), nothing
    written."""
    from gqa_convert.model.decoder import GQATransformer

    plan = plan_conversion(src, gguf_file=gguf_file)
    state = load_state_dict(plan, allow_nonfinite=allow_nonfinite)
    return GQATransformer.from_state_dict(plan.config, state)
