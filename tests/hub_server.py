"""A Hub-protocol test server: the part of huggingface.co's HTTP API that huggingface_hub's
client uses to create a repo, commit to it, branch, open a pull request, list and download.

Standard library only, on 127.0.0.1, in a thread of the test process. Repos live on disk
under `root` (commits as JSON trees, regular files as blobs, LFS objects per repo), so what
is uploaded is what comes back, byte for byte. What it does as the Hub does:

- tokens: `Authorization: Bearer` must be a known token (else 401 for any route), writes
  need one whose user owns the namespace (else 401 anonymous / 403), a private repo is
  `RepoNotFound` to everybody else;
- commits are atomic: a failed commit (bad LFS pointer, injected 500) changes no ref;
- LFS "basic" transfer: the batch answer gives a one-off upload URL (like S3's presigned
  ones, it carries no Authorization) and a verify URL; objects already stored get no
  upload action, so an interrupted push resumes where it stopped;
- `create_pr=1` puts the commit on a new `refs/pr/N`.

What it does not do: Xet (run the client with HF_HUB_DISABLE_XET=1), multipart LFS, tags,
discussions other than the PR refs a commit opens, pagination (every listing is one page).
`fail_next` injects errors; `requests` records every request (method, path, status).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores larger files in LFS whatever their name
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.model")
)
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
SHA = re.compile(r"[0-9a-f]{40}")
NAME = r"[A-Za-z0-9][\w.-]*"

# Routes on the raw (still %-quoted) path; `rev` is one segment, quoted as the client sends it.
API = rf"/api/(?P<type>models|datasets|spaces)/(?P<repo>{NAME}/{NAME})"
GIT = rf"(?:/(?P<type>datasets|spaces))?/(?P<repo>{NAME}/{NAME})"  # models have no prefix
RESOLVE = rf"{GIT}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"{API}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", rf"{API}/tree/(?P<rev>[^/]+)(?P<path>/.*)?", "tree"),
    ("GET", rf"{API}/refs", "refs"),
    ("POST", rf"{API}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"{API}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"{API}/branch/(?P<branch>.+)", "create_branch"),
    ("POST", rf"{GIT}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", rf"{GIT}\.git/info/lfs/objects/verify", "lfs_verify"),
    ("PUT", r"/lfs-upload/(?P<ticket>[\w-]+)", "lfs_put"),
    ("HEAD", RESOLVE, "resolve"),
    ("GET", RESOLVE, "resolve"),
]
WRITES = {"POST", "PUT", "DELETE", "PATCH"}
# Recognisable fake tokens: tests assert they never show in output or written files.
HUB_TOKEN = "hf_FAKEtoken_for_tests_0123456789"  # user "alice", member of org "org"
OTHER_TOKEN = "hf_FAKEtoken_other_user_9876543210"  # user "bob", no org


class HubHTTPError(Exception):
    """An error answer: status, message, and the Hub's X-Error-Code when it sends one."""

    def __init__(self, status: int, message: str, code: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


@dataclass(frozen=True)
class User:
    name: str
    orgs: tuple[str, ...] = ()

    @property
    def namespaces(self) -> set[str]:
        return {self.name, *self.orgs}


@dataclass
class Request:
    method: str
    path: str
    status: int
    user: str | None
    range: str | None = None  # the Range header, if any


@dataclass
class Failure:
    method: str
    path: re.Pattern
    status: int
    times: int


@dataclass
class Repo:
    """One repo on disk: `repo.json` (visibility, refs), `commits/`, `blobs/`, `lfs/`."""

    folder: Path
    repo_id: str
    kind: str  # model, dataset, space
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        (self.folder / "repo.json").write_text(json.dumps(self.meta, indent=1))

    @property
    def private(self) -> bool:
        return self.meta["private"]

    @property
    def refs(self) -> dict[str, str]:
        return self.meta["refs"]

    def commit(self, sha: str) -> dict[str, Any]:
        return json.loads((self.folder / "commits" / f"{sha}.json").read_text())

    def resolve(self, rev: str) -> str | None:
        """Branch, `refs/heads/x`, `refs/pr/N` or full commit sha -> commit sha."""
        for ref in (f"refs/heads/{rev}", rev):
            if ref in self.refs:
                return self.refs[ref]
        if SHA.fullmatch(rev) and (self.folder / "commits" / f"{rev}.json").exists():
            return rev
        return None

    def blob(self, entry: dict[str, Any]) -> Path:
        if entry["lfs"]:
            return self.folder / "lfs" / entry["lfs"]["oid"]
        return self.folder / "blobs" / entry["oid"]

    def lfs_patterns(self, files: dict[str, Any]) -> list[str]:
        entry = files.get(".gitattributes")
        if entry is None:
            return []
        text = self.blob(entry).read_text()
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


class HubServer:
    """The server and its state. `start()` binds 127.0.0.1 on a free port; `url` is the
    HF_ENDPOINT to give the client; `stop()` shuts it down."""

    def __init__(self, root: Path, tokens: dict[str, User]):
        self.root = Path(root)
        self.tokens = dict(tokens)
        self.requests: list[Request] = []
        self.failures: list[Failure] = []
        self.tickets: dict[str, tuple[str, str, str, int]] = {}  # -> (kind, repo, oid, size)
        self.lock = threading.RLock()
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.counter = 0

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    # --- test hooks ------------------------------------------------------------------------
    def fail_next(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests matching (method, raw path) with `status`."""
        with self.lock:
            self.failures.append(Failure(method, re.compile(path_regex), status, times))

    def writes(self) -> list[Request]:
        """Requests that could change state (every POST / PUT, reads-only POSTs included)."""
        return [r for r in self.requests if r.method in WRITES]

    def repo(self, repo_id: str, kind: str = "model") -> Repo | None:
        folder = self.root / f"{kind}s" / repo_id
        if not (folder / "repo.json").exists():
            return None
        return Repo(folder, repo_id, kind, json.loads((folder / "repo.json").read_text()))

    def files(self, repo_id: str, rev: str = "main", kind: str = "model") -> dict[str, bytes]:
        """Every file of `repo_id` at `rev`, read from disk (for assertions)."""
        repo = self.repo(repo_id, kind)
        sha = repo.resolve(rev)
        return {p: repo.blob(e).read_bytes() for p, e in repo.commit(sha)["files"].items()}

    def create_repo(
        self, repo_id: str, *, private: bool = False, kind: str = "model", owner: str = ""
    ) -> Repo:
        """A new repo with its first commit (`.gitattributes`), as the Hub makes one."""
        with self.lock:
            folder = self.root / f"{kind}s" / repo_id
            for sub in ("commits", "blobs", "lfs"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            repo = Repo(folder, repo_id, kind, {"private": private, "refs": {}, "prs": 0})
            data = GITATTRIBUTES.encode()
            files = {".gitattributes": self._store_regular(repo, data)}
            sha = self._write_commit(repo, None, files, "initial commit")
            repo.refs["refs/heads/main"] = sha
            repo.save()
            return repo

    def upload(self, repo_id: str, files: dict[str, bytes], rev: str = "main") -> str:
        """Commit `files` directly (test set-up, bypassing HTTP); LFS for *.safetensors etc."""
        with self.lock:
            repo = self.repo(repo_id)
            parent = repo.resolve(rev)
            tree = dict(repo.commit(parent)["files"])
            patterns = repo.lfs_patterns(tree)
            for path, data in files.items():
                if _is_lfs(path, data[:512], len(data), patterns):
                    oid = hashlib.sha256(data).hexdigest()
                    (repo.folder / "lfs" / oid).write_bytes(data)
                    tree[path] = self._lfs_entry(oid, len(data))
                else:
                    tree[path] = self._store_regular(repo, data)
            sha = self._write_commit(repo, parent, tree, "test upload")
            repo.refs[rev if rev.startswith("refs/") else f"refs/heads/{rev}"] = sha
            repo.save()
            return sha

    # --- storage ---------------------------------------------------------------------------
    def _store_regular(self, repo: Repo, data: bytes) -> dict[str, Any]:
        oid = git_blob_oid(data)
        (repo.folder / "blobs" / oid).write_bytes(data)
        return {"size": len(data), "oid": oid, "lfs": None}

    @staticmethod
    def _lfs_entry(oid: str, size: int) -> dict[str, Any]:
        pointer = lfs_pointer(oid, size)
        lfs = {"oid": oid, "size": size, "pointerSize": len(pointer)}
        return {"size": size, "oid": git_blob_oid(pointer), "lfs": lfs}

    def _write_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Any], message: str
    ) -> str:
        self.counter += 1
        body = {
            "parents": [parent] if parent else [],
            "files": files,
            "message": message,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }
        sha = hashlib.sha1(json.dumps([body, self.counter, repo.repo_id]).encode()).hexdigest()
        (repo.folder / "commits" / f"{sha}.json").write_text(json.dumps(body))
        return sha


def _is_lfs(path: str, sample: bytes, size: int, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    by_name = any(fnmatch.fnmatch(path if "/" in p else name, p) for p in patterns)
    return by_name or size >= LFS_THRESHOLD or b"\0" in sample


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the tests read `requests`
        pass

    # --- plumbing --------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        path = split.path
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.user: User | None = None
        status = 500
        try:
            self.body_file = self._read_body()
            with hub.lock:
                failure = next(
                    (f for f in hub.failures if f.method == method and f.path.fullmatch(path)),
                    None,
                )
                if failure is not None:
                    failure.times -= 1
                    if failure.times <= 0:
                        hub.failures.remove(failure)
            if failure is not None:
                raise HubHTTPError(failure.status, "Internal Error (injected by the test)")
            for route_method, pattern, name in ROUTES:
                match = re.fullmatch(pattern, split.path)
                if match and route_method == method:
                    self.user = self._authenticate(name)
                    status = getattr(self, f"route_{name}")(**match.groupdict())
                    break
            else:
                raise HubHTTPError(404, f"no route for {method} {split.path}")
        except HubHTTPError as e:
            status = e.status
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send_json(e.status, {"error": e.message}, headers)
        except Exception as e:  # a bug in this server: say so, as the Hub would, with a 500
            status = 500
            self._send_json(500, {"error": f"test server bug: {type(e).__name__}: {e}"})
        finally:
            with hub.lock:
                hub.requests.append(
                    Request(
                        method,
                        split.path,
                        status,
                        self.user.name if self.user else None,
                        self.headers.get("Range"),
                    )
                )
            body = getattr(self, "body_file", None)
            if body is not None:
                body.close()

    def _read_body(self):
        """The request body, spooled to a temporary file (Content-Length or chunked)."""
        out = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115 (closed in _dispatch)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            for _ in range(1 << 30):  # bounded: one chunk per iteration
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                _copy(self.rfile, out, size)
                self.rfile.readline()
        else:
            _copy(self.rfile, out, int(self.headers.get("Content-Length") or 0))
        out.seek(0)
        return out

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body_file.read() or b"null")
        except ValueError:
            raise HubHTTPError(400, "body is not JSON") from None

    def _authenticate(self, route: str) -> User | None:
        header = self.headers.get("Authorization")
        if route == "lfs_put" or header is None:  # presigned upload URLs carry no token
            return None
        token = header.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", **(headers or {})}
        self._send(status, json.dumps(data).encode(), headers)

    # --- repos, permissions ----------------------------------------------------------------
    def _repo_for_commit(self, repo: str, type: str) -> tuple[Repo, bool]:
        """The repo a preupload or commit targets, and whether it opens a PR: a PR needs only
        read access (any signed-in user may open one), a direct commit needs write access."""
        create_pr = self.query.get("create_pr") == "1"
        found = self._repo(repo, type, write=not create_pr)
        if create_pr and self.user is None:
            raise HubHTTPError(401, "You must be authenticated to open a pull request")
        return found, create_pr

    def _repo(self, repo: str, type: str | None, *, write: bool = False) -> Repo:
        kind = TYPES.get(type or "models", "model")
        found = self.hub.repo(repo, kind)
        if found is None or (found.private and not self._owns(repo)):
            status = 401 if self.user is None else 404
            raise HubHTTPError(status, "Repository not found", "RepoNotFound")
        if write and self.user is None:
            raise HubHTTPError(401, "You must be authenticated to write to this repo")
        if write and not self._owns(repo):
            raise HubHTTPError(403, "You don't have the rights to write to this repo")
        return found

    def _owns(self, repo_id: str) -> bool:
        return self.user is not None and repo_id.split("/")[0] in self.user.namespaces

    def _rev(self, repo: Repo, rev: str) -> str:
        sha = repo.resolve(unquote(rev))
        if sha is None:
            raise HubHTTPError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return sha

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.kind == "model" else f"{repo.kind}s/"
        return f"{self.hub.url}/{prefix}{repo.repo_id}"

    # --- routes ----------------------------------------------------------------------------
    def route_whoami(self) -> int:
        if self.user is None:
            raise HubHTTPError(401, "Invalid username or password.")
        orgs = [{"name": o, "roleInOrg": "write", "type": "org"} for o in self.user.orgs]
        role = {"displayName": "tests", "role": "write"}
        auth = {"type": "access_token", "accessToken": role}
        data = {"type": "user", "name": self.user.name, "orgs": orgs, "auth": auth}
        self._send_json(200, data)
        return 200

    def route_create_repo(self) -> int:
        body = self._json_body() or {}
        name, org = body.get("name"), body.get("organization")
        kind = body.get("type") or "model"
        if self.user is None:
            raise HubHTTPError(401, "You must be authenticated to create a repo")
        if not name or not re.fullmatch(NAME, name) or kind not in TYPES.values():
            raise HubHTTPError(400, "Invalid repo name or type")
        repo_id = f"{org or self.user.name}/{name}"
        if not self._owns(repo_id):
            raise HubHTTPError(403, f"You don't have the rights to create a repo under {org}")
        with self.hub.lock:
            existing = self.hub.repo(repo_id, kind)
            if existing is not None:
                url = self._repo_url(existing)
                self._send_json(409, {"error": "You already created this repo", "url": url})
                return 409
            private = body.get("visibility") == "private" or bool(body.get("private"))
            repo = self.hub.create_repo(repo_id, private=private, kind=kind)
        self._send_json(200, {"url": self._repo_url(repo), "name": repo_id})
        return 200

    def route_validate_yaml(self) -> int:
        content = (self._json_body() or {}).get("content", "")
        errors = []
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if match:
            try:
                data = yaml.safe_load(match.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        status = 400 if errors else 200
        self._send_json(status, {"errors": errors, "warnings": []})
        return status

    def route_repo_info(self, type: str, repo: str, rev: str | None) -> int:
        found = self._repo(repo, type)
        sha = self._rev(found, rev or "main")
        files = found.commit(sha)["files"]
        data = {
            "id": repo,
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24],
            "modelId": repo,
            "author": repo.split("/")[0],
            "sha": sha,
            "private": found.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "lastModified": found.commit(sha)["date"],
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }
        self._send_json(200, data)
        return 200

    def route_tree(self, type: str, repo: str, rev: str, path: str | None) -> int:
        found = self._repo(repo, type)
        sha = self._rev(found, rev)
        files = found.commit(sha)["files"]
        base = unquote(path or "").strip("/")
        prefix = f"{base}/" if base else ""
        if base and not any(p.startswith(prefix) for p in files):
            raise HubHTTPError(404, f"{base} does not exist on {rev}", "EntryNotFound")
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries: dict[str, dict[str, Any]] = {}
        for p, entry in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if recursive or depth == 1:
                    folder = prefix + "/".join(parts[:depth])
                    oid = hashlib.sha1(folder.encode()).hexdigest()
                    entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0})
            if recursive or len(parts) == 1:
                item = {"type": "file", "oid": entry["oid"], "size": entry["size"]}
                if entry["lfs"]:
                    item["lfs"] = entry["lfs"]
                entries[p] = item
        self._send_json(200, [{**e, "path": p} for p, e in entries.items()])
        return 200

    def route_refs(self, type: str, repo: str) -> int:
        found = self._repo(repo, type)

        def info(prefix: str) -> list[dict[str, str]]:
            return [
                {"name": ref.removeprefix(prefix), "ref": ref, "targetCommit": sha}
                for ref, sha in sorted(found.refs.items())
                if ref.startswith(prefix)
            ]

        data = {"branches": info("refs/heads/"), "tags": info("refs/tags/"), "converts": []}
        if self.query.get("include_prs"):
            data["pullRequests"] = info("refs/pr/")
        self._send_json(200, data)
        return 200

    def route_preupload(self, type: str, repo: str, rev: str) -> int:
        found, _ = self._repo_for_commit(repo, type)
        files = found.commit(self._rev(found, rev))["files"]
        patterns = found.lfs_patterns(files)
        answer = []
        for item in (self._json_body() or {}).get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = _is_lfs(path, base64.b64decode(item.get("sample", "")), size, patterns)
            remote = files.get(path)
            if remote is None:
                oid = None
            else:  # what the client compares with its own: sha256 for LFS, git oid otherwise
                oid = remote["lfs"]["oid"] if remote["lfs"] else remote["oid"]
            mode = "lfs" if lfs else "regular"
            answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": answer, "commitOid": found.resolve(unquote(rev))})
        return 200

    def route_commit(self, type: str, repo: str, rev: str) -> int:
        found, create_pr = self._repo_for_commit(repo, type)
        target = unquote(rev)
        if SHA.fullmatch(target):
            raise HubHTTPError(400, "Cannot commit to a commit sha: name a branch")
        lines = [json.loads(line) for line in self.body_file.read().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the first ndjson line must be the header")
        header = lines[0]["value"]
        with self.hub.lock:
            parent = self._rev(found, target)
            if create_pr and f"refs/heads/{target}" not in found.refs and target != "main":
                raise HubHTTPError(404, f"Invalid rev id: {target}", "RevisionNotFound")
            wanted = header.get("parentCommit")
            if wanted and not create_pr and not parent.startswith(wanted):
                raise HubHTTPError(412, "A commit has happened since. Please refresh and try again")
            tree = dict(found.commit(parent)["files"])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    tree[path] = self.hub._store_regular(found, data)
                elif key == "lfsFile":
                    oid, size = value["oid"], value.get("size")
                    stored = found.folder / "lfs" / oid
                    if not stored.exists() or (size is not None and stored.stat().st_size != size):
                        raise HubHTTPError(422, f"LFS object {oid} of {path} was never uploaded")
                    tree[path] = self.hub._lfs_entry(oid, stored.stat().st_size)
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        missing = "A file with this name doesn't exist"
                        raise HubHTTPError(404, missing, "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
                else:
                    raise HubHTTPError(400, f"unknown commit operation {key!r}")
            message = header.get("summary", "")
            sha = self.hub._write_commit(found, parent, tree, message)
            pr_url = None
            if create_pr:
                found.meta["prs"] += 1
                found.refs[f"refs/pr/{found.meta['prs']}"] = sha
                pr_url = f"{self._repo_url(found)}/discussions/{found.meta['prs']}"
            else:
                ref = target if target.startswith("refs/") else f"refs/heads/{target}"
                found.refs[ref] = sha
            found.save()
        data = {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{self._repo_url(found)}/commit/{sha}",
            "pullRequestUrl": pr_url,
        }
        self._send_json(200, data)
        return 200

    def route_create_branch(self, type: str, repo: str, branch: str) -> int:
        found = self._repo(repo, type, write=True)
        name = unquote(branch)
        start = (self._json_body() or {}).get("startingPoint") or "main"
        with self.hub.lock:
            if f"refs/heads/{name}" in found.refs:
                raise HubHTTPError(409, "Reference already exists")
            found.refs[f"refs/heads/{name}"] = self._rev(found, start)
            found.save()
        self._send_json(200, {})
        return 200

    def route_lfs_batch(self, type: str | None, repo: str) -> int:
        body = self._json_body() or {}
        ref = (body.get("ref") or {}).get("name")
        found = self._repo(repo, type, write=ref is not None)
        if self.user is None:
            raise HubHTTPError(401, "You must be authenticated to upload")
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubHTTPError(400, "this server does upload with the basic transfer only")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            stored = found.folder / "lfs" / oid
            answer = {"oid": oid, "size": size, "authenticated": True}
            if not (stored.exists() and stored.stat().st_size == size):
                ticket = secrets.token_urlsafe(16)
                with self.hub.lock:
                    self.hub.tickets[ticket] = (found.kind, repo, oid, size)
                prefix = "" if found.kind == "model" else f"{found.kind}s/"
                verify = f"{self.hub.url}/{prefix}{repo}.git/info/lfs/objects/verify"
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{ticket}"},
                    "verify": {"href": verify},
                }
            objects.append(answer)
        headers = {"Content-Type": "application/vnd.git-lfs+json"}
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), headers)
        return 200

    def route_lfs_put(self, ticket: str) -> int:
        with self.hub.lock:
            grant = self.hub.tickets.get(ticket)
        if grant is None:
            raise HubHTTPError(403, "Request has expired or the signature does not match")
        kind, repo_id, oid, size = grant
        repo = self.hub.repo(repo_id, kind)
        digest, n = hashlib.sha256(), 0
        with tempfile.NamedTemporaryFile(dir=repo.folder / "lfs", delete=False) as tmp:
            for chunk in iter(lambda: self.body_file.read(1 << 20), b""):
                digest.update(chunk)
                n += len(chunk)
                tmp.write(chunk)
        if n != size or digest.hexdigest() != oid:
            Path(tmp.name).unlink()
            raise HubHTTPError(400, f"uploaded bytes do not match oid {oid} and size {size}")
        shutil.move(tmp.name, repo.folder / "lfs" / oid)
        with self.hub.lock:
            self.hub.tickets.pop(ticket, None)
        self._send(200, b"")
        return 200

    def route_lfs_verify(self, type: str | None, repo: str) -> int:
        found = self._repo(repo, type)
        if self.user is None:
            raise HubHTTPError(401, "You must be authenticated to upload")
        body = self._json_body() or {}
        stored = found.folder / "lfs" / str(body.get("oid"))
        if not stored.exists() or stored.stat().st_size != body.get("size"):
            raise HubHTTPError(404, f"LFS object {body.get('oid')} not found")
        self._send_json(200, {"success": True})
        return 200

    def route_resolve(self, type: str | None, repo: str, rev: str, path: str) -> int:
        found = self._repo(repo, type)
        sha = self._rev(found, rev)
        name = unquote(path)
        entry = found.commit(sha)["files"].get(name)
        if entry is None:
            raise HubHTTPError(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": sha})
        blob = found.blob(entry)
        size = entry["size"]
        headers = {
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry["lfs"]:
            etag = entry["lfs"]["oid"]
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        else:
            etag = entry["oid"]
        headers["ETag"] = f'"{etag}"'
        start, end = 0, size  # [start, end)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        status = 200
        if match and self.command == "GET":
            start, status = min(int(match.group(1)), size), 206
            if match.group(2):  # bytes=a-b: both ends included
                end = max(start, min(int(match.group(2)) + 1, size))
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        if self.command == "HEAD":
            self._send(status, b"", headers)
            return status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        with blob.open("rb") as f:
            f.seek(start)
            _copy(f, self.wfile, end - start)
        return status


def _copy(src, dst, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            raise HubHTTPError(400, "request body ended early")
        dst.write(chunk)
        n -= len(chunk)
