"""Half precision with attention biases (issue 22, item 4): how far our bf16 / fp16 logits
are from HF's, on the families whose attention has biases and on bias-free ones.

For each case (a tiny random checkpoint built here with transformers, as the tests build
them) and each half dtype:
  gate     `verify(src, dtype=...)`'s max |logit diff| (HF's model vs ours, both in dtype)
  hf_err   max |HF in dtype - HF in fp32| over the same tokens
  our_err  max |ours in dtype - HF in fp32|
so a figure for the rounding of each side against an fp32 reference, next to the gate's.

Then, for one projection alone (Qwen2-0.5B's q_proj shape: d_model 896, 14 heads of 64, 80
positions, random weights and bias in TL's layout), max |x @ W + b - HF's F.linear| per
dtype for the two ways of computing it: `matmul + b` (two roundings in half precision) and
`baddbmm` (the bias folded in): why the forward uses baddbmm in half precision only.

Usage: python scripts/measure_half_bias.py [--seq-len 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gqa_convert.api import convert_in_memory
from gqa_convert.verify import verify
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens

# (family, overrides): biased first, then bias-free ones for comparison.
CASES = {
    "qwen2 (q/k/v bias)": ("qwen2", {}),
    "llama attention_bias (q/k/v/o)": ("llama", {"attention_bias": True}),
    "granite attention_bias (q/k/v/o)": ("granite", {"attention_bias": True}),
    "olmo2 attention_bias (q/k/v/o)": ("olmo2", {"attention_bias": True}),
    "smollm3 attention_bias (q/k/v/o)": ("smollm3", {"attention_bias": True}),
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen3": ("qwen3", {}),
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", {}),
}
DTYPES = ("bfloat16", "float16")


def figures(src: Path, dtype: str, seq_len: int) -> dict[str, float]:
    gate = verify(src, dtype=dtype, seq_len=seq_len, tolerances={"max_abs_logit_diff": 1e9})
    tokens = random_tokens(seq_len)
    half = getattr(torch, dtype)
    with torch.no_grad():
        exact = load_hf(src)(tokens).logits
        hf = load_hf(src, half)(tokens).logits.float()
        ours = convert_in_memory(src).to(half)(tokens).float()
    return {
        "gate": gate.max_abs_logit_diff,
        "hf_err": float((hf - exact).abs().max()),
        "our_err": float((ours - exact).abs().max()),
    }


def projection_figures() -> None:
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    n, m, h, pos = 14, 896, 64, 80
    print("\n| dtype | matmul + b vs F.linear | baddbmm vs F.linear |\n|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        W = (torch.randn(n, m, h, generator=g) * m**-0.5).to(dtype)
        b = torch.randn(n, h, generator=g).to(dtype)
        x = torch.randn(1, pos, m, generator=g).to(dtype)
        hf = F.linear(x[0], W.permute(0, 2, 1).reshape(n * h, m), b.flatten())
        hf = hf.unflatten(-1, (n, h)).permute(1, 0, 2)  # [n, pos, h]
        two = torch.matmul(x, W) + b[:, None, :]
        once = torch.baddbmm(b[:, None, :], x.expand(n, -1, -1), W)
        diffs = [float((t.float() - hf.float()).abs().max()) for t in (two, once)]
        print(f"| {str(dtype).removeprefix('torch.')} | {diffs[0]:.2g} | {diffs[1]:.2g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=40)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seq_len {args.seq_len}")
    header = "| case | " + " | ".join(
        f"{d} {k}" for d in ("bf16", "fp16") for k in ("gate", "hf_err", "our_err")
    )
    print(header + " |")
    print("|---" * (1 + 3 * len(DTYPES)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (family, overrides)) in enumerate(CASES.items()):
            src = make_hf_checkpoint(Path(tmp) / str(i), family, **overrides)
            row = [name]
            for dtype in DTYPES:
                f = figures(src, dtype, args.seq_len)
                row += [f"{f['gate']:.2g}", f"{f['hf_err']:.2g}", f"{f['our_err']:.2g}"]
            print("| " + " | ".join(row) + " |", flush=True)
    projection_figures()


if __name__ == "__main__":
    main()
