"""The Hub at both ends, over HTTP against the loopback Hub-protocol server (tests/hub_server.py):
convert from a repo id (online, pinned, offline from the cache), push an export (main, branch,
pull request, dry run), and what goes wrong (wrong token, private repos, a 500 mid-upload,
unverified exports). Tokens are fake and must never show in output or written files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file

from gqa_convert.api import convert
from gqa_convert.errors import BadInputError, HubError, ParityError, UsageError
from gqa_convert.export import MANIFEST_NAME
from gqa_convert.hub import check_export, push_export, resolve_source
from tests.hf_models import make_hf_checkpoint, make_hf_model
from tests.hub_server import HUB_TOKEN, OTHER_TOKEN

# A Hub server and mostly CLI subprocesses: 1-16 s a test (69 s for the module), so `slow`.
pytestmark = pytest.mark.slow

WRONG_TOKEN = "hf_FAKEwrongtoken_000000000000000"


# --- helpers -------------------------------------------------------------------------------


def publish(hub, tmp_path: Path, repo_id: str = "org/src", extra=None, **model) -> str:
    """A tiny random checkpoint committed to `repo_id` on the server; its commit sha."""
    folder = make_hf_checkpoint(tmp_path / "published" / repo_id.replace("/", "--"), **model)
    files = {p.name: p.read_bytes() for p in folder.iterdir()} | (extra or {})
    if hub.repo(repo_id) is None:
        hub.create_repo(repo_id)
    return hub.upload(repo_id, files)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def gqa(*args: object, token: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`gqa-convert ARGS` in a subprocess, in the hub fixture's environment (+ HF_TOKEN)."""
    full = {**os.environ, **env, **({"HF_TOKEN": token} if token else {})}
    command = [sys.executable, "-m", "gqa_convert.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=full, timeout=300)


def error_lines(run: subprocess.CompletedProcess) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def assert_secret_absent(secret: str, *texts: str, folders: tuple[Path, ...] = ()) -> None:
    for text in texts:
        assert secret not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), path


def remote_state(hub, repo_id: str) -> tuple[dict, dict]:
    """(refs, files at main) of a repo, read from the server's disk."""
    return dict(hub.repo(repo_id).refs), hub.files(repo_id)


# --- source: from a repo id ----------------------------------------------------------------


def test_source_downloads_only_what_the_conversion_reads(hub, tmp_path):
    """Index + its shards, config, tokenizer and generation config: not the consolidated
    copy, the .bin next to the safetensors, the README or anything in a subfolder."""
    extra = {
        "tokenizer.json": b'{"model": {}}',
        "README.md": b"# source\n",
        "consolidated.safetensors": b"not read",
        "pytorch_model.bin": b"not read",
        "original/consolidated.00.pth": b"not read",
        "onnx/model.safetensors": b"not read",
    }
    sha = publish(hub, tmp_path, extra=extra, max_shard_size="100KB")
    source = resolve_source("org/src", token=HUB_TOKEN)
    assert (source.repo_id, source.revision) == ("org/src", sha)
    got = {p.relative_to(source.path).as_posix() for p in source.path.rglob("*") if p.is_file()}
    shards = set(
        json.loads((source.path / "model.safetensors.index.json").read_text())[
            "weight_map"
        ].values()
    )
    assert len(shards) > 1
    assert got == {"config.json", "generation_config.json", "tokenizer.json"} | {
        "model.safetensors.index.json",
        *shards,
    }
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}
    assert not fetched & {"consolidated.safetensors", "pytorch_model.bin", "README.md"}
    out = convert("org/src", tmp_path / "out", token=HUB_TOKEN, verify=False)  # fake tokenizer
    record = manifest(out)["source"]
    assert (record["id"], record["revision"]) == ("org/src", sha)
    assert set(record["files"]) >= shards | {"config.json", "tokenizer.json"}


def test_bin_only_source_is_fetched_and_converted_like_safetensors(hub, tmp_path):
    model = make_hf_model("llama")
    model.save_pretrained(tmp_path / "st")
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    hub.create_repo("org/bin")
    hub.upload("org/bin", {p.name: p.read_bytes() for p in (tmp_path / "bin").iterdir()})
    source = resolve_source("org/bin")  # public: no token needed
    assert sorted(p.name for p in source.path.iterdir()) == ["config.json", "pytorch_model.bin"]
    ours = convert("org/bin", tmp_path / "from-bin")
    reference = convert(tmp_path / "st", tmp_path / "from-st")
    a, b = load_file(ours / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_revision_pins_the_source_commit(hub, tmp_path):
    first = publish(hub, tmp_path, seed=0)
    second = publish(hub, tmp_path, seed=1)
    pinned = resolve_source("org/src", revision=first)
    latest = resolve_source("org/src")
    assert (pinned.revision, latest.revision) == (first, second)
    w0, w1 = (
        load_file(pinned.path / "model.safetensors"),
        load_file(latest.path / "model.safetensors"),
    )
    assert not torch.equal(w0["model.embed_tokens.weight"], w1["model.embed_tokens.weight"])
    with pytest.raises(HubError, match=r"org/src: revision 'nope' not found"):
        resolve_source("org/src", revision="nope")
    with pytest.raises(UsageError, match="--revision"):
        resolve_source(tmp_path, revision="main")  # a local folder has no revision


# --- push ----------------------------------------------------------------------------------


def test_private_repo_is_invisible_to_other_users(hub, tmp_path):
    publish(hub, tmp_path)
    out = convert("org/src", tmp_path / "out")
    push_export(out, "org/secret", private=True, token=HUB_TOKEN, force=True)
    assert hub.repo("org/secret").private
    for token in (OTHER_TOKEN, None):
        with pytest.raises(HubError, match=r"^org/secret: repository not found") as caught:
            resolve_source("org/secret", token=token)
        assert "\n" not in str(caught.value)
    assert resolve_source("org/secret", token=HUB_TOKEN).repo_id == "org/secret"
    assert HfApi().whoami(token=HUB_TOKEN)["name"] == "alice"
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        HfApi().whoami(token=WRONG_TOKEN)
    before = remote_state(hub, "org/src")
    with pytest.raises(HubError, match="exists and is public"):
        push_export(out, "org/src", private=True, token=HUB_TOKEN, force=True)
    assert remote_state(hub, "org/src") == before


def test_unverified_exports_are_refused_before_any_request(hub, tmp_path):
    out = convert(make_hf_checkpoint(tmp_path / "src"), tmp_path / "out", verify=False)
    assert manifest(out)["verification"]["status"] == "skipped"
    with pytest.raises(UsageError, match=r"verification was skipped.*--force"):
        push_export(out, "org/dst", token=HUB_TOKEN)
    data = manifest(out)
    data["verification"]["status"] = "failed-forced"
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ParityError, match="verification failed"):
        push_export(out, "org/dst", token=HUB_TOKEN)
    with (out / "README.md").open("a") as card:
        card.write("\nEdited by hand before the push.\n")
    listed = sorted(set(os.listdir(out)) - {MANIFEST_NAME})
    assert check_export(out, force=True)[1] == [*listed, MANIFEST_NAME]  # the card may change
    (out / "config.json").write_text("{}")  # no longer the file the manifest describes
    with pytest.raises(BadInputError, match=r"config\.json: 2 bytes"):
        check_export(out, force=True)
    assert hub.requests == []


def test_push_with_the_login_token_replaces_stale_shards(hub, tmp_path):
    """The token of `hf auth login` (HF_HOME/token) is used when none is given; a re-push
    of another shape leaves no shard of the previous one on the branch."""
    Path(hf_constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(hf_constants.HF_TOKEN_PATH).write_text(HUB_TOKEN)
    src = make_hf_checkpoint(tmp_path / "src")
    sharded = convert(src, tmp_path / "sharded", shard_bytes=100_000)
    single = convert(src, tmp_path / "single")
    push_export(sharded, "org/dst", force=True)
    assert len([p for p in hub.files("org/dst") if p.startswith("model-")]) > 1
    result = push_export(single, "org/dst", force=True)
    assert sorted(hub.files("org/dst")) == sorted([".gitattributes", *(n for n, _ in result.files)])
    assert set(result.deleted) == {p for p in os.listdir(sharded) if p.startswith("model")}


# --- the command line, end to end ----------------------------------------------------------


def test_convert_from_hub_then_push_round_trips_every_file(hub, tmp_path):
    """`convert org/src OUT --push-to org/dst`: verified, pushed, and what comes back from
    the Hub is OUT byte for byte, with the card's base_model and the source commit."""
    sha = publish(hub, tmp_path)
    out = tmp_path / "out"
    run = gqa("--debug", "convert", "org/src", out, "--push-to", "org/dst", token=HUB_TOKEN)
    assert run.returncode == 0, run.stderr
    assert "parity PASSED" in run.stderr
    head = hub.repo("org/dst").refs["refs/heads/main"]
    assert run.stdout.strip().endswith(f"/org/dst/commit/{head}")
    record = manifest(out)
    assert record["source"]["id"] == "org/src" and record["source"]["revision"] == sha
    assert record["verification"]["status"] == "passed"
    back = Path(snapshot_download("org/dst", token=HUB_TOKEN))
    pushed = {p.name for p in back.iterdir()}
    assert pushed == {p.name for p in out.iterdir()} | {".gitattributes"}
    for path in out.iterdir():
        assert sha256(back / path.name) == sha256(path), path.name
    assert ModelCard.load(back / "README.md").data.base_model == "org/src"
    assert_secret_absent(HUB_TOKEN, run.stdout, run.stderr, folders=(tmp_path,))


def test_offline_convert_uses_the_cache_and_sends_nothing(hub, tmp_path):
    sha = publish(hub, tmp_path)
    online = convert("org/src", tmp_path / "online", token=HUB_TOKEN)
    sent = len(hub.requests)
    run = gqa("convert", "org/src", tmp_path / "offline", "--no-verify", HF_HUB_OFFLINE="1")
    assert run.returncode == 0, run.stderr
    assert len(hub.requests) == sent
    offline = tmp_path / "offline"
    assert manifest(offline)["source"]["revision"] == sha
    assert sha256(offline / "model.safetensors") == sha256(online / "model.safetensors")
    run = gqa("convert", "org/never-fetched", tmp_path / "x", "--no-verify", HF_HUB_OFFLINE="1")
    assert run.returncode == 7
    assert error_lines(run) == [error_lines(run)[0]]
    assert "org/never-fetched: not (fully) in the local cache" in run.stderr
    assert "HF_HUB_OFFLINE" in run.stderr and len(hub.requests) == sent


def test_push_to_a_branch_and_as_a_pull_request(hub, tmp_path):
    out = convert(make_hf_checkpoint(tmp_path / "src"), tmp_path / "out")
    expected = {p.name: p.read_bytes() for p in out.iterdir()}
    run = gqa("push", out, "org/dst", "--revision", "dev", "--force", token=HUB_TOKEN)
    assert run.returncode == 0, run.stderr
    assert sorted(hub.files("org/dst")) == [".gitattributes"]  # main untouched
    dev = hub.files("org/dst", "dev")
    assert dev.pop(".gitattributes") and dev == expected
    run = gqa("push", out, "org/dst", "--create-pr", "--commit-message", "Add GQA", "--force",
              token=HUB_TOKEN)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("/org/dst/discussions/1")
    repo = hub.repo("org/dst")
    assert repo.commit(repo.refs["refs/pr/1"])["message"] == "Add GQA"
    assert sorted(hub.files("org/dst")) == [".gitattributes"]
    pr = hub.files("org/dst", "refs/pr/1")
    assert pr.pop(".gitattributes") and pr == expected


def test_wrong_token_exits_7_with_one_line_naming_the_repo(hub, tmp_path):
    publish(hub, tmp_path)
    out = convert(make_hf_checkpoint(tmp_path / "src"), tmp_path / "out")
    for debug in ((), ("--debug",)):
        run = gqa(*debug, "push", out, "org/dst", "--force", "--token", WRONG_TOKEN)
        assert run.returncode == 7, run.stderr
        (line,) = error_lines(run)
        assert line.startswith("error: org/dst: ") and "refused the token (401" in line
        assert_secret_absent(WRONG_TOKEN, run.stdout, run.stderr)
        assert ("Traceback" in run.stderr) == bool(debug)
    run = gqa("convert", "org/src", tmp_path / "x", "--no-verify", token=WRONG_TOKEN)
    assert run.returncode == 7 and len(error_lines(run)) == 1
    assert "org/src: " in run.stderr and "401" in run.stderr
    assert_secret_absent(WRONG_TOKEN, run.stdout, run.stderr, folders=(tmp_path,))
    assert hub.repo("org/dst") is None and not (tmp_path / "x").exists()


def test_server_error_mid_upload_leaves_the_repo_unchanged_and_resumes(hub, tmp_path):
    """The commit fails (500) after the weights were uploaded: the branch and its files are
    as before; the same push again completes without sending the weights a second time."""
    first = convert(make_hf_checkpoint(tmp_path / "a", seed=0), tmp_path / "first")
    second = convert(make_hf_checkpoint(tmp_path / "b", seed=1), tmp_path / "second")
    push_export(first, "org/dst", token=HUB_TOKEN, force=True)
    before = remote_state(hub, "org/dst")
    hub.fail_next("POST", r"/api/models/org/dst/commit/main", status=500)
    sent = len(hub.requests)
    run = gqa("push", second, "org/dst", "--force", token=HUB_TOKEN)
    assert run.returncode == 7, run.stderr
    (line,) = error_lines(run)
    assert line.startswith("error: org/dst: ") and "HTTP 500" in line
    assert "nothing was committed" in line
    assert remote_state(hub, "org/dst") == before
    assert any(r.method == "PUT" for r in hub.requests[sent:])  # the weights went up
    sent = len(hub.requests)
    run = gqa("push", second, "org/dst", "--force", token=HUB_TOKEN)
    assert run.returncode == 0, run.stderr
    assert not any(r.method == "PUT" for r in hub.requests[sent:])  # and not twice
    files = hub.files("org/dst")
    assert {name: files[name] for name in os.listdir(second)} == {
        p.name: p.read_bytes() for p in second.iterdir()
    }


def test_dry_run_lists_files_and_card_and_sends_nothing(hub, tmp_path):
    publish(hub, tmp_path)
    out = convert("org/src", tmp_path / "out")
    sent = len(hub.requests)
    run = gqa("push", out, "org/dst", "--dry-run", "--force", token=HUB_TOKEN)
    assert run.returncode == 0, run.stderr
    for path in out.iterdir():
        assert path.name in run.stdout and f"{path.stat().st_size:,}" in run.stdout
    assert "base_model: org/src" in run.stdout and "nothing sent" in run.stdout
    run = gqa("convert", "org/src", tmp_path / "x", "--no-verify", "--push-to", "org/dst")
    assert run.returncode == 2 and "--push-to" in run.stderr
    assert hub.requests[sent:] == []
    assert_secret_absent(HUB_TOKEN, run.stdout, run.stderr)


def test_push_to_after_a_forced_failed_verification_writes_but_does_not_push(hub, tmp_path):
    publish(hub, tmp_path)
    out = tmp_path / "out"
    sent = len(hub.requests)
    # No conversion reaches top-1 agreement 1.01: a verification that must fail.
    run = gqa(
        "convert",
        "org/src",
        out,
        "--force",
        "--min-top1",
        "1.01",
        "--push-to",
        "org/dst",
        token=HUB_TOKEN,
    )
    assert run.returncode == 5, run.stderr
    assert "not pushed" in run.stderr
    assert manifest(out)["verification"]["status"] == "failed-forced"
    assert [r for r in hub.requests[sent:] if "dst" in r.path] == []
    assert hub.repo("org/dst") is None


# --- verify and inspect a repo id ----------------------------------------------------------


def test_verify_a_hub_repo_id_online_pinned_and_offline(hub, tmp_path):
    """`verify org/src` resolves the repo as `convert` does (it said `no such folder`)."""
    from gqa_convert.verify import verify

    hub.create_repo("org/private", private=True)
    first = publish(hub, tmp_path, repo_id="org/private", seed=0)
    publish(hub, tmp_path, repo_id="org/private", seed=1)
    report = verify("org/private", revision=first, token=HUB_TOKEN, seq_len=16)
    assert report.passed, report.summary()
    assert report.reference["source"] == "org/private" and report.reference["revision"] == first
    run = gqa("verify", "org/private", "--json", "--seq-len", 16, token=HUB_TOKEN)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["passed"] is True
    assert_secret_absent(HUB_TOKEN, run.stdout, run.stderr)
    sent = len(hub.requests)
    run = gqa("verify", "org/private", "--json", "--seq-len", 16, HF_HUB_OFFLINE="1")
    assert run.returncode == 0, run.stderr
    assert len(hub.requests) == sent  # from the cache
    run = gqa("verify", "org/nothing", "--seq-len", 16, token=HUB_TOKEN)
    assert run.returncode == 7 and "org/nothing: repository not found" in run.stderr


def test_inspect_a_hub_repo_id_fetches_headers_only(hub, tmp_path):
    from gqa_convert.inspection import inspect_checkpoint

    sha = publish(hub, tmp_path, max_shard_size="100KB", tie_word_embeddings=True)
    local = inspect_checkpoint(tmp_path / "published" / "org--src")
    sent = len(hub.requests)
    remote = inspect_checkpoint("org/src", token=HUB_TOKEN)
    assert remote["revision"] == sha and remote["source"] == "org/src"
    fetched = remote.pop("fetched")
    assert {k: v for k, v in remote.items() if k not in ("source", "revision")} == {
        k: v for k, v in local.items() if k != "source"
    }
    shards = [n for n in remote["files"] if n.endswith(".safetensors")]
    assert len(shards) > 1
    for name in shards:
        assert fetched[name] < remote["files"][name]["bytes"] / 10, (name, fetched[name])
        gets = [r for r in hub.requests[sent:] if r.method == "GET" and r.path.endswith("/" + name)]
        assert [(r.status, r.range) for r in gets] == [
            (206, "bytes=0-7"),
            (206, f"bytes=8-{fetched[name] - 1}"),
        ]
    run = gqa("inspect", "org/src", "--json", token=HUB_TOKEN)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["fetched"] == fetched
    run = gqa("inspect", "org/src", "--revision", "nope")
    assert run.returncode == 7 and "revision 'nope' not found" in run.stderr
    run = gqa("inspect", "org/never-fetched", HF_HUB_OFFLINE="1")
    assert run.returncode == 7 and "not (fully) in the local cache" in run.stderr


def test_the_token_read_for_a_private_hub_source_never_reaches_output_or_files(hub, tmp_path):
    """The token-leak check where a token is actually read: a private source, every command
    that takes SRC, with --debug (tracebacks and debug logs on)."""
    hub.create_repo("org/private", private=True)
    publish(hub, tmp_path, repo_id="org/private")
    out = tmp_path / "out"
    runs = [
        gqa("--debug", "convert", "org/private", out, "--seq-len", 16, token=HUB_TOKEN),
        gqa("--debug", "verify", "org/private", "--seq-len", 16, "--token", HUB_TOKEN),
        gqa("--debug", "inspect", "org/private", "--json", token=HUB_TOKEN),
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert_secret_absent(HUB_TOKEN, run.stdout, run.stderr)
    # The token was read and sent: the server saw alice on the private repo's files.
    assert any(r.user == "alice" and "/org/private/resolve/" in r.path for r in hub.requests)
    assert_secret_absent(HUB_TOKEN, folders=(out, tmp_path / "hf-home"))
