"""`gqa-convert inspect`: what a checkpoint is, from config.json and safetensors headers only.

No tensor byte is read: a checkpoint still downloading, or one whose data is damaged, can be
inspected as long as its headers are intact (damage shows up under `problems`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from gqa_convert.checkpoint import DTYPES
from gqa_convert.config import ModelConfig, RopeConfig
from gqa_convert.mapping import ConversionPlan, plan_conversion
from gqa_convert.memory import DTYPE_BYTES, estimate

# Rough fixed costs of the processes, measured on this project's machines (see README).
CONVERT_BASE_BYTES = 150 * 2**20  # python + numpy + our code, no torch
QUANTISED_BASE_BYTES = 200 * 2**20  # a quantised source's reader: gguf-py, transformers' tables


def inspect_checkpoint(
    src: str | Path,
    *,
    verify_tokens: int | None = None,
    revision: str | None = None,
    token: str | None = None,
    gguf_file: str | None = None,
) -> dict[str, Any]:
    """A JSON-ready description of the HF checkpoint folder (or .gguf file) `src`, or of the
    Hub repo `src` (`org/name`, at `revision`): online, only config.json, the index and each
    safetensors header are fetched (HTTP range reads; a GGUF repo's file, `gguf_file`, is
    downloaded whole); with HF_HUB_OFFLINE=1, the local cache is read. For a Hub repo,
    `fetched` lists the bytes fetched of each file, and `revision` the commit."""
    import tempfile

    from huggingface_hub import constants

    from gqa_convert.hub import download_source, fetch_headers, is_repo_id, resolve_source

    if Path(src).exists() or not is_repo_id(str(src)) or gguf_file is not None:
        source = resolve_source(src, revision=revision, token=token, gguf_file=gguf_file)
        info = _describe(source.path, verify_tokens, gguf_file=gguf_file)
        if source.repo_id is None:
            return info
        return {**info, "source": str(src), "revision": source.revision, "fetched": {}}
    if constants.is_offline_mode():
        source = download_source(str(src), revision=revision, token=token)
        info = _describe(source.path, verify_tokens)
        fetched: dict[str, Any] = {}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            source, sizes, fetched = fetch_headers(
                str(src), Path(tmp), revision=revision, token=token
            )
            info = _describe(source.path, verify_tokens, sizes)
    return {**info, "source": str(src), "revision": source.revision, "fetched": fetched}


def _describe(
    src: Path,
    verify_tokens: int | None,
    sizes: dict[str, int] | None = None,
    gguf_file: str | None = None,
) -> dict[str, Any]:
    """`inspect_checkpoint` of a folder or .gguf file; `sizes` are the real sizes of weight
    files of which the folder holds only the header."""
    plan = plan_conversion(src, check_sizes=False, gguf_file=gguf_file, refuse=False)
    cfg, source = plan.config, plan.source
    tensors = list(plan.sources.values())
    parts = [part for tensor in tensors for part in tensor.parts]
    n_params = sum(_numel(t.shape) for t in tensors)
    total_bytes = sum(part.nbytes for part in parts)
    files: dict[str, dict[str, Any]] = {}
    ends: dict[Path, int] = {}

    def size(path: Path) -> int:
        return (sizes or {}).get(path.name) or path.stat().st_size

    for part in parts:
        entry = files.setdefault(part.path.name, {"bytes": size(part.path), "tensors": 0})
        entry["tensors"] += 1
        ends[part.path] = max(ends.get(part.path, 0), part.end)
    truncated = {
        path.name: {"bytes": size(path), "header_says": end}
        for path, end in ends.items()
        if size(path) < end
    }
    # Convert, an upper bound: one source tensor and its rearranged copy at a time, up to two
    # written tensors waiting for the background sha256, or an fp32 temporary to cast; a
    # dequantised tensor (float32) also its stored bytes, the dequantisation's temporaries
    # and the rounding's (8x; measured 7x on SmolLM2's GGUF embedding), and a quantised
    # source's reader its imports (transformers' GGUF tables: 200 MB).
    largest = max(t.nbytes * (8 if t.scheme else 4) for t in tensors)
    convert_peak = CONVERT_BASE_BYTES + largest + (QUANTISED_BASE_BYTES if source.quantized else 0)
    # Verify (float32, SRC converted in memory, the default input length): whole-model and
    # layer-streamed, each with the logit statistics' float64 temporaries (memory.py).
    storage = max(DTYPES[t.dtype][0].itemsize for t in tensors)
    tokens = verify_tokens or _default_seq_len(cfg)
    need = estimate(
        cfg,
        dtype="float32",
        storage_bytes=storage,
        tokens=tokens,
        second_copy=source.quantized,  # ours dequantised by our reader, beside HF's
        dequantisation=source.dequantisation_bytes,
    )
    out_dtype = plan.output_dtype(None)
    dense_bytes = sum(
        _numel(task.target_shape)
        * (
            DTYPE_BYTES[out_dtype]
            if out_dtype
            else DTYPES[plan.sources[task.source].dtype][0].itemsize
        )
        for task in plan.tasks
    )
    return {
        "source": str(Path(src)),
        "architecture": cfg.architecture,
        "family": cfg.family,
        "parameters": n_params,
        # MoE: what one token runs through (the top_k experts of each MoE layer, not all).
        "active_parameters_per_token": active_parameters(cfg, n_params),
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads,
        "group_size": cfg.group_size,
        "head_to_kv_head": [h // cfg.group_size for h in range(cfg.n_heads)],
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "rope": {
            k: v
            for k, v in vars(cfg.rope).items()
            if k in ("theta", "type") or v != getattr(RopeConfig(), k)
        },
        "quirks": quirks(plan),
        "sliding_window": cfg.sliding_window,
        "local_attention_layers": [i for i, t in enumerate(cfg.attn_types) if t == "local"],
        "tied_embeddings": cfg.tie_word_embeddings,
        "qkv_bias": cfg.qkv_bias,
        "dtypes": dict(
            Counter(DTYPES[p.dtype][1] if p.dtype in DTYPES else p.dtype for p in parts)
        ),
        "tensor_bytes": total_bytes,
        # Quantised sources: how (method, format, block size, modules left dense), and what
        # the export is: dense, in `export_dtype` (--dtype overrides), `export_tensor_bytes`.
        "quantization": source.quantization,
        "export_dtype": out_dtype or _dtype_names(plan),
        "export_tensor_bytes": dense_bytes,
        # Why convert and verify would refuse this source (a format the gate cannot check).
        "refused": str(source.refusal) if source.refusal is not None else None,
        "files": files,
        "dropped_tensors": list(plan.dropped),
        "truncated_files": truncated,  # shorter than their headers say: convert refuses them
        "estimated_peak_memory_bytes": {
            "convert": convert_peak,
            "verify": need.whole,  # whole-model
            "verify_streamed": need.streamed,
            "verify_sub_layer": need.sub_layer,
        },
    }


def _dtype_names(plan: ConversionPlan) -> str:
    names = {DTYPES[plan.sources[t.source].dtype][1] for t in plan.tasks}
    return names.pop() if len(names) == 1 else "mixed"


def active_parameters(cfg: ModelConfig, total: int) -> int:
    """Parameters one token uses: `total` less the experts it is not routed to, in each MoE
    layer (n_experts - top_k experts of 3 * d_model * d_expert each, and their biases
    where they have them, gpt-oss); `total` if dense."""
    if cfg.moe is None:
        return total
    per_expert = 3 * cfg.d_model * cfg.moe.d_expert
    if cfg.moe.expert_bias:
        per_expert += 2 * cfg.moe.d_expert + cfg.d_model
    unused = (cfg.moe.n_experts - cfg.moe.top_k) * per_expert
    return total - unused * sum(cfg.moe.layers)


def _default_seq_len(cfg) -> int:
    from gqa_convert.verify import default_seq_len  # torch: only to size the estimate

    return default_seq_len(cfg)


def quirks(plan: ConversionPlan) -> dict[str, Any]:
    """What the family does beyond Llama, in words, as our decoder options say it."""
    cfg: ModelConfig = plan.config
    found: dict[str, Any] = {}
    if cfg.qk_norm == "head":
        found["qk_norm"] = "RMSNorm of q and k over d_head, per head, before rotary"
    if cfg.qk_norm == "proj":
        found["qk_norm"] = "RMSNorm of q and k over the whole projection, before rotary"
    if cfg.norm_placement == "post":
        found["norm_placement"] = "post: ln1 / ln2 normalise the attention / MLP output"
    if cfg.norm_placement == "sandwich":
        found["norm_placement"] = "sandwich: ln1 / ln2 before, ln1_post / ln2_post after"
    if cfg.norm_offset:
        found["norm_offset"] = f"RMSNorm scales by ({cfg.norm_offset:g} + w) in fp32"
    if cfg.act_fn != "silu":
        found["act_fn"] = cfg.act_fn
    for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
        if getattr(cfg, name) is not None:
            found[name] = getattr(cfg, name)
    if cfg.rope_local is not None:
        found["rope_local"] = (
            f"local layers: {cfg.rope_local.type} rope, theta {cfg.rope_local.theta:g}"
        )
    defaults = ModelConfig.__dataclass_fields__
    for name in ("embedding_multiplier", "attention_multiplier", "residual_multiplier"):
        if getattr(cfg, name) != defaults[name].default:
            found[name] = getattr(cfg, name)
    if cfg.logits_scaling != 1.0:
        found["logits_scaling"] = cfg.logits_scaling
    if not all(cfg.rope_layers):
        found["no_rope_layers"] = [i for i, r in enumerate(cfg.rope_layers) if not r]
    if cfg.moe is not None:
        moe = cfg.moe
        routing = [f"{moe.n_experts} experts of width {moe.d_expert}, top {moe.top_k} per token"]
        options = {
            "weights renormalised": moe.norm_topk_prob,
            f"{moe.router} router": moe.router != "softmax",
            "score correction bias": moe.score_correction_bias,
            f"top {moe.topk_group} of {moe.n_group} groups": moe.n_group > 1,
            f"weights x {moe.routed_scaling_factor}": moe.routed_scaling_factor != 1,
            f"shared expert of width {moe.d_shared_expert}": moe.d_shared_expert is not None,
            "router input RMS-normed and scaled": moe.router_input_norm,
            "weights x per-expert scales": moe.per_expert_scale,
            "a dense MLP beside the experts, each with its norms": moe.dense_mlp,
        }
        routing += [text for text, on in options.items() if on]
        found["moe"] = (
            f"{', '.join(routing)}; MoE layers {[i for i, m in enumerate(moe.layers) if m]}"
        )
    if cfg.rotary_dim != cfg.d_head and cfg.rope.type != "proportional":
        found["rotary_dim"] = f"{cfg.rotary_dim} of {cfg.d_head} (partial rotary)"
    found.update(_quirks_2026(cfg))
    found.update(_quirks_gemma4(cfg))
    fused: dict[str, dict[str, None]] = {}  # e.g. qkv_proj -> W_Q, _W_K, _W_V (split)
    stacked: dict[str, None] = {}  # experts stored stacked: each sliced out per expert
    for task in plan.tasks:
        if task.expert is not None:
            stacked[task.source.rsplit(".", 1)[-1]] = None
        elif task.rows is not None:
            parts = fused.setdefault(task.source.split(".")[-2], {})
            parts[task.target.split(".")[-1]] = None
    if fused:
        found["fused"] = {name: ", ".join(parts) for name, parts in fused.items()}
    if stacked:
        found["experts_stacked"] = ", ".join(stacked)
    return found


def _quirks_gemma4(cfg: ModelConfig) -> dict[str, Any]:
    """Gemma 4's options, in words."""
    found: dict[str, Any] = {}
    if cfg.rope.type == "proportional":
        angles = int(cfg.rope.partial_rotary_factor * cfg.d_head_global // 2)
        found["rope"] = f"global layers: proportional, {angles} of {cfg.d_head_global // 2} angles"
    if (cfg.d_head_global, cfg.n_key_value_heads_global) != (cfg.d_head, cfg.n_key_value_heads):
        found["global_layers"] = (
            f"head size {cfg.d_head_global}, {cfg.n_key_value_heads_global} KV heads"
            f"{', k = v (no v_proj)' if cfg.k_eq_v_global else ''}"
        )
    if cfg.kv_shared_layers:
        shared = range(cfg.n_layers - cfg.kv_shared_layers, cfg.n_layers)
        found["kv_shared_layers"] = {i: cfg.kv_source(i) for i in shared}
    if cfg.d_mlp_shared_kv != cfg.d_mlp:
        found["d_mlp_shared_kv"] = cfg.d_mlp_shared_kv
    if cfg.d_per_layer_input:
        found["per_layer_input"] = f"{cfg.d_per_layer_input} per layer"
    if cfg.v_norm or cfg.layer_scalar:
        found["v_norm, layer_scalar"] = (cfg.v_norm, cfg.layer_scalar)
    return found


def _quirks_2026(cfg: ModelConfig) -> dict[str, Any]:
    """The options of the 2026 dense families (README's family table), in words."""
    found: dict[str, Any] = {}
    if cfg.rotary_adjacent_pairs:
        found["rotary_adjacent_pairs"] = "interleaved rotary: pairs (2i, 2i + 1)"
    if cfg.rotary_in_fp32 or cfg.rotary_math_in_fp32:
        where = "cos / sin and the rotation" if cfg.rotary_in_fp32 else "the rotation"
        found["rotary_in_fp32"] = f"{where} in fp32, then cast back"
    if cfg.norm_weight_in_fp32:
        found["norm_weight_in_fp32"] = "norms scale by w in fp32, then cast back"
    if cfg.qk_norm == "heads":
        found["qk_norm"] = "LayerNorm of q and k over d_head, a weight per head, before rotary"
    if cfg.qk_norm_after_rotary:
        found["qk_norm"] = "RMSNorm of q and k over d_head, per head, after rotary"
    if cfg.qk_norm == "weightless" and not cfg.qk_norm_on_nope_layers:
        found["qk_norm"] += " (no weight; rotary layers only)"
    if cfg.norm_type == "layer":
        found["norm_type"] = f"LayerNorm{' with bias' if cfg.norm_bias else ' without bias'}"
    if cfg.parallel_attn_mlp:
        found["parallel_attn_mlp"] = "resid + attn(ln1(resid)) + mlp(ln1(resid))"
    if not cfg.gated_mlp:
        found["mlp"] = f"ungated: W_out({cfg.act_fn}(x W_in))"
    if cfg.mlp_bias:
        found["mlp_bias"] = True
    if cfg.o_bias != cfg.qkv_bias:
        found["o_bias"] = cfg.o_bias
    if cfg.logit_scale != 1.0:
        found["logit_scale"] = cfg.logit_scale
    if cfg.rope_thetas:
        found["rope_thetas"] = list(cfg.rope_thetas)
    if cfg.attn_sinks:
        found["attn_sinks"] = "a learned logit per head joins each softmax (attn.sinks)"
    if cfg.query_scale_beta is not None and cfg.temperature_tuning:
        found["temperature_tuning"] = (
            f"on layers without rotary, q times 1 + {cfg.query_scale_beta:g} * log(1 + "
            f"floor((token index + 1) / {cfg.query_scale_length}))"
        )
    elif cfg.query_scale_beta is not None:
        found["query_scale"] = (
            f"q times 1 + {cfg.query_scale_beta:g} * log(1 + floor(position / "
            f"{cfg.query_scale_length}))"
        )
    if cfg.chunked_layers:
        found["chunked_attention"] = (
            f"chunks of {cfg.attention_chunk_size} tokens on layers "
            f"{[i for i, c in enumerate(cfg.chunked_layers) if c]}"
        )
    if cfg.moe is not None and cfg.moe.score_scales_input:
        found["moe_input_scaling"] = "each chosen expert runs on x * its router score"
    return found


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_table(plan: ConversionPlan, dtype: str | None = None) -> list[dict[str, Any]]:
    """The conversion plan, one row per target tensor: what `convert --dry-run` prints."""
    rows = []
    for task in plan.tasks:
        info = plan.sources[task.source]
        rows.append(
            {
                "target": task.target,
                "shape": list(task.target_shape),
                "dtype": dtype or DTYPES[info.dtype][1],
                "source": task.source,
                "source_shape": list(task.source_shape),
                "layout": task.layout,
                "shard": info.path.name,
            }
        )
    return rows
