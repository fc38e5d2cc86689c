"""Benchmarks for issue 14: generation with our KV cache against transformers' `generate`.

    a. KV-cache bytes per token: ours (`model.new_cache()` after a generation) vs HF's cache
       (`generate(..., return_dict_in_generate=True)`) vs the size expanded to n_heads
    b. decode tokens/s: `GQATransformer.generate` vs HF `generate` (greedy, fp32, batch 1,
       same process, same prompt); each pair of runs is interleaved (order alternating) and
       the figure is the median of the per-pair ratios. Decode-only time is
       T(N new tokens) - T(1 new token), so the prefill cancels.
    c. what re-rotating every cached key at each step would cost (TL's `KeyValueCacheEntry`
       keeps keys unrotated): one step's `apply_rotary` over the keys held, all layers, as a
       share of one of our decode steps. Our `LayerCache` holds keys after rotary instead.
    d. decode tokens/s of `--long` new tokens (default 512: the buffers grow twice) with the
       cache grown in blocks (issue 22) vs allocated for the whole call at once (the cache
       before it: `LayerCache.BLOCK` past the capacity), paired and interleaved as in b,
       at the first thread count.

The model is a random Llama-shaped checkpoint built here with transformers (d_model 1024,
8 layers, 16 heads / 4 KV heads, d_head 64, d_mlp 2816, vocab 32000, untied: 151 M
parameters, 605 MB fp32), cached in $GQA_CONVERT_CACHE/bench-generate-llama. Writes its table
into BENCHMARKS.md between the `bench-generate:begin` / `bench-generate:end` markers
(`--no-write` to skip).

Usage: python scripts/bench_generate.py [--runs 5] [--new 64] [--prompt 32] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gqa_convert import convert_in_memory  # noqa: E402
from gqa_convert.model.kv_cache import LayerCache  # noqa: E402
from gqa_convert.model.rotary import apply_rotary  # noqa: E402

BEGIN, END = "<!-- bench-generate:begin -->", "<!-- bench-generate:end -->"
SHAPE = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=2816,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
RECIPE = 1


def checkpoint() -> Path:
    cache = os.environ.get("GQA_CONVERT_CACHE") or Path.home() / ".cache" / "gqa-convert"
    folder = Path(cache).expanduser() / "bench-generate-llama"
    marker = folder / ".bench-complete"
    if marker.exists() and marker.read_text().strip() == str(RECIPE):
        return folder
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    marker.write_text(f"{RECIPE}\n")
    return folder


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="paired runs (median)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--threads", default="1,2", help="torch thread counts for figure b")
    parser.add_argument("--long", type=int, default=512, help="new tokens for figure d")
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(threads[0])
    started, when = time.perf_counter(), datetime.datetime.now()
    load = os.getloadavg()[0]

    from transformers import AutoModelForCausalLM

    src = checkpoint()
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ours = convert_in_memory(src)
    cfg = ours.cfg
    tokens = torch.randint(
        0, cfg.d_vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)
    )
    n = args.new

    def run_ours(new: int, cache=None):
        return ours.generate(tokens, new, eos_token_id=[], cache=cache)

    def run_hf(new: int, **kw):
        with torch.no_grad():
            return hf.generate(
                tokens, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0, **kw
            )

    # a. bytes per token, and the same tokens from both
    cache = ours.new_cache()
    mine = run_ours(n, cache)
    out = run_hf(n, return_dict_in_generate=True)
    assert torch.equal(mine, out.sequences), "greedy tokens differ from HF's"
    hf_cache = out["cache"] if "cache" in out else out["past_key_values"]
    hf_bytes = sum(
        t.untyped_storage().nbytes()
        for layer in hf_cache.layers
        for t in (layer.keys, layer.values)
    )
    fed = cache.length
    itemsize = 4
    expanded = 2 * cfg.n_layers * cfg.n_heads * cfg.d_head * itemsize
    formula = 2 * cfg.n_layers * cfg.n_key_value_heads * cfg.d_head * itemsize
    ours_per_token, hf_per_token = cache.nbytes / fed, hf_bytes / hf_cache.get_seq_length()

    # b. decode speed, paired and interleaved, per thread count
    speed = {}
    for count in threads:
        torch.set_num_threads(count)
        for _ in range(2):  # warm-up
            run_ours(n), run_hf(n)
        ratios, ours_tps, hf_tps, ours_e2e, hf_e2e = [], [], [], [], []
        for i in range(args.runs):
            sides = [("ours", run_ours), ("hf", run_hf)]
            times = {}
            for name, fn in sides if i % 2 == 0 else sides[::-1]:
                full, one = timed(lambda fn=fn: fn(n)), timed(lambda fn=fn: fn(1))
                times[name] = (full, max(full - one, 1e-9))
            ours_tps.append((n - 1) / times["ours"][1])
            hf_tps.append((n - 1) / times["hf"][1])
            ours_e2e.append(n / times["ours"][0])
            hf_e2e.append(n / times["hf"][0])
            ratios.append(ours_tps[-1] / hf_tps[-1])
        speed[count] = (ratios, ours_tps, hf_tps, ours_e2e, hf_e2e)
    torch.set_num_threads(threads[0])

    # c. re-rotating the held keys every step (TL's unrotated cache), vs one decode step
    mean_len = args.prompt + n // 2
    keys = torch.randn(1, mean_len, cfg.n_key_value_heads, cfg.d_head)
    step = statistics.median(
        timed(lambda: run_ours(2)) - timed(lambda: run_ours(1)) for _ in range(3)
    )

    def rerotate():
        positions = torch.arange(mean_len)
        for _ in range(cfg.n_layers):
            cos, sin = ours.rotary(mean_len, torch.float32, positions=positions)
            apply_rotary(keys, cos, sin)

    rerotate()
    rot = statistics.median(timed(rerotate) for _ in range(5))

    # d. the cache grown in blocks vs allocated at once (first allocation = the capacity)
    block = LayerCache.BLOCK

    def run_at_once(new: int):
        LayerCache.BLOCK = 2**62
        try:
            return run_ours(new)
        finally:
            LayerCache.BLOCK = block

    growth: dict[str, list[float]] = {"blocks": [], "once": []}
    for i in range(args.runs):
        sides = [("blocks", run_ours), ("once", run_at_once)]
        for name, fn in sides if i % 2 == 0 else sides[::-1]:
            full, one = timed(lambda fn=fn: fn(args.long)), timed(lambda fn=fn: fn(1))
            growth[name].append((args.long - 1) / max(full - one, 1e-9))
    growth_ratios = [b / o for b, o in zip(growth["blocks"], growth["once"], strict=True)]

    med = statistics.median
    rows = [
        (
            "a. KV cache bytes per token (fp32)",
            f"{ours_per_token:,.0f} B",
            f"HF cache {hf_per_token:,.0f} B; expanded to n_heads {expanded:,} B",
            f"{ours_per_token / expanded:.2f}x of expanded",
            f"= 2 x {cfg.n_layers} layers x {cfg.n_key_value_heads} KV heads x {cfg.d_head}"
            f" x 4 = {formula:,} B",
        ),
    ]
    for count, (ratios, ours_tps, hf_tps, ours_e2e, hf_e2e) in speed.items():
        verdict = "pass" if med(ratios) >= 1.0 else "**fail**"
        rows += [
            (
                f"b. decode tokens/s, {count} thread(s), batch 1, prompt {args.prompt}, "
                f"{n} new, greedy fp32",
                f"{med(ours_tps):.1f} tok/s",
                f"HF generate {med(hf_tps):.1f} tok/s",
                f"{med(ratios):.2f}x (median of {args.runs} paired: "
                + ", ".join(f"{r:.2f}" for r in ratios)
                + ")",
                f">= 1.0x: {verdict}",
            ),
            (
                f"b. end-to-end (prefill + decode) tokens/s, {count} thread(s)",
                f"{med(ours_e2e):.1f} tok/s",
                f"HF generate {med(hf_e2e):.1f} tok/s",
                f"{med(ours_e2e) / med(hf_e2e):.2f}x",
                "-",
            ),
        ]
    rows += [
        (
            f"c. re-rotating {mean_len} held keys x {cfg.n_layers} layers per step",
            f"{rot * 1e3:.2f} ms",
            f"one decode step {step * 1e3:.1f} ms",
            f"{rot / step:.1%} of a step",
            "avoided: keys cached after rotary",
        ),
        (
            f"d. decode tokens/s, {threads[0]} thread(s), prompt {args.prompt}, {args.long} new, "
            f"cache grown in blocks of {block} then doubling",
            f"{med(growth['blocks']):.1f} tok/s",
            f"allocated at once {med(growth['once']):.1f} tok/s",
            f"{med(growth_ratios):.2f}x (median of {args.runs} paired: "
            + ", ".join(f"{r:.2f}" for r in growth_ratios)
            + ")",
            "the cache before issue 22 allocated prompt + max_new_tokens at once",
        ),
    ]
    lines = [
        f"`python scripts/bench_generate.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"on {when:%Y-%m-%d %H:%M}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at the start, Python {platform.python_version()}, "
        f"torch {torch.__version__}; took {time.perf_counter() - started:.0f} s.",
        "",
        "| figure | ours | baseline | ratio | note |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in rows],
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        path = REPO / "BENCHMARKS.md"
        text = path.read_text()
        if BEGIN not in text:
            text = f"{text.rstrip()}\n\n## Generation (issue 14)\n\n{BEGIN}\n{END}\n"
        head, rest = text.split(BEGIN, 1)
        path.write_text(f"{head}{BEGIN}\n{section}\n{END}{rest.split(END, 1)[1]}")
        print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
