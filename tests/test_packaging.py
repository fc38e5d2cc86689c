"""A non-editable install carries configs/ (the family tables) inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_every_family_table(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gqa_convert-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tables = {f"gqa_convert/configs/{p.name}" for p in (ROOT / "configs").glob("*.toml")}
    assert tables and tables <= names
