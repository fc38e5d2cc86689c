"""What flushing the export costs: `gqa-convert convert SRC OUT --no-verify` on the benchmark
checkpoint (scripts/bench.py builds it into $GQA_CONVERT_CACHE/bench-llama-16L).

1. The wall time spent inside each `os.fsync` of one conversion (its file named through
   /proc/self/fd), `--runs` times.
2. Whole conversions, interleaved: every fsync (this code), only the shards' own fsync at
   close (the code before issue 15), and none (`os.fsync` patched out). Median and runs.

Usage: python scripts/fsync_cost.py [--runs N] [--src FOLDER]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402

TIMED = """
import atexit, json, os, sys, time
real, spent = os.fsync, []
def fsync(fd):
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    start = time.perf_counter()
    real(fd)
    spent.append((name, time.perf_counter() - start))
os.fsync = fsync
atexit.register(lambda: print(json.dumps(spent), file=sys.__stdout__))
"""
VARIANTS = {
    "every fsync": "",
    "shards' fsync only": (
        "import gqa_convert.export as e; e.sync_tree = e.fsync_folder = lambda path: None"
    ),
    "no fsync": "import os; os.fsync = lambda fd: None",
}
RUN_CLI = "\nimport sys; from gqa_convert.cli import main; sys.argv[0] = 'gqa-convert'; main()"


def convert(patch: str, src: Path, out: Path) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)  # start each run with no dirty pages of the last
    argv = [sys.executable, "-c", patch + RUN_CLI, "convert", str(src), str(out), "--no-verify"]
    start = time.perf_counter()
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--src", type=Path, default=None)
    args = parser.parse_args()
    src = args.src or bench.checkpoint(16)
    bench.warm(src)
    with tempfile.TemporaryDirectory(dir=bench.cache_dir()) as work:
        out = Path(work) / "out"
        for _ in range(args.runs):
            _, stdout = convert(TIMED, src, out)
            spent = json.loads(stdout.strip().splitlines()[-1])
            total = sum(s for _, s in spent)
            calls = ", ".join(f"{name} {s:.3f}" for name, s in spent)
            print(f"{len(spent)} fsync calls, {total:.2f} s inside them: {calls}")
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.runs):
            for name, patch in VARIANTS.items():
                times[name].append(convert(patch, src, out)[0])
    for name, runs in times.items():
        listed = ", ".join(f"{t:.2f}" for t in runs)
        print(f"{name}: median {statistics.median(runs):.2f} s (runs {listed})")


if __name__ == "__main__":
    main()
