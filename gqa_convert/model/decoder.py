"""GQATransformer: embedding, RMSNorm, rotary, GQA blocks, gated MLP, unembedding.

The families differ by a few named options of `ModelConfig`, each a line or two here or in
the attention: `qk_norm` (model/norm.py), `norm_placement` "post" (ln1 / ln2 on the
sublayer's output, OLMo2) or "sandwich" (ln1 / ln2 before, ln1_post / ln2_post after each
sublayer, Gemma 2/3), Granite's four multipliers, `rope_layers` (no rotary on SmolLM3's
NoPE layers), partial rotary and the rope scalings (model/rotary.py); Gemma's norm offset
(model/norm.py), embedding scale, GeGLU (`act_fn`), soft-caps on attention scores
(attention.py) and logits, `query_pre_attn_scalar`, and a rotary per layer type
(`rope_local`); `moe` (a mixture of experts for the MLP of the layers it names,
model/moe.py); the 2026 dense families' `mlp_bias`, `gated_mlp` (model/mlp.py), `norm_type`
"layer" (model/norm.py), `parallel_attn_mlp`, `logit_scale`, `rope_thetas` (a rotary per
layer theta) and the attention's interleaved rotary, q/k norms after rotary, sinks and query
scale (attention.py).

Parameter names are TransformerLens HookedTransformer names (`embed.W_E`,
`blocks.{l}.attn.W_Q`, `blocks.{l}.mlp.W_gate`, `unembed.W_U`, ...). The numerics follow
HF's Llama: RMSNorm in fp32 then cast back, rotary cos/sin computed in fp32 then cast to
the compute dtype, softmax in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gqa_convert.config import GenerationDefaults, ModelConfig
from gqa_convert.model.attention import GroupedQueryAttention, soft_cap
from gqa_convert.model.generate import generate
from gqa_convert.model.hooks import HookPoint
from gqa_convert.model.kv_cache import KVCache
from gqa_convert.model.lens import RETURN_TYPES, TransformerLensAPI, lm_cross_entropy_loss
from gqa_convert.model.mlp import ACTIVATIONS, MLP, bias, linear
from gqa_convert.model.moe import MoEMLP
from gqa_convert.model.norm import RMSNorm, make_norm, model_norm
from gqa_convert.model.rotary import length_dependent, rotary_inv_freq, rotary_table

__all__ = ["ACTIVATIONS", "GQATransformer", "RMSNorm", "rotary_inv_freq"]


class GatedMLP(nn.Module):
    """W_out(act(x W_gate) * (x W_in)), weights stored [d_model, d_mlp] / [d_mlp, d_model];
    act is `cfg.act_fn` (SiLU, or Gemma's tanh GELU); with `cfg.mlp_bias`, b_gate / b_in
    [d_mlp] and b_out [d_model] added as HF's nn.Linear adds them (InternLM3, ERNIE)."""

    def __init__(self, cfg: ModelConfig, d_mlp: int | None = None):
        """`d_mlp`: this layer's width, if not cfg.d_mlp (Gemma 4's double-wide MLPs)."""
        super().__init__()
        f = d_mlp or cfg.d_mlp
        self.act = ACTIVATIONS[cfg.act_fn]
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, f))
        self.W_gate = nn.Parameter(torch.empty(cfg.d_model, f))
        self.W_out = nn.Parameter(torch.empty(f, cfg.d_model))
        if cfg.mlp_bias:
            self.b_gate, self.b_in = bias(f, True), bias(f, True)
            self.b_out = bias(cfg.d_model, True)
        # TL's GatedMLP hook points, all [batch, pos, d_mlp]
        self.hook_pre = HookPoint()  # x W_gate, before the activation
        self.hook_pre_linear = HookPoint()  # x W_in
        self.hook_post = HookPoint()  # act(pre) * pre_linear, the input of W_out

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if hasattr(self, "b_gate"):
            gate = self.hook_pre(linear(x, self.W_gate, self.b_gate))
            pre_linear = self.hook_pre_linear(linear(x, self.W_in, self.b_in))
            post = self.hook_post(self.act(gate) * pre_linear)
            return linear(post, self.W_out, self.b_out)
        gate = self.hook_pre(x @ self.W_gate)
        return self.hook_post(self.act(gate) * self.hook_pre_linear(x @ self.W_in)) @ self.W_out


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class PerLayerEmbed(nn.Module):
    """Gemma 4's per-layer inputs: a second embedding `W_E` [d_vocab_per_layer, n_layers,
    p] (times sqrt(p) rounded to the dtype, as HF's embed_scale) and a projection of the
    scaled embeddings `W_proj` [d_model, n_layers, p] (times d_model^-0.5, then RMSNorm `ln`
    over p), summed and times 2^-0.5: one input [batch, pos, n_layers, p] per layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p = cfg.d_per_layer_input
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab_per_layer, cfg.n_layers, p))
        self.W_proj = nn.Parameter(torch.empty(cfg.d_model, cfg.n_layers, p))
        self.ln = make_norm(p, cfg.eps, cfg.norm_type, cfg.norm_weight_in_fp32, cfg.norm_offset)
        self.scale, self.proj_scale = p**0.5, cfg.d_model**-0.5

    def forward(
        self, tokens: Int[Tensor, "batch pos"], embeds: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos n_layers p"]:
        scale = torch.tensor(self.scale, dtype=torch.float32, device=embeds.device)
        by_token = self.W_E[tokens] * scale.to(self.W_E.dtype)
        proj = (embeds @ self.W_proj.flatten(1)).unflatten(-1, self.W_proj.shape[1:])
        return (self.ln(proj * self.proj_scale) + by_token) * 2**-0.5


class PerLayerInput(nn.Module):
    """Gemma 4's gate of a block's per-layer input into the residual stream:
    ln_post((act(x W_gate) * per_layer_input) W_out), W_gate [d_model, p], W_out [p,
    d_model]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act_fn]
        self.W_gate = nn.Parameter(torch.empty(cfg.d_model, cfg.d_per_layer_input))
        self.W_out = nn.Parameter(torch.empty(cfg.d_per_layer_input, cfg.d_model))
        self.ln_post = model_norm(cfg)

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], per_layer: Float[Tensor, "batch pos p"]
    ) -> Float[Tensor, "batch pos d_model"]:
        return self.ln_post((self.act(x @ self.W_gate) * per_layer) @ self.W_out)


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.hook_in = HookPoint()  # [batch, pos, d_model], after ln_final (TL's Unembed)
        self.hook_out = HookPoint()  # [batch, pos, d_vocab], before scaling and soft-cap

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.hook_out(self.hook_in(x) @ self.W_U)


def scale_embeddings(cfg: ModelConfig, x: Tensor) -> Tensor:
    """Embeddings times the multiplier: Granite's as a Python float, Gemma's sqrt(d_model)
    first rounded to x's dtype (through fp32), as HF's embed_scale buffer."""
    m = cfg.embedding_multiplier
    if cfg.embedding_multiplier_in_dtype:
        return x * torch.tensor(m, dtype=torch.float32, device=x.device).to(x.dtype)
    return x * m


def final_logits(cfg: ModelConfig, logits: Tensor) -> Tensor:
    """What follows the unembedding: Granite's logits_scaling, Cohere's logit_scale, Gemma
    2's soft-cap."""
    if cfg.logit_scale != 1.0:
        logits = logits * cfg.logit_scale
    if cfg.logits_scaling != 1.0:  # x / 1.0 is x: no [batch, pos, vocab] copy for the rest
        logits = logits / cfg.logits_scaling
    return soft_cap(logits, cfg.final_logit_softcap)


SPLIT_INPUTS = ("hook_q_input", "hook_k_input", "hook_v_input")


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.ln1 = model_norm(cfg)
        self.attn = GroupedQueryAttention(cfg, cfg.attn_types[layer_id], layer_id)
        if not cfg.parallel_attn_mlp:  # Cohere: the MLP reads ln1's output too
            self.ln2 = model_norm(cfg)
        if cfg.norm_placement == "sandwich":  # Gemma 2/3: TL's names for the norms after
            self.ln1_post, self.ln2_post = model_norm(cfg), model_norm(cfg)
        if cfg.is_moe_layer(layer_id):  # Gemma 4's: with its dense MLP beside the experts
            dense = GatedMLP(cfg, cfg.layer_d_mlp(layer_id)) if cfg.moe.dense_mlp else None
            self.mlp = MoEMLP(cfg, dense)
        else:
            self.mlp = GatedMLP(cfg, cfg.layer_d_mlp(layer_id)) if cfg.gated_mlp else MLP(cfg)
        if cfg.d_per_layer_input:  # Gemma 4: the block's per-layer input, after the MLP
            self.per_layer = PerLayerInput(cfg)
            self.hook_per_layer_input = HookPoint()  # [batch, pos, d_per_layer_input]
            self.hook_per_layer_out = HookPoint()  # [batch, pos, d_model], added to resid
        if cfg.layer_scalar:  # Gemma 4: the block's output times it
            self.layer_scalar = nn.Parameter(torch.ones(1))
        self.use_rope = cfg.rope_layers[layer_id]  # False: a NoPE layer, no rotary at all
        self.hook_resid_pre = HookPoint()  # every residual-stream hook: [batch, pos, d_model]
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        # TL's optional inputs, firing only when the model's set_use_* turns them on:
        # per-head copies of resid_pre [batch, pos, heads (n_kv for k / v), d_model] ...
        self.use_split_qkv_input = False
        self.hook_q_input = HookPoint()
        self.hook_k_input = HookPoint()
        self.hook_v_input = HookPoint()
        self.hook_attn_in = HookPoint()  # TL's use_attn_in, refused with GQA (as TL): never
        # ... and the MLP's input, resid_mid [batch, pos, d_model]
        self.use_hook_mlp_in = False
        self.hook_mlp_in = HookPoint()

    def forward(
        self,
        resid: Tensor,
        cos: Tensor,
        sin: Tensor,
        use_fast_path: bool | None = None,
        cache: Any | None = None,
        attention_mask: Int[Tensor, "batch positions_so_far"] | None = None,
        positions: Int[Tensor, "*batch pos"] | None = None,
        per_layer_input: Float[Tensor, "batch pos p"] | None = None,
        shared_kv: dict[int, tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Pre-norm: resid + m * sublayer(ln(resid)); post-norm: resid + m * ln(sublayer(resid));
        sandwich: resid + m * ln_post(sublayer(ln(resid))), m being Granite's
        residual_multiplier (1 elsewhere); parallel (Cohere): resid + attn(ln1(resid)) +
        mlp(ln1(resid)). hook_attn_out / hook_mlp_out see the sublayer's output before m
        (after the post-norm, as TransformerLens). `cache` (this layer's KV cache entry),
        `attention_mask` and `positions` (the new tokens') go to the attention, and
        `shared_kv` (Gemma 4's KV sharing). Gemma 4: resid + per_layer(resid,
        per_layer_input) after the MLP, the result times `layer_scalar`."""
        pre, m = self.cfg.norm_placement != "post", self.cfg.residual_multiplier
        resid = self.hook_resid_pre(resid)
        if self.use_split_qkv_input:  # TL's: q, k, v inputs per head, each through ln1
            acfg = self.attn.cfg
            kv = acfg.n_heads if acfg.ungroup_grouped_query_attention else acfg.n_key_value_heads
            hooks = (
                (self.hook_q_input, acfg.n_heads),
                (self.hook_k_input, kv),
                (self.hook_v_input, kv),
            )
            inputs = [hook(resid[:, :, None].expand(-1, -1, n, -1)) for hook, n in hooks]
            q_in, k_in, v_in = (self.ln1(x) if pre else x for x in inputs)
        else:
            q_in = k_in = v_in = self.ln1(resid) if pre else resid
        rotary = (cos, sin) if self.use_rope else None
        attn_out = self.attn(
            q_in,
            k_in,
            v_in,
            cache,
            None,
            attention_mask,
            rotary=rotary,
            use_fast_path=use_fast_path,
            positions=positions,
            shared_kv=shared_kv,
        )
        attn_out = self.hook_attn_out(self.norm_after(1, attn_out))
        if self.cfg.parallel_attn_mlp:  # HF's order: (resid + attn) + mlp, from ln1's output
            x = v_in if not self.use_split_qkv_input else self.ln1(resid)
            mlp_out = self.hook_mlp_out(self.mlp(x))
            return self.hook_resid_post(resid + attn_out * m + mlp_out * m)
        resid = self.hook_resid_mid(resid + attn_out * m)
        mlp_in = self.hook_mlp_in(resid.clone()) if self.use_hook_mlp_in else resid
        if hasattr(self.mlp, "dense"):
            mlp_out = self.mlp(self.ln2(mlp_in), mlp_in)  # Gemma 4: the experts read resid
        else:
            mlp_out = self.mlp(self.ln2(mlp_in) if pre else mlp_in)
        mlp_out = self.hook_mlp_out(self.norm_after(2, mlp_out))
        resid = resid + mlp_out * m
        if hasattr(self, "per_layer"):
            per_layer = self.hook_per_layer_input(per_layer_input)
            resid = resid + self.hook_per_layer_out(self.per_layer(resid, per_layer))
        if hasattr(self, "layer_scalar"):
            resid = resid * self.layer_scalar
        return self.hook_resid_post(resid)

    def inactive_hooks(self) -> dict[str, str]:
        """{hook point name within the block: the setting that makes it fire} for those
        that do not fire now (TL's optional hook points)."""
        off = {"hook_attn_in": "use_attn_in, which grouped-query attention refuses (as TL)"}
        if not self.use_split_qkv_input:
            off |= dict.fromkeys(SPLIT_INPUTS, "model.set_use_split_qkv_input(True)")
        if not self.use_hook_mlp_in:
            off["hook_mlp_in"] = "model.set_use_hook_mlp_in(True)"
        if not self.attn.cfg.use_attn_result:
            off["attn.hook_result"] = "model.set_use_attn_result(True)"
        return off

    def norm_after(self, i: int, out: Tensor) -> Tensor:
        """Sublayer i's output through the norm after it: ln{i} under "post" (OLMo2),
        ln{i}_post under "sandwich" (Gemma 2/3), none under "pre"."""
        placement = self.cfg.norm_placement
        if placement == "pre":
            return out
        return getattr(self, f"ln{i}" if placement == "post" else f"ln{i}_post")(out)


class GQATransformer(TransformerLensAPI):
    """A Llama-family decoder in TransformerLens layout: tokens [batch, pos] -> logits.

    Also the research tool (TL's API): `run_with_cache` returning an `ActivationCache`,
    the stacked weights and token helpers (model/lens.py, model/activation_cache.py),
    `hooks`, `run_with_hooks`, `reset_hooks` (model/hooks.py), `generate` with a KV cache
    at n_kv heads (model/generate.py), `to_tokens` / `to_string` with the tokenizer
    `from_pretrained` attaches (from the export's files)."""

    generation_defaults = GenerationDefaults()  # stop tokens; from_pretrained reads the export's
    tokenizer_loader: Callable[[], Any] | None = None  # set by from_pretrained

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]: what enters block 0 (scaled)
        if cfg.d_per_layer_input:  # Gemma 4's per-layer inputs
            self.embed_per_layer = PerLayerEmbed(cfg)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = model_norm(cfg)
        self.unembed = Unembed(cfg)
        self.reset_rotary()
        self._tokenizer: Any = None  # tokenizer_loader's, on first use
        self.setup()  # names the hook points: keep it last

    def reset_rotary(self) -> None:
        """The inverse frequencies, of global layers and (Gemma 3) of local ones when they
        differ. fp32 always, as HF's: plain tensors, not buffers, so `.to(bfloat16)` cannot
        round them (a phase error growing with position). rotary() moves their device."""
        cfg = self.cfg
        self.rotary_inv_freq = rotary_inv_freq(cfg.rope, cfg.rotary_dim, None, cfg.n_ctx)
        self.rotary_inv_freq_local = None
        if cfg.rope_local is not None:
            self.rotary_inv_freq_local = rotary_inv_freq(cfg.rope_local, cfg.rotary_dim)
        # Granite SWA: a rotary per distinct layer theta
        self.rotary_inv_freq_layers = {
            rope: rotary_inv_freq(rope, cfg.rotary_dim)
            for rope in {cfg.layer_rope(i) for i in range(cfg.n_layers)}
            if rope not in (cfg.rope, cfg.rope_local)
        }

    def rotary(
        self,
        n_pos: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
        attn_type: str = "global",
        positions: Int[Tensor, "*batch pos"] | None = None,
        layer: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """cos, sin [n_pos, rotary_dim] in HF's convention (frequencies repeated twice, or
        each repeated in place for adjacent pairs), on `device` (default: the embedding's),
        for layers of `attn_type` (or for `layer`, with its own theta: Granite SWA); for
        `positions` given, [*positions.shape, rotary_dim] and n_pos is ignored.

        dynamic and longrope frequencies depend on the length, HF's max(positions) + 1:
        recomputed for each call, as a fresh HF model does for a sequence of this length."""
        cfg = self.cfg
        rope = cfg.layer_rope(layer) if layer is not None else cfg.rope_for(attn_type)
        if positions is None:
            positions = torch.arange(n_pos, device=device or self.embed.W_E.device)
        inv_freq = self.rotary_inv_freq
        if rope in self.rotary_inv_freq_layers:
            inv_freq = self.rotary_inv_freq_layers[rope]
        elif rope != cfg.rope and self.rotary_inv_freq_local is not None:
            inv_freq = self.rotary_inv_freq_local
        if layer is not None and cfg.layer_rotary_dim(layer) != cfg.rotary_dim:
            inv_freq = rotary_inv_freq(rope, cfg.layer_rotary_dim(layer))  # Gemma 4
        if length_dependent(rope):
            n_len = int(positions.max()) + 1
            inv_freq = rotary_inv_freq(rope, cfg.rotary_dim, n_len, cfg.n_ctx)
        pairs = cfg.rotary_adjacent_pairs
        return rotary_table(inv_freq, positions, dtype, pairs, rope.attention_factor)

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | str | list[str],
        use_fast_path: bool | None = None,
        *,
        cache: KVCache | None = None,
        attention_mask: Int[Tensor, "batch positions_so_far"] | None = None,
        logits_to_keep: int = 0,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        stop_at_layer: int | None = None,
    ) -> Any:
        """Logits [batch, pos, d_vocab]. `use_fast_path`: None picks SDPA unless a hook reads
        scores or pattern; False forces the reference path (explicit scores, pattern,
        repeat_interleave).

        TL's options: `tokens` may be a string or a list of strings (tokenised by `tokenize`
        with `prepend_bos` and `padding_side`, padding masked); `return_type` "logits",
        "loss" (next-token cross-entropy, `loss_per_token`: [batch, pos - 1]), "both"
        ((logits, loss)) or None; `stop_at_layer` (None: all layers): run only
        `blocks[:stop_at_layer]` (negative counts from the end) and return that residual
        stream [batch, pos, d_model], as TL's `HookedTransformer`.

        For generation (model/generate.py): `cache` holds the keys and values of the tokens
        fed before (`tokens` come after them); `attention_mask` [batch, cached + new] is 0 on
        left padding; each row's rotary positions count its attended tokens (HF's
        `generate`: the mask's cumsum - 1). `logits_to_keep` > 0: logits of the last ones."""
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        if isinstance(tokens, str | list):
            tokens, mask = self.tokenize(tokens, padding_side or "left", prepend_bos)
            if attention_mask is None and not mask.all():
                attention_mask = mask
        elif tokens.ndim == 1:
            tokens = tokens[None]  # TL: one sequence gets a batch dimension
        resid = self.hook_embed(scale_embeddings(self.cfg, self.embed(tokens)))
        per_layer = [None] * len(self.blocks)
        if hasattr(self, "embed_per_layer"):  # Gemma 4: [batch, pos, n_layers, p]
            per_layer = self.embed_per_layer(tokens, resid).unbind(2)
        shared_kv: dict[int, tuple[Tensor, Tensor]] = {}  # Gemma 4's KV sharing
        n_new, past = tokens.shape[1], cache.length if cache is not None else 0
        if attention_mask is not None:
            positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -n_new:]
        else:
            positions = torch.arange(past, past + n_new, device=resid.device)
        dtype = torch.float32 if self.cfg.rotary_in_fp32 else resid.dtype
        # cos / sin per distinct rotary (Gemma 3's local layers, Granite SWA's thetas)
        tables: dict[Any, tuple[Tensor, Tensor]] = {}
        layers = cache.layers if cache is not None else [None] * len(self.blocks)
        for i, (block, entry) in list(enumerate(zip(self.blocks, layers, strict=True)))[
            :stop_at_layer
        ]:
            rope = self.cfg.layer_rope(i)
            if rope not in tables:
                tables[rope] = self.rotary(n_new, dtype, None, positions=positions, layer=i)
            cos, sin = tables[rope]
            resid = block(
                resid,
                cos,
                sin,
                use_fast_path,
                entry,
                attention_mask,
                positions,
                per_layer[i],
                shared_kv,
            )
        if stop_at_layer is not None:
            return resid
        if logits_to_keep:
            resid = resid[:, -logits_to_keep:]
        if return_type is None:
            self.ln_final(resid)  # its hook points still fire, as TL's
            return None
        logits = final_logits(self.cfg, self.unembed(self.ln_final(resid)))
        if return_type == "logits":
            return logits
        loss = lm_cross_entropy_loss(logits, tokens, attention_mask, loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def new_cache(self, capacity: int = 0) -> KVCache:
        """An empty generation cache: every layer at n_kv heads, sliding-window layers
        holding their last window - 1 tokens, Llama 4's chunked layers their last
        chunk - 1 (HF's cache: the current chunk's keys are among them); `capacity`: the
        most tokens the caller will feed (buffers grow in blocks up to it, kv_cache.py)."""
        windows = [block.attn.window or block.attn.cfg.chunk_size for block in self.blocks]
        return KVCache(windows, capacity)

    generate = generate  # model/generate.py

    @property
    def tokenizer(self) -> Any:
        """The export's tokenizer (transformers' AutoTokenizer), loaded on first use."""
        if self._tokenizer is None:
            if self.tokenizer_loader is None:
                from gqa_convert.errors import BadInputError

                raise BadInputError(
                    "this model has no tokenizer: load an export that has one with "
                    "GQATransformer.from_pretrained(folder), or pass token ids"
                )
            self._tokenizer = self.tokenizer_loader()
        return self._tokenizer

    def to_tokens(
        self, text: str | list[str], padding_side: str = "left", prepend_bos: bool | None = None
    ) -> Int[Tensor, "batch pos"]:
        """Token ids [batch, pos] on the model's device, as the tokenizer makes them (its
        special tokens included; `prepend_bos` as in `tokenize`); several texts are padded on
        `padding_side`."""
        return self.tokenize(text, padding_side, prepend_bos)[0]

    def tokenize(
        self, text: str | list[str], padding_side: str = "left", prepend_bos: bool | None = None
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """`to_tokens` and the attention mask (0 on padding), both [batch, pos].
        `prepend_bos` (TL's): None keeps what the tokenizer does; True starts every text with
        BOS (added where the tokenizer adds none), False drops the BOS the tokenizer adds."""
        tok = self.tokenizer
        texts = [text] if isinstance(text, str) else list(text)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = tok(texts).input_ids
        if prepend_bos is not None:
            bos = tok.bos_token_id
            if bos is None and prepend_bos:
                raise ValueError("prepend_bos=True, but the tokenizer has no BOS token")
            adds = bos is not None and tok("").input_ids[:1] == [bos]
            if prepend_bos and not adds:
                rows = [[bos, *row] for row in rows]
            elif not prepend_bos and adds:
                rows = [row[1:] for row in rows]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(len(row))
            ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
        device = self.embed.W_E.device
        return ids.to(device), mask.to(device)

    def to_string(self, tokens: Int[Tensor, "... pos"] | list[int] | int) -> str | list[str]:
        """Text of 1-D tokens (a str) or of each row of 2-D tokens (a list), special
        tokens included."""
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        if isinstance(tokens, int):
            tokens = [tokens]
        if tokens and isinstance(tokens[0], list):
            return [self.to_string(row) for row in tokens]
        return self.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)

    @classmethod
    def from_pretrained(
        cls, converted_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"
    ) -> GQATransformer:
        """Load an export of `gqa-convert convert` (config.json + safetensors), with its stop
        tokens (generation_config.json) and its tokenizer, when they were copied. export.py
        reads the files (it imports nothing of model/); the model takes the tensors."""
        from gqa_convert.export import load_export, load_extras

        cfg, state = load_export(Path(converted_dir))
        model = cls.from_state_dict(cfg, state, dtype=dtype, device=device)
        model.generation_defaults, model.tokenizer_loader = load_extras(Path(converted_dir))
        return model

    @classmethod
    def from_state_dict(
        cls,
        cfg: ModelConfig,
        state: dict[str, Tensor],
        dtype: torch.dtype | None = None,
        device: str = "cpu",
    ) -> GQATransformer:
        """Build on the meta device and take `state`'s tensors as parameters (no copy).

        Every parameter must come from `state`, except biases the config says are absent,
        which are zero; any missing or unexpected name is an error.
        """
        with torch.device("meta"):
            model = cls(cfg)
        zero = {
            name for name in model.state_dict() if name not in state and _zero_by_config(cfg, name)
        }
        missing = set(model.state_dict()) - set(state) - zero
        unexpected = set(state) - set(model.state_dict())
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        ref_dtype = dtype or state["embed.W_E"].dtype
        full = dict(state)
        for name in zero:
            full[name] = torch.zeros(model.get_parameter(name).shape, dtype=ref_dtype)
        model.load_state_dict(full, assign=True, strict=True)
        model.reset_rotary()
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def _zero_by_config(cfg: ModelConfig, name: str) -> bool:
    """Biases the source family does not have: zero in our model, never read from files."""
    leaf = name.rsplit(".", 1)[-1]
    return (leaf in ("b_Q", "_b_K", "_b_V") and not cfg.qkv_bias) or (
        leaf == "b_O" and not cfg.o_bias
    )
