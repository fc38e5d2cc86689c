"""One frozen config for our decoder, and the one door from HF's config.json into it.

HF field names appear only in `from_hf`. Everything the checkpoint states is read, never
derived: `head_dim` need not be d_model / n_heads, `rope_theta` need not be 10000.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gqa_convert.architectures import Family, family_for
from gqa_convert.errors import BadInputError, UnsupportedModelError

FORMAT = "gqa-convert/1"
ROPE_TYPES = (
    "default",
    "linear",
    "dynamic",
    "yarn",
    "longrope",
    "llama3",
    "ntk_alpha",
    "proportional",
)
ROUTERS = ("softmax", "sigmoid")  # MoEConfig.router: how the router scores the experts
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu", "xielu")  # HF ACT2FN names
# transformers' Qwen2Config default: with use_sliding_window and no max_window_layers,
# layers from 28 on use the window (0: every layer does).
QWEN2_MAX_WINDOW_LAYERS = 28


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings, as transformers' `ROPE_INIT_FUNCTIONS` read them.

    `factor`: linear, dynamic (NTK, against `ModelConfig.n_ctx`), yarn, llama3, longrope.
    `low/high_freq_factor`: llama3. `original_max_position_embeddings`: llama3, yarn, and
    longrope's switch from `short_factor` to `long_factor`. `beta_fast/beta_slow/truncate`:
    yarn. `attention_factor` multiplies cos and sin (yarn, longrope; 1 otherwise).
    `partial_rotary_factor`: rotary on the first `int(d_head * factor)` dims of each head.
    `alpha`: ntk_alpha (Hunyuan), the default frequencies at theta * alpha^(d / (d - 2)),
    d = d_head. proportional (Gemma 4): the whole head rotates, pairs (i, i + d_head / 2),
    the first `partial_rotary_factor` of the frequencies those of theta over d_head (divided
    by `factor`, default 1), the rest 0 (features that do not move).
    """

    theta: float = 10_000.0
    type: str = "default"
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float = 1.0
    beta_fast: float | None = None
    beta_slow: float | None = None
    truncate: bool = True
    long_factor: tuple[float, ...] | None = None
    short_factor: tuple[float, ...] | None = None
    partial_rotary_factor: float = 1.0
    alpha: float | None = None

    def __post_init__(self) -> None:
        for name in ("long_factor", "short_factor"):  # JSON gives lists back
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP (model/moe.py): `n_experts` gated SiLU experts of width
    `d_expert`, `top_k` of them per token by a softmax router (in fp32, HF's), their weights
    divided by their sum when `norm_topk_prob`; `weights_in_fp32` (Mixtral): the expert
    outputs are scaled by the fp32 weights, else by the weights cast to the compute dtype.
    `layers`: True where the layer's MLP is the MoE, False where it is dense (Qwen3-MoE's
    `mlp_only_layers` / `decoder_sparse_step`).

    The DeepSeek-V3 style router (GLM-4.5), each option off by default:
    `router`: "softmax" (over every expert) or "sigmoid" (each expert's own score);
    `router_in_fp32`: the router's weight and correction bias kept in fp32 when the model is
    cast to a half dtype, and its logits from the input cast to fp32 (GLM-4.5 and ERNIE 4.5
    MoE: HF's `_keep_in_fp32_modules_strict`; Hunyuan MoE: its fp32 nn.Linear);
    `score_correction_bias`: a learned bias `e_score_correction_bias` [n_experts] added to
    the scores to choose the experts, not to weigh them; `n_group` / `topk_group`: the experts
    in `n_group` equal groups, each group scored by the sum of its 2 best scores, the
    experts chosen only within the `topk_group` best groups; `routed_scaling_factor`: the
    chosen weights times this (after `norm_topk_prob`); `d_shared_expert`: the width of a
    gated SiLU expert every token runs through, added unweighted (None: none; 0: GLM-4.5's
    n_shared_experts = 0, whose zero-width tensors HF still writes and whose output is 0);
    `score_scales_input` (Llama 4): the weight multiplies the expert's input, not its output.

    gpt-oss's options: `router_bias` (the router has a bias `b_gate`), `softmax_after_topk`
    (top-k on the router logits, then a softmax over the k in their dtype), `expert_bias`
    (each expert has b_gate, b_in, b_out), `clamped_swiglu` (gate <= limit, up in
    [-limit, limit], out = (up + 1) * gate * sigmoid(alpha * gate); `swiglu_alpha`,
    `swiglu_limit`).

    Gemma 4's (26B-A4B, `enable_moe_block`): `dense_mlp`, a dense gated MLP (`dense`) beside
    the experts on every MoE layer, reading ln2's output, its output through a norm of its
    own; the router and the experts read the residual stream instead, the experts through a
    norm of their own and their sum through another; the two outputs added (then ln2_post).
    `router_input_norm`: the router's input is the weightless RMSNorm of that stream, times
    `router_scale` [d_model], times d_model^-0.5. `per_expert_scale`: each chosen weight
    times the expert's own learned scale, after `norm_topk_prob`."""

    n_experts: int
    top_k: int
    d_expert: int
    norm_topk_prob: bool = False
    weights_in_fp32: bool = False
    layers: tuple[bool, ...] = ()
    router: str = "softmax"
    router_in_fp32: bool = False
    score_correction_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    d_shared_expert: int | None = None
    # Llama 4: each chosen expert's weight multiplies its input, x * w, not its output
    score_scales_input: bool = False
    router_bias: bool = False
    softmax_after_topk: bool = False
    expert_bias: bool = False
    clamped_swiglu: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    dense_mlp: bool = False
    router_input_norm: bool = False
    per_expert_scale: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(bool(x) for x in self.layers))
        if not 0 < self.top_k <= self.n_experts:
            raise BadInputError(
                f"config.json: num_experts_per_tok = {self.top_k} with {self.n_experts} experts"
            )
        if self.router not in ROUTERS:
            raise BadInputError(f"config.json: router {self.router!r} (one of {ROUTERS})")
        if (
            self.n_group < 1
            or self.n_experts % self.n_group
            or not 0 < self.topk_group <= self.n_group
            or self.top_k > self.topk_group * (self.n_experts // self.n_group)
            or (self.n_group > 1 and self.n_experts // self.n_group < 2)
        ):
            raise BadInputError(
                f"config.json: n_group = {self.n_group}, topk_group = {self.topk_group} with "
                f"{self.n_experts} experts, {self.top_k} per token: expected groups of at "
                "least 2 experts dividing them, topk_group <= n_group, and top_k experts "
                "within the topk_group groups"
            )
        if self.d_shared_expert is not None and self.d_shared_expert < 0:
            raise BadInputError(f"config.json: shared expert width {self.d_shared_expert} < 0")


@dataclass(frozen=True)
class ModelConfig:
    """Everything our decoder needs, in our names. Build it with `from_hf` or `load_config`."""

    architecture: str
    family: str
    d_model: int
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    eps: float
    act_fn: str = "silu"
    rope: RopeConfig = field(default_factory=RopeConfig)
    sliding_window: int | None = None
    # "global" or "local" (sliding window) for each layer.
    attn_types: tuple[str, ...] = ()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    dtype: str = "float32"
    # TransformerLens's 1/(layer_id+1) score scaling; no HF Llama-family model uses it.
    scale_attn_by_inverse_layer_idx: bool = False
    # Decoder options, each off by default (Llama). See the README's family table.
    qk_norm: str | None = None  # RMSNorm of q and k before rotary: "head" (Qwen3) or "proj" (OLMo2)
    norm_placement: str = "pre"  # "post": ln1 / ln2 normalise the sublayer's output (OLMo2)
    embedding_multiplier: float = 1.0  # Granite: embeddings times this
    attention_multiplier: float | None = None  # Granite: the score scale, not 1/sqrt(d_head)
    residual_multiplier: float = 1.0  # Granite: sublayer outputs times this, before the add
    logits_scaling: float = 1.0  # Granite: logits divided by this
    rope_layers: tuple[bool, ...] = ()  # False: the layer has no rotary (SmolLM3's NoPE)
    norm_weight_in_fp32: bool = False  # OLMo2's RMSNorm: weight times fp32, then the cast
    rotary_in_fp32: bool = False  # OLMo2: cos / sin stay fp32, q / k rotate in fp32
    # Gemma: every RMSNorm scales by (norm_offset + w), in fp32, then casts back (w is HF's).
    norm_offset: float = 0.0
    # Gemma: the embedding multiplier (sqrt(d_model)) is rounded to the compute dtype before
    # the product, as HF's embed_scale buffer; Granite's multiplies as a Python float.
    embedding_multiplier_in_dtype: bool = False
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: scores times this^-0.5
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    rope_local: RopeConfig | None = None  # Gemma 3: the local layers' rotary (None: `rope`)
    moe: MoEConfig | None = None  # None: every MLP dense (Mixtral, Qwen3-MoE, OLMoE: MoEConfig)
    # The 2026 dense families (README's family table), each off by default.
    mlp_bias: bool = False  # biases on the MLP's projections (b_gate, b_in, b_out)
    rotary_adjacent_pairs: bool = False  # interleaved rotary: pairs (2i, 2i + 1) (GLM, Cohere)
    rotary_math_in_fp32: bool = False  # Cohere: q / k rotate in fp32, cos / sin in the dtype
    qk_norm_after_rotary: bool = False  # Hunyuan: the q / k norms act on the rotated q / k
    norm_type: str = "rms"  # "layer": LayerNorm, mean subtracted (Cohere, StarCoder2)
    norm_bias: bool = False  # LayerNorm with a bias `b` (StarCoder2)
    parallel_attn_mlp: bool = False  # Cohere: resid + attn(ln1(x)) + mlp(ln1(x))
    gated_mlp: bool = True  # False: W_out(act(x W_in + b_in)) + b_out (StarCoder2, Apertus)
    logit_scale: float = 1.0  # Cohere: logits times this
    # Granite SWA: each layer's rope theta (0: no rotary there), the rope's other settings
    # shared; empty: `rope` / `rope_local` by layer type.
    rope_thetas: tuple[float, ...] = ()
    attn_sinks: bool = False  # Granite SWA: a learned logit per head joins each softmax
    # gpt-oss: that softmax in the compute dtype, its max subtracted first (GptOss's eager)
    sinks_softmax_in_dtype: bool = False
    # Ministral 3 (llama_4_scaling_beta): after rotary, q times
    # 1 + beta * log(1 + floor(position / query_scale_length)).
    query_scale_beta: float | None = None
    query_scale_length: int | None = None
    # Llama 4's attention temperature tuning: the same scale (beta = attn_scale, length =
    # floor_scale) at floor((index + 1) / length), the index counting every token, padding
    # included (Llama4TextAttention's arange + cache length), only on layers without rotary.
    temperature_tuning: bool = False
    # Llama 4: the q / k norm ("weightless": RMS over d_head, no weight) on rotary layers only.
    qk_norm_on_nope_layers: bool = True
    # Llama 4's chunked attention: on the layers flagged in `chunked_layers`, a query attends
    # only the keys of its own `attention_chunk_size`-token chunk (positions // size equal).
    attention_chunk_size: int | None = None
    chunked_layers: tuple[bool, ...] = ()
    # Gemma 4: global layers' head size and KV heads (None: d_head, n_key_value_heads);
    # `k_eq_v_global`: global layers have no W_V, v is k's projection (before k's norm);
    # `v_norm`: a weightless RMSNorm of v; `kv_shared_layers`: the last this many layers
    # compute no K/V and attend those of the last earlier layer of their type (`kv_source`);
    # `d_per_layer_input` (0: off) the width of the per-layer input embeddings (vocabulary
    # `d_vocab_per_layer`) each block adds through a gated projection; `layer_scalar`: each
    # block's output (the whole residual stream) times its `layer_scalar`;
    # `d_mlp_shared_kv` the MLP width of the K/V-shared layers (None: d_mlp; E2B / E4B's
    # use_double_wide_mlp: twice it).
    d_head_global: int | None = None
    n_key_value_heads_global: int | None = None
    k_eq_v_global: bool = False
    v_norm: bool = False
    kv_shared_layers: int = 0
    d_per_layer_input: int = 0
    d_vocab_per_layer: int = 0
    layer_scalar: bool = False
    d_mlp_shared_kv: int | None = None

    def __post_init__(self) -> None:
        for name, base in (
            ("d_head_global", "d_head"),
            ("n_key_value_heads_global", "n_key_value_heads"),
            ("d_mlp_shared_kv", "d_mlp"),
        ):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(self, base))
        global_kv = self.n_key_value_heads_global  # Gemma 4's; else n_key_value_heads, checked
        if global_kv != self.n_key_value_heads and self.n_heads % global_kv:  # as transformers
            raise BadInputError(
                f"config.json: num_attention_heads={self.n_heads} is not divisible by "
                f"num_global_key_value_heads={self.n_key_value_heads_global}"
            )
        if not 0 <= self.kv_shared_layers < self.n_layers:
            raise BadInputError(
                f"config.json: num_kv_shared_layers = {self.kv_shared_layers}: expected 0 to "
                f"{self.n_layers - 1} (the first layer computes its own K/V)"
            )
        if self.n_heads % self.n_key_value_heads:
            raise BadInputError(
                f"config.json: num_attention_heads={self.n_heads} is not divisible by "
                f"num_key_value_heads={self.n_key_value_heads}"
            )
        if not self.attn_types:  # unstated: every layer global
            object.__setattr__(self, "attn_types", ("global",) * self.n_layers)
        if len(self.attn_types) != self.n_layers or not set(self.attn_types) <= {
            "global",
            "local",
        }:
            raise BadInputError(
                f"config.json: attn_types has {len(self.attn_types)} entries, n_layers = "
                f"{self.n_layers}: expected one 'global' or 'local' per layer"
            )
        if "local" in self.attn_types and not self.sliding_window:
            raise BadInputError(
                "config.json: attn_types has 'local' layers, sliding_window is "
                f"{self.sliding_window!r}"
            )
        if not self.rope_layers:  # unstated: every layer rotates
            object.__setattr__(self, "rope_layers", (True,) * self.n_layers)
        if len(self.rope_layers) != self.n_layers:
            raise BadInputError(
                f"config.json: rope_layers has {len(self.rope_layers)} entries, n_layers = "
                f"{self.n_layers}: expected one true / false per layer"
            )
        object.__setattr__(self, "rope_layers", tuple(bool(r) for r in self.rope_layers))
        if self.moe is not None and len(self.moe.layers) != self.n_layers:
            raise BadInputError(
                f"config.json: {len(self.moe.layers)} MoE layer flags, n_layers = {self.n_layers}"
            )
        object.__setattr__(self, "chunked_layers", tuple(bool(c) for c in self.chunked_layers))
        if self.chunked_layers and (
            len(self.chunked_layers) != self.n_layers or not self.attention_chunk_size
        ):
            raise BadInputError(
                f"config.json: {len(self.chunked_layers)} chunked-attention flags for "
                f"{self.n_layers} layers, attention_chunk_size = {self.attention_chunk_size!r}"
            )
        qk_norms = (None, "head", "heads", "proj", "weightless")
        if self.qk_norm not in qk_norms or self.norm_placement not in (
            "pre",
            "post",
            "sandwich",
        ):
            raise BadInputError(
                f"config.json: qk_norm={self.qk_norm!r} (None, 'head', 'heads', 'proj' or "
                "'weightless'), "
                f"norm_placement={self.norm_placement!r} ('pre', 'post' or 'sandwich')"
            )
        if self.norm_type not in ("rms", "layer"):
            raise BadInputError(f"config.json: norm_type={self.norm_type!r} ('rms' or 'layer')")
        object.__setattr__(self, "rope_thetas", tuple(float(t) for t in self.rope_thetas))
        if self.rope_thetas and len(self.rope_thetas) != self.n_layers:
            raise BadInputError(
                f"config.json: {len(self.rope_thetas)} per-layer rope thetas, n_layers = "
                f"{self.n_layers}"
            )
        for layer in range(self.n_layers):  # every shared layer has a source
            self.kv_source(layer)

    def rope_for(self, attn_type: str) -> RopeConfig:
        """The rotary of a layer type: `rope_local` on local layers when set, else `rope`."""
        return self.rope_local if attn_type == "local" and self.rope_local else self.rope

    def layer_rope(self, layer: int) -> RopeConfig:
        """The rotary of layer `layer`: its type's, at its own theta where `rope_thetas`
        gives one (Granite SWA; meaningless on a layer without rotary)."""
        rope = self.rope_for(self.attn_types[layer])
        if self.rope_thetas and self.rope_thetas[layer] and self.rope_thetas[layer] != rope.theta:
            return replace(rope, theta=self.rope_thetas[layer])
        return rope

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotate (the first ones); the rest pass through."""
        return int(self.d_head * self.rope.partial_rotary_factor)

    def layer_d_head(self, layer: int) -> int:
        """The head size of layer `layer` (Gemma 4's global layers: `d_head_global`)."""
        return self.d_head_global if self.attn_types[layer] == "global" else self.d_head

    def layer_n_kv(self, layer: int) -> int:
        """The KV heads of layer `layer` (Gemma 4's global layers: their own count)."""
        if self.attn_types[layer] == "global":
            return self.n_key_value_heads_global
        return self.n_key_value_heads

    def layer_rotary_dim(self, layer: int) -> int:
        """Rotating dims of layer `layer`'s heads: `rotary_dim` at the layer's head size;
        the whole head under proportional rope (its frequencies hold the partial factor)."""
        d_head, rope = self.layer_d_head(layer), self.layer_rope(layer)
        return d_head if rope.type == "proportional" else int(d_head * rope.partial_rotary_factor)

    def kv_source(self, layer: int) -> int | None:
        """The earlier layer whose keys and values layer `layer` attends (Gemma 4's KV
        sharing: the last layer of its type before the shared ones), None: its own."""
        first = self.n_layers - self.kv_shared_layers
        if layer < first:
            return None
        kind = self.attn_types[layer]
        owners = [i for i in range(first) if self.attn_types[i] == kind]
        if not owners:
            raise BadInputError(
                f"config.json: layer {layer} ({kind}) shares K/V, but no layer before the "
                f"{self.kv_shared_layers} shared ones is {kind}"
            )
        return owners[-1]

    def layer_d_mlp(self, layer: int) -> int:
        """The dense MLP width of layer `layer` (Gemma 4's K/V-shared layers: their own)."""
        return self.d_mlp if self.kv_source(layer) is None else self.d_mlp_shared_kv

    def has_w_v(self, layer: int) -> bool:
        """Whether layer `layer` has its own V projection (not K/V-shared, not k = v)."""
        if self.kv_source(layer) is not None:
            return False
        return not (self.k_eq_v_global and self.attn_types[layer] == "global")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.layers[layer]

    def keeps_fp32(self, name: str) -> bool:
        """Whether tensor `name` (ours) stays fp32 in a half-precision model or export: an MoE
        router's weight and correction bias with `moe.router_in_fp32` (HF keeps them so)."""
        parts = name.split(".")  # blocks.{l}.mlp.{W_gate, e_score_correction_bias}
        return (
            self.moe is not None
            and self.moe.router_in_fp32
            and len(parts) == 4
            and parts[0] == "blocks"
            and parts[2] == "mlp"
            and parts[3] in ("W_gate", "e_score_correction_bias")
            and parts[1].isdigit()
            and self.is_moe_layer(int(parts[1]))
        )

    @property
    def n_experts(self) -> int:
        return self.moe.n_experts if self.moe else 0

    @property
    def d_expert(self) -> int:
        """One expert's MLP width (Qwen3-MoE's moe_intermediate_size; 0 without MoE)."""
        return self.moe.d_expert if self.moe else 0

    @property
    def d_shared_expert(self) -> int:
        """The shared expert's width (GLM-4.5's n_shared_experts * moe_intermediate_size; 0
        without one)."""
        return (self.moe.d_shared_expert or 0) if self.moe else 0

    @property
    def has_shared_expert(self) -> bool:
        return self.moe is not None and self.moe.d_shared_expert is not None

    @property
    def group_size(self) -> int:
        """Query heads per KV head: head h reads KV head h // group_size."""
        return self.n_heads // self.n_key_value_heads

    # TransformerLens's HookedTransformerConfig names for what code written against TL reads
    # from `model.cfg` (ActivationCache, SAE libraries); derived, never stored.
    normalization_type = "RMS"
    attn_only = False
    gated_mlp = True
    final_rms = True
    parallel_attn_mlp = False

    @property
    def positional_embedding_type(self) -> str:
        return "rotary" if any(self.rope_layers) else "standard"

    @property
    def use_normalization_before_and_after(self) -> bool:
        return self.norm_placement == "sandwich"

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def original_architecture(self) -> str:
        return self.architecture

    @property
    def num_experts(self) -> int | None:
        return self.moe.n_experts if self.moe else None

    @property
    def experts_per_token(self) -> int | None:
        return self.moe.top_k if self.moe else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("attn_types", "rope_layers", "rope_thetas", "chunked_layers"):
            data[name] = list(data[name])
        if data["moe"] is not None:
            data["moe"]["layers"] = list(data["moe"]["layers"])
        for rope in (data["rope"], data["rope_local"]):
            for name in ("long_factor", "short_factor"):
                if rope is not None and rope[name] is not None:
                    rope[name] = list(rope[name])
        return {"format": FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        if data.pop("format", None) != FORMAT:
            raise BadInputError(f"config.json: not a gqa-convert export (format != {FORMAT!r})")
        try:
            data["rope"] = RopeConfig(**data["rope"])
            if data.get("rope_local") is not None:
                data["rope_local"] = RopeConfig(**data["rope_local"])
            data["attn_types"] = tuple(data["attn_types"])
            data["rope_layers"] = tuple(data.get("rope_layers", ()))
            data["rope_thetas"] = tuple(data.get("rope_thetas", ()))
            data["chunked_layers"] = tuple(data.get("chunked_layers", ()))
            if data.get("moe") is not None:
                data["moe"] = MoEConfig(**data["moe"])
            return cls(**data)
        except (KeyError, TypeError) as e:  # a missing, unknown or mistyped field
            raise BadInputError(
                f"config.json: not a valid gqa-convert config ({type(e).__name__}: {e})"
            ) from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a BadInputError that names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _get(hf: dict, key: str, kind: type, default: Any = ...) -> Any:
    """`hf[key]` checked to be a `kind` (ints and floats > 0); null means the default."""
    value = hf.get(key)
    if value is None:
        if default is ...:
            raise BadInputError(f"config.json: missing field {key!r}")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if not ok or (kind is int and value <= 0):
        raise BadInputError(
            f"config.json: field {key!r} = {value!r} is not a valid {kind.__name__}"
        )
    if kind is float and not 0 < value < float("inf"):  # eps, theta, factors: all positive
        raise BadInputError(f"config.json: field {key!r} = {value!r} is not a positive number")
    return value


def _rope_from_hf(hf: dict, family: Family, d_head: int) -> RopeConfig:
    """Both spellings: `rope_parameters` (transformers 5) and `rope_theta` + `rope_scaling`.

    Each value is read where transformers' `standardize_rope_params` and the rope type's
    init function read it, with the same defaults.
    """
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(key, {}), dict | None):
            raise BadInputError(f"config.json: field {key!r} = {hf[key]!r} is not an object")
    if "rope_parameters" in family.defaults and not (
        hf.get("rope_parameters") or hf.get("rope_scaling")
    ):  # the config class's own rope (Apertus: llama3; Ministral 3: yarn), rope_theta unread
        hf = {**hf, "rope_parameters": dict(family.defaults["rope_parameters"])}
    if isinstance(hf.get("rope_parameters"), dict):
        where, params = "rope_parameters", dict(hf["rope_parameters"])
        if "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
            raise UnsupportedModelError(
                "config.json: per-layer-type rope_parameters are not supported"
            )
    else:
        where, params = "rope_scaling", dict(hf.get("rope_scaling") or {})
        params.setdefault(
            "rope_theta", hf.get("rope_theta", family.defaults.get("rope_theta", 1e4))
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = family.rope_aliases.get(rope_type, rope_type)
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"config.json: {where}.rope_type = {rope_type!r} is not supported "
            f"(supported: {', '.join(ROPE_TYPES)})"
        )
    partial = params.get(
        "partial_rotary_factor",
        hf.get("partial_rotary_factor", family.defaults.get("partial_rotary_factor", 1.0)),
    )
    if partial != 1.0 and "partial_rotary_factor" not in family.defaults:
        raise UnsupportedModelError(
            f"config.json: partial_rotary_factor = {partial!r} is not supported for "
            f"{family.architectures[0]} (its modelling code rotates whole heads)"
        )
    partial = _get({"partial_rotary_factor": partial}, "partial_rotary_factor", float)
    dim = int(d_head * partial)
    if dim % 2 or not 0 < partial <= 1:
        raise BadInputError(
            f"config.json: partial_rotary_factor = {partial} gives {dim} rotary dims of "
            f"head_dim {d_head}: expected an even number > 0"
        )
    common = {"theta": _get(params, "rope_theta", float), "partial_rotary_factor": partial}
    if rope_type == "dynamic" and params.get("alpha") and family.fixed.get("ntk_alpha"):
        # Hunyuan: "dynamic" with an alpha is a fixed NTK stretch of the base (its rotary
        # embedding calls it ntk_alpha), whatever the length.
        return RopeConfig(**common, type="ntk_alpha", alpha=_get(params, "alpha", float))
    if rope_type == "default":
        return RopeConfig(**common)
    common["type"] = rope_type
    if rope_type == "proportional":  # Gemma 4: factor optional, 1 by default
        return RopeConfig(**common, factor=_get(params, "factor", float, 1.0))
    if rope_type in ("linear", "dynamic"):
        return RopeConfig(**common, factor=_get(params, "factor", float))
    # transformers: a top-level original_max_position_embeddings (Phi-3's config class always
    # has one) wins over rope_parameters'; max_position_embeddings is the last resort.
    n_ctx = _get(hf, "max_position_embeddings", int)
    top = hf.get("original_max_position_embeddings")
    top = family.defaults.get("original_max_position_embeddings") if top is None else top
    original = _get(
        {"o": top} if top is not None else {"o": params.get("original_max_position_embeddings")},
        "o",
        int,
        n_ctx,
    )
    if rope_type == "llama3":
        return RopeConfig(
            **common,
            factor=_get(params, "factor", float),
            low_freq_factor=_get(params, "low_freq_factor", float),
            high_freq_factor=_get(params, "high_freq_factor", float),
            original_max_position_embeddings=original,
        )
    factor = _get(params, "factor", float, None) or n_ctx / original
    attention_factor = _get(params, "attention_factor", float, None)
    if rope_type == "yarn":
        if attention_factor is None:
            mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
            attention_factor = (
                _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                if mscale and mscale_all
                else _yarn_mscale(factor)
            )
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise BadInputError(f"config.json: {where}.truncate = {truncate!r} is not a bool")
        return RopeConfig(
            **common,
            factor=factor,
            original_max_position_embeddings=original,
            attention_factor=float(attention_factor),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            truncate=truncate,
        )
    # longrope
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    lists = {}
    for name in ("long_factor", "short_factor"):
        value = params.get(name)
        if not (isinstance(value, list) and len(value) == dim // 2) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value
        ):
            raise BadInputError(
                f"config.json: {where}.{name} must be a list of {dim // 2} numbers "
                f"(rotary dims / 2), found {value!r}"
            )
        lists[name] = tuple(float(x) for x in value)
    return RopeConfig(
        **common,
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=float(attention_factor),
        **lists,
    )


LAYER_TYPES = {"full_attention": "global", "sliding_attention": "local"}


def _ropes(
    hf: dict, family: Family, d_head: int, d_head_global: int | None = None
) -> tuple[RopeConfig, RopeConfig | None]:
    """The rotary of global layers, and of local layers where the family has one per layer
    type (Gemma 3, else None), read as Gemma3TextConfig reads them: `rope_parameters`
    {full_attention, sliding_attention}, else `rope_theta` + `rope_scaling` (global) and
    `rope_local_base_freq` (local), with the family's default thetas (Gemma 4: its default
    `rope_parameters`; global layers' head size `d_head_global`)."""
    if not family.fixed.get("rope_per_layer_type"):
        return _rope_from_hf(hf, family, d_head), None
    per_type = hf.get("rope_parameters") or family.defaults.get("rope_parameters") or {}
    if not isinstance(per_type, dict) or not set(per_type) <= set(LAYER_TYPES):
        raise BadInputError(
            f"config.json: rope_parameters = {per_type!r}: expected an object per layer type "
            f"({', '.join(LAYER_TYPES)})"
        )
    ropes = {}
    # Gemma 3 reads the local theta from rope_local_base_freq; OLMo 3 reads none (its
    # config class gives local layers its default theta, whatever rope_theta says).
    local_field = family.fixed.get("local_theta_field", "rope_local_base_freq")
    for layer_type, theta_field in (
        ("full_attention", "rope_theta"),
        ("sliding_attention", local_field),
    ):
        params = per_type.get(layer_type) or {"rope_type": "default"}
        if not isinstance(params, dict):
            raise BadInputError(f"config.json: rope_parameters.{layer_type} is not an object")
        params = dict(params)
        if layer_type == "full_attention" and isinstance(hf.get("rope_scaling"), dict):
            params.update(hf["rope_scaling"])
        theta = hf.get(theta_field) if theta_field else None
        params.setdefault("rope_theta", theta or family.defaults[theta_field or "rope_theta"])
        dim = d_head_global if layer_type == "full_attention" and d_head_global else d_head
        rope = _rope_from_hf({**hf, "rope_parameters": params}, family, dim)
        if rope.type in ("dynamic", "longrope"):  # their frequencies follow the length
            raise UnsupportedModelError(
                f"config.json: rope_type {rope.type!r} on {layer_type} layers is not supported"
            )
        ropes[LAYER_TYPES[layer_type]] = rope
    return ropes["global"], ropes["local"]


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _attn_types(
    hf: dict, family: Family, rope_layers: tuple[bool, ...]
) -> tuple[tuple[str, ...], int | None]:
    n_layers = len(rope_layers)
    # An absent sliding_window is the config class's default (Gemma 2 / 3: 4096).
    if "sliding_window" in hf:
        window = _get(hf, "sliding_window", int, None)
    else:
        window = family.defaults.get("sliding_window")
    layer_types = hf.get("layer_types") if family.reads_layer_types else None
    if layer_types is not None:
        names = LAYER_TYPES
        if not isinstance(layer_types, list):
            raise BadInputError(f"config.json: field 'layer_types' = {layer_types!r} is not a list")
        if len(layer_types) != n_layers or any(t not in names for t in layer_types):
            raise UnsupportedModelError(
                f"config.json: layer_types = {layer_types!r}: expected {n_layers} entries of "
                f"{' / '.join(names)}"
            )
        types = tuple(names[t] for t in layer_types)
    elif window is None or family.sliding_window_rule == "never":
        types = ("global",) * n_layers
    elif family.sliding_window_rule == "always":
        types = ("local",) * n_layers
    elif family.sliding_window_rule == "pattern":  # Gemma 2 / 3: each pattern-th is global
        every = family.fixed.get("sliding_window_pattern")
        every = every or _get(
            hf, "sliding_window_pattern", int, family.defaults.get("sliding_window_pattern")
        )
        types = tuple("global" if (i + 1) % every == 0 else "local" for i in range(n_layers))
    elif family.sliding_window_rule == "pattern_first":  # Granite SWA: layer 0, 4, 8... global
        every = family.fixed["sliding_window_pattern"]
        types = tuple("global" if i % every == 0 else "local" for i in range(n_layers))
    elif family.sliding_window_rule == "use_sliding_window":  # Qwen3-MoE: every layer, if on
        types = ("local" if _get(hf, "use_sliding_window", bool, False) else "global",) * n_layers
    elif family.sliding_window_rule == "no_rope_layers":  # SmolLM3: the NoPE layers, if on
        on = _get(hf, "use_sliding_window", bool, False)
        types = tuple("local" if on and not rope else "global" for rope in rope_layers)
    else:  # qwen2
        on = _get(hf, "use_sliding_window", bool, False)
        first = hf.get("max_window_layers")
        first = QWEN2_MAX_WINDOW_LAYERS if first is None else first
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise BadInputError(
                f"config.json: field 'max_window_layers' = {first!r} is not a count >= 0"
            )
        types = tuple("local" if on and i >= first else "global" for i in range(n_layers))
    if family.fixed.get("last_layer_global") and types:  # Gemma 4's config class forces it
        types = (*types[:-1], "global")
    if "local" in types and window is None:
        raise BadInputError(
            "config.json: layer_types asks for sliding attention, sliding_window is null"
        )
    return types, window if "local" in types else None


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our config from the dict of an HF `config.json` (either rope spelling)."""
    architectures = hf.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise BadInputError(
            f"config.json: field 'architectures' = {architectures!r} is not a list of names"
        )
    family = family_for(architectures, hf.get("model_type"))
    if hf.get("auto_map"):
        # Custom modelling code: we never run it (no trust_remote_code), and cannot vouch
        # that the weights mean what the stated architecture's stock code says they mean.
        raise UnsupportedModelError(
            f"config.json: auto_map = {hf['auto_map']!r} asks for the checkpoint's own "
            "modelling code, which gqa-convert never runs; if the model is a stock "
            f"{family.architectures[0]}, delete auto_map from config.json and convert again"
        )
    # The config class's renamed fields (InternLM3's qkv_bias -> attention_bias).
    hf = {**{f: hf[a] for a, f in family.field_aliases.items() if a in hf}, **hf}
    act_field = family.activation_field  # hidden_act, or Gemma 2/3's hidden_activation
    act = hf.get(act_field) or family.defaults.get(act_field, "silu")
    act = family.activation_aliases.get(act, act) if isinstance(act, str) else act
    gated = family.fixed.get("gated_mlp", True)
    if act not in ACTIVATIONS or (act == "xielu" and gated):
        raise UnsupportedModelError(
            f"config.json: {act_field} = {act!r} is not supported "
            f"(supported: {', '.join(a for a in ACTIVATIONS if a != 'xielu' or not gated)})"
        )
    if _get(hf, "use_bidirectional_attention", bool, False):
        raise UnsupportedModelError(
            "config.json: use_bidirectional_attention = true (an encoder) is not supported"
        )
    if hf.get("clip_qkv") is not None:
        raise UnsupportedModelError(
            f"config.json: clip_qkv = {hf['clip_qkv']!r} (q / k / v clamped) is not supported"
        )
    d_model = _get(hf, "hidden_size", int)
    n_heads = _get(hf, "num_attention_heads", int)
    n_layers = _get(hf, "num_hidden_layers", int)
    d_head = _head_dim(hf, family, d_model, n_heads)
    rope_layers = _rope_layers(hf, family, n_layers)
    attn_types, window = _attn_types(hf, family, rope_layers)
    rope_layers, rope_thetas = _nope_layers(hf, family, rope_layers, attn_types)
    biases = _biases(hf, family)
    moe = _moe_from_hf(hf, family, n_layers)
    if biases["mlp"] and moe is not None:
        raise UnsupportedModelError(
            f"config.json: {family.bias_fields.get('mlp', 'mlp_bias')} = true in a mixture of "
            "experts: MLP biases there (ERNIE 4.5 MoE's on the shared expert and lm_head) are "
            "not supported"
        )
    defaults = family.defaults

    def option(name: str, kind: type, default: Any) -> Any:
        """Hard-wired by the family, read from config.json if the family reads it, else off."""
        if name in family.fixed:
            return family.fixed[name]
        return _get(hf, name, kind, defaults[name]) if name in defaults else default

    def soft_cap(name: str) -> float | None:
        """A soft-cap (Gemma 2): null in config.json or false in the family's table is off."""
        if name not in family.fixed and name in hf and hf[name] is None:
            return None
        return option(name, float, None) or None

    # Gemma: embeddings times sqrt(d_model), rounded to the compute dtype first.
    sqrt_scale = family.fixed.get("embedding_scale") == "sqrt_d_model"
    gemma4 = _gemma4_layers(hf, family, attn_types, d_head)
    rope, rope_local = _ropes(hf, family, d_head, gemma4.get("d_head_global"))
    beta, scale_length = _query_scale(hf, family, rope)
    tuning = _temperature_tuning(hf, family)  # Llama 4's, in place of Ministral 3's
    if tuning is not None:
        beta, scale_length = tuning
    chunk_size, chunked = _chunked_layers(hf, family, rope_layers)
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if not isinstance(dtype, str):
        raise BadInputError(f"config.json: field 'dtype' = {dtype!r} is not a dtype name")
    fixed = family.fixed
    return ModelConfig(
        architecture=(hf.get("architectures") or [family.architectures[0]])[0],
        family=family.name,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_key_value_heads=_get(
            hf, "num_key_value_heads", int, defaults.get("num_key_value_heads", n_heads)
        ),
        d_head=d_head,
        d_mlp=_get(hf, family.fixed.get("d_mlp_field", "intermediate_size"), int),
        d_vocab=_get(hf, "vocab_size", int),
        n_ctx=_get(hf, "max_position_embeddings", int),
        eps=_get(hf, family.eps_field, float, defaults.get(family.eps_field, ...)),
        act_fn=act,
        rope=rope,
        rope_local=rope_local if rope_local != rope else None,
        sliding_window=window,
        attn_types=attn_types,
        tie_word_embeddings=_get(
            hf, "tie_word_embeddings", bool, defaults.get("tie_word_embeddings", False)
        ),
        qkv_bias=biases["qkv"],
        o_bias=biases["o"],
        mlp_bias=biases["mlp"],
        dtype=str(dtype),
        qk_norm=_qk_norm(hf, family),
        norm_placement=family.fixed.get("norm_placement", "pre"),
        norm_weight_in_fp32=family.fixed.get("norm_weight_in_fp32", False),
        rotary_in_fp32=family.fixed.get("rotary_in_fp32", False),
        embedding_multiplier=d_model**0.5
        if sqrt_scale
        else option("embedding_multiplier", float, 1.0),
        embedding_multiplier_in_dtype=sqrt_scale,
        norm_offset=float(family.fixed.get("norm_offset", 0.0)),
        query_pre_attn_scalar=option("query_pre_attn_scalar", float, None),
        attn_logit_softcap=soft_cap("attn_logit_softcapping"),
        final_logit_softcap=soft_cap("final_logit_softcapping"),
        attention_multiplier=option("attention_multiplier", float, None),
        residual_multiplier=option("residual_multiplier", float, 1.0),
        logits_scaling=option("logits_scaling", float, 1.0),
        rope_layers=rope_layers,
        moe=moe,
        rotary_adjacent_pairs=fixed.get("rotary_adjacent_pairs", False),
        rotary_math_in_fp32=fixed.get("rotary_math_in_fp32", False),
        qk_norm_after_rotary=fixed.get("qk_norm_after_rotary", False),
        norm_type=fixed.get("norm_type", "rms"),
        norm_bias=fixed.get("norm_bias", False),
        parallel_attn_mlp=fixed.get("parallel_attn_mlp", False),
        gated_mlp=gated,
        logit_scale=option("logit_scale", float, 1.0),
        rope_thetas=rope_thetas,
        attn_sinks=fixed.get("attn_sinks", False),
        sinks_softmax_in_dtype=fixed.get("sinks_softmax_in_dtype", False),
        query_scale_beta=beta,
        query_scale_length=scale_length,
        temperature_tuning=tuning is not None,
        qk_norm_on_nope_layers=fixed.get("qk_norm_on_nope_layers", True),
        attention_chunk_size=chunk_size,
        chunked_layers=chunked,
        v_norm=fixed.get("v_norm", False),
        layer_scalar=fixed.get("layer_scalar", False),
        **gemma4,
    )


def _count(hf: dict, key: str, default: int) -> int:
    """`hf[key]`, an int >= 0 (null: `default`)."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadInputError(f"config.json: field {key!r} = {value!r} is not a count >= 0")
    return value


def _gemma4_layers(
    hf: dict, family: Family, attn_types: tuple[str, ...], d_head: int
) -> dict[str, Any]:
    """Gemma4TextConfig's global layers (head_dim and KV heads), k = v, KV sharing and
    per-layer inputs, for a family that reads them (`global_head_dim` in its defaults).
    Global layers' sizes are `per_layer_config` (what transformers writes) or
    `global_head_dim` and, with attention_k_eq_v, `num_global_key_value_heads` (what the
    published configs state); any other per-layer difference is refused."""
    if "global_head_dim" not in family.defaults:
        return {}
    n_layers = len(attn_types)
    k_eq_v = _get(hf, "attention_k_eq_v", bool, False)
    n_kv = _get(hf, "num_key_value_heads", int)
    per_layer = hf.get("per_layer_config")
    if per_layer is None:
        d_global = _get(hf, "global_head_dim", int, family.defaults["global_head_dim"])
        n_kv_global = _get(hf, "num_global_key_value_heads", int, None) if k_eq_v else None
        n_kv_global = n_kv_global or n_kv
    else:
        overrides = {}
        if not isinstance(per_layer, dict):
            raise BadInputError(f"config.json: per_layer_config = {per_layer!r} is not an object")
        for key, value in per_layer.items():
            if not (isinstance(key, str) and key.isdigit() and isinstance(value, dict)):
                raise BadInputError(f"config.json: per_layer_config[{key!r}] = {value!r}")
            overrides[int(key)] = value
        global_values = {
            json.dumps(overrides.get(i, {}), sort_keys=True)
            for i, t in enumerate(attn_types)
            if t == "global"
        }
        allowed = {"head_dim", "num_key_value_heads"}
        if (
            len(global_values) > 1
            or any(attn_types[i] == "local" for i in overrides if i < n_layers)
            or any(i >= n_layers or not set(v) <= allowed for i, v in overrides.items())
        ):
            raise UnsupportedModelError(
                "config.json: per_layer_config gives layers other sizes than their type's "
                "(supported: head_dim and num_key_value_heads, the same on every global layer)"
            )
        first = next((overrides[i] for i, t in enumerate(attn_types) if t == "global"), {})
        d_global = _get(first, "head_dim", int, d_head)
        n_kv_global = _get(first, "num_key_value_heads", int, n_kv)
    d_per_layer = _count(hf, "hidden_size_per_layer_input", 0)
    wide = 2 if _get(hf, "use_double_wide_mlp", bool, False) else 1  # on K/V-shared layers
    return {
        "d_mlp_shared_kv": wide * _get(hf, "intermediate_size", int),
        "d_head_global": d_global,
        "n_key_value_heads_global": n_kv_global,
        "k_eq_v_global": k_eq_v,
        "kv_shared_layers": _count(hf, "num_kv_shared_layers", 0),
        "d_per_layer_input": d_per_layer,
        "d_vocab_per_layer": _get(hf, "vocab_size_per_layer_input", int) if d_per_layer else 0,
    }


def _head_dim(hf: dict, family: Family, d_model: int, n_heads: int) -> int:
    """`head_dim` as the config class reads it: the file's, else the class's default
    (Seed-OSS, GLM-4...: 128), null or no default: hidden_size / heads."""
    if "head_dim" in hf:
        d_head = _get(hf, "head_dim", int, None)
    else:
        d_head = family.defaults.get("head_dim")
    if d_head is None:
        if d_model % n_heads:
            raise BadInputError(
                f"config.json: no head_dim, and hidden_size={d_model} is not divisible by "
                f"num_attention_heads={n_heads}"
            )
        d_head = d_model // n_heads
    return d_head


def _biases(hf: dict, family: Family) -> dict[str, bool]:
    """Whether q/k/v, o and the MLP have biases: hard-wired by the family (`fixed`), or
    the config.json field of `bias_fields` (Llama: attention_bias, mlp_bias; Seed-OSS:
    attention_out_bias for o; ERNIE, StarCoder2: use_bias), with the class's default."""
    out = {}
    for part in ("qkv", "o", "mlp"):
        if f"{part}_bias" in family.fixed:
            out[part] = bool(family.fixed[f"{part}_bias"])
            continue
        name = family.bias_fields.get(part)
        out[part] = bool(name) and _get(hf, name, bool, family.defaults.get(name, False))
    return out


def _qk_norm(hf: dict, family: Family) -> str | None:
    """The q/k norm the family has, if its switch (`qk_norm_field`, Cohere's use_qk_norm)
    is on."""
    switch = family.fixed.get("qk_norm_field")
    if switch and not _get(hf, switch, bool, family.defaults.get(switch, False)):
        return None
    return family.fixed.get("qk_norm") or None  # false: a parent's norm switched off


def _nope_layers(
    hf: dict, family: Family, rope_layers: tuple[bool, ...], attn_types: tuple[str, ...]
) -> tuple[tuple[bool, ...], tuple[float, ...]]:
    """Layers without rotary by the family's rule (`nope_global`: "always", Cohere 2's
    global layers; "with_window", EXAONE 4's, when config.json sets a sliding_window: every
    layer rotates without one), and Granite SWA's per-layer thetas (`layer_rope_theta`,
    0: no rotary; absent: every layer at rope_theta, returned as no thetas)."""
    rule = family.fixed.get("nope_global")
    window = (
        hf["sliding_window"] if "sliding_window" in hf else family.defaults.get("sliding_window")
    )
    if rule == "always" or (rule == "with_window" and window is not None):
        rope_layers = tuple(
            r and t == "local" for r, t in zip(rope_layers, attn_types, strict=True)
        )
    thetas = hf.get("layer_rope_theta") if family.fixed.get("layer_rope_theta") else None
    if thetas is None:
        return rope_layers, ()
    if (
        not isinstance(thetas, list)
        or len(thetas) != len(rope_layers)
        or not all(
            isinstance(t, int | float) and not isinstance(t, bool) and t >= 0 for t in thetas
        )
    ):
        raise BadInputError(
            f"config.json: layer_rope_theta = {thetas!r}: expected {len(rope_layers)} "
            "thetas >= 0 (0: no rotary)"
        )
    rope_layers = tuple(r and t != 0 for r, t in zip(rope_layers, thetas, strict=True))
    return rope_layers, tuple(float(t) for t in thetas)


def _query_scale(hf: dict, family: Family, rope: RopeConfig) -> tuple[float | None, int | None]:
    """Ministral 3's query scaling: `llama_4_scaling_beta` and the rope's
    original_max_position_embeddings, both of which Ministral3Attention reads."""
    if not family.fixed.get("llama_4_scaling"):
        return None, None
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    if not params:
        params = family.defaults.get("rope_parameters", {})
    beta = _get(params, "llama_4_scaling_beta", float, None)
    length = rope.original_max_position_embeddings
    if beta is None or length is None:
        raise BadInputError(
            "config.json: Ministral3Attention scales queries by rope_parameters."
            "llama_4_scaling_beta and original_max_position_embeddings; found "
            f"{beta!r} and {length!r}"
        )
    return beta, length


def _temperature_tuning(hf: dict, family: Family) -> tuple[float, int] | None:
    """Llama 4's attention temperature tuning on its NoPE layers, if `attn_temperature_tuning`:
    (attn_scale, floor_scale), as Llama4TextAttention reads them."""
    if not family.fixed.get("temperature_tuning"):
        return None
    defaults = family.defaults
    if not _get(hf, "attn_temperature_tuning", bool, defaults["attn_temperature_tuning"]):
        return None
    scale = _get(hf, "attn_scale", float, defaults["attn_scale"])
    return scale, _get(hf, "floor_scale", int, defaults["floor_scale"])


KINDS = {"chunked_attention", "full_attention"}  # Llama 4's layer_types


def _chunked_layers(
    hf: dict, family: Family, rope_layers: tuple[bool, ...]
) -> tuple[int | None, tuple[bool, ...]]:
    """Llama 4's chunked attention: `attention_chunk_size` (null: none) on the layers
    `layer_types` calls "chunked_attention", or without layer_types the rotary layers (as
    Llama4TextConfig derives them)."""
    if not family.fixed.get("chunked_attention"):
        return None, ()
    if "attention_chunk_size" in hf:
        size = _get(hf, "attention_chunk_size", int, None)
    else:
        size = family.defaults["attention_chunk_size"]
    types = hf.get("layer_types")
    if types is None:
        chunked = rope_layers if size is not None else (False,) * len(rope_layers)
    elif not isinstance(types, list) or len(types) != len(rope_layers) or not set(types) <= KINDS:
        raise UnsupportedModelError(
            f"config.json: layer_types = {types!r}: expected {len(rope_layers)} entries of "
            "full_attention / chunked_attention"
        )
    else:
        chunked = tuple(t == "chunked_attention" for t in types)
    if any(chunked) and size is None:
        raise BadInputError(
            "config.json: layer_types has chunked_attention layers, attention_chunk_size is null"
        )
    return (size, chunked) if any(chunked) else (None, ())


def _moe_from_hf(hf: dict, family: Family, n_layers: int) -> MoEConfig | None:
    """The family's `[moe]` table: each of our fields is a config.json field (or a list of
    spellings, the first present wins), or a value the modelling code hard-wires (a bool or
    number; `router` is always the kind itself). Beyond MoEConfig's fields: `mlp_only_layers`
    and `sparse_step` (Qwen3-MoE), `first_dense` (the first k layers dense: GLM-4.5's
    first_k_dense_replace), `last_moe` (the last MoE layer, -1: the last layer; ERNIE 4.5's
    moe_layer_end_index), `shared_experts` (how many experts of width d_expert the shared
    expert is made of: d_shared_expert = shared_experts * d_expert; 0 with
    `shared_experts_zero_means_none`: none, as ERNIE 4.5 builds none), `enabled` (a bool
    field, false: no MoE at all; Gemma 4's enable_moe_block)."""
    if not family.moe:
        return None
    enabled = family.moe.get("enabled")
    if enabled is not None and not _get(hf, enabled, bool, family.defaults.get(enabled, False)):
        return None
    values: dict[str, Any] = {}
    for name, spec in family.moe.items():
        if name == "enabled":
            continue
        if not isinstance(spec, str | list) or name == "router":
            values[name] = spec
            continue
        keys = [spec] if isinstance(spec, str) else list(spec)
        key = next((k for k in keys if hf.get(k) is not None), keys[0])
        if name in ("mlp_only_layers", "moe_layers"):
            values[name] = hf.get(key)
        elif name in ("first_dense", "shared_experts", "last_moe"):  # may be 0 (or -1: last)
            value = hf.get(key, family.defaults.get(key, 0))
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise BadInputError(f"config.json: field {key!r} = {value!r} is not a count >= 0")
            values[name] = value
        elif name == "top_k" and isinstance(hf.get(key), list):
            values[name] = _uniform_per_layer(hf, key, n_layers)
        else:
            kind = MOE_KINDS.get(name, int)
            values[name] = _get(hf, key, kind, family.defaults.get(key, ...))
    only = values.pop("mlp_only_layers", None) or []
    step = values.pop("sparse_step", 1)
    first = values.pop("first_dense", 0)
    last = values.pop("last_moe", -1)
    last = n_layers - 1 if last == -1 else last
    zero_is_none = values.pop("shared_experts_zero_means_none", False)
    if "shared_experts" in values:
        count = values.pop("shared_experts")
        if count or not zero_is_none:
            values["d_shared_expert"] = count * values["d_expert"]
    listed = values.pop("moe_layers", None)  # Llama 4: the MoE layers, overriding the step
    for field_name, value in (("mlp_only_layers", only), ("moe_layers", listed or [])):
        if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
            raise BadInputError(f"config.json: {field_name} = {value!r} is not a list of layers")
    layers = tuple(
        i not in only and (i + 1) % step == 0 and first <= i <= last for i in range(n_layers)
    )
    if listed is not None:
        layers = tuple(i in listed for i in range(n_layers))
    return MoEConfig(**values, layers=layers)


def _uniform_per_layer(hf: dict, key: str, n_layers: int) -> int:
    """A per-layer list of top-k (Hunyuan-A13B's `moe_topk`: [8] * 32; transformers reads
    entry `layer_idx`) whose entries all agree: that number. Entries that differ are refused
    (one top-k per model here)."""
    value = hf[key]
    firsts = {_get({key: v}, key, int) for v in value} if value else set()
    if len(value) != n_layers or len(firsts) != 1:
        raise UnsupportedModelError(
            f"config.json: {key} = {value!r}: a per-layer top-k is supported only as "
            f"{n_layers} equal entries (one top-k for every layer)"
        )
    return firsts.pop()


# The kind of each `[moe]` field read from config.json (int if not named here).
MOE_KINDS = {
    "norm_topk_prob": bool,
    "routed_scaling_factor": float,
    "swiglu_alpha": float,
    "swiglu_limit": float,
}


def _rope_layers(hf: dict, family: Family, n_layers: int) -> tuple[bool, ...]:
    """SmolLM3's `no_rope_layers` (1: rotary, 0: none), or its every-`interval`th NoPE."""
    if "no_rope_layer_interval" not in family.defaults:
        return (True,) * n_layers
    flags = hf.get("no_rope_layers")
    if flags is None:
        every = _get(hf, "no_rope_layer_interval", int, family.defaults["no_rope_layer_interval"])
        return tuple((i + 1) % every != 0 for i in range(n_layers))
    if not isinstance(flags, list) or len(flags) != n_layers or any(f not in (0, 1) for f in flags):
        raise BadInputError(
            f"config.json: no_rope_layers = {flags!r}: expected {n_layers} entries of 0 / 1"
        )
    return tuple(bool(f) for f in flags)


def load_hf_config(src: Path) -> ModelConfig:
    """Our config from `src/config.json`, an HF checkpoint folder."""
    return from_hf(read_json(Path(src) / "config.json"))


@dataclass(frozen=True)
class GenerationDefaults:
    """What an export says about stopping: read by export.py (`stop_tokens_from_hf`), used
    by the model's `generate` (here, below both, so neither imports the other for it)."""

    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None


def stop_tokens_from_hf(
    generation_config: dict[str, Any] | None, hf: dict[str, Any]
) -> GenerationDefaults:
    """Eos token ids and pad token id as transformers' `generate` takes them: from
    generation_config.json, or, without one, from config.json (`GenerationConfig.
    from_model_config`). `eos_token_id` may be one id or a list."""
    source, where = (
        (generation_config, "generation_config.json")
        if generation_config is not None
        else (hf, "config.json")
    )
    eos, pad = source.get("eos_token_id"), source.get("pad_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    ids = [*eos, *([] if pad is None else [pad])]
    if not isinstance(eos, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise BadInputError(
            f"{where}: eos_token_id = {source.get('eos_token_id')!r}, pad_token_id = {pad!r}: "
            "expected token ids (ints >= 0)"
        )
    return GenerationDefaults(tuple(eos), pad)
