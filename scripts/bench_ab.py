"""Before / after of a change: the same commands run from two source trees, interleaved.

    python scripts/bench_ab.py BEFORE [--after REPO] [--runs 5] [--what convert,verify] [--src SRC]

BEFORE is a checkout of the code before the change (`git worktree add /tmp/before HEAD~1`),
AFTER this repository by default. Each command runs as `python -P -m gqa_convert.cli ...`
with PYTHONPATH set to one tree (-P: not the working directory; which tree each side imports
is checked first), on the 16-layer bench checkpoint of scripts/bench.py (built into its
cache if missing) or SRC, before and after alternating, before first on even runs; each
figure is the median of its runs and a wall ratio the median of the per-pair ratios (a
pair sees about the same load on a shared machine). Peak RSS and CPU seconds are the
child's own (bench.py's launcher).

  convert  `convert SRC OUT --no-verify` (OUT removed after each run)
  verify   `verify SRC OUT --no-streaming`, OUT a --no-verify export written once
  verify-src  `verify SRC --no-streaming` (ours mapped from SRC in memory)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/, beside this file

WHICH = "import gqa_convert, sys; print(gqa_convert.__file__)"


def tree_argv(tree: Path, *args: str) -> list[str]:
    return ["env", f"PYTHONPATH={tree}", sys.executable, "-P", "-m", "gqa_convert.cli", *args]


def imported_from(tree: Path) -> Path:
    out = subprocess.run(
        ["env", f"PYTHONPATH={tree}", sys.executable, "-P", "-c", WHICH],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip()).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path, help="checkout of the code before the change")
    parser.add_argument("--after", type=Path, default=bench.REPO, help="the changed checkout")
    parser.add_argument("--runs", type=int, default=5, help="runs per side (median)")
    parser.add_argument("--what", default="convert,verify", help="convert, verify, verify-src")
    parser.add_argument("--layers", type=int, default=16, help="layers of the bench checkpoint")
    parser.add_argument("--src", type=Path, help="another checkpoint instead of the bench one")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        got = imported_from(tree)
        if got != tree:
            sys.exit(f"{name}: PYTHONPATH={tree} imports gqa_convert from {got}")
    src = args.src or bench.checkpoint(args.layers)
    bench.warm(src)
    work = bench.scratch()
    subprocess.run(
        tree_argv(trees["before"], "convert", str(src), str(work / "plain"), "--no-verify"),
        check=True,
        capture_output=True,
    )
    commands = {
        "convert": lambda: ["convert", str(src), str(work / "out"), "--no-verify"],
        "verify": lambda: ["verify", str(src), str(work / "plain"), "--no-streaming"],
        "verify-src": lambda: ["verify", str(src), "--no-streaming"],
    }
    name = src.name if args.src else f"{args.layers}L bench checkpoint"
    print(f"{name}, {args.runs} runs per side, {bench.machine()}")
    print("| command | before | after | after / before (wall) | CPU s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for what in args.what.split(","):
        runs: dict[str, list[bench.Child]] = {"before": [], "after": []}
        for i in range(args.runs):
            for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
                runs[side].append(bench.run_child(tree_argv(trees[side], *commands[what]())))
                shutil.rmtree(work / "out", ignore_errors=True)
        b, a = runs["before"], runs["after"]
        ratio = statistics.median(x.wall_s / y.wall_s for x, y in zip(a, b, strict=True))

        def med(children: list[bench.Child], field: str) -> float:
            return statistics.median(getattr(c, field) for c in children)

        print(
            f"| {what} | {med(b, 'wall_s'):.2f} s | {med(a, 'wall_s'):.2f} s | {ratio:.2f}x | "
            f"{med(b, 'cpu_s'):.1f} -> {med(a, 'cpu_s'):.1f} | "
            f"{med(b, 'rss_bytes') / 1e6:,.0f} -> {med(a, 'rss_bytes') / 1e6:,.0f} MB |",
            flush=True,
        )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
