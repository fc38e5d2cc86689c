"""`gqa-convert convert --no-verify` of a Llama-3.1-8B-shaped fine-grained FP8 checkpoint:
peak memory against the largest dense tensor, wall time against `cp -r` of the source.

The checkpoint (random e4m3 with float32 scales per 128 x 128 block, bf16 embedding and
lm_head: 9.1 GB, `build_llama8b_shaped.py --fp8`) is built once, shard by shard. Each command
runs under `/usr/bin/time -v` (peak RSS is its maxrss); `cp -r` and the conversion alternate
`--runs` times, and the export (16.1 GB of bf16, the default dtype of a quantised source) is
removed after each run.

    python scripts/bench_fp8.py [FOLDER] [--runs N] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_llama8b_shaped import SHARD_BYTES, fp8_config, fp8_specs, write_checkpoint


def timed(command: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU s, peak RSS bytes) of `command` under /usr/bin/time -v."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", done.stderr).group(1).strip()

    clock = [float(x) for x in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(x * 60**i for i, x in enumerate(reversed(clock)))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    return wall, cpu, int(field("Maximum resident set size (kbytes)")) * 1024


def main() -> None:
    cache = Path(os.environ.get("GQA_CONVERT_CACHE") or Path.home() / ".cache" / "gqa-convert")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=cache / "llama8b-fp8")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="where the copies go")
    args = parser.parse_args()
    specs = fp8_specs()
    src = write_checkpoint(args.folder.expanduser(), specs, fp8_config(), SHARD_BYTES, 8, True)
    work = args.work or src.parent
    source_bytes = sum(p.stat().st_size for p in src.iterdir())
    largest_stored = max(s.nbytes for s in specs)
    largest_fp32 = max(4 * s.nbytes for s in specs if s.dtype == "F8_E4M3")  # dequantised
    gqa = shutil.which("gqa-convert") or sys.exit("gqa-convert is not on PATH")
    runs: dict[str, list[tuple[float, float, int]]] = {"cp": [], "convert": []}
    for _ in range(args.runs):
        copy, out = work / "bench-fp8-cp", work / "bench-fp8-out"
        for path in (copy, out):
            shutil.rmtree(path, ignore_errors=True)
        runs["cp"].append(timed(["cp", "-r", str(src), str(copy)]))
        shutil.rmtree(copy)
        runs["convert"].append(timed([gqa, "convert", str(src), str(out), "--no-verify"]))
        written = sum(p.stat().st_size for p in out.iterdir())
        shutil.rmtree(out)
    cp_wall = statistics.median(r[0] for r in runs["cp"])
    wall = statistics.median(r[0] for r in runs["convert"])
    cpu = statistics.median(r[1] for r in runs["convert"])
    peak = max(r[2] for r in runs["convert"])
    print(f"source: {src} ({source_bytes / 1e9:.2f} GB); export written: {written / 1e9:.2f} GB")
    print(f"largest stored tensor {largest_stored / 1e9:.2f} GB (the bf16 embedding);")
    print(f"largest FP8 tensor dequantised to float32 {largest_fp32 / 1e9:.3f} GB")
    convert_runs = [round(r[0], 1) for r in runs["convert"]]
    cp_runs = [round(r[0], 1) for r in runs["cp"]]
    print(f"convert --no-verify: wall {wall:.1f} s (runs {convert_runs}), CPU {cpu:.1f} s")
    print(f"  peak RSS {peak / 1e9:.2f} GB = {peak / largest_stored:.2f}x the largest tensor")
    print(f"cp -r: wall {cp_wall:.1f} s (runs {cp_runs}); ratio {wall / cp_wall:.1f}x")


if __name__ == "__main__":
    main()
