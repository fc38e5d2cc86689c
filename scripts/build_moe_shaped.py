"""Build a random Mixtral-shaped checkpoint on disk, tensor by tensor, and measure that
converting it stays O(largest tensor) in memory, not O(expert layer) or O(model).

Shape (`SHAPE`): 2 layers, d_model 1024, 16 / 4 heads (d_head 64), 32 experts of width 1024,
top 4, vocab 8192, bf16, Mixtral's per-expert Hub names (block_sparse_moe.experts.{e}.w1/2/3):
436 MB in 2 shards. One expert layer (32 x 3 tensors of 2 MB, and attention) is 205 MB; the
largest tensor is the 16 MB embedding (or lm_head). Weights are random bf16 of +-[2^-8, 2^-4)
(build_llama8b_shaped's recipe), norms 1.

    python scripts/build_moe_shaped.py [FOLDER]            # default $GQA_CONVERT_CACHE/moe-shaped
    python scripts/build_moe_shaped.py [FOLDER] --measure  # then convert it (--no-verify, and
        # with the gate, layer-streamed), each in a child process: peak RSS (ru_maxrss, the
        # child spawned by a tiny launcher as scripts/bench.py does) against the tensor sizes
    python scripts/build_moe_shaped.py FOLDER --family gpt_oss --measure  # gpt-oss-20b's
        # width, 2 layers (GPT_OSS_SHAPE): 5.7 GB, experts stacked in 1.06 GB gate_up_proj
    python scripts/build_moe_shaped.py FOLDER --family gpt_oss_120b  # gpt-oss-120b's width:
        # 128 experts, 2 layers, about 15 GB (scripts/measure_moe_sub_layer.py runs the gate
        # on it under --max-memory 12GB, and an expert swap)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
from build_llama8b_shaped import attention_specs, write_checkpoint

from gqa_convert.checkpoint import (
    TensorSpec,
)

SHAPE = dict(layers=2, d_model=1024, n_heads=16, n_kv=4, d_head=64, d_expert=1024, experts=32)
SHAPE |= dict(top_k=4, vocab=8192)
SHARD_BYTES = 300_000_000
MB = 1 << 20


def hf_config(s: dict = SHAPE) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": s["d_model"],
        "intermediate_size": s["d_expert"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["n_heads"],
        "num_key_value_heads": s["n_kv"],
        "head_dim": s["d_head"],
        "num_local_experts": s["experts"],
        "num_experts_per_tok": s["top_k"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }


def specs(s: dict = SHAPE) -> list[TensorSpec]:
    m, i, v = s["d_model"], s["d_expert"], s["vocab"]
    out = [TensorSpec("model.embed_tokens.weight", "BF16", (v, m))]
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}."
        out += attention_specs(p, s)
        out += [
            TensorSpec(p + "block_sparse_moe.gate.weight", "BF16", (s["experts"], m)),
            TensorSpec(p + "input_layernorm.weight", "BF16", (m,)),
            TensorSpec(p + "post_attention_layernorm.weight", "BF16", (m,)),
        ]
        for e in range(s["experts"]):
            x = f"{p}block_sparse_moe.experts.{e}."
            out += [
                TensorSpec(x + "w1.weight", "BF16", (i, m)),
                TensorSpec(x + "w2.weight", "BF16", (m, i)),
                TensorSpec(x + "w3.weight", "BF16", (i, m)),
            ]
    out.append(TensorSpec("model.norm.weight", "BF16", (m,)))
    out.append(TensorSpec("lm_head.weight", "BF16", (v, m)))
    return out


# gpt-oss-20b at its real width, 2 of its 24 layers (issue 27): 64 / 8 heads of 64, 32 experts
# of width 2880 stacked as the Hub stacks them (dense bf16, not MXFP4), vocab 201088: 5.7 GB.
GPT_OSS_SHAPE = dict(layers=2, d_model=2880, n_heads=64, n_kv=8, d_head=64, d_expert=2880)
GPT_OSS_SHAPE |= dict(experts=32, top_k=4, vocab=201088)


def gpt_oss_config(s: dict = GPT_OSS_SHAPE) -> dict:
    return {
        **hf_config(s),
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * (s["layers"] // 2),
        "rope_theta": 150000,
        "rope_scaling": {
            **{"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0},
            **{"truncate": False, "original_max_position_embeddings": 4096},
        },
        "attention_bias": True,
        "swiglu_limit": 7.0,
    }


def gpt_oss_specs(s: dict = GPT_OSS_SHAPE) -> list[TensorSpec]:
    """gpt-oss's Hub names: biased attention with sinks, a biased router, experts stacked."""
    m, i, v, e = s["d_model"], s["d_expert"], s["vocab"], s["experts"]
    q, kv = s["n_heads"] * s["d_head"], s["n_kv"] * s["d_head"]
    out = [TensorSpec("model.embed_tokens.weight", "BF16", (v, m))]
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}."
        out += attention_specs(p, s)
        out += [
            TensorSpec(p + f"self_attn.{n}_proj.bias", "BF16", (q if n == "q" else kv,))
            for n in "qkv"
        ]
        out += [
            TensorSpec(p + "self_attn.o_proj.bias", "BF16", (m,)),
            TensorSpec(p + "self_attn.sinks", "BF16", (s["n_heads"],)),
            TensorSpec(p + "mlp.router.weight", "BF16", (e, m)),
            TensorSpec(p + "mlp.router.bias", "BF16", (e,)),
            TensorSpec(p + "mlp.experts.gate_up_proj", "BF16", (e, m, 2 * i)),
            TensorSpec(p + "mlp.experts.gate_up_proj_bias", "BF16", (e, 2 * i)),
            TensorSpec(p + "mlp.experts.down_proj", "BF16", (e, i, m)),
            TensorSpec(p + "mlp.experts.down_proj_bias", "BF16", (e, m)),
            TensorSpec(p + "input_layernorm.weight", "BF16", (m,)),
            TensorSpec(p + "post_attention_layernorm.weight", "BF16", (m,)),
        ]
    out.append(TensorSpec("model.norm.weight", "BF16", (m,)))
    out.append(TensorSpec("lm_head.weight", "BF16", (v, m)))
    return out


# gpt-oss-120b's width (issue 28): as gpt-oss-20b's, 128 experts: 2 layers, about 15 GB, one
# layer's experts 3.2B parameters (12.7 GB in fp32): no whole layer fits a 12 GB budget.
GPT_OSS_120B_SHAPE = {**GPT_OSS_SHAPE, "experts": 128}

FAMILIES = {
    "mixtral": (specs, hf_config, SHAPE),
    "gpt_oss": (gpt_oss_specs, gpt_oss_config, GPT_OSS_SHAPE),
    "gpt_oss_120b": (gpt_oss_specs, gpt_oss_config, GPT_OSS_120B_SHAPE),
}


def build(folder: Path, shape: dict | None = None, seed: int = 13, family: str = "mixtral") -> Path:
    """Write the checkpoint into `folder` (kept if there already), one tensor in memory;
    `shape` defaults to the family's."""
    make_specs, make_config, default = FAMILIES[family]
    shape = shape or default
    return write_checkpoint(folder, make_specs(shape), make_config(shape), SHARD_BYTES, seed)


def measure(src: Path, family: str = "mixtral") -> None:
    make_specs, _, shape = FAMILIES[family]
    all_specs = make_specs(shape)
    largest = max(s.nbytes for s in all_specs)
    layer = sum(s.nbytes for s in all_specs if s.name.startswith("model.layers.0."))
    total = sum(s.nbytes for s in all_specs)
    print(
        f"checkpoint {total / MB:.0f} MB, one layer {layer / MB:.0f} MB (experts and router), "
        f"largest tensor {largest / MB:.0f} MB"
    )
    # The floor: the modules `convert --no-verify` imports, no tensor read.
    imports = "import gqa_convert.cli, gqa_convert.api, gqa_convert.export, gqa_convert.mapping"
    base = bench.run_child(bench.python_child(imports))
    print(f"imports alone: peak RSS {base.rss_bytes / MB:.0f} MB")
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        for label, extra in (("--no-verify", ["--no-verify"]), ("gate, streamed", ["--streaming"])):
            out = Path(tmp) / f"out{len(extra[0])}"
            child = bench.run_child([*bench.cli(), "convert", str(src), str(out), *extra])
            print(
                f"convert {label}: peak RSS {child.rss_bytes / MB:.0f} MB, "
                f"wall {child.wall_s:.1f} s"
            )
            shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache = os.environ.get("GQA_CONVERT_CACHE") or Path.home() / ".cache" / "gqa-convert"
    parser.add_argument("folder", nargs="?", type=Path, default=Path(cache) / "moe-shaped")
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--family", choices=FAMILIES, default="mixtral")
    args = parser.parse_args()
    folder = build(args.folder.expanduser(), family=args.family)
    print(folder)
    if args.measure:
        measure(folder, args.family)


if __name__ == "__main__":
    main()
