"""The HuggingFace Hub at both ends: fetch a source checkpoint by repo id, push an export.

Both go through huggingface_hub, so the endpoint (`HF_ENDPOINT`), the cache (`HF_HOME`),
offline mode (`HF_HUB_OFFLINE=1`) and the token (`token=`, else `HF_TOKEN`, else the
`hf auth login` one) are the client's own. The token is handed to the client and nowhere
else: it is never logged, printed or written, and error messages are scrubbed of it.

Fetching downloads only what the conversion reads: config.json, generation_config.json, the
tokenizer files, and the weights `checkpoint.weight_files` would pick (the index's shards,
else model.safetensors or the lone .safetensors; pytorch_model*.bin only when the repo has
no safetensors). Pushing is one commit of the files the export's manifest lists: the remote
branch shows the whole export or none of it. An interrupted push is resumed by running it
again: objects already uploaded (LFS or Xet) are not sent twice.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa_convert import __version__
from gqa_convert.checkpoint import (
    BIN_INDEX_NAME,
    BIN_NAME,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SINGLE_NAME,
)
from gqa_convert.config import read_json
from gqa_convert.errors import BadInputError, HubError, ParityError, UsageError, listing
from gqa_convert.export import MANIFEST_NAME, PASSTHROUGH

log = logging.getLogger(__name__)

# The files of a source repo the conversion reads or copies, besides the weights.
SOURCE_FILES = ("config.json", INDEX_NAME, BIN_INDEX_NAME, *PASSTHROUGH)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Remote files a push replaces: weights left over from an earlier export of another shape.
WEIGHT_FILE = re.compile(r"[^/]*\.safetensors(\.index\.json)?")


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint folder on disk; for a Hub source, the repo id and the commit it is at."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # the full commit sha


@dataclass(frozen=True)
class PushResult:
    """What a push sent (or, with `dry_run`, would send)."""

    repo_id: str
    revision: str  # the branch written, or the pull request's ref
    files: tuple[tuple[str, int], ...]  # (path in the repo, bytes)
    card: str  # README.md as pushed
    dry_run: bool
    deleted: tuple[str, ...] = ()  # stale weight files removed from the branch
    commit_url: str | None = None
    pr_url: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def is_repo_id(text: str) -> bool:
    """`org/name` as the Hub spells repo ids (no `--`, `..`, leading or trailing `-` or `.`)."""
    if not REPO_ID.fullmatch(text) or "--" in text or ".." in text:
        return False
    return all(not part.endswith((".", "-")) for part in text.split("/"))


# --- source --------------------------------------------------------------------------------


def resolve_source(
    src: str | Path,
    revision: str | None = None,
    token: str | None = None,
    gguf_file: str | None = None,
) -> ResolvedSource:
    """A local checkpoint folder (or .gguf file) as it is, or the Hub repo `src` downloaded
    into the cache (of a GGUF repo, only the file `gguf_file`).

    `src` is a Hub repo id when it has the `org/name` shape and no such local path exists.
    `revision` (branch, tag or commit) applies to Hub sources only.
    """
    if Path(src).exists() or not is_repo_id(str(src)):
        if revision is not None:
            raise UsageError(f"--revision applies to a Hub repo id; {src} is a local folder")
        return ResolvedSource(Path(src))
    return download_source(str(src), revision=revision, token=token, gguf_file=gguf_file)


def download_source(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    gguf_file: str | None = None,
) -> ResolvedSource:
    """Download what the conversion of `repo_id` needs into the HF cache (or find it there,
    offline); return the snapshot folder and the commit it is at. With `gguf_file`, only
    that file is fetched, and the path is the file's."""
    from huggingface_hub import snapshot_download

    what = f"downloading {repo_id}" + (f" at {revision}" if revision else "")
    also = f"; nor is {repo_id} a local folder"
    if gguf_file is not None:
        with hub_errors(repo_id, what, token=token, revision=revision, not_found=also):
            pattern = [glob.escape(gguf_file)]
            folder = Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=pattern, token=token)
            )
        if not (folder / gguf_file).is_file():
            raise BadInputError(
                f"{repo_id}@{folder.name[:12]}: no file {gguf_file!r} (--gguf-file)"
            )
        return ResolvedSource(folder / gguf_file, repo_id, folder.name)
    with hub_errors(repo_id, what, token=token, revision=revision, not_found=also):
        meta = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=SOURCE_FILES, token=token)
        )
        sha = meta.name  # the snapshot folder is named by the commit
        if not (meta / "config.json").is_file():
            raise BadInputError(
                f"{repo_id}@{sha[:12]}: no config.json in the repository (not an HF "
                "checkpoint; for a GGUF repo, name the file with --gguf-file)"
            )
        weights = source_weight_files(repo_id, sha, meta)
        log.info("%s@%s: fetching %s", repo_id, sha[:12], ", ".join(weights))
        patterns = [*SOURCE_FILES, *(glob.escape(name) for name in weights)]
        folder = Path(
            snapshot_download(repo_id, revision=sha, allow_patterns=patterns, token=token)
        )
    return ResolvedSource(folder, repo_id, sha)


def fetch_headers(
    repo_id: str, dest: Path, *, revision: str | None = None, token: str | None = None
) -> tuple[ResolvedSource, dict[str, int], dict[str, int]]:
    """What `inspect` needs of `repo_id`, into the folder `dest`: config.json, the index and,
    of each safetensors weight file, only its header (two HTTP range reads: the 8-byte
    length, then the JSON). A pytorch_model*.bin has no header to read: it is downloaded.

    Returns the source (`dest`, repo id, commit), each weight file's size on the Hub, and
    the bytes fetched of each file.
    """
    import shutil

    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    what = f"reading the headers of {repo_id}" + (f" at {revision}" if revision else "")
    also = f"; nor is {repo_id} a local folder"
    sizes, fetched = {}, {}
    with hub_errors(repo_id, what, token=token, revision=revision, not_found=also):
        meta = _snapshot(repo_id, revision, ["config.json", INDEX_NAME, BIN_INDEX_NAME], token)
        sha = meta.name  # the snapshot folder is named by the commit
        if not (meta / "config.json").is_file():
            raise BadInputError(
                f"{repo_id}@{sha[:12]}: no config.json in the repository (not an HF checkpoint)"
            )
        for path in meta.iterdir():
            shutil.copyfile(path, dest / path.name)
            fetched[path.name] = path.stat().st_size
        for name in source_weight_files(repo_id, sha, meta):
            if not name.endswith(".safetensors"):
                path = Path(hf_hub_download(repo_id, name, revision=sha, token=token))
                shutil.copyfile(path, dest / name)
                sizes[name] = fetched[name] = path.stat().st_size
                continue
            url = hf_hub_url(repo_id, name, revision=sha)
            sizes[name] = get_hf_file_metadata(url, token=token).size
            head = _read_range(url, 0, 8, token)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if 0 < n <= min(MAX_HEADER_BYTES, sizes[name] - 8):  # else read_header says why
                head += _read_range(url, 8, n, token)
            (dest / name).write_bytes(head)
            fetched[name] = len(head)
    log.info("%s@%s: fetched %d bytes", repo_id, sha[:12], sum(fetched.values()))
    return ResolvedSource(dest, repo_id, sha), sizes, fetched


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token))


def _read_range(url: str, start: int, length: int, token: str | None) -> bytes:
    """`length` bytes of the file at `url` from `start`, by an HTTP range request (a server
    that ignores Range and sends the whole file is read up to what we need, then dropped)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(token=token), "Range": f"bytes={start}-{start + length - 1}"}
    data = bytearray()
    with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
        hf_raise_for_status(response)
        skip = start if response.status_code == 200 else 0
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= skip + length:
                break
    return bytes(data[skip : skip + length])


def source_weight_files(repo_id: str, sha: str, meta: Path) -> list[str]:
    """The weight files of `repo_id` at `sha` that the conversion reads, chosen as
    `checkpoint.weight_files` chooses them; `meta` holds the repo's index files, if any."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:  # the listing snapshot_download cached: works offline too
        files = {f.path for f in get_cached_repo_tree(repo_id, revision=sha)}
    except CachedRepoTreeNotFoundError:  # a cache written by an older client
        files = {p.name for p in meta.iterdir()}
    root = {name for name in files if "/" not in name}
    safetensors = sorted(name for name in root if name.endswith(".safetensors"))
    if INDEX_NAME in root:
        return _index_shards(meta / INDEX_NAME)
    if SINGLE_NAME in root:
        return [SINGLE_NAME]
    if safetensors:
        return safetensors  # one file; several without an index is refused by the planner
    if BIN_INDEX_NAME in root:
        return _index_shards(meta / BIN_INDEX_NAME)
    if BIN_NAME in root:
        return [BIN_NAME]
    raise BadInputError(
        f"{repo_id}@{sha[:12]}: no weights in the repository (none of {SINGLE_NAME}, "
        f"{INDEX_NAME}, {BIN_NAME}, {BIN_INDEX_NAME})"
    )


def _index_shards(index: Path) -> list[str]:
    """The shard files an index names; [] when it is unreadable (the planner says why)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return sorted(s for s in shards if isinstance(s, str) and ".." not in s and s[:1] != "/")


# --- push ----------------------------------------------------------------------------------


def push_export(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> PushResult:
    """Push the export `folder` to the Hub model repo `repo_id` in one commit.

    The repo is created if needed (`private` applies then; pushing with `private` to an
    existing public repo is refused). `revision` names the branch (created from main if new);
    `create_pr` opens a pull request against it instead of writing it. An export whose
    manifest shows a failed, forced or skipped verification is refused unless `force`.
    `dry_run` checks everything local and returns what would be sent, sending nothing.
    """
    folder = Path(folder)
    if not is_repo_id(repo_id):
        raise UsageError(f"{repo_id!r} is not a Hub repo id (expected org/name)")
    if revision is not None and not revision.strip():
        raise UsageError("--revision must name a branch")
    manifest, names = check_export(folder, force=force)
    card = model_card(folder, manifest)
    target = revision or "main"
    files = tuple(
        (name, len(card.encode()) if name == "README.md" else (folder / name).stat().st_size)
        for name in names
    )
    result = PushResult(repo_id, target, files, card, dry_run)
    if dry_run:
        return result

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    with hub_errors(repo_id, "creating the repository", token=token):
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise HubError(
                f"{repo_id}: exists and is public; --private only applies to a new repository "
                "(make it private on the Hub first, or push without --private)"
            )
    if revision is not None and not create_pr and not revision.startswith("refs/"):
        with hub_errors(repo_id, f"creating the branch {revision}", token=token):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    with hub_errors(repo_id, f"listing {target}", token=token, revision=target):
        remote = api.list_repo_files(repo_id, revision=target)
    stale = sorted(p for p in remote if WEIGHT_FILE.fullmatch(p) and p not in dict(files))
    operations = [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=card.encode() if name == "README.md" else folder / name,
        )
        for name, _ in files
    ] + [CommitOperationDelete(path_in_repo=p) for p in stale]
    message = commit_message or f"Upload {_title(manifest)} converted by gqa-convert {__version__}"
    log.info(
        "pushing %d files (%d bytes) to %s@%s%s",
        len(files),
        result.total_bytes,
        repo_id,
        target,
        " as a pull request" if create_pr else "",
    )
    with hub_errors(repo_id, "uploading and committing", token=token, revision=target):
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        )
    pushed_to = info.pr_revision if create_pr and info.pr_revision else target
    return PushResult(
        repo_id,
        pushed_to,
        files,
        card,
        False,
        deleted=tuple(stale),
        commit_url=str(info.commit_url),
        pr_url=info.pr_url,
    )


def check_export(folder: Path, *, force: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The manifest of an export folder and the files to push: those it lists (checked to
    exist with the recorded size) and the manifest itself. Refuses an unverified export
    unless `force`."""
    if not folder.is_dir():
        raise BadInputError(f"{folder}: no such export folder")
    manifest = read_json(folder / MANIFEST_NAME)
    try:
        status = manifest["verification"]["status"]
        listed = manifest["output"]["files"]
        sizes = {name: int(entry["bytes"]) for name, entry in listed.items()}
    except (KeyError, TypeError, ValueError):
        raise BadInputError(
            f"{folder / MANIFEST_NAME}: not a gqa-convert manifest (no verification.status "
            "or output.files)"
        ) from None
    if status != "passed" and not force:
        why = {
            "skipped": "verification was skipped (--no-verify)",
            "failed-forced": "verification failed and the export was forced",
        }.get(status, f"verification status is {status!r}")
        error = ParityError if status == "failed-forced" else UsageError
        raise error(
            f"{folder}: refusing to push: {why}; run `gqa-convert verify`, or pass --force "
            "to push it anyway"
        )
    problems = []
    for name, size in sorted(sizes.items()):
        path = folder / name
        if "/" in name or name.startswith("."):
            problems.append(f"{name}: not a file name of an export")
        elif not path.is_file():
            problems.append(f"{path}: listed in {MANIFEST_NAME}, missing")
        elif path.stat().st_size != size and name != "README.md":  # the card may be edited
            actual = path.stat().st_size
            problems.append(f"{path}: {actual} bytes, {MANIFEST_NAME} says {size}")
    if problems:
        raise BadInputError(listing(f"{folder}: the export does not match its manifest", problems))
    extra = sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in sizes and p.name != MANIFEST_NAME and not p.name.startswith(".")
    )
    if extra:
        log.warning("%s: not pushed (not in %s): %s", folder, MANIFEST_NAME, ", ".join(extra))
    return manifest, [*sorted(sizes), MANIFEST_NAME]


def model_card(folder: Path, manifest: dict[str, Any]) -> str:
    """The export's README.md, checked as a Hub model card, with `base_model` set to the
    source repo id when the source came from the Hub."""
    from huggingface_hub import ModelCard

    path = folder / "README.md"
    try:
        text = path.read_text(encoding="utf-8")
        card = ModelCard(text)
    except FileNotFoundError:
        raise BadInputError(f"{path}: missing (the export's model card)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInputError(f"{path}: not a valid model card ({_first_line(e)})") from None
    source = (manifest.get("source") or {}).get("id")
    if isinstance(source, str) and is_repo_id(source) and card.data.base_model != source:
        card.data.base_model = source
        return str(card)
    return text


def _title(manifest: dict[str, Any]) -> str:
    source = str((manifest.get("source") or {}).get("id") or "model")
    return source.rstrip("/").split("/")[-1]


# --- errors --------------------------------------------------------------------------------


@contextmanager
def hub_errors(
    repo_id: str,
    action: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    not_found: str = "",
) -> Iterator[None]:
    """Turn what huggingface_hub raises into a one-line HubError naming `repo_id`;
    `not_found` is added to the message for a repository the Hub does not show."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    try:
        yield
    except (HubError, BadInputError, UsageError):
        raise
    except Exception as error:
        cause = _root_cause(error, (HfHubHTTPError, OfflineModeIsEnabled, ConnectionError))
        status = cause.response.status_code if isinstance(cause, HfHubHTTPError) else None
        where = f"the Hub at {constants.ENDPOINT}"
        if isinstance(cause, GatedRepoError):
            message = "gated repository: accept its conditions on the Hub, with this token's user"
        elif isinstance(cause, RepositoryNotFoundError):
            message = (
                f"repository not found on {where} (or it is private and the token cannot "
                f"read it; --token, HF_TOKEN or `hf auth login` set the token){not_found}"
            )
        elif isinstance(cause, RevisionNotFoundError):
            message = f"revision {revision!r} not found"
        elif status == 401:
            message = (
                f"{where} refused the token (401 Unauthorized) while {action}; "
                "check --token, HF_TOKEN or `hf auth login`"
            )
        elif status == 403:
            message = (
                f"the token may not do this (403 Forbidden) while {action}: "
                "it needs write access to the repository's namespace"
            )
        elif isinstance(cause, HfHubHTTPError):
            detail = cause.server_message or cause.response.reason_phrase
            message = f"{where} answered HTTP {status} while {action}"
            message += f" ({_first_line(detail)})" if detail else ""
            if action.startswith("uploading"):
                message += "; nothing was committed: run the same push again to resume"
        elif isinstance(error, (LocalEntryNotFoundError, RevisionResolutionError)) or (
            isinstance(cause, OfflineModeIsEnabled)
        ):
            if constants.is_offline_mode():
                how = "HF_HUB_OFFLINE is set"
            else:
                how = f"{where} cannot be reached ({type(error.__cause__ or error).__name__})"
            message = (
                f"not (fully) in the local cache ({constants.HF_HUB_CACHE}) and {how}; "
                "run once with the Hub reachable"
            )
        elif _is_transport_error(cause):
            message = f"cannot reach {where} while {action} ({type(cause).__name__})"
        elif isinstance(error, (ValueError, OSError)):  # the client refused an answer
            message = f"{action} failed: {_first_line(error)}"
        else:
            raise
        raise HubError(_scrub(f"{repo_id}: {message}", token)) from error


def _root_cause(error: BaseException, kinds: tuple[type, ...]) -> BaseException:
    """The first exception of `kinds` in `error`'s chain (the client wraps upload errors)."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return error


def _is_transport_error(error: BaseException) -> bool:
    try:
        import httpx2 as httpx  # the HTTP client of huggingface_hub 2.x
    except ImportError:  # pragma: no cover - huggingface_hub 1.x uses httpx
        import httpx
    return isinstance(error, (httpx.TransportError, ConnectionError))


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _scrub(message: str, token: str | None) -> str:
    """`message` without any token we may hold (the argument, HF_TOKEN, the login's)."""
    from huggingface_hub import constants

    secrets = {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}
    with suppress(OSError, UnicodeDecodeError):
        secrets.add(Path(constants.HF_TOKEN_PATH).read_text().strip())
    for secret in secrets:
        if secret and len(secret) >= 8:
            message = message.replace(secret, "***")
    return " ".join(message.split())
