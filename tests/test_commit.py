"""The commit point: the rename that puts an export at OUT never destroys what the run did
not write, replaces atomically, and comes after everything written is flushed to disk.

"Mid-run" is made deterministic with the test barrier of `export.atomic_folder`: a run
started with GQA_CONVERT_TEST_BARRIER=FIFO has finished its temporary folder and passed
its start-up check when it opens FIFO, and commits once the test closes its end. Waiting
for a run to reach it polls, but nothing depends on how long anything takes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from gqa_convert import GQATransformer, convert
from gqa_convert import export as export_module
from gqa_convert.errors import OutputError
from gqa_convert.export import HOST, MANIFEST_NAME, TEST_BARRIER_ENV, rename_noreplace
from tests.cli_subprocess import Run, cli_command, cli_env, work_folders
from tests.hf_models import make_hf_checkpoint

STAMPED = {MANIFEST_NAME, "README.md"}  # they hold a timestamp


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Two checkpoints of one shape (same file names and sizes), different weights, and an
    export of each."""
    base = tmp_path_factory.mktemp("commit")
    found = {}
    for name, seed in (("a", 0), ("b", 1)):
        src = make_hf_checkpoint(base / f"src-{name}", "llama", seed=seed)
        found[name] = src
        found[f"{name}-export"] = convert(src, base / f"export-{name}", verify=False)
    return found


def digests(folder: Path) -> dict[str, str | None]:
    return {
        p.name: None if p.name in STAMPED else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
    }


def assert_whole_export(folder: Path, reference: Path) -> None:
    """`folder` holds exactly `reference`'s files and bytes, and its manifest's hashes."""
    assert digests(folder) == digests(reference)
    files = json.loads((folder / MANIFEST_NAME).read_text())["output"]["files"]
    for name, entry in files.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"], name
    GQATransformer.from_pretrained(folder)


class Held:
    """`gqa-convert ARGS` in a subprocess that stops at the commit until `release()`."""

    def __init__(self, fifo: Path, *args: object):
        os.mkfifo(fifo)
        self.fifo, self._fd = fifo, None
        env = cli_env(**{TEST_BARRIER_ENV: str(fifo)})
        self.proc = subprocess.Popen(
            cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def wait_at_commit(self) -> None:
        """Return once the run has opened the FIFO: its export is finished, not committed."""
        while True:
            try:
                self._fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                return
            except OSError as e:  # ENXIO: no reader yet
                if e.errno != errno.ENXIO:
                    raise
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended before its commit: {self.proc.communicate()}")
            time.sleep(0.01)

    def release(self) -> None:
        os.close(self._fd)  # the run reads end-of-file and commits

    def result(self) -> Run:
        stdout, stderr = self.proc.communicate()
        return Run(self.proc.returncode, stdout, stderr)


def one_error_line(run: Run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return run.message


def user_folder_appears_at_commit(run: Held, out: Path):
    """Hold `run` just before its commit, make a user's folder with a file at `out`, then
    let it finish; its result."""
    run.wait_at_commit()
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    run.release()
    return run.result()


def test_a_folder_created_at_out_mid_run_is_left_alone(sources, tmp_path):
    out = tmp_path / "out"
    run = Held(tmp_path / "fifo", "convert", sources["a"], out, "--no-verify")
    done = user_folder_appears_at_commit(run, out)

    assert done.code == 6
    message = one_error_line(done)
    kept = tmp_path / f"out.new-{run.proc.pid}"
    assert message == (
        f"{out}: appeared during the conversion; left as it is, the finished export is kept "
        f"in {kept}"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert_whole_export(kept, sources["a-export"])
    assert work_folders(tmp_path) == []


def test_overwrite_never_replaces_a_non_checkpoint_that_appears_mid_run(sources, tmp_path):
    out = tmp_path / "out"
    run = Held(tmp_path / "fifo", "convert", sources["a"], out, "--no-verify", "--overwrite")
    done = user_folder_appears_at_commit(run, out)

    assert done.code == 6
    assert "was replaced during the conversion by a non-checkpoint" in one_error_line(done)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert_whole_export(tmp_path / f"out.new-{run.proc.pid}", sources["a-export"])
    assert work_folders(tmp_path) == []


def test_two_concurrent_writers_exactly_one_wins_whole(sources, tmp_path):
    out = tmp_path / "out"
    runs = {
        name: Held(tmp_path / f"fifo-{name}", "convert", sources[name], out, "--no-verify")
        for name in ("a", "b")
    }
    for run in runs.values():  # both past the start-up check, both exports finished
        run.wait_at_commit()
    for run in runs.values():
        run.release()
    results = {name: run.result() for name, run in runs.items()}

    assert sorted(r.code for r in results.values()) == [0, 6], results
    winner = next(name for name, r in results.items() if r.code == 0)
    loser = "b" if winner == "a" else "a"
    assert_whole_export(out, sources[f"{winner}-export"])
    assert one_error_line(results[loser]).startswith(f"{out}: appeared during the conversion")
    assert_whole_export(tmp_path / f"out.new-{runs[loser].proc.pid}", sources[f"{loser}-export"])
    assert work_folders(tmp_path) == []


def test_overwrite_under_a_concurrent_reader_never_shows_out_absent_or_partial(sources, tmp_path):
    out = tmp_path / "out"
    convert(sources["a"], out, verify=False)
    names = {p.name for p in out.iterdir()}
    assert names == {p.name for p in sources["b-export"].iterdir()}  # one listing for both
    seen, problems, stop = [], [], threading.Event()

    def look() -> None:
        try:
            fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            problems.append("OUT absent")
            return
        try:
            listed = set(os.listdir(fd))
            inode = os.fstat(fd).st_ino
            current = os.stat(out).st_ino == inode  # else OUT was swapped while listing
        finally:
            os.close(fd)
        if current and listed != names:
            problems.append(f"OUT holds {sorted(listed)}")
        seen.append(inode)

    def poll() -> None:
        while not stop.is_set():
            look()

    run = Held(tmp_path / "fifo", "convert", sources["b"], out, "--no-verify", "--overwrite")
    run.wait_at_commit()
    look()  # the old export
    reader = threading.Thread(target=poll)
    reader.start()
    run.release()
    done = run.result()
    stop.set()
    reader.join()
    look()  # the new one

    assert done.code == 0, done.stderr
    assert problems == []
    assert len(set(seen)) >= 2 and len(seen) > 2  # the reader did watch the swap
    assert_whole_export(out, sources["b-export"])
    assert work_folders(tmp_path) == []  # the replaced export is removed


@pytest.mark.parametrize("overwrite", [False, True])
def test_every_file_and_folder_is_fsynced_before_the_rename(
    sources, tmp_path, monkeypatch, overwrite
):
    out = tmp_path / "out"
    if overwrite:
        convert(sources["b"], out, verify=False)
    events = []
    real_fsync, real_renameat2 = os.fsync, export_module.renameat2

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def renameat2(src: Path, dst: Path, flags: int) -> bool:
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst), flags))
        return real_renameat2(src, dst, flags)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(export_module, "renameat2", renameat2)
    convert(sources["a"], out, overwrite=overwrite)  # verified: the gate reads, never writes

    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 1, events
    _, tmp, dst, flags = events[renames[0]]
    assert dst == os.path.realpath(out)
    assert Path(tmp).name == f".out.tmp-{HOST}-{os.getpid()}"
    assert flags == (export_module.RENAME_EXCHANGE if overwrite else export_module.RENAME_NOREPLACE)
    before = [e[1] for e in events[: renames[0]] if e[0] == "fsync"]
    after = [e[1] for e in events[renames[0] :] if e[0] == "fsync"]
    files = sorted(p.name for p in out.iterdir())
    assert {MANIFEST_NAME, "README.md", "config.json", "model.safetensors"} <= set(files)
    for name in files:
        assert os.path.join(tmp, name) in before, name
    assert before[-1] == tmp  # the folder, once every file in it is flushed
    assert after == [os.path.realpath(tmp_path)]  # the parent, for the rename itself


def test_the_library_convert_verifies_by_default(sources, tmp_path):
    out = convert(sources["a"], tmp_path / "out")
    verification = json.loads((out / MANIFEST_NAME).read_text())["verification"]
    assert verification["status"] == "passed"
    assert verification["report"]["passed"] is True and verification["report"]["tokens"] > 0


def test_rename_noreplace_without_renameat2_never_replaces_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_RENAMEAT2", None)  # an old libc, or not Linux

    def folder(name: str, *files: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for f in files:
            (path / f).write_text(f)
        return path

    src = folder("src", "model.safetensors")
    full, empty = folder("full", "notes.txt"), folder("empty")
    (tmp_path / "file").write_text("a file")
    for dst in (full, empty, tmp_path / "file"):
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
    assert list(empty.iterdir()) == [] and (tmp_path / "file").read_text() == "a file"
    rename_noreplace(src, tmp_path / "new")
    assert not src.exists() and (tmp_path / "new" / "model.safetensors").is_file()


def test_without_renameat2_a_conflict_is_still_refused(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_RENAMEAT2", None)
    out = tmp_path / "out"
    real = export_module.sync_tree

    def someone_writes_out(folder: Path) -> None:  # just before the commit
        real(folder)
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    monkeypatch.setattr(export_module, "sync_tree", someone_writes_out)
    with pytest.raises(OutputError, match="appeared during the conversion"):
        convert(sources["a"], out, verify=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert_whole_export(tmp_path / f"out.new-{os.getpid()}", sources["a-export"])
