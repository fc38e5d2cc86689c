"""Our writer of quantised checkpoints, from a dense HF model: FP8 (fine-grained blocks, per
tensor, per row; fbgemm_fp8), compressed-tensors (float8 and int pack-quantized), MXFP4
tensors and GGUF files, as their producers lay them out (DeepSeek / transformers' fp8,
llm-compressor, llama.cpp's convert_hf_to_gguf.py).

The quantisation itself only has to give valid stored tensors: what the tests check is that
our reader and transformers' loader read them alike. And the independent numpy
dequantisations (`reference_*`) the tests hold our reader to, written from the formats'
definitions with loops over blocks, not with our reader's code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gqa_convert.sources.compressed import scale_grid
from tests.hf_models import make_hf_model, save_hf_checkpoint

E4M3_MAX = 448.0


# The linear layers a quantiser converts: every 2-d weight of the decoder layers (the
# embedding and lm_head stay dense, as in every released FP8 / llm-compressor checkpoint).
def quantizable(name: str, tensor: torch.Tensor) -> bool:
    return ".layers." in name and name.endswith(".weight") and tensor.ndim == 2


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _save(folder: Path, tensors: dict[str, torch.Tensor], quantization: dict[str, Any]) -> Path:
    """Replace the folder's weights by `tensors` and add `quantization` to its config."""
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = quantization
    path.write_text(json.dumps(config, indent=2))
    return folder


def dense_checkpoint(folder: Path, family: str = "llama", **overrides: Any) -> Path:
    """A tiny random HF checkpoint (tests/hf_models.py) to quantise."""
    return save_hf_checkpoint(make_hf_model(family, **overrides), folder)


# ---- FP8 ------------------------------------------------------------------------------


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] | None, per_row: bool = False):
    """(e4m3 weight, float32 scale): blocks of `block` (ceil grid, partial edge blocks), one
    scale per row, or one per tensor."""
    w = weight.float()
    if block is None:
        if per_row:
            scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX  # [rows, 1]
        else:
            scale = w.abs().max() / E4M3_MAX  # []
        return (w / scale).to(torch.float8_e4m3fn), scale
    b0, b1 = block
    rows, cols = w.shape
    grid = (math.ceil(rows / b0), math.ceil(cols / b1))
    scale = torch.empty(grid)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            part = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            scale[i, j] = part.abs().max() / E4M3_MAX
            q[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (part / scale[i, j]).to(
                torch.float8_e4m3fn
            )
    return q, scale


def write_fp8(
    folder: Path,
    *,
    block: tuple[int, int] | None = (128, 128),
    per_row: bool = False,
    skip: tuple[str, ...] = ("lm_head",),
    method: str = "fp8",
) -> Path:
    """Quantise the dense checkpoint in `folder` in place: fine-grained FP8 (`fp8`: blocks,
    or with `block=None` one scale per tensor / per row) or `fbgemm_fp8` (per row).
    Modules in `skip` (names, or name suffixes) stay dense and are listed as not converted."""
    tensors = load_file(folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    scale_name = "weight_scale" if method == "fbgemm_fp8" else "weight_scale_inv"
    for name, tensor in tensors.items():
        module = _module(name)
        if not quantizable(name, tensor) or any(
            module == s or module.endswith("." + s) for s in skip
        ):
            out[name] = tensor
            continue
        fbgemm = method == "fbgemm_fp8"  # one scale per row, always
        q, scale = quantize_fp8(tensor, None if fbgemm else block, per_row or fbgemm)
        out[name] = q
        out[f"{module}.{scale_name}"] = scale
    if method == "fbgemm_fp8":
        quantization = {
            "quant_method": "fbgemm_fp8",
            "activation_scale_ub": 1200.0,
            "modules_to_not_convert": list(skip),
        }
    else:
        quantization = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block) if block else None,
            "modules_to_not_convert": list(skip),
        }
    return _save(folder, out, quantization)


def e4m3_value(code: int) -> float:
    """The value of one e4m3fn byte, from its bit fields (OCP FP8: bias 7, no infinities,
    S.1111.111 is NaN)."""
    code = int(code)
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def reference_fp8(
    weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None
) -> np.ndarray:
    """float32 e4m3 `weight` (uint8) times `scale`, element by element over the blocks."""
    values = np.array([e4m3_value(c) for c in range(256)], dtype=np.float64).astype(np.float32)
    w = values[weight.astype(np.int64)]
    out = np.empty(w.shape, np.float32)
    rows, cols = w.shape
    s = scale.astype(np.float32)
    if block is None:
        s = s.reshape(rows, 1) if s.size > 1 else np.full((rows, 1), s.reshape(()))
        block, s = (1, cols), s
    b0, b1 = block
    for i in range(0, rows, b0):
        for j in range(0, cols, b1):
            out[i : i + b0, j : j + b1] = w[i : i + b0, j : j + b1] * s[i // b0, j // b1]
    return out


# ---- GGUF ------------------------------------------------------------------------------

# transformers' model type -> llama.cpp's architecture and what its converter does to tensors
GGUF_ARCH = {
    "llama": ("llama", "permute"),
    "qwen3": ("qwen3", None),
    "qwen3_moe": ("qwen3moe", None),
    "gemma3_text": ("gemma3", "norm+1"),
    "mixtral": ("llama", "permute"),  # llama.cpp writes Mixtral as llama with experts
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(
    model,
    path: Path,
    *,
    types: dict[str, str] | None = None,
    default: str = "Q8_0",
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """`model` (an HF model) as llama.cpp writes it: metadata, llama.cpp's names and layouts,
    weights quantised to ggml `types` (by llama.cpp name fragment, e.g. {"attn_q": "Q4_0"};
    `default` for the other matrices; norms and vectors F32); `extra` tensors besides."""
    import gguf

    config = model.config
    arch, undo = GGUF_ARCH[config.model_type]
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers
    )
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {config.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    n_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if n_experts:
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    experts: dict[str, list[np.ndarray]] = {}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, value in state.items():
        if "rotary_emb" in hf_name:
            continue
        expert = re_expert(hf_name)
        if expert is not None:  # per-expert HF tensors, stacked as llama.cpp stacks them
            experts.setdefault(expert, []).append(value)
            continue
        base, _, leaf = hf_name.rpartition(".")
        name = names.get_name(base)
        if name is None and hf_name.endswith("experts.gate_up_proj"):
            gate, up = np.split(value, 2, axis=1)
            layer = hf_name.split(".")[2]
            _add(writer, f"blk.{layer}.ffn_gate_exps.weight", gate, types, default)
            _add(writer, f"blk.{layer}.ffn_up_exps.weight", up, types, default)
            continue
        if name is None:
            name, leaf = names.get_name(hf_name), None
        assert name is not None, hf_name
        gguf_name = f"{name}.{leaf}" if leaf else name
        if undo == "permute" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            kv = config.num_key_value_heads if ".attn_k." in gguf_name else None
            value = llama_cpp_permute(value, config.num_attention_heads, kv)
        if undo == "norm+1" and gguf_name.endswith("norm.weight"):
            value = value + 1
        _add(writer, gguf_name, value, types, default)
    for key, stacked in experts.items():
        _add(writer, key, np.stack(stacked), types, default)
    for name, value in (extra or {}).items():
        _add(writer, name, value, types, default)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def re_expert(hf_name: str) -> str | None:
    """Mixtral's per-expert w1 / w3 / w2 -> llama.cpp's stacked tensor, else None."""
    import re

    match = re.fullmatch(
        r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.\d+\.(w[123])\.weight", hf_name
    )
    if match is None:
        return None
    kind = {"w1": "gate", "w3": "up", "w2": "down"}[match.group(2)]
    return f"blk.{match.group(1)}.ffn_{kind}_exps.weight"


def _add(writer, name: str, value: np.ndarray, types: dict[str, str] | None, default: str) -> None:
    import gguf

    kind = "F32" if value.ndim == 1 else default
    for fragment, chosen in (types or {}).items():
        if fragment in name and value.ndim >= 2:
            kind = chosen
    qtype = gguf.GGMLQuantizationType[kind]
    data = gguf.quants.quantize(value.astype(np.float32), qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)


def reference_gguf(blocks: np.ndarray, kind: str) -> np.ndarray:
    """Independent numpy dequantisation of the simple ggml block types, from ggml's block
    layouts (ggml-common.h): Q8_0 {f16 d; i8 qs[32]}, Q4_0 {f16 d; u8 qs[16]: element j in
    the low nibble of byte j, element j + 16 in its high nibble, value (q - 8) * d},
    Q4_1 {f16 d, m; u8 qs[16]: q * d + m}, F16, F32."""
    if kind in ("F32", "F16"):
        return blocks.astype(np.float32)
    layout = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    rows = blocks.reshape(-1, blocks.shape[-1])
    out = np.empty((rows.shape[0], rows.shape[1] // layout * 32), np.float32)
    for r in range(rows.shape[0]):
        for b in range(rows.shape[1] // layout):
            raw = rows[r, b * layout : (b + 1) * layout]
            d = np.float32(raw[0:2].view(np.float16)[0])
            if kind == "Q8_0":
                q = raw[2:34].view(np.int8).astype(np.float32)
                values = d * q
            else:
                qs = raw[4:20] if kind == "Q4_1" else raw[2:18]
                q = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float32)
                if kind == "Q4_1":
                    m = np.float32(raw[2:4].view(np.float16)[0])
                    values = d * q + m
                else:
                    values = d * (q - np.float32(8))
            out[r, b * 32 : (b + 1) * 32] = values
    return out.reshape(*blocks.shape[:-1], -1)


# ---- compressed-tensors ------------------------------------------------------------------


def pack_int32(values: np.ndarray, num_bits: int) -> np.ndarray:
    """compressed-tensors' pack_to_int32 of signed `values` [rows, cols], bit by bit: value i
    of a row (plus 2^(num_bits - 1)) at bits i * num_bits .. of the row's words, low first."""
    rows, cols = values.shape
    words = math.ceil(cols * num_bits / 32)
    out = np.zeros((rows, words), dtype=np.uint32)
    unsigned = (values.astype(np.int64) + (1 << (num_bits - 1))).astype(np.uint64)
    for i in range(cols):
        for bit in range(num_bits):
            position = i * num_bits + bit
            out[:, position // 32] |= (
                ((unsigned[:, i] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(position % 32)
            ).astype(np.uint32)
    return out.view(np.int32)


def unpack_reference(packed: np.ndarray, num_bits: int, cols: int) -> np.ndarray:
    """The inverse of `pack_int32`, bit by bit."""
    words = packed.view(np.uint32).astype(np.uint64)
    out = np.zeros((packed.shape[0], cols), dtype=np.int64)
    for i in range(cols):
        for bit in range(num_bits):
            position = i * num_bits + bit
            out[:, i] |= (
                (words[:, position // 32] >> np.uint64(position % 32)) & np.uint64(1)
            ).astype(np.int64) << bit
    return out - (1 << (num_bits - 1))


def _scale_index(i: int, j: int, strategy: str, args: dict[str, Any]) -> tuple[int, ...]:
    if strategy == "tensor":
        return (0,)
    if strategy == "channel":
        return (i, 0)
    if strategy == "group":
        return (i, j // args["group_size"])
    b0, b1 = args["block_structure"]
    return (i // b0, j // b1)


def write_compressed(
    folder: Path,
    *,
    kind: str = "float",
    num_bits: int = 8,
    strategy: str = "channel",
    group_size: int | None = None,
    block: tuple[int, int] | None = None,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.bfloat16,
    ignore: tuple[str, ...] = ("lm_head",),
) -> Path:
    """Quantise the dense checkpoint in `folder` in place as llm-compressor saves it:
    float8 (`float-quantized`) or int (`pack-quantized`) weights, one scale (and zero point,
    if not `symmetric`) per tensor / row / group / block; `ignore` stays dense."""
    tensors = load_file(folder / "model.safetensors")
    args = {"group_size": group_size, "block_structure": list(block) if block else None}
    fmt = "float-quantized" if kind == "float" else "pack-quantized"
    out: dict[str, torch.Tensor] = {}
    import re

    for name, tensor in tensors.items():
        module = _module(name)
        ignored = any(
            re.match(p[3:], module) if p.startswith("re:") else module == p for p in ignore
        )
        if not quantizable(name, tensor) or ignored:
            out[name] = tensor
            continue
        w = tensor.float().numpy()
        rows, cols = w.shape
        grid = scale_grid(w.shape, strategy, args)
        qmax = E4M3_MAX if kind == "float" else 2 ** (num_bits - 1) - 1
        lo, hi = np.full(grid, np.inf, np.float32), np.full(grid, -np.inf, np.float32)
        for i in range(rows):
            for j in range(cols):
                k = _scale_index(i, j, strategy, args)
                lo[k], hi[k] = min(lo[k], w[i, j]), max(hi[k], w[i, j])
        if symmetric:
            scale = np.maximum(np.abs(lo), np.abs(hi)) / qmax
            zero = np.zeros(grid, np.float32)
        else:
            scale = (hi - lo) / (2**num_bits - 1)
            zero = np.clip(
                np.round(-(2 ** (num_bits - 1)) - lo / scale), -(2 ** (num_bits - 1)), qmax
            )
        scale_t = torch.from_numpy(scale.astype(np.float32)).to(scale_dtype)
        s = scale_t.float().numpy()
        q = np.empty_like(w)
        for i in range(rows):
            for j in range(cols):
                k = _scale_index(i, j, strategy, args)
                q[i, j] = w[i, j] / s[k] + zero[k]
        if kind == "float":
            out[name] = torch.from_numpy(np.clip(q, -qmax, qmax)).to(torch.float8_e4m3fn)
        else:
            qi = np.clip(np.round(q), -(2 ** (num_bits - 1)), qmax).astype(np.int64)
            out[f"{module}.weight_packed"] = torch.from_numpy(pack_int32(qi, num_bits))
            out[f"{module}.weight_shape"] = torch.tensor([rows, cols])
        out[f"{module}.weight_scale"] = scale_t
        if not symmetric:
            zp = zero.astype(np.int64)
            if kind == "int" and strategy in ("group", "channel"):
                out[f"{module}.weight_zero_point"] = torch.from_numpy(
                    np.ascontiguousarray(pack_int32(zp.T, num_bits).T)
                )
            else:
                out[f"{module}.weight_zero_point"] = torch.from_numpy(zp.astype(np.int8))
    weights = {
        "num_bits": num_bits,
        "type": kind,
        "symmetric": symmetric,
        "strategy": strategy,
        "group_size": group_size,
        "block_structure": list(block) if block else None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    activations = (
        {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
        if kind == "float"
        else None
    )
    quantization = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": activations,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
    return _save(folder, out, quantization)


def round_to(exact: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values (exact) rounded once, to nearest even, to `dtype`; as float32."""
    if dtype == torch.float32:
        return exact.astype(np.float32)
    if dtype == torch.float16:
        return exact.astype(np.float16).astype(np.float32)
    # bfloat16: 8 significant bits; np.round rounds halves to even
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.abs(exact)))
    ulp = np.where(exact == 0, 1.0, 2.0 ** (exponent - 7))
    return (np.round(exact / ulp) * ulp).astype(np.float32)


def reference_compressed(
    q: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray | None,
    strategy: str,
    args: dict[str, Any],
    dtype: torch.dtype,
) -> np.ndarray:
    """(q - zero) * scale element by element, exact in float64, rounded once to the scale's
    `dtype` (float32 values of the result); `scale` holds the scales' float values."""
    exact = np.empty(q.shape, np.float64)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            k = _scale_index(i, j, strategy, args)
            k = k if scale.ndim == len(k) else ()
            value = float(q[i, j]) - (float(zero[k]) if zero is not None else 0.0)
            exact[i, j] = value * float(scale[k])
    return round_to(exact, dtype)


# ---- MXFP4 (gpt-oss's experts) ------------------------------------------------------------

E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
# The Hub's gpt-oss checkpoints: only the experts' gate_up_proj / down_proj are MXFP4.
GPT_OSS_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


def quantize_mxfp4(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' dense experts [E, cols, rows] -> (blocks uint8 [E, rows, cols / 32, 16],
    scales uint8 [E, rows, cols / 32]): per block of 32, the smallest power of two that
    brings the largest magnitude within 6, each value to its nearest e2m1 code (low nibble
    first)."""
    rows_major = np.swapaxes(dense, -1, -2).astype(np.float32)  # [E, rows, cols]
    groups = rows_major.reshape(*rows_major.shape[:-1], -1, 32)  # [E, rows, G, 32]
    peak = np.abs(groups).max(-1)
    exponent = np.ceil(np.log2(np.maximum(peak, 2.0**-100) / 6.0)).astype(np.int32)
    exponent = np.clip(exponent, -127, 127)
    scaled = groups / np.ldexp(np.float32(1), exponent)[..., None]
    nearest = np.abs(np.abs(scaled)[..., None] - E2M1_MAGNITUDES).argmin(-1)
    codes = (nearest | np.where(scaled < 0, 8, 0)).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.astype(np.uint8), (exponent + 127).astype(np.uint8)


def write_mxfp4(folder: Path) -> dict[str, np.ndarray]:
    """Rewrite a dense gpt-oss checkpoint's experts (`gate_up_proj`, `down_proj`) as MXFP4
    `_blocks` / `_scales`, as the Hub's checkpoints store them, with their
    quantization_config. Returns the dense experts the stored blocks mean, [E, cols, rows],
    by `reference_mxfp4` (an independent byte-by-byte reading)."""
    from tests.test_quantized import reference_mxfp4

    tensors = {k: v for k, v in load_file(folder / "model.safetensors").items()}
    meant = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(tensors.pop(name).float().numpy())
        tensors[name + "_blocks"] = torch.from_numpy(blocks)
        tensors[name + "_scales"] = torch.from_numpy(scales)
        meant[name] = np.ascontiguousarray(np.swapaxes(reference_mxfp4(blocks, scales), -1, -2))
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_NOT_CONVERTED}
    _save(folder, tensors, quantization)
    return meant
