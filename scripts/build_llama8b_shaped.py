"""Build a random checkpoint shaped like Llama-3.1-8B, shard by shard, never whole in memory.

32 layers, d_model 4096, 32 / 8 heads (d_head 128), d_mlp 14336, vocab 128256, untied, bf16:
16.06 GB in 4 shards. Weights are random bf16 of +-[2^-8, 2^-4) (scripts/bench.py's recipe),
norms 1. Rope: theta 500000, no llama3 scaling, so verify's default input stays 128 tokens
(with Llama-3.1's llama3 scaling it would be 1024; `--seq-len 128` gives the same load).

    python scripts/build_llama8b_shaped.py [FOLDER]  # default $GQA_CONVERT_CACHE/llama8b-shaped
    python scripts/build_llama8b_shaped.py FOLDER --swap-kv 20 # also FOLDER-swap-kv20: a copy
        # (hard links, but the shard holding layer 20's k_proj is copied) with KV heads 0 and 1
        # of that k_proj swapped in place. `verify FOLDER-swap-kv20 OUT`, OUT converted from
        # FOLDER, must fail at layer 20, k (`convert` of the copy passes: both sides read it)
    python scripts/build_llama8b_shaped.py FOLDER --fp8  # the same shape as a fine-grained FP8
        # checkpoint (Qwen3-FP8 / DeepSeek style): every layer's linear weight random e4m3 with
        # a random float32 weight_scale_inv per 128 x 128 block, embedding and lm_head bf16
        # (lm_head in modules_to_not_convert): 9.1 GB in 3 shards

Peak memory is the largest tensor (the 1.05 GB embedding) plus the random draw of one block
of rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gqa_convert.checkpoint import (
    INDEX_NAME,
    SafetensorsWriter,
    TensorSpec,
    read_weights,
    shard_names,
    shard_specs,
)

SHAPE = dict(layers=32, d_model=4096, n_heads=32, n_kv=8, d_head=128, d_mlp=14336, vocab=128256)
SHARD_BYTES = 4_100_000_000  # 4 shards
ROWS = 4096  # rows drawn at a time


def hf_config(s: dict = SHAPE) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["d_model"],
        "intermediate_size": s["d_mlp"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["n_heads"],
        "num_key_value_heads": s["n_kv"],
        "head_dim": s["d_head"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": s.get("max_position", 131072),
        "rms_norm_eps": 1e-5,
        "rope_theta": s.get("rope_theta", 500000.0),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }


def specs(s: dict = SHAPE) -> list[TensorSpec]:
    m, f, v = s["d_model"], s["d_mlp"], s["vocab"]
    out = [TensorSpec("model.embed_tokens.weight", "BF16", (v, m))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += attention_specs(p, s)
        out += [
            TensorSpec(p + "mlp.gate_proj.weight", "BF16", (f, m)),
            TensorSpec(p + "mlp.up_proj.weight", "BF16", (f, m)),
            TensorSpec(p + "mlp.down_proj.weight", "BF16", (m, f)),
            TensorSpec(p + "input_layernorm.weight", "BF16", (m,)),
            TensorSpec(p + "post_attention_layernorm.weight", "BF16", (m,)),
        ]
    out.append(TensorSpec("model.norm.weight", "BF16", (m,)))
    out.append(TensorSpec("lm_head.weight", "BF16", (v, m)))
    return out


FP8_BLOCK = 128


def fp8_specs(s: dict = SHAPE) -> list[TensorSpec]:
    """`specs(s)` with every layer's 2-d weight in e4m3 and its block scales beside it."""
    out = []
    for spec in specs(s):
        if ".layers." not in spec.name or len(spec.shape) != 2:
            out.append(spec)
            continue
        rows, cols = spec.shape
        grid = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
        out.append(TensorSpec(spec.name, "F8_E4M3", spec.shape))
        out.append(TensorSpec(spec.name + "_scale_inv", "F32", grid))
    return out


def fp8_config(s: dict = SHAPE) -> dict:
    return {
        **hf_config(s),
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            "modules_to_not_convert": ["lm_head"],
        },
    }


def attention_specs(prefix: str, s: dict) -> list[TensorSpec]:
    """A Llama layer's q / k / v / o projections, HF names under `prefix`."""
    m, q, kv = s["d_model"], s["n_heads"] * s["d_head"], s["n_kv"] * s["d_head"]
    return [
        TensorSpec(prefix + "self_attn.q_proj.weight", "BF16", (q, m)),
        TensorSpec(prefix + "self_attn.k_proj.weight", "BF16", (kv, m)),
        TensorSpec(prefix + "self_attn.v_proj.weight", "BF16", (kv, m)),
        TensorSpec(prefix + "self_attn.o_proj.weight", "BF16", (m, q)),
    ]


def random_array(rng: np.random.Generator, spec: TensorSpec) -> np.ndarray:
    """Random values of `spec`'s dtype: bf16 as below, e4m3 codes of magnitude [2^-6, 2^8)
    (no NaN), float32 scales in [2^-12, 2^-8) (so e4m3 x scale spans bf16's range above)."""
    if spec.dtype == "BF16":
        return random_bf16(rng, spec.shape)
    if spec.dtype == "F8_E4M3":
        codes = rng.integers(0, 1 << 8, size=spec.shape, dtype=np.uint8)
        exponent = ((codes >> 3) & 0x7) + np.uint8(1)  # 1..8 (of 0..15, bias 7): no NaN
        return (codes & np.uint8(0x87)) | (exponent << np.uint8(3))
    if spec.dtype == "F32":
        return np.ldexp(
            rng.uniform(1, 2, size=spec.shape), -12 + rng.integers(0, 4, spec.shape)
        ).astype(np.float32)
    raise ValueError(f"{spec.name}: no random {spec.dtype}")


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """bf16 bit patterns (as uint16) of +-[2^-8, 2^-4), drawn ROWS rows at a time."""
    out = np.empty(shape, dtype=np.uint16)
    for start in range(0, shape[0], ROWS):
        r = rng.integers(
            0, 1 << 16, size=(min(ROWS, shape[0] - start), *shape[1:]), dtype=np.uint16
        )
        exponent = ((r >> 7) & 3) + np.uint16(127 - 8)
        out[start : start + len(r)] = (r & np.uint16(0x807F)) | (exponent << np.uint16(7))
    return out


def build(folder: Path, shape: dict = SHAPE, shard_bytes: int = SHARD_BYTES, seed: int = 8) -> Path:
    """Write the checkpoint of `shape` into `folder` (kept if it is there already): random
    bf16 weights from `seed`, norms 1.0. `shape` may also set `rope_theta`, `max_position`."""
    progress = shard_bytes == SHARD_BYTES
    return write_checkpoint(folder, specs(shape), hf_config(shape), shard_bytes, seed, progress)


def write_checkpoint(
    folder: Path,
    all_specs: list[TensorSpec],
    config: dict,
    shard_bytes: int,
    seed: int,
    progress: bool = False,
) -> Path:
    """`all_specs` written into `folder` shard by shard, one tensor in memory (random bf16
    from `seed`, norms 1.0), with the index and `config`, then renamed into place; a folder
    already holding a config.json is kept."""
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shards = shard_specs(all_specs, shard_bytes)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards, strict=True):
        if progress:
            print(f"writing {name} ({len(shard)} tensors)", file=sys.stderr, flush=True)
        writer = SafetensorsWriter(tmp / name, shard)
        for spec in shard:
            if spec.name.endswith("norm.weight"):
                array = np.full(spec.shape, 0x3F80, dtype=np.uint16)  # 1.0
            else:
                array = random_array(rng, spec)
            writer.write(spec.name, array)
            del array
        writer.close()
    weight_map = {s.name: n for n, shard in zip(names, shards, strict=True) for s in shard}
    index = {"metadata": {"total_size": sum(s.nbytes for s in all_specs)}, "weight_map": weight_map}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder)
    return folder


def swap_kv(src: Path, layer: int, a: int = 0, b: int = 1, shape: dict = SHAPE) -> Path:
    """A copy of `src` (of `shape`) with KV heads a and b of layer `layer`'s k_proj swapped."""
    out = src.with_name(f"{src.name}-swap-kv{layer}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    info = read_weights(src)[f"model.layers.{layer}.self_attn.k_proj.weight"]
    for path in src.iterdir():
        if path == info.path:
            shutil.copyfile(path, out / path.name)
        else:
            os.link(path, out / path.name)
    rows = shape["d_head"] * shape["d_model"] * 2  # bytes of one KV head's rows
    with open(out / info.path.name, "r+b") as f:
        f.seek(info.start + a * rows)
        head_a = f.read(rows)
        f.seek(info.start + b * rows)
        head_b = f.read(rows)
        f.seek(info.start + a * rows)
        f.write(head_b)
        f.seek(info.start + b * rows)
        f.write(head_a)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache = os.environ.get("GQA_CONVERT_CACHE") or Path.home() / ".cache" / "gqa-convert"
    parser.add_argument("folder", nargs="?", type=Path, default=Path(cache) / "llama8b-shaped")
    parser.add_argument("--swap-kv", type=int, metavar="LAYER")
    parser.add_argument("--fp8", action="store_true", help="fine-grained FP8 (see above)")
    args = parser.parse_args()
    if args.fp8:
        folder = args.folder.expanduser()
        print(write_checkpoint(folder, fp8_specs(), fp8_config(), SHARD_BYTES, 8, True))
        return
    folder = build(args.folder.expanduser())
    print(folder)
    if args.swap_kv is not None:
        print(swap_kv(folder, args.swap_kv))


if __name__ == "__main__":
    main()
