"""Write a converted checkpoint folder atomically, and load one back.

An export is `config.json` (our ModelConfig, plus the source's HF config for the round trip)
and safetensors files in TransformerLens names, sharded like HF's when large. It is written
into a temporary folder beside OUT and renamed into place at the end, so OUT either does not
exist, is the previous export, or is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gqa_convert import __version__
from gqa_convert.card import render_model_card
from gqa_convert.checkpoint import (
    DTYPES,
    TensorInfo,
    TensorSpec,
    find_index,
    read_array,
    read_weights,
    sha256_file,
    write_sharded,
)
from gqa_convert.config import ModelConfig, read_json
from gqa_convert.dtypes import CODES, cast
from gqa_convert.errors import BadInputError, OutputError, listing
from gqa_convert.mapping import ConversionPlan, expected_tasks, iter_arrays

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9  # HF's default max_shard_size, "5GB"


# `.{OUT}.tmp-{pid}` (being written) and `.{OUT}.old-{pid}` (the export being replaced).
WORK_FOLDER = re.compile(r"\.(?P<out>.+)\.(?:tmp|old)-(?P<pid>\d+)")


def check_output(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Raise OutputError if `out` cannot be written: it exists (and not `overwrite`), or a
    file stands where a parent folder must be. Cheap: run it before long work (verification).

    `--overwrite` replaces only what we could have written (a folder with a config.json, or
    an empty one), never one of `inputs` or a folder holding them.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists():
        for source in inputs:
            if Path(source).resolve().is_relative_to(out.resolve()):
                raise OutputError(f"{out}: is or holds the input {source}; refusing to replace it")
        if not out.is_dir() or not ((out / "config.json").is_file() or not any(out.iterdir())):
            raise OutputError(
                f"{out}: exists and is not a checkpoint folder (no config.json); "
                "refusing to replace it even with --overwrite"
            )
    blocker = next((p for p in (out.parent, *out.parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"{blocker}: is a file, so it cannot hold the output folder {out}")
    if blocker is not None and not os.access(blocker, os.W_OK | os.X_OK):
        raise OutputError(f"{blocker}: cannot create the output folder (Permission denied)")


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename.

    The rename is the commit point: killed before it, `out` is untouched (a `.tmp-PID`
    folder may stay behind, and the next run for the same `out` removes it once PID is
    dead); any exception, Ctrl-C included, removes the temporary folder.
    """
    out = Path(out)
    check_output(out, overwrite, inputs)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_work_folders(out)
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
    except OSError as e:  # anything unreported while writing: a full disk, a lost mount
        shutil.rmtree(tmp, ignore_errors=True)
        where = f"{e.filename}: " if e.filename else ""
        raise OutputError(f"{out}: I/O error ({where}{e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_work_folders(out: Path) -> None:
    """Remove the `.tmp-PID` / `.old-PID` folders of `out` left by runs that were killed."""
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = WORK_FOLDER.fullmatch(entry.name)
        if match and match["out"] == out.name and not _alive(int(match["pid"])):
            log.info("removing %s, left by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: another user's; overflow: not a PID we wrote
        return True
    return True


# Files of the source that travel with the export unchanged, when present.
PASSTHROUGH = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
MANIFEST_NAME = "conversion.json"


def write_export(
    plan: ConversionPlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: str | None = None,
    verification: dict[str, Any] | None = None,
    source_id: str | None = None,
    source_revision: str | None = None,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Stream `plan`'s tensors into an export folder at `out`; `progress(nbytes)` per tensor.

    `dtype` (float32 / float16 / bfloat16; None keeps the source's) casts on the way.
    `verification` is the parity report to record (None: verification was skipped).
    `source_id` is the Hub repo id of the source, if it came from the Hub; a local source is
    recorded by its folder name only (a pushed card must not publish local paths).
    """
    out = Path(out)
    out_code = CODES[dtype] if dtype else None
    codes = {t.target: plan.sources[t.source].dtype for t in plan.tasks}
    specs = [TensorSpec(t.target, out_code or codes[t.target], t.target_shape) for t in plan.tasks]
    arrays = (
        (task.target, cast(array, codes[task.target], out_code or codes[task.target]))
        for task, array in iter_arrays(plan, allow_nonfinite=allow_nonfinite)
    )
    read_files = source_files(plan)
    stop_hashing = threading.Event()  # set on failure, so Ctrl-C does not wait for the hashes
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        _set_on_exit(stop_hashing),
        atomic_folder(out, overwrite, (plan.src,)) as tmp,
    ):
        # The source's hashes are computed beside the conversion, on the other core.
        source_hashes = pool.submit(
            lambda: {p.name: _read_source(sha256_file, p, stop=stop_hashing) for p in read_files}
        )
        hashes = write_sharded(tmp, specs, arrays, shard_bytes, progress)
        config = {**plan.config.to_dict(), "hf_config": dict(plan.hf_config)}
        if out_code:
            config["dtype"] = config["hf_config"]["dtype"] = dtype
        hashes["config.json"] = write_json(tmp / "config.json", config)
        copied = [p for p in read_files if p.name in PASSTHROUGH]
        for path in copied:
            _read_source(shutil.copy2, path, tmp / path.name)
        source_hashes = source_hashes.result()
        hashes.update({p.name: source_hashes[p.name] for p in copied})
        manifest = build_manifest(
            plan,
            source_id=source_id,
            source_revision=source_revision,
            source_hashes=source_hashes,
            written={name: file_entry(tmp / name, sha) for name, sha in hashes.items()},
            dtype=dtype or _dtype_name(set(codes.values())),
            verification=verification,
        )
        card = write_text(tmp / "README.md", render_model_card(plan.config, manifest))
        manifest["output"]["files"]["README.md"] = file_entry(tmp / "README.md", card)
        write_json(tmp / MANIFEST_NAME, manifest)
    log.info("wrote %s (%d tensors)", out, len(specs))
    return out


def _read_source(action: Callable[..., Any], path: Path, *args: Any, **kwargs: Any) -> Any:
    """`action(path, *args)`, which reads the source file `path` (and may write `args[0]`):
    failing to read it is bad input (exit 3), not an output error. An OSError of the
    written side (another file name, or none while writing) stays one (exit 6)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return action(path, *args, **kwargs)
    except OSError as e:
        if (e.filename is None and args) or (e.filename and Path(e.filename) != Path(path)):
            raise
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from None


@contextmanager
def _set_on_exit(event: threading.Event):
    try:
        yield
    finally:
        event.set()


def source_files(plan: ConversionPlan) -> list[Path]:
    """Every file of the source the export reads or copies: config, index, shards, tokenizer."""
    files = [plan.src / "config.json"]
    index = find_index(plan.src)  # model.safetensors.index.json or pytorch_model.bin's
    if index is not None:
        files.append(index)
    files += sorted({info.path for info in plan.sources.values()})
    files += [plan.src / name for name in PASSTHROUGH if (plan.src / name).is_file()]
    return files


def _dtype_name(codes: set[str]) -> str:
    names = {DTYPES[c][1] for c in codes}
    return names.pop() if len(names) == 1 else "mixed"


def file_entry(path: Path, sha256: str) -> dict[str, Any]:
    return {"sha256": sha256, "bytes": path.stat().st_size}


def build_manifest(
    plan: ConversionPlan,
    *,
    source_id: str | None,
    source_revision: str | None,
    source_hashes: dict[str, str],
    written: dict[str, dict[str, Any]],
    dtype: str,
    verification: dict[str, Any] | None,
) -> dict[str, Any]:
    """The provenance record: what was read, what was written, how it was checked."""
    src = plan.src
    if verification is None:
        status = "skipped"
    else:
        status = "passed" if verification.get("passed") else "failed-forced"
    return {
        "format": "gqa-convert-manifest/1",
        "tool": {"name": "gqa-convert", "version": __version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {
            "id": source_id or src.name,
            "hub": source_id is not None,
            "revision": source_revision,
            "architecture": plan.config.architecture,
            "files": {
                name: {"sha256": sha, "bytes": (src / name).stat().st_size}
                for name, sha in source_hashes.items()
            },
        },
        "output": {
            "dtype": dtype,
            "layout": "transformer_lens",
            "tensors": len(plan.tasks),
            "dropped_source_tensors": list(plan.dropped),
            "zero_biases_not_written": [
                n
                for n, on in (("b_Q/_b_K/_b_V", plan.config.qkv_bias), ("b_O", plan.config.o_bias))
                if not on
            ],
            "files": written,
        },
        "verification": {"status": status, "report": verification},
    }


def write_text(path: Path, text: str) -> str:
    """Write `text` to `path`; return its sha256."""
    data = text.encode("utf-8")
    try:
        path.write_bytes(data)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, data: Any) -> str:
    """Write `data` as indented JSON; return the file's sha256."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def to_torch(array: np.ndarray, code: str) -> torch.Tensor:
    """A numpy array in storage dtype -> torch tensor of the real dtype (shares memory)."""
    import torch  # the plain conversion path moves bytes and never needs torch

    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if code == "BF16" else tensor


def load_state_dict(
    plan: ConversionPlan, *, allow_nonfinite: bool = False
) -> dict[str, torch.Tensor]:
    """Convert in memory: every target tensor of `plan` as a torch tensor, source dtype."""
    return {
        task.target: to_torch(array, plan.sources[task.source].dtype)
        for task, array in iter_arrays(plan, allow_nonfinite=allow_nonfinite)
    }


def load_export(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an export folder written by `write_export`."""
    if WORK_FOLDER.fullmatch(Path(folder).name):
        raise BadInputError(f"{folder}: the work folder of an unfinished or replaced export")
    data = read_json(folder / "config.json")
    data.pop("hf_config", None)
    cfg = ModelConfig.from_dict(data)
    infos = read_weights(folder)
    check_export_tensors(folder, cfg, infos)
    state = {name: to_torch(read_array(info), info.dtype) for name, info in infos.items()}
    return cfg, state


def check_export_tensors(folder: Path, cfg: ModelConfig, infos: dict[str, TensorInfo]) -> None:
    """Raise BadInputError listing every tensor of an export that its config.json does not
    imply (an edit that changed one and not the other): missing, unexpected, wrong shape."""
    expected = {t.target: t.target_shape for t in expected_tasks(cfg)[0]}
    problems = []
    for name, shape in expected.items():
        if name not in infos:
            problems.append(f"{name}: missing from the export (shape {list(shape)})")
        elif infos[name].shape != shape:
            problems.append(
                f"{name}: shape {list(infos[name].shape)} in the export, config.json implies "
                f"{list(shape)}"
            )
        elif infos[name].dtype not in CODES.values():
            problems.append(f"{name}: dtype {infos[name].dtype}, not F32, F16 or BF16")
    problems += [
        f"{name}: in the export, not implied by config.json"
        for name in sorted(set(infos) - set(expected))
    ]
    if problems:
        raise BadInputError(
            listing(f"{folder}: the tensors do not match its config.json", problems)
        )
