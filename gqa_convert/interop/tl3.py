"""An export as a TransformerLens `HookedTransformer`, for codebases built on transformer-lens 3.x.

transformer-lens 3.9 is the last release with `HookedTransformer` (4.0 keeps only
`TransformerBridge`); it is an optional extra: `pip install -e '.[tl]'`. Our export already
has HookedTransformer's names and shapes (`_W_K` / `_W_V` unexpanded, as in TL's
`GroupedQueryAttention`), so the tensors load as they are, after one strict check:

- every export tensor must be a HookedTransformer parameter of the same shape;
- every HookedTransformer parameter must come from the export, except biases that no source
  of ours has (`mlp.b_in`, `mlp.b_out`, `unembed.b_U`, and `b_Q/_b_K/_b_V` / `b_O` when
  config.json says so), which are zero, exactly what the export leaves out;
- buffers TL derives from its config (`rotary_sin/cos`, `mask`, `IGNORE`) keep TL's values.

No weight processing happens unless asked (`fold_ln`, ...): the model computes what the HF
checkpoint computes. Gemma is the one family whose tensors TL holds differently, and gets
them as TL's own Gemma conversion makes them: every RMSNorm weight as 1 + w (our export keeps
HF's w, the offset being a property of our norm), computed in fp32, and `embed.W_E` times
sqrt(d_model) (that number rounded to the dtype first, as HF's embed_scale); Gemma 2's
sandwich norms are TL's `use_normalization_before_and_after` (`ln1_post`, `ln2_post`), its
soft-caps `attn_scores_soft_cap` / `output_logits_soft_cap`, its query_pre_attn_scalar
`attn_scale`, Gemma 3's local rotary `rotary_base_local`.

Qwen3's q/k norms are TL's `use_qk_norm` (`attn.q_norm.w`), OLMo 2's and 3's post-norms
and OLMo 2's, 3's and OLMoE's projection-wide q/k norms come with their
`original_architecture` (OLMo 3's yarn on global layers only: `yarn_global_attn_only`), a
mixture of experts (Mixtral, OLMoE) is TL's `MoE` (router and experts as nn.Linear: our
tensors transposed, `_moe_as_linear`), Phi-3's partial rotary is `rotary_dim`, interleaved
rotary (Helium, ERNIE, GLM-4) `rotary_adjacent_pairs`, linear and yarn rope are TL's own. What
TL 3.9 lacks is refused naming the option: Granite's multipliers, SmolLM3's layers without
rotary, dynamic and longrope scaling, MLP biases on a gated MLP, Ministral 3's query scale,
and the other options of `TL_LACKS`. The config maps one to one: RMSNorm, gated SiLU MLP,
rotary at the checkpoint's theta, llama3 rope as TL's NTK-by-parts (the same formula as
HF's), sliding-window layers as TL's `"local"` attention (TL keeps keys with
`q - k < window_size`, HF's rule).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from importlib import import_module, metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gqa_convert.config import ModelConfig, RopeConfig
from gqa_convert.errors import BadInputError, UnsupportedModelError, listing
from gqa_convert.export import load_export

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[tl]'"

# Our rope type -> the HookedTransformerConfig fields that reproduce HF's inv_freq. TL 3.9
# has no longrope, and its dynamic NTK is Qwen-1's, not transformers' `dynamic`.
ROPE_FIELDS: dict[str, Callable[[RopeConfig], dict[str, Any]]] = {
    "default": lambda rope: {},
    "linear": lambda rope: {"rotary_scaling_factor": rope.factor},  # global layers only
    "yarn": lambda rope: {
        "use_yarn_rope": True,
        "yarn_factor": rope.factor,
        "yarn_attention_factor": rope.attention_factor,
        "yarn_beta_fast": rope.beta_fast,
        "yarn_beta_slow": rope.beta_slow,
        "yarn_truncate": rope.truncate,
        "yarn_original_max_position_embeddings": rope.original_max_position_embeddings,
    },
    "llama3": lambda rope: {
        "use_NTK_by_parts_rope": True,
        "NTK_by_parts_factor": rope.factor,
        "NTK_by_parts_low_freq_factor": rope.low_freq_factor,
        "NTK_by_parts_high_freq_factor": rope.high_freq_factor,
        "NTK_original_ctx_len": rope.original_max_position_embeddings,
    },
}

# TL's own `from_pretrained` default for string inputs (loading_from_pretrained.py);
# every other architecture prepends BOS. Only matters with a tokenizer.
PREPEND_BOS = {
    "Qwen2ForCausalLM": False,
    "Qwen3ForCausalLM": False,
    "Olmo2ForCausalLM": False,
}

# Architectures whose q / k norm TL applies over the whole projection.
PROJ_QK_NORM = ("Olmo2ForCausalLM", "OlmoeForCausalLM", "Olmo3ForCausalLM")
# Architectures whose ln1 / ln2 TL applies after the sublayer (its POST_NORM_ARCHITECTURES).
POST_NORM = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")

# HookedTransformer parameters that no source of ours has, so no export holds them.
ALWAYS_ZERO = ("b_in", "b_out", "b_U")


def _transformer_lens() -> Any:
    """The transformer_lens module, or an ImportError that says how to install it."""
    try:
        tl = import_module("transformer_lens")
    except ImportError as e:
        raise ImportError(
            f"to_hooked_transformer needs transformer-lens 3.x: {INSTALL_HINT}"
        ) from e
    try:
        has_it = hasattr(tl, "HookedTransformer")
    except ImportError:  # 4.x answers hasattr with an ImportError (its migration pointer)
        has_it = False
    if not has_it:
        try:
            version = metadata.version("transformer-lens")
        except metadata.PackageNotFoundError:
            version = "?"
        raise ImportError(
            f"the installed transformer-lens ({version}) has no HookedTransformer "
            f"(4.0 removed it); install 3.9: {INSTALL_HINT}, or use to_transformer_bridge"
        )
    return tl


def hooked_transformer_config(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    default_prepend_bos: bool | None = None,
) -> HookedTransformerConfig:
    """The HookedTransformerConfig of our config; UnsupportedModelError for what TL lacks."""
    tl = _transformer_lens()
    if cfg.rope.type not in ROPE_FIELDS:
        raise UnsupportedModelError(
            f"config.json: rope.type = {cfg.rope.type!r} has no exact HookedTransformer "
            f"equivalent (supported: {', '.join(ROPE_FIELDS)})"
        )
    if cfg.act_fn not in TL_ACTIVATIONS:
        raise UnsupportedModelError(f"config.json: act_fn = {cfg.act_fn!r} is not supported")
    local = "local" in cfg.attn_types
    _refuse_what_tl_lacks(cfg, local)
    moe = {}
    if cfg.moe is not None:  # TL's MoE: every layer, experts of width d_mlp
        moe = {
            "d_mlp": cfg.moe.d_expert,
            "num_experts": cfg.moe.n_experts,
            "experts_per_token": cfg.moe.top_k,
            "norm_topk_prob": cfg.moe.norm_topk_prob,
        }
    if default_prepend_bos is None:
        default_prepend_bos = PREPEND_BOS.get(cfg.architecture, True)
    return tl.HookedTransformerConfig(
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        n_heads=cfg.n_heads,
        n_key_value_heads=cfg.n_key_value_heads,  # always: our K/V are stored unexpanded
        n_layers=cfg.n_layers,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        eps=cfg.eps,
        act_fn=cfg.act_fn,
        normalization_type="LN" if cfg.norm_type == "layer" else "RMS",  # StarCoder2: LN
        final_rms=cfg.norm_type == "rms",
        gated_mlp=cfg.gated_mlp,  # StarCoder2, Apertus: TL's MLP (W_in, act, W_out)
        positional_embedding_type="rotary",
        rotary_dim=cfg.rotary_dim,  # Phi-3's partial rotary: the first rotary_dim dims
        rotary_base=cfg.rope.theta,
        # rotate-half (pairs (i, i + rotary_dim / 2)), or interleaved (Helium, ERNIE, GLM-4)
        rotary_adjacent_pairs=cfg.rotary_adjacent_pairs,
        **ROPE_FIELDS[cfg.rope.type](cfg.rope),
        use_attn_scale=True,  # scores / sqrt(d_head), or / sqrt(query_pre_attn_scalar):
        attn_scale=cfg.query_pre_attn_scalar**0.5 if cfg.query_pre_attn_scalar else -1.0,
        attn_scores_soft_cap=cfg.attn_logit_softcap or -1.0,  # -1: TL's "off"
        output_logits_soft_cap=cfg.final_logit_softcap or -1.0,
        use_normalization_before_and_after=cfg.norm_placement == "sandwich",
        rotary_base_local=cfg.rope_local.theta if cfg.rope_local else None,
        # OLMo 3: yarn on global layers only, plain rotary on local ones
        yarn_global_attn_only=cfg.rope_local is not None,
        use_qk_norm=cfg.qk_norm == "head",  # Qwen3; OLMo2's "proj" comes with its architecture
        scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
        use_local_attn=local,
        window_size=cfg.sliding_window if local else None,
        attn_types=list(cfg.attn_types) if local else None,
        original_architecture=cfg.architecture,
        default_prepend_bos=default_prepend_bos,
        init_weights=False,  # every parameter is loaded (or zero) below
        dtype=dtype,
        device=device,
        **{"d_mlp": cfg.d_mlp, **moe},
    )


# The same functions in TL's table; xielu: TL's XIELU module (mlp.act_fn.*, Apertus).
TL_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "xielu")

# Our options with no HookedTransformer equivalent in TL 3.9, as (field, value TL assumes).
TL_LACKS = (
    ("attention_multiplier", None),  # Granite
    ("residual_multiplier", 1.0),  # Granite
    ("logits_scaling", 1.0),  # Granite
    ("logit_scale", 1.0),  # Cohere
    ("attn_sinks", False),  # Granite SWA
    ("query_scale_beta", None),  # Ministral 3's llama_4_scaling_beta
    ("qk_norm_after_rotary", False),  # Hunyuan
    ("rope_thetas", ()),  # Granite SWA's per-layer theta
    ("chunked_layers", ()),  # Llama 4's chunked attention
    ("temperature_tuning", False),  # Llama 4's
    ("v_norm", False),  # Gemma 4's, with its layer_scalar, k = v, K/V sharing, per-layer inputs
    ("layer_scalar", False),
    ("k_eq_v_global", False),
    ("kv_shared_layers", 0),
    ("d_per_layer_input", 0),
)


def _refuse_what_tl_lacks(cfg: ModelConfig, local: bool) -> None:
    """UnsupportedModelError naming each option TL 3.9 would silently compute differently."""
    problems = [
        f"{name} = {getattr(cfg, name)!r}" for name, tl in TL_LACKS if getattr(cfg, name) != tl
    ]
    if cfg.embedding_multiplier != 1.0 and not cfg.embedding_multiplier_in_dtype:
        # Granite's (a Python float); Gemma's, rounded to the dtype, folds into W_E exactly.
        problems.append(f"embedding_multiplier = {cfg.embedding_multiplier!r}")
    local_rope, rope = cfg.rope_local, cfg.rope
    if local_rope is not None and (local_rope.type != "default" or rope.type not in ROPE_LOCAL_OK):
        problems.append(
            f"rotary {rope.type!r} on global and {local_rope.type!r} on local layers (TL's "
            "rotary_base_local changes only the base)"
        )
    if not all(cfg.rope_layers):
        problems.append(
            "layers without rotary (no_rope_layers: "
            f"{[i for i, r in enumerate(cfg.rope_layers) if not r]})"
        )
    if cfg.norm_placement == "post" and cfg.architecture not in POST_NORM:
        problems.append("norm_placement = 'post' (TL applies it to OLMo 2 and 3 only)")
    if cfg.qk_norm == "proj" and cfg.architecture not in PROJ_QK_NORM:
        problems.append("qk_norm = 'proj' (TL applies it to OLMo2 and OLMoE only)")
    if cfg.qk_norm == "weightless":
        problems.append("qk_norm = 'weightless' (Llama 4's, on rotary layers only)")
    if cfg.qk_norm == "heads":
        problems.append("qk_norm = 'heads' (TL's q / k norm weights are shared by the heads)")
    if cfg.parallel_attn_mlp:
        problems.append("parallel_attn_mlp (TL's parallel block normalises the MLP's input by ln2)")
    if cfg.mlp_bias and cfg.gated_mlp:
        problems.append("mlp_bias with a gated MLP (TL's GatedMLP has no bias on its gate)")
    if cfg.moe is not None and not all(cfg.moe.layers):
        dense = [i for i, moe in enumerate(cfg.moe.layers) if not moe]
        problems.append(f"dense MLP layers {dense} among MoE layers (TL's MoE is on every layer)")
    if cfg.moe is not None:  # TL's MoE: a softmax router's top-k, no shared expert
        moe = cfg.moe
        beyond = {
            f"a {moe.router} router": moe.router != "softmax",
            "e_score_correction_bias": moe.score_correction_bias,
            f"grouped top-k (n_group = {moe.n_group})": moe.n_group > 1,
            f"routed_scaling_factor = {moe.routed_scaling_factor}": moe.routed_scaling_factor != 1,
            "a shared expert": moe.d_shared_expert is not None,
            "the weight scaling the expert's input": moe.score_scales_input,  # Llama 4
            "a dense MLP beside the experts": moe.dense_mlp,  # Gemma 4
            "a normed, scaled router input": moe.router_input_norm,
            "per-expert scales": moe.per_expert_scale,
        }
        problems += [f"{what} (TL's MoE lacks it)" for what, on in beyond.items() if on]
    if cfg.rope.type == "linear" and local and cfg.rope_local is None:
        problems.append("linear rope scaling with sliding-window layers (TL skips them)")
    if cfg.rope.type == "yarn" and cfg.rope.partial_rotary_factor != 1.0:
        problems.append("yarn with partial rotary")
    if problems:
        raise UnsupportedModelError(
            f"{cfg.architecture}: TransformerLens 3.9's HookedTransformer cannot express "
            f"{'; '.join(problems)}; use GQATransformer.from_pretrained instead"
        )


# Global rope types TL applies to global layers only, so a plain local rotary stays plain.
ROPE_LOCAL_OK = ("default", "linear", "yarn")


def tl_tensor(
    cfg: ModelConfig, name: str, tensor: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """An export tensor as TL holds it: Gemma's norms as offset + w (in fp32, then cast),
    its embedding times sqrt(d_model) rounded to `dtype` (TL's Gemma conversion); the rest
    as they are, cast to `dtype`."""
    leaf = name.rsplit(".", 1)[-1]
    if cfg.norm_offset and leaf == "w":  # every `.w` is an RMSNorm weight
        return (cfg.norm_offset + tensor.float()).to(dtype)
    tensor = tensor.to(dtype)
    if name == "embed.W_E" and cfg.embedding_multiplier_in_dtype:
        scale = torch.tensor(cfg.embedding_multiplier, dtype=torch.float32).to(dtype)
        return tensor * scale.to(tensor.device)
    return tensor


def _zero_by_construction(cfg: ModelConfig, name: str) -> bool:
    """A bias the source does not have: zero in TL, never written to the export."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "b" and cfg.norm_type == "layer":  # a LayerNorm's (Cohere's have none)
        return not cfg.norm_bias
    if leaf in ("b_Q", "_b_K", "_b_V"):
        return not cfg.qkv_bias
    if leaf == "b_O":
        return not cfg.o_bias
    return leaf in ALWAYS_ZERO


def to_hooked_transformer(
    converted_dir: str | Path,
    *,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    tokenizer: PreTrainedTokenizerBase | None = None,
    default_prepend_bos: bool | None = None,
) -> HookedTransformer:
    """A transformer-lens 3.x `HookedTransformer` holding the export at `converted_dir`.

    Loaded without processing by default; the four flags are TL's `from_pretrained` ones and
    run TL's own processing after the strict load. `center_writing_weights` does nothing on
    these RMSNorm models (TL skips it: centering is exact only under LayerNorm).
    `center_unembed` shifts each position's logits by a constant (log-probs are unchanged).
    `tokenizer` (e.g. `AutoTokenizer.from_pretrained(converted_dir)`) enables TL's string
    inputs; `default_prepend_bos=None` takes TL's default for the architecture.
    """
    tl = _transformer_lens()
    folder = Path(converted_dir)
    cfg, state = load_export(folder)
    state = _moe_as_linear(cfg, state)
    tl_cfg = hooked_transformer_config(
        cfg, dtype=dtype, device=device, default_prepend_bos=default_prepend_bos
    )
    with warnings.catch_warnings():
        # 3.x warns that HookedTransformer goes away in 4.0: we target 3.x on purpose.
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = tl.HookedTransformer(tl_cfg, tokenizer=tokenizer)
    params = dict(model.named_parameters())
    full = _full_state_dict(folder, cfg, state, params, model.state_dict(), dtype, device)
    # assign: the parameters become the export's tensors (TL's were allocated, never touched).
    model.load_state_dict(full, strict=True, assign=True)
    model.eval()
    if fold_ln or center_writing_weights or center_unembed or fold_value_biases:
        if center_writing_weights:
            log.warning("center_writing_weights: skipped by TransformerLens for RMSNorm models")
        model.load_and_process_state_dict(
            model.state_dict(),
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )
    return model


def _moe_as_linear(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TL's MoE keeps its router and experts as nn.Linear: `blocks.{l}.mlp.W_gate.weight`
    [n_experts, d_model] and `...experts.{e}.W_in.weight` [d_expert, d_model], the transposes
    of our `W_gate` [d_model, n_experts] and `W_in` [d_model, d_expert] (likewise W_gate,
    W_out of each expert)."""
    moe = [f"blocks.{i}.mlp." for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    return {
        (f"{n}.weight" if n.startswith(tuple(moe)) else n): (t.T if n.startswith(tuple(moe)) else t)
        for n, t in state.items()
    }


def _full_state_dict(
    folder: Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    tl_state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str,
) -> dict[str, torch.Tensor]:
    """Exactly TL's state-dict keys: export tensors, zero biases, TL's derived buffers.

    Every offender (a missing parameter, an unknown tensor, a wrong shape) is listed in one
    BadInputError.
    """
    problems = [
        f"{name}: in the export, not a HookedTransformer parameter"
        for name in sorted(set(state) - set(tl_state))
    ]
    full: dict[str, torch.Tensor] = {}
    for name, value in tl_state.items():
        if name in state:  # a parameter, or a buffer the export holds (xIELU's beta, eps)
            tensor = state[name]
            if tensor.numel() == 1 and value.numel() == 1:  # xIELU: HF's [1], TL's []
                tensor = tensor.reshape(value.shape)
            if tuple(tensor.shape) != tuple(value.shape):
                problems.append(
                    f"{name}: shape {list(tensor.shape)} in the export, "
                    f"HookedTransformer wants {list(value.shape)}"
                )
            full[name] = tl_tensor(cfg, name, tensor.to(device), dtype)
        elif name not in params:  # rotary_sin/cos, mask, IGNORE: computed from the config
            full[name] = value
        elif _zero_by_construction(cfg, name):
            full[name] = torch.zeros_like(params[name])
        else:
            problems.append(f"{name}: missing from the export")
    if problems:
        raise BadInputError(listing(f"{folder}: does not fit a HookedTransformer", problems))
    return full
