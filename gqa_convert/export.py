"""Write a converted checkpoint folder atomically, and load one back.

An export is `config.json` (our ModelConfig, plus the source's HF config for the round trip)
and safetensors files in TransformerLens names, sharded like HF's when large. It is written
into a temporary folder beside OUT and renamed into place at the end, so OUT either does not
exist, is the previous export, or is complete.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gqa_convert import __version__
from gqa_convert.card import render_model_card
from gqa_convert.checkpoint import (
    DTYPES,
    TensorInfo,
    TensorSpec,
    read_array,
    read_weights,
    sha256_file,
    to_torch,
    write_sharded,
)
from gqa_convert.config import ModelConfig, read_json
from gqa_convert.dtypes import CODES, cast
from gqa_convert.errors import BadInputError, OutputError, listing
from gqa_convert.mapping import ConversionPlan, iter_arrays
from gqa_convert.weight_map import expected_tasks

if TYPE_CHECKING:
    import torch

    from gqa_convert.config import GenerationDefaults

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9  # HF's default max_shard_size, "5GB"


# The host's name as it goes into a work folder's name (a hostname is [A-Za-z0-9.-] already).
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
# `.{OUT}.tmp-{host}-{pid}` (being written, or the replaced export being removed) and
# `.{OUT}.old-{host}-{pid}` (the export being replaced, where RENAME_EXCHANGE is missing).
# Earlier versions wrote `.{OUT}.tmp-{pid}`: still never loaded, but never removed either,
# since nothing says which host's run left it.
WORK_FOLDER = re.compile(r"\.(?P<out>.+)\.(?:tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)")
# Tests only: the path of a FIFO to read to its end just before the commit (tests/test_commit.py
# holds runs there, so that something can happen at OUT "mid-run", deterministically).
TEST_BARRIER_ENV = "GQA_CONVERT_TEST_BARRIER"


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
        if not _replaceable(out):
            raise OutputError(
                f"{out}: exists and is not a checkpoint folder (no config.json); "
                "refusing to replace it even with --overwrite"
            )
    blocker = next((p for p in (out.parent, *out.parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"{blocker}: is a file, so it cannot hold the output folder {out}")
    if blocker is not None and not os.access(blocker, os.W_OK | os.X_OK):
        raise OutputError(f"{blocker}: cannot create the output folder (Permission denied)")


def _replaceable(path: Path) -> bool:
    """What `--overwrite` may replace: a folder with a config.json, or an empty folder."""
    return path.is_dir() and ((path / "config.json").is_file() or not any(path.iterdir()))


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()):
    """Yield a temporary folder beside `out`; on success it becomes `out` in one rename.

    The rename is the commit point, and it never destroys what this run did not write:
    without `overwrite` it fails if anything is at `out` by then (renameat2 with
    RENAME_NOREPLACE); with it, it swaps the new folder with a checkpoint folder at `out`
    (RENAME_EXCHANGE, so `out` is never absent) and then removes the old one. Before the
    rename every file and folder written is fsynced; after it, the parent folder.

    Killed before the rename, `out` is untouched (a `.tmp-HOST-PID` folder may stay behind:
    the next run on this host for the same `out` removes it once PID is dead); any
    exception, Ctrl-C included, removes the temporary folder.
    """
    out = Path(out)
    check_output(out, overwrite, inputs)
    tmp = out.parent / f".{out.name}.tmp-{HOST}-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_work_folders(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{out.parent}: cannot create the output folder ({e.strerror})") from None
    try:
        yield tmp
        sync_tree(tmp)
        _wait_for_test_barrier()
    except OSError as e:  # anything unreported while writing: a full disk, a lost mount
        shutil.rmtree(tmp, ignore_errors=True)
        where = f"{e.filename}: " if e.filename else ""
        raise OutputError(f"{out}: I/O error ({where}{e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        replaced = _commit(tmp, out, overwrite)
    except OSError as e:
        raise _conflict(tmp, out, f"cannot be renamed into place ({e.strerror or e})") from None
    if replaced is not None:
        _remove(replaced)


def _commit(tmp: Path, out: Path, overwrite: bool) -> Path | None:
    """Rename the finished `tmp` to `out`; return where the export it replaced now is.

    A conflict (something at `out` that this run may not replace) raises OutputError after
    moving the finished export aside (`_keep`), so the caller's cleanup finds no `tmp`.
    """
    replaced = None
    try:
        if overwrite and os.path.lexists(out):
            replaced = _swap(tmp, out)
        else:
            rename_noreplace(tmp, out)
    except FileExistsError:
        raise _conflict(tmp, out, "appeared during the conversion") from None
    fsync_folder(out.parent)
    return replaced


def _swap(tmp: Path, out: Path) -> Path | None:
    """Exchange `tmp` and `out`; return the path now holding the replaced export."""
    try:
        swapped = renameat2(tmp, out, RENAME_EXCHANGE)
    except FileNotFoundError:  # `out` went away since the start: a plain commit
        rename_noreplace(tmp, out)
        return None
    if swapped:
        if not _replaceable(tmp):  # replaced during the run by something not ours: put it back
            try:
                renameat2(tmp, out, RENAME_EXCHANGE)
            except OSError as e:
                raise OutputError(
                    f"{out}: was replaced during the conversion by a non-checkpoint, now at "
                    f"{tmp}, and could not be put back ({e.strerror}); move it back by hand"
                ) from None
            raise _conflict(tmp, out, "was replaced during the conversion by a non-checkpoint")
        return tmp
    # No RENAME_EXCHANGE here (kernel or filesystem): `out` is absent between two renames.
    if not _replaceable(out):
        raise _conflict(tmp, out, "was replaced during the conversion by a non-checkpoint")
    old = out.parent / f".{out.name}.old-{HOST}-{os.getpid()}"
    os.rename(out, old)
    try:
        rename_noreplace(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    return old


def _conflict(tmp: Path, out: Path, what: str) -> OutputError:
    """The error for a commit refused at `out`; the finished export is moved to
    `OUT.new-PID` beside it (never over anything) when it can be, else removed."""
    kept = out.parent / f"{out.name}.new-{os.getpid()}"
    try:
        fsync_folder(tmp)
        rename_noreplace(tmp, kept)
        fsync_folder(out.parent)
        where = f"the finished export is kept in {kept}"
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        where = "the finished export was removed"
    return OutputError(f"{out}: {what}; left as it is, {where}")


def _remove(path: Path) -> None:
    if path.is_symlink():  # `out` was a link to a checkpoint folder: the link is replaced
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _wait_for_test_barrier() -> None:
    fifo = os.environ.get(TEST_BARRIER_ENV)
    if fifo:
        with open(fifo, "rb") as f:
            f.read()


# renameat2(2) flags (linux/fs.h), and "paths relative to the working directory".
RENAME_NOREPLACE, RENAME_EXCHANGE, AT_FDCWD = 1, 2, -100


def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.4
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the libc, kernel or filesystem lacks it.
    Failures raise OSError (FileExistsError for RENAME_NOREPLACE onto an existing path)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # no such call / flag here
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename the folder `src` to `dst`; FileExistsError if anything is at `dst`.

    Without renameat2, `dst` is claimed with mkdir (which fails if anything is there) and
    `src` renamed onto that empty folder: a rename onto a folder that something else has
    filled in between fails (ENOTEMPTY), so nothing but our own empty folder is replaced.
    """
    if renameat2(src, dst, RENAME_NOREPLACE):
        return
    os.mkdir(dst)
    claimed = os.lstat(dst)
    try:
        os.rename(src, dst)
    except OSError as e:
        with suppress(OSError):
            now = os.lstat(dst)
            if (now.st_dev, now.st_ino) == (claimed.st_dev, claimed.st_ino):
                os.rmdir(dst)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(e.errno, e.strerror, str(dst)) from None
        raise


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder, deepest first: after a power
    loss, a folder renamed into place holds the bytes that were written into it."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(Path(root))


def fsync_folder(folder: Path) -> None:
    """fsync a folder, so the names in it (a rename, a new file) survive a power loss."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a folder; their names are durable
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_stale_work_folders(out: Path) -> None:
    """Remove the work folders of `out` left by killed runs on this host (a PID says nothing
    about another host's processes, on a shared filesystem)."""
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = WORK_FOLDER.fullmatch(entry.name)
        if (
            match
            and match["out"] == out.name
            and match["host"] == HOST
            and not _alive(int(match["pid"]))
        ):
            log.info("removing %s, left by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _own_work_folder(name: str) -> bool:
    """Whether `name` is a work folder of this very process (the gate verifies its own)."""
    match = WORK_FOLDER.fullmatch(name)
    return bool(match) and match["host"] == HOST and int(match["pid"]) == os.getpid()


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


def write_files(
    plan: ConversionPlan,
    folder: Path,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: str | None = None,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, str]:
    """Write the model files of `plan` into `folder`: the tensors (sharded, with an index
    when more than one shard), config.json and the source's tokenizer files, copied.
    Return {file: sha256} of the files written (the copies are hashed as source files).

    `dtype` (float32 / float16 / bfloat16; None keeps the source's, or is a quantised
    source's compute dtype: `plan.output_dtype`) casts on the way; `progress(nbytes)` is
    called per tensor.
    """
    dtype = plan.output_dtype(dtype)
    out_code = CODES[dtype] if dtype else None
    codes = {t.target: plan.sources[t.source].dtype for t in plan.tasks}
    # an MoE router HF keeps in fp32 stays F32 where the source has it so (cfg.keeps_fp32)
    out = {
        name: code
        if out_code is None or (code == "F32" and plan.config.keeps_fp32(name))
        else out_code
        for name, code in codes.items()
    }
    specs = [TensorSpec(t.target, out[t.target], t.target_shape) for t in plan.tasks]
    arrays = (
        (task.target, cast(array, codes[task.target], out[task.target]))
        for task, array in iter_arrays(plan, allow_nonfinite=allow_nonfinite)
    )
    hashes = write_sharded(folder, specs, arrays, shard_bytes, progress)
    config = {**plan.config.to_dict(), "hf_config": dict(plan.hf_config)}
    if out_code:
        config["dtype"] = config["hf_config"]["dtype"] = dtype
    hashes["config.json"] = write_json(folder / "config.json", config)
    for path in source_files(plan):
        if path.name in PASSTHROUGH:
            _read_source(shutil.copy2, path, folder / path.name)
    return hashes


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
def hashing_sources(plan: ConversionPlan) -> Iterator[Future[dict[str, str]]]:
    """The sha256 of every source file (`source_files`), computed on another thread beside
    the conversion; leaving the block abandons it (Ctrl-C need not wait for a 10 GB hash)."""
    stop = threading.Event()
    read_files = source_files(plan)
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            yield pool.submit(
                lambda: {p.name: _read_source(sha256_file, p, stop=stop) for p in read_files}
            )
        finally:
            stop.set()


def write_provenance(
    plan: ConversionPlan,
    folder: Path,
    written: dict[str, str],
    source_hashes: dict[str, str],
    *,
    dtype: str | None = None,
    verification: dict[str, Any] | None = None,
    source_id: str | None = None,
    source_revision: str | None = None,
) -> None:
    """Write the manifest (conversion.json) and model card (README.md) of the files that
    `write_files` put in `folder`. `verification` is the parity report of those files (None:
    skipped). `source_id` is the Hub repo id of the source, if it came from the Hub; a local
    source is recorded by its folder name only (a pushed card must not publish local paths).
    """
    copied = {n: sha for n, sha in source_hashes.items() if n in PASSTHROUGH}
    codes = {plan.sources[t.source].dtype for t in plan.tasks}
    manifest = build_manifest(
        plan,
        source_id=source_id,
        source_revision=source_revision,
        source_hashes=source_hashes,
        written={n: file_entry(folder / n, sha) for n, sha in {**written, **copied}.items()},
        dtype=plan.output_dtype(dtype) or _dtype_name(codes),
        verification=verification,
    )
    card = write_text(folder / "README.md", render_model_card(plan.config, manifest))
    manifest["output"]["files"]["README.md"] = file_entry(folder / "README.md", card)
    write_json(folder / MANIFEST_NAME, manifest)


def source_files(plan: ConversionPlan) -> list[Path]:
    """Every file of the source the export reads or copies: config, index, shards (or the
    .gguf file), tokenizer."""
    folder = plan.source.folder
    copied = [folder / n for n in PASSTHROUGH if (folder / n).is_file()]
    return [*plan.source.files, *(copied if plan.source.passthrough else [])]


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
    sizes = {path.name: path.stat().st_size for path in source_files(plan)}
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
                name: {"sha256": sha, "bytes": sizes[name]} for name, sha in source_hashes.items()
            },
            # How the source was quantised (None: dense): method, format, block size, the
            # modules left unquantised. The export is dense (`output.dtype`).
            "quantization": plan.source.quantization,
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


def load_state_dict(
    plan: ConversionPlan, *, allow_nonfinite: bool = False
) -> dict[str, torch.Tensor]:
    """Convert in memory: every target tensor of `plan` as a torch tensor, source dtype."""
    return {
        task.target: to_torch(array, plan.sources[task.source].dtype)
        for task, array in iter_arrays(plan, allow_nonfinite=allow_nonfinite)
    }


def refuse_foreign_work_folder(folder: Path) -> None:
    """A work folder is read only by the process writing it (convert's gate reads its own
    temp folder); another's is an unfinished or replaced export."""
    if WORK_FOLDER.fullmatch(Path(folder).name) and not _own_work_folder(Path(folder).name):
        raise BadInputError(f"{folder}: the work folder of an unfinished or replaced export")


def load_export(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an export folder written by `api.convert_plan`."""
    refuse_foreign_work_folder(folder)
    data = read_json(folder / "config.json")
    data.pop("hf_config", None)
    cfg = ModelConfig.from_dict(data)
    infos = read_weights(folder)
    check_export_tensors(folder, cfg, infos)
    state = {name: to_torch(read_array(info), info.dtype) for name, info in infos.items()}
    return cfg, state


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_extras(folder: Path) -> tuple[GenerationDefaults, Callable[[], Any]]:
    """An export's stop tokens (generation_config.json, else the source's config.json) and
    the loader of its tokenizer (`load_tokenizer`, called on first use)."""
    from gqa_convert.config import stop_tokens_from_hf

    gen_path = folder / "generation_config.json"
    generation = read_json(gen_path) if gen_path.exists() else None
    hf = read_json(folder / "config.json").get("hf_config") or {}
    return stop_tokens_from_hf(generation, hf), lambda: load_tokenizer(folder)  # on first use


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer copied into an export, or BadInputError (exit 3) in one line."""
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise BadInputError(
            f"{folder}: no tokenizer in the export (its source had no tokenizer.json, "
            "tokenizer.model or vocab.json); copy the source's tokenizer files into it, "
            "or pass token ids"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a file it cannot read
        raise BadInputError(
            f"{folder}: transformers cannot load the tokenizer ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


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
