"""Issue 22, item 4: the cost of rounding the attention projections as HF does.

`GroupedQueryAttention._project` folds the bias into the half-precision batched matmul
(`baddbmm`: one rounding, as HF's `F.linear`) and keeps `matmul + b` in fp32;
`_project_out` is `F.linear(z, W_O, b_O)` (an addmm) in every dtype. This times the plain
forward of a whole model (`GQATransformer.forward`, no generate, SDPA path) with:

    old       matmul + b for Q/K/V, z @ W_O + b_O          (before issue 22)
    new       the code as it is
    baddbmm   baddbmm for Q/K/V in fp32 too                (the option not taken)

For each dtype and length, runs are interleaved (old, new, baddbmm, then again in another
order) and each figure is the median over `--runs` of its time / old's in the same round.

The model: bench_generate.py's Llama shape (d_model 1024, 8 layers, 16 heads / 4 KV heads,
d_head 64, d_mlp 2816, vocab 32000) with random weights and q/k/v/o biases, built in memory.

Usage: python scripts/bench_projection.py [--runs 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gqa_convert.config import from_hf
from gqa_convert.model.attention import GroupedQueryAttention
from gqa_convert.model.decoder import GQATransformer

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "intermediate_size": 2816,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "attention_bias": True,
}


def old_project(self, name, x, W, b):
    if x.ndim == 3:
        batch, pos, _ = x.shape
        out = torch.matmul(x.reshape(1, batch * pos, -1), W)
        return out.permute(1, 0, 2).unflatten(0, (batch, pos)) + b
    return torch.einsum("bpnm,nmh->bpnh", x, W) + b


def old_project_out(self, z):
    return z.flatten(2) @ self.W_O.flatten(0, 1) + self.b_O


def baddbmm_project(self, name, x, W, b):
    if x.ndim == 3:
        batch, pos, m = x.shape
        x = x.reshape(1, batch * pos, m)
        out = torch.baddbmm(b[:, None, :], x.expand(W.shape[0], -1, -1), W)
        return out.permute(1, 0, 2).unflatten(0, (batch, pos))
    return torch.einsum("bpnm,nmh->bpnh", x, W) + b


VARIANTS = {
    "old": {"_project": old_project, "_project_out": old_project_out},
    "new": {},
    "baddbmm": {"_project": baddbmm_project},
}


@contextmanager
def variant(name: str):
    saved = {k: getattr(GroupedQueryAttention, k) for k in VARIANTS[name]}
    for k, fn in VARIANTS[name].items():
        setattr(GroupedQueryAttention, k, fn)
    try:
        yield
    finally:
        for k, fn in saved.items():
            setattr(GroupedQueryAttention, k, fn)


def model() -> GQATransformer:
    torch.manual_seed(0)
    m = GQATransformer(from_hf(HF_CONFIG))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.eval()


def timed(m: GQATransformer, tokens: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        m(tokens)
        start = time.perf_counter()
        for _ in range(reps):
            m(tokens)
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = model()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.runs} rounds")
    print("| dtype | tokens | old ms | new / old | baddbmm / old |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        m = base.to(dtype)
        for n_pos in (1, 128):
            tokens = torch.randint(0, 32000, (1, n_pos))
            reps = 20 if n_pos == 1 else 3
            ratios: dict[str, list[float]] = {"new": [], "baddbmm": []}
            olds = []
            for r in range(args.runs):
                order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
                times = {}
                for name in order:
                    with variant(name):
                        times[name] = timed(m, tokens, reps)
                olds.append(times["old"])
                for name in ratios:
                    ratios[name].append(times[name] / times["old"])
            print(
                f"| {str(dtype).removeprefix('torch.')} | {n_pos} | "
                f"{statistics.median(olds) * 1e3:.2f} | "
                f"{statistics.median(ratios['new']):.3f} | "
                f"{statistics.median(ratios['baddbmm']):.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
