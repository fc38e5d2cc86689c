"""Half precision with attention biases (issue 22, item 4): how far our bf16 / fp16 logits
are from HF's, on the families whose attention has biases and on bias-free ones.

For each case (a tiny random checkpoint built here with transformers, as the tests build
them) and each half dtype:
  gate     `verify(src, dtype=...)`'s max |logit diff| (HF's model vs ours, both in dtype)
  hf_err   max |HF in dtype - HF in fp32| over the same tokens
  our_err  max |ours in dtype - HF in fp32|
so a figure for the rounding of each side against an fp32 reference, next to the gate's.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=40)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
