"""Deliberately broken conversions: each must fail the parity gate, which must say where.

A mutation maps (config, state dict in our layout) to a broken pair. Apply it in memory
(`mutated_model`) or to an export folder (`mutate_export`), which rewrites config.json and
the weights as a converter with that bug would have written them.

Two bugs live in model behaviour rather than in the weights; how each is simulated:
- Grouping `h % n_kv` instead of `h // group` (a `tile` where `repeat_interleave` belongs).
  `grouping_modulo` writes it into the weights: with the correct grouping, put old query
  head `sigma(j) = (j % group) * n_kv + j // group` at index j of W_Q, b_Q and W_O. New head
  j reads KV head j // group = sigma(j) % n_kv, so the model computes
  sum_h O_h attn(Q_h, K_{h % n_kv}, V_{h % n_kv}): exactly the buggy grouping (a no-op for
  MHA and MQA, where both groupings agree). `grouping_modulo_behaviour` instead patches one
  attention module to tile K / V; the two give the same logits (a test checks it).
- Sliding window ignored: a config mutation (every layer global, no window), as a
  converter that drops `sliding_window` would write.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from gqa_convert.api import convert_in_memory
from gqa_convert.checkpoint import INDEX_NAME
from gqa_convert.config import ModelConfig
from gqa_convert.export import load_export
from gqa_convert.model.decoder import GQATransformer

State = dict[str, Tensor]
Mutation = Callable[[ModelConfig, State], tuple[ModelConfig, State]]


def swap_kv_heads(layer: int = 1, a: int = 0, b: int = 1) -> Mutation:
    """K and V of KV heads a and b swapped in one layer: query group a reads group b's K/V."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        for name in ("_W_K", "_W_V", "_b_K", "_b_V"):
            key = f"blocks.{layer}.attn.{name}"
            if key in state:
                w = state[key].clone()
                w[[a, b]] = w[[b, a]]
                state[key] = w
        return cfg, state

    return mutate


def modulo_order(cfg: ModelConfig) -> list[int]:
    """sigma: the old query head that goes to index j (see the module docstring)."""
    g, k = cfg.group_size, cfg.n_key_value_heads
    return [(j % g) * k + j // g for j in range(cfg.n_heads)]


def grouping_modulo(layer: int | None = 1) -> Mutation:
    """The `h % n_kv` grouping, as weights (one layer, or every layer with None)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        order = modulo_order(cfg)
        layers = range(cfg.n_layers) if layer is None else [layer]
        for i in layers:
            for name in ("W_Q", "b_Q", "W_O"):  # head axis first in all three
                key = f"blocks.{i}.attn.{name}"
                if key in state:
                    state[key] = state[key][order].clone()
        return cfg, state

    return mutate


def grouping_modulo_behaviour(model: GQATransformer, layer: int = 1) -> GQATransformer:
    """Patch one attention module so head h reads KV head h % n_kv (K / V tiled, not
    interleaved), on the reference path (a hook on hook_pattern turns SDPA off)."""
    attn = model.blocks[layer].attn
    g = attn.repeat_kv_heads

    def scores(q: Tensor, k: Tensor) -> Tensor:
        k = k.repeat(1, 1, g, 1)  # [batch, pos, kv, d] -> [batch, pos, kv * g, d], tiled
        return torch.einsum("bqnh,bknh->bnqk", q, k) * (1.0 / attn.attn_scale)

    def z_scores(v: Tensor, pattern: Tensor) -> Tensor:
        return torch.einsum("bknh,bnqk->bqnh", v.repeat(1, 1, g, 1), pattern)

    attn.calculate_attention_scores = scores
    attn.calculate_z_scores = z_scores
    attn.hook_pattern.register_forward_hook(lambda module, inputs, output: None)
    return model


def wrong_rope_theta(theta: float = 10_000.0) -> Mutation:
    """Every layer's rotary uses `theta` (TransformerLens's bug: 10000 whatever the file says)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        return replace(cfg, rope=replace(cfg.rope, theta=theta)), state

    return mutate


def norm_to_ones(name: str = "blocks.1.ln1.w") -> Mutation:
    """One RMSNorm weight replaced by ones (a norm dropped by the converter)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        state[name] = torch.ones_like(state[name])
        return cfg, state

    return mutate


def w_o_transposed(layer: int = 1) -> Mutation:
    """W_O transposed within each head: HF's [d_model, d_head] block of o_proj read as
    [d_head, d_model] without the transpose (a `view` where a `rearrange` belongs)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        key = f"blocks.{layer}.attn.W_O"
        w = state[key]  # [n, d_head, d_model]
        state[key] = w.transpose(1, 2).reshape(w.shape).clone()  # [n, m, h] bytes as [n, h, m]
        return cfg, state

    return mutate


def sliding_window_ignored() -> Mutation:
    """Every layer global and no window: what a converter that drops `sliding_window` writes."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        return replace(cfg, attn_types=("global",) * cfg.n_layers, sliding_window=None), state

    return mutate


def mutated_model(src: Path, mutation: Mutation) -> GQATransformer:
    """`src` converted in memory, then broken by `mutation`."""
    model = convert_in_memory(src)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    cfg, state = mutation(model.cfg, state)
    return GQATransformer.from_state_dict(cfg, state)


def mutate_export(folder: Path, mutation: Mutation) -> Path:
    """Rewrite an export folder's config.json and weights (one file) with `mutation` applied."""
    cfg, state = load_export(folder)
    cfg, state = mutation(cfg, {name: t.clone() for name, t in state.items()})
    config = json.loads((folder / "config.json").read_text())
    config = {**cfg.to_dict(), "hf_config": config.get("hf_config")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for old in [*folder.glob("*.safetensors"), folder / INDEX_NAME]:
        old.unlink(missing_ok=True)
    save_file({n: t.contiguous() for n, t in state.items()}, folder / "model.safetensors")
    return folder


def qkv_split_shifted(layer: int = 1) -> Mutation:
    """A fused qkv_proj (Phi-3) split one head too far: q takes heads 1..n of the rows, k
    and v are shifted the same way (the last v head wraps round to q's first)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        n, k = cfg.n_heads, cfg.n_key_value_heads
        names = [f"blocks.{layer}.attn.{name}" for name in ("W_Q", "_W_K", "_W_V")]
        rows = torch.cat([state[name] for name in names]).roll(-1, dims=0)  # [n + 2k, m, h]
        for name, part in zip(names, rows.split([n, k, k]), strict=True):
            state[name] = part.clone()
        return cfg, state

    return mutate


def norm_placement(placement: str) -> Mutation:
    """ln1 / ln2 applied at the other end of their sublayer (OLMo2's post-norms moved before
    attention and the MLP, as a converter that maps OLMo2 onto Llama's block would do)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        return replace(cfg, norm_placement=placement), state

    return mutate


def config_field(name: str, value: object) -> Mutation:
    """One config field replaced: a quirk the converter did not read (a Granite multiplier
    left at its Llama value, rotary on every layer of a SmolLM3)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        return replace(cfg, **{name: value}), state

    return mutate


def moe_field(name: str, value: object, **more: object) -> Mutation:
    """One field of the mixture-of-experts config replaced (the expert weights applied in
    the compute dtype where Mixtral keeps them fp32, ...), and any `more` with it."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        return replace(cfg, moe=replace(cfg.moe, **{name: value}, **more)), state

    return mutate


def post_norms_dropped() -> Mutation:
    """Gemma 2/3's ln1_post / ln2_post left out (a converter that maps Gemma 2 onto Gemma's
    pre-norm block, ln2 from pre_feedforward_layernorm): the sublayer outputs go unnormed."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        state = {n: t for n, t in state.items() if not n.endswith(("ln1_post.w", "ln2_post.w"))}
        return replace(cfg, norm_placement="pre"), state

    return mutate


def experts_swapped(layer: int = 1, a: int = 0, b: int = 1) -> Mutation:
    """Experts a and b of one MoE layer exchanged (an off-by-one expert index in the map):
    the router still picks a, which now computes b."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        for name in ("W_gate", "W_in", "W_out"):
            ka, kb = (f"blocks.{layer}.mlp.experts.{e}.{name}" for e in (a, b))
            state[ka], state[kb] = state[kb], state[ka]
        return cfg, state

    return mutate


def attn_types_shifted() -> Mutation:
    """The local / global pattern one layer late (layer i gets layer i - 1's type)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        types = cfg.attn_types[-1:] + cfg.attn_types[:-1]
        return replace(cfg, attn_types=types), state

    return mutate


def router_transposed(layer: int = 1) -> Mutation:
    """The router's [n_experts, d_model] bytes read as [d_model, n_experts] without the
    transpose (a `view` where a `rearrange` belongs)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        key = f"blocks.{layer}.mlp.W_gate"
        w = state[key]  # [d_model, n_experts]
        state[key] = w.T.contiguous().view(w.shape).clone()
        return cfg, state

    return mutate


def local_rope_on_global_layers() -> Mutation:
    """Gemma 3's local rotary (rope_local_base_freq, no scaling) used on the global layers."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        return replace(cfg, rope=cfg.rope_local, rope_local=None), state

    return mutate


def topk_not_renormalised() -> Mutation:
    """The top-k weights left as the softmax gives them (Mixtral divides them by their sum)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        return replace(cfg, moe=replace(cfg.moe, norm_topk_prob=False)), state

    return mutate


def expert_gate_and_in_exchanged(layer: int = 1, expert: int = 0) -> Mutation:
    """One expert's W_gate and W_in exchanged (w1 / w3, gate_proj / up_proj mixed up)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        g, i = (f"blocks.{layer}.mlp.experts.{expert}.{n}" for n in ("W_gate", "W_in"))
        state[g], state[i] = state[i], state[g]
        return cfg, state

    return mutate


def tensor_zeroed(name: str) -> Mutation:
    """One tensor replaced by zeros: a bias the converter did not read (Seed-OSS's o_proj
    bias under its own switch, an MLP bias), a sink left at its initial value."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        state[name] = torch.zeros_like(state[name])
        return cfg, state

    return mutate


def parallel_block_as_serial() -> Mutation:
    """Cohere's parallel block run as Llama's serial one, ln2 a copy of ln1 (a converter that
    maps Cohere onto Llama's block): the MLP reads ln1(resid + attn) instead of ln1(resid)."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        for i in range(cfg.n_layers):
            state[f"blocks.{i}.ln2.w"] = state[f"blocks.{i}.ln1.w"].clone()
        return replace(cfg, parallel_attn_mlp=False), state

    return mutate


def router_rounded(dtype: torch.dtype = torch.bfloat16) -> Mutation:
    """Every MoE router's weight and correction bias rounded to `dtype` (kept in their
    dtype): a model cast whole to `dtype` held them so, where HF keeps them in fp32."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        for layer in range(cfg.n_layers):
            for leaf in ("W_gate", "e_score_correction_bias"):
                name = f"blocks.{layer}.mlp.{leaf}"
                if cfg.is_moe_layer(layer) and name in state:
                    state[name] = state[name].to(dtype).to(state[name].dtype)
        return cfg, state

    return mutate


def shared_expert_dropped() -> Mutation:
    """The shared expert left out (a converter that maps GLM-4.5 onto a routed-only MoE):
    each MoE layer's output is the routed experts' sum alone."""

    def mutate(cfg: ModelConfig, state: State) -> tuple[ModelConfig, State]:
        state = {n: t for n, t in state.items() if ".mlp.shared_expert." not in n}
        return replace(cfg, moe=replace(cfg.moe, d_shared_expert=None)), state

    return mutate


def tensor_to_ones(name: str) -> Mutation:
    """One learned scale replaced by ones: a scale the converter did not read (Gemma 4's
    router scale, its per-expert scales)."""
    return norm_to_ones(name)


# Casts in another place, in model behaviour (the rounding checks of tests/numerics.py):
# each takes our model and patches it in place.


def swiglu_in_fp32(model: GQATransformer) -> GQATransformer:
    """gpt-oss's clamped SwiGLU computed in fp32 and rounded once, where HF's rounds each
    operation in the compute dtype (hooks inside the experts are skipped)."""
    from gqa_convert.model.moe import Expert

    for expert in model.modules():
        if isinstance(expert, Expert) and expert.clamp is not None:

            def forward(x: Tensor, m: Expert = expert) -> Tensor:
                alpha, limit = m.clamp
                gate = (x @ m.W_gate + m.b_gate).float().clamp(max=limit)
                pre = (x @ m.W_in + m.b_in).float().clamp(min=-limit, max=limit)
                post = ((pre + 1) * (gate * torch.sigmoid(gate * alpha))).to(x.dtype)
                return post @ m.W_out + m.b_out

            expert.forward = forward
    return model


def temperature_scale_rounded(model: GQATransformer) -> GQATransformer:
    """Llama 4's temperature-tuning scale rounded to q's dtype before the product (Ministral
    3's way), where HF multiplies by the fp32 scale and rounds the product once."""
    for block in model.blocks:
        attn = block.attn
        scale = attn._query_scale
        attn._query_scale = lambda *a, f=scale: f(*a).to(a[-1].dtype)
    return model


def per_layer_gate_in_fp32(model: GQATransformer) -> GQATransformer:
    """Gemma 4's per-layer gate, act(x W_gate) * per_layer_input, computed in fp32 and rounded
    once, where HF rounds the projection, the activation and the product each in the dtype
    (the input hooks inside are skipped)."""
    for block in model.blocks:
        gate = block.per_layer

        def forward(x: Tensor, per_layer: Tensor, m=gate) -> Tensor:
            inner = m.act((x @ m.W_gate).float()) * per_layer.float()
            return m.ln_post(inner.to(x.dtype) @ m.W_out)

        gate.forward = forward
    return model
