"""Run the CLI as a user does (a separate process) and check what it leaves on disk.

Every run gets a recognisable fake Hub token in its environment, so any test can assert
that the token never shows in output or in written files (`assert_no_secret`).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FAKE_TOKEN = "hf_FAKEtoken1234567890SECRET"
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# The work folders of export.atomic_folder: `.{OUT}.tmp-{host}-{pid}` and
# `.{OUT}.old-{host}-{pid}` (and an earlier version's, without the host).
WORK_FOLDER = re.compile(r"\..+\.(?:tmp|old)-(?:.+-)?\d+")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def message(self) -> str:
        """The first line of the error message, without its `error: ` prefix."""
        for line in self.stderr.splitlines():
            if line.startswith("error: "):
                return line.removeprefix("error: ")
        return ""


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI run: ours, plus the fake token, offline, a wide console."""
    env = {**os.environ, **dict.fromkeys(TOKEN_VARS, FAKE_TOKEN)}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200", **extra)
    return env


def cli_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "gqa_convert.cli", *map(str, args)]


def run_cli(*args: object, timeout: float = 120, drop_root: bool = False) -> Run:
    """`gqa-convert ARGS` in a subprocess. `drop_root`: without root's power to ignore
    file permissions (so a read-only folder is read-only to the test, even as root)."""
    done = subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
        preexec_fn=_drop_dac_override if drop_root else None,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def start_cli(*args: object) -> subprocess.Popen:
    """`gqa-convert ARGS` started in the background, Ctrl-C-able even if we ignore SIGINT."""
    return subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _drop_dac_override() -> None:
    # prctl(PR_CAPBSET_DROP, cap): the exec'd process keeps root's uid, not these powers.
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def can_drop_root() -> bool:
    """Whether `run_cli(drop_root=True)` works here (root needs CAP_SETPCAP for it)."""
    if os.geteuid() != 0:
        return True
    try:
        subprocess.run([sys.executable, "-c", ""], preexec_fn=_drop_dac_override, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def work_folders(parent: Path) -> list[str]:
    """The temporary / replaced-export folders the CLI left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if WORK_FOLDER.fullmatch(p.name))


def assert_no_secret(secret: str, *texts: str, folders: tuple[Path, ...] = ()) -> None:
    """`secret` is in none of `texts` and in no file under `folders`."""
    for text in texts:
        assert secret not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"{secret!r} found in {path}"
