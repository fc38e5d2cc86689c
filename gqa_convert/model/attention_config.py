"""What `GroupedQueryAttention` reads from its config, in TransformerLens's field names.

The module takes our `ModelConfig`, a dict with TL's field names, or a TL
`HookedTransformerConfig`; the last two are read by duck typing (no transformer_lens import).
TL options this module does not implement are refused with an error naming the field,
never ignored. TL options read with TL 3.9's exact semantics: `use_qk_norm` (RMSNorm of q and
k over d_head, per head, weights `q_norm.w` / `k_norm.w`, after `hook_q` / `hook_k`, before
rotary and the cache), `use_yarn_rope` and its `yarn_*` fields (not on local layers under
`yarn_global_attn_only`), `rotary_scaling_factor` (linear scaling, global layers only) and
`use_NTK_by_parts_rope` (llama3), in TL's precedence: NTK-by-parts, then yarn, then linear;
`rotary_base_local` (local layers' base) and `attn_scores_soft_cap` (Gemma 2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gqa_convert.config import ModelConfig, RopeConfig
from gqa_convert.errors import UnsupportedModelError

# TL fields whose non-default value changes attention in ways we do not implement:
# field -> the predicate that says "set".
NOT_IMPLEMENTED: dict[str, Callable[[Any], bool]] = {
    "clip_qkv": lambda v: v is not None,
    "use_logn_attn": bool,
    "use_dynamic_ntk_rope": bool,  # Qwen-1's dynamic NTK, not transformers' `dynamic`
    "load_in_4bit": bool,
    "use_attention_sinks": bool,
    "attention_dir": lambda v: v not in (None, "causal"),
    "original_architecture": lambda v: (
        v in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
    ),
}
POSITIONAL_TYPES = ("rotary", "standard")  # "standard": no rotary inside attention


@dataclass(frozen=True)
class AttentionConfig:
    """The resolved attention settings (TL names where TL has one; `rope` carries the base
    and the scaling of every rope type). `attn_scale` is what scores are divided by before
    any layer-index scaling (Granite: 1 / attention_multiplier).

    Ours: `qk_norm` "head" is TL's `use_qk_norm` (Qwen3), "proj" one RMSNorm over all heads'
    projection (OLMo2, where TL ties it to `original_architecture`); `norm_weight_in_fp32`
    and `rotary_in_fp32` keep OLMo2's bf16 rounding; `n_ctx` is dynamic rope's threshold.
    `positional_embedding_type` "standard": no rotary (also SmolLM3's NoPE layers).
    `attn_scores_soft_cap` (Gemma 2) caps the scaled scores before the mask, as TL and HF.
    `rotary_adjacent_pairs` (TL's): interleaved rotary (GLM, Cohere, Helium, ERNIE); the
    2026 families' options (`qk_norm` "heads", `qk_norm_after_rotary`, `attn_sinks`, the
    query scale) are ours, from a ModelConfig only."""

    n_heads: int
    n_key_value_heads: int
    d_model: int
    d_head: int
    attn_scale: float
    window_size: int | None = None
    scale_attn_by_inverse_layer_idx: bool = False
    positional_embedding_type: str = "rotary"
    rotary_dim: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    rotary_adjacent_pairs: bool = False
    use_split_qkv_input: bool = False
    ungroup_grouped_query_attention: bool = False
    use_attn_result: bool = False
    dtype: torch.dtype | None = None  # None: torch's default dtype
    n_ctx: int | None = None
    qk_norm: str | None = None  # None, "head" or "proj"
    eps: float = 1e-5  # the q / k norms'
    norm_weight_in_fp32: bool = False
    rotary_in_fp32: bool = False
    norm_offset: float = 0.0  # Gemma 3's q / k norms scale by (1 + w)
    attn_scores_soft_cap: float | None = None  # TL's name: scores -> cap * tanh(scores / cap)
    norm_type: str = "rms"  # the q / k norms' kind: "layer" (Cohere's LayerNorms)
    qk_norm_after_rotary: bool = False  # Hunyuan: q / k normalised after rotary
    rotary_math_in_fp32: bool = False  # Cohere: rotate in fp32 with cos / sin of the dtype
    attn_sinks: bool = False  # a learned logit per head joins the softmax (Granite SWA)
    sinks_softmax_in_dtype: bool = False  # gpt-oss: that softmax in the compute dtype
    # Ministral 3: after rotary, q times 1 + beta * log(1 + floor(position / length)).
    query_scale_beta: float | None = None
    query_scale_length: int | None = None
    # Llama 4's temperature tuning: the query scale at floor((token index + 1) / length)
    temperature_tuning: bool = False
    # Llama 4's chunked attention: keys of the query's own chunk only (positions // size).
    chunk_size: int | None = None
    # Gemma 4: `v_norm` a weightless RMSNorm of v; `k_eq_v` no W_V, v is k's projection;
    # `kv_source` the layer whose keys and values this one attends (it has no W_K / W_V);
    # `kv_store` later layers attend this one's.
    v_norm: bool = False
    k_eq_v: bool = False
    kv_source: int | None = None
    kv_store: bool = False

    @property
    def rotary_base(self) -> float:
        return self.rope.theta

    @property
    def group_size(self) -> int:
        """Query heads per KV head: head h reads KV head h // group_size."""
        return self.n_heads // self.n_key_value_heads


def attention_config(
    cfg: ModelConfig | Mapping[str, Any] | Any, attn_type: str, layer_id: int | None = None
) -> AttentionConfig:
    """Our `AttentionConfig` from a ModelConfig, a TL-style dict or a TL config object.

    For a ModelConfig, `layer_id` picks the layer's rotary (`rope_layers`; None or past
    n_layers: a layer with rotary)."""
    if isinstance(cfg, AttentionConfig):
        return cfg
    if isinstance(cfg, ModelConfig):
        in_model = layer_id is not None and layer_id < cfg.n_layers
        rotary = not in_model or cfg.rope_layers[layer_id]
        query_scaled = cfg.query_scale_beta is not None and not (
            cfg.temperature_tuning and rotary
        )  # Llama 4: temperature tuning on NoPE layers only
        chunked = in_model and bool(cfg.chunked_layers) and cfg.chunked_layers[layer_id]
        multiplier = cfg.attention_multiplier  # Granite: scores times it, not / sqrt(d_head)
        # Gemma 4: global layers' own head size and KV heads, K/V shared between layers
        d_head = cfg.layer_d_head(layer_id) if in_model else cfg.d_head
        source = cfg.kv_source(layer_id) if in_model else None
        # Gemma 2/3: scores / sqrt(query_pre_attn_scalar)
        scale = (cfg.query_pre_attn_scalar or d_head) ** 0.5
        return AttentionConfig(
            n_heads=cfg.n_heads,
            n_key_value_heads=cfg.layer_n_kv(layer_id) if in_model else cfg.n_key_value_heads,
            d_model=cfg.d_model,
            d_head=d_head,
            attn_scale=1 / multiplier if multiplier else scale,
            window_size=cfg.sliding_window,
            scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
            positional_embedding_type="rotary" if rotary else "standard",
            rotary_dim=(cfg.layer_rotary_dim(layer_id) if in_model else cfg.rotary_dim)
            if rotary
            else None,
            # Gemma 3: the local layers' own; Granite SWA: the layer's own theta
            rope=cfg.layer_rope(layer_id) if in_model else cfg.rope_for(attn_type),
            rotary_adjacent_pairs=cfg.rotary_adjacent_pairs,
            n_ctx=cfg.n_ctx,
            qk_norm=cfg.qk_norm if rotary or cfg.qk_norm_on_nope_layers else None,
            eps=cfg.eps,
            norm_weight_in_fp32=cfg.norm_weight_in_fp32,
            rotary_in_fp32=cfg.rotary_in_fp32,
            norm_offset=cfg.norm_offset,
            attn_scores_soft_cap=cfg.attn_logit_softcap,
            norm_type=cfg.norm_type,
            qk_norm_after_rotary=cfg.qk_norm_after_rotary,
            rotary_math_in_fp32=cfg.rotary_math_in_fp32,
            attn_sinks=cfg.attn_sinks,
            sinks_softmax_in_dtype=cfg.sinks_softmax_in_dtype,
            query_scale_beta=cfg.query_scale_beta if query_scaled else None,
            query_scale_length=cfg.query_scale_length,
            temperature_tuning=cfg.temperature_tuning,
            chunk_size=cfg.attention_chunk_size if chunked else None,
            v_norm=cfg.v_norm,
            k_eq_v=cfg.k_eq_v_global and attn_type == "global",
            kv_source=source,
            kv_store=in_model
            and any(cfg.kv_source(i) == layer_id for i in range(layer_id + 1, cfg.n_layers)),
        )
    if isinstance(cfg, Mapping):
        get = cfg.get
    else:

        def get(name: str, default: Any = None) -> Any:
            return getattr(cfg, name, default)

    for name, is_set in NOT_IMPLEMENTED.items():
        if is_set(get(name)):
            raise UnsupportedModelError(
                f"GroupedQueryAttention: cfg.{name} = {get(name)!r} is not implemented"
            )
    positional = get("positional_embedding_type", "standard")
    if positional not in POSITIONAL_TYPES:
        raise UnsupportedModelError(
            f"GroupedQueryAttention: cfg.positional_embedding_type = {positional!r} is not "
            f"implemented (supported: {', '.join(POSITIONAL_TYPES)})"
        )
    d_model, d_head = _int(get, "d_model"), _int(get, "d_head")
    n_heads = get("n_heads", -1)
    n_heads = d_model // d_head if n_heads in (None, -1) else _int(get, "n_heads")
    n_kv = get("n_key_value_heads")
    n_kv = n_heads if n_kv is None else _int(get, "n_key_value_heads")
    if n_heads % n_kv:
        raise ValueError(
            f"cfg.n_heads = {n_heads} is not divisible by cfg.n_key_value_heads = {n_kv}"
        )
    scale = get("attn_scale", -1.0)
    if not get("use_attn_scale", True):
        scale = 1.0
    elif scale is None or scale == -1.0:  # TL's "unset": sqrt(d_head)
        scale = d_head**0.5
    rotary_dim = get("rotary_dim") or d_head
    if positional == "rotary" and (rotary_dim % 2 or rotary_dim > d_head):
        raise ValueError(f"cfg.rotary_dim = {rotary_dim} must be even and at most d_head")
    base = get("rotary_base", 10_000)
    if attn_type == "local" and get("rotary_base_local") is not None:
        base = get("rotary_base_local")
    rope = _tl_rope(get, float(base), attn_type)
    dtype = get("dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return AttentionConfig(
        n_heads=n_heads,
        n_key_value_heads=n_kv,
        d_model=d_model,
        d_head=d_head,
        attn_scale=float(scale),
        window_size=get("window_size"),
        scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx", False)),
        positional_embedding_type=positional,
        rotary_dim=rotary_dim if positional == "rotary" else None,
        rope=rope,
        rotary_adjacent_pairs=bool(get("rotary_adjacent_pairs", False)),
        use_split_qkv_input=bool(get("use_split_qkv_input", False) or get("use_attn_in", False)),
        ungroup_grouped_query_attention=bool(get("ungroup_grouped_query_attention", False)),
        use_attn_result=bool(get("use_attn_result", False)),
        dtype=dtype,
        n_ctx=get("n_ctx"),
        qk_norm="head" if get("use_qk_norm") else None,
        eps=float(get("eps", 1e-5)),
        attn_scores_soft_cap=cap if (cap := get("attn_scores_soft_cap")) and cap > 0 else None,
    )


def _tl_rope(get: Callable[..., Any], base: float, attn_type: str) -> RopeConfig:
    """TL's rope scalings as our RopeConfig, in the precedence of TL's
    `calculate_sin_cos_rotary`: NTK-by-parts (llama3), yarn, linear."""
    if get("use_NTK_by_parts_rope"):  # TL's name for llama3 scaling, the same formula
        return RopeConfig(
            theta=base,
            type="llama3",
            factor=get("NTK_by_parts_factor", 8.0),
            low_freq_factor=get("NTK_by_parts_low_freq_factor", 1.0),
            high_freq_factor=get("NTK_by_parts_high_freq_factor", 4.0),
            original_max_position_embeddings=get("NTK_original_ctx_len", 8192),
        )
    if get("use_yarn_rope") and not (get("yarn_global_attn_only") and attn_type == "local"):
        return RopeConfig(
            theta=base,
            type="yarn",
            factor=float(get("yarn_factor", 1.0)),
            attention_factor=float(get("yarn_attention_factor", 1.0)),
            beta_fast=float(get("yarn_beta_fast", 32.0)),
            beta_slow=float(get("yarn_beta_slow", 1.0)),
            truncate=bool(get("yarn_truncate", True)),
            original_max_position_embeddings=get("yarn_original_max_position_embeddings", 4096),
        )
    factor = get("rotary_scaling_factor", 1.0)
    if factor is not None and factor != 1.0 and attn_type != "local":
        return RopeConfig(theta=base, type="linear", factor=float(factor))
    return RopeConfig(theta=base)


def _int(get: Callable[..., Any], name: str) -> int:
    value = get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"cfg.{name} = {value!r}: expected a positive int")
    return value
