"""An export as a TransformerLens 4 `TransformerBridge` (transformer-lens >= 4.3, < 5).

TL 4 builds every model as a bridge, one of two ways, and `to_transformer_bridge` takes the
first where it computes exactly what the HF checkpoint computes, else the second:

- **native**: `TransformerBridge.boot_native(cfg)`, TL's own small decoder (RMSNorm, gated
  MLP, GQA, rotary with linear or llama3 scaling, soft-caps), loaded with our tensors through
  `convert_tl_checkpoint`. It expresses Llama, Qwen2 without a window, Phi-3 without a window
  or longrope, and Gemma (norms as 1 + w, the embedding times sqrt(d_model), both folded in
  as TL's Gemma conversion does: `tl3.tl_tensor`). Its rotary turns adjacent pairs
  (2i, 2i + 1) where HF's turns (i, i + r/2), so the rotary dims of each q and k head are
  reordered (the permutation HF's Llama conversion script undoes): scores, patterns, z and
  logits are unchanged, but `hook_q` / `hook_k` (and `W_Q` / `W_K`) list those dims in
  `route.qk_order` (native dim j = our dim `qk_order[j]`). Its causal mask is [n_ctx, n_ctx]
  per layer, so `n_ctx` is capped (default 2048): longer inputs are refused by TL.
- **transformers**: our `to-hf` into a temporary folder, then
  `TransformerBridge.boot_transformers` on it (eager attention, TL's adapter for the
  architecture). Everything else: sliding windows, q/k norms, post and sandwich norms,
  mixtures of experts, dynamic / yarn / longrope rotary, NoPE layers, a rotary per layer
  type, Granite's multipliers. Q/K keep HF's order.

`bridge.gqa_route` says which path was taken and why (`BridgeRoute`); `bridge_route(cfg)`
says it without building anything. Either way `hook_k` / `hook_v` are
[batch, pos, n_kv_heads, d_head], as ours.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass
from importlib import import_module, metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gqa_convert.config import ModelConfig, RopeConfig
from gqa_convert.errors import BadInputError, UnsupportedModelError, listing
from gqa_convert.export import TOKENIZER_FILES, load_export, load_tokenizer
from gqa_convert.interop.tl3 import PREPEND_BOS, TL_LACKS, tl_tensor

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

INSTALL_HINT_TL4 = "pip install -e '.[tl4]' (in a venv of its own: it replaces transformer-lens 3)"

NATIVE_N_CTX = 2048  # default cap: TL's native model holds an [n_ctx, n_ctx] mask per layer

# Our act_fn (HF's ACT2FN name) -> the same function in TL's native table.
NATIVE_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_new"}


def _native_rope_scaling(rope: RopeConfig) -> dict[str, Any] | None:
    """TL native's `rope_scaling` for our rope (its formulas are HF's for these types)."""
    if rope.type == "linear":
        return {"rope_type": "linear", "factor": rope.factor}
    if rope.type == "llama3":
        return {
            "rope_type": "llama3",
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    return None


@dataclass(frozen=True)
class BridgeRoute:
    """How an export becomes a bridge: `path` "native" or "transformers"; `reasons`: what
    TL's native model cannot express (empty on the native path); `qk_order`: on the native
    path, our d_head index of each of the bridge's q / k dims (None: the same order)."""

    path: str
    reasons: tuple[str, ...] = ()
    qk_order: tuple[int, ...] | None = None


def native_obstacles(cfg: ModelConfig) -> list[str]:
    """What of `cfg` TL 4.3's native model would compute differently (empty: nothing)."""
    problems = [
        f"{name} = {getattr(cfg, name)!r}" for name, v in TL_LACKS if getattr(cfg, name) != v
    ]
    if cfg.embedding_multiplier != 1.0 and not cfg.embedding_multiplier_in_dtype:
        problems.append(f"embedding_multiplier = {cfg.embedding_multiplier!r}")  # Granite's
    if "local" in cfg.attn_types:
        problems.append(f"sliding-window layers (window {cfg.sliding_window})")
    if cfg.qk_norm is not None:
        problems.append(f"q/k norm ({cfg.qk_norm!r})")
    if cfg.norm_placement != "pre":
        problems.append(f"norm_placement = {cfg.norm_placement!r}")
    if cfg.moe is not None:
        problems.append("a mixture of experts")
    if not all(cfg.rope_layers):
        problems.append("layers without rotary")
    if cfg.rope_local is not None:
        problems.append("a rotary per layer type")
    rope = cfg.rope
    if rope.type not in ("default", "linear", "llama3"):
        problems.append(f"rope type {rope.type!r} (native: default, linear, llama3)")
    elif rope.type != "default" and (rope.factor or 0.0) < 1.0:
        problems.append(f"rope factor {rope.factor!r} < 1 (native ignores it)")
    if rope.theta != int(rope.theta):
        problems.append(f"rope theta {rope.theta!r} (TL stores an int)")
    if cfg.rotary_dim <= 0 or cfg.rotary_dim % 2:
        problems.append(f"rotary_dim = {cfg.rotary_dim}")
    if cfg.act_fn not in NATIVE_ACTIVATIONS:
        problems.append(f"act_fn = {cfg.act_fn!r}")
    if cfg.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx")
    if cfg.norm_weight_in_fp32 or cfg.rotary_in_fp32:
        problems.append("fp32 norm weights / rotary (OLMo2's half-precision rounding)")
    return problems


def native_qk_order(d_head: int, rotary_dim: int) -> tuple[int, ...]:
    """Our dim for each native q / k dim: native pairs (2i, 2i + 1) are our (i, i + r/2);
    dims past rotary_dim (partial rotary) stay in place."""
    half = rotary_dim // 2
    rotary = [j // 2 + (half if j % 2 else 0) for j in range(rotary_dim)]
    return (*rotary, *range(rotary_dim, d_head))


def bridge_route(cfg: ModelConfig) -> BridgeRoute:
    """The path `to_transformer_bridge(path="auto")` takes for `cfg`, and why."""
    problems = native_obstacles(cfg)
    if problems:
        return BridgeRoute("transformers", tuple(problems))
    return BridgeRoute("native", (), native_qk_order(cfg.d_head, cfg.rotary_dim))


def _transformer_bridge_class() -> Any:
    """TL 4's TransformerBridge with `boot_native` attached, or an ImportError saying how
    to install it."""
    try:
        version = metadata.version("transformer-lens")
        import_module("transformer_lens.model_bridge.sources.native")  # attaches boot_native
        bridge = import_module("transformer_lens.model_bridge")
    except (ImportError, metadata.PackageNotFoundError) as e:
        raise ImportError(
            f"to_transformer_bridge needs transformer-lens 4: {INSTALL_HINT_TL4}"
        ) from e
    if int(version.split(".")[0]) < 4:
        raise ImportError(
            f"the installed transformer-lens ({version}) has no TransformerBridge.boot_native; "
            f"to_transformer_bridge needs 4.3: {INSTALL_HINT_TL4}"
        )
    return bridge.TransformerBridge


def to_transformer_bridge(
    export: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    path: str = "auto",
    n_ctx: int | None = None,
) -> TransformerBridge:
    """A TransformerLens 4 `TransformerBridge` computing what the export's HF model computes.

    `path`: "auto" (native where TL's native model expresses the family exactly, else
    through transformers), "native" (UnsupportedModelError naming what it cannot express)
    or "transformers". `device` None: TL's default (`get_device()`); `dtype` None: the
    export's. `n_ctx` (native path only): the longest input, default min(the export's,
    2048). The route taken is `bridge.gqa_route`; string inputs use the export's tokenizer
    when it has one.
    """
    if path not in ("auto", "native", "transformers"):
        raise ValueError(f"path must be 'auto', 'native' or 'transformers', not {path!r}")
    bridge_cls = _transformer_bridge_class()
    folder = Path(export)
    cfg, state = load_export(folder)
    dtype = dtype or getattr(torch, cfg.dtype)
    if device is None:
        device = import_module("transformer_lens.utilities").get_device()
    route = bridge_route(cfg)
    if path == "native" and route.path != "native":
        raise UnsupportedModelError(
            f"{cfg.architecture}: TransformerLens 4.3's native model cannot express "
            f"{'; '.join(route.reasons)}; use path='transformers' (or 'auto')"
        )
    if path == "transformers":
        route = BridgeRoute("transformers", route.reasons or ("path='transformers'",))
    if route.path == "native":
        bridge = _boot_native(bridge_cls, folder, cfg, state, route, device, dtype, n_ctx)
    else:
        del state
        bridge = _boot_transformers(bridge_cls, folder, device, dtype)
    bridge.gqa_route = route
    log.info("%s: TransformerBridge %s (%s)", folder, route.path, "; ".join(route.reasons))
    return bridge


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def _boot_transformers(bridge_cls: Any, folder: Path, device: Any, dtype: torch.dtype) -> Any:
    """Our to-hf into a temporary folder (tokenizer included), then TL's boot_transformers.

    boot_transformers insists on loading a tokenizer from the folder; for an export without
    one, the HF model is loaded here (eager attention, as boot_transformers does) and wrapped
    by `build_bridge_from_module`, the assembly boot_transformers ends with."""
    from gqa_convert.to_hf import export_to_hf

    with tempfile.TemporaryDirectory(prefix="gqa-convert-bridge-") as tmp:
        hf_dir = export_to_hf(folder, Path(tmp) / folder.name)
        if _has_tokenizer(folder):
            bridge = bridge_cls.boot_transformers(str(hf_dir), device=device, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            builder = import_module("transformer_lens.model_bridge.sources")
            hf_model = AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=dtype, attn_implementation="eager"
            ).to(device)
            bridge = builder.build_bridge_from_module(
                hf_model,
                hf_model.config.architectures[0],
                hf_config=hf_model.config,
                dtype=dtype,
                device=device,
            )
    bridge.cfg.model_name = folder.name
    return bridge


def _boot_native(
    bridge_cls: Any,
    folder: Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    route: BridgeRoute,
    device: Any,
    dtype: torch.dtype,
    n_ctx: int | None,
) -> Any:
    """TL's native model of `cfg`, loaded strictly with the export's tensors."""
    tl_config = import_module("transformer_lens.config")
    convert_tl_checkpoint = import_module(
        "transformer_lens.utilities.tl_checkpoint_conversion"
    ).convert_tl_checkpoint
    bridge_cfg = tl_config.TransformerBridgeConfig(
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        n_layers=cfg.n_layers,
        n_ctx=n_ctx or min(cfg.n_ctx, NATIVE_N_CTX),
        n_heads=cfg.n_heads,
        n_key_value_heads=cfg.n_key_value_heads,  # K/V at n_kv heads, as ours
        d_vocab=cfg.d_vocab,
        d_mlp=cfg.d_mlp,
        act_fn=NATIVE_ACTIVATIONS[cfg.act_fn],
        eps=cfg.eps,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=cfg.rotary_dim,
        rotary_base=int(cfg.rope.theta),
        use_attn_scale=True,  # scores / attn_scale; -1: / sqrt(d_head)
        attn_scale=cfg.query_pre_attn_scalar**0.5 if cfg.query_pre_attn_scalar else -1.0,
        attn_scores_soft_cap=cfg.attn_logit_softcap or -1.0,  # -1: off
        output_logits_soft_cap=cfg.final_logit_softcap or -1.0,
        default_prepend_bos=PREPEND_BOS.get(cfg.architecture, True),
        original_architecture=cfg.architecture,
        init_weights=False,  # every parameter is loaded (or a zero bias) below
        dtype=dtype,
    )
    bridge_cfg.rope_scaling = _native_rope_scaling(cfg.rope)  # read by NativeRotary
    tokenizer = load_tokenizer(folder) if _has_tokenizer(folder) else None
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not move the caller's RNG
        bridge = bridge_cls.boot_native(
            bridge_cfg, tokenizer=tokenizer, device=device, dtype=dtype, model_name=folder.name
        )
    ours = _with_absent_biases(cfg, state)
    ours = {name: tl_tensor(cfg, name, t, dtype) for name, t in ours.items()}
    order = torch.tensor(route.qk_order)
    for name in [n for n in ours if n.endswith(("W_Q", "b_Q", "_W_K", "_b_K"))]:
        ours[name] = ours[name][..., order]  # [..., d_head]: rotate-half -> adjacent pairs
    try:
        converted = convert_tl_checkpoint(ours, copy.deepcopy(bridge.cfg))
    except ValueError as e:
        raise BadInputError(f"{folder}: {e}") from e
    _check_fits(folder, converted, bridge.state_dict())
    bridge.load_state_dict(converted, strict=True)
    bridge.eval()
    return bridge


def _with_absent_biases(
    cfg: ModelConfig, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`state` plus, in our names, the zero biases TL's native model has and the source does
    not (its q/k/v/o and unembedding Linears always carry one)."""
    ref = state["embed.W_E"]
    shapes: dict[str, tuple[int, ...]] = {"unembed.b_U": (cfg.d_vocab,)}
    for i in range(cfg.n_layers):
        attn = f"blocks.{i}.attn."
        if not cfg.qkv_bias:
            shapes[attn + "b_Q"] = (cfg.n_heads, cfg.d_head)
            shapes[attn + "_b_K"] = shapes[attn + "_b_V"] = (cfg.n_key_value_heads, cfg.d_head)
        if not cfg.o_bias:
            shapes[attn + "b_O"] = (cfg.d_model,)
    zeros = {n: torch.zeros(s, dtype=ref.dtype) for n, s in shapes.items() if n not in state}
    return {**state, **zeros}


def _check_fits(
    folder: Path, converted: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]
) -> None:
    """Every bridge parameter comes from the export (or is a zero bias), every export
    tensor is one, shapes agree; all offenders in one BadInputError."""
    problems = [f"{n}: missing from the export" for n in sorted(set(wanted) - set(converted))]
    problems += [f"{n}: not a bridge parameter" for n in sorted(set(converted) - set(wanted))]
    problems += [
        f"{n}: shape {list(t.shape)}, the bridge wants {list(wanted[n].shape)}"
        for n, t in sorted(converted.items())
        if n in wanted and t.shape != wanted[n].shape
    ]
    if problems:
        raise BadInputError(listing(f"{folder}: does not fit TL's native model", problems))
