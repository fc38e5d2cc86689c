"""Gemma 4 text: tiny random Gemma4ForCausalLM checkpoints with each switch (K/V shared from
earlier layers, k = v global layers with their own KV heads, per-layer input embeddings,
global layers with twice the head size and proportional rope, a window shorter than the
prompts, a final soft-cap; the MoE variant's experts beside each dense MLP, 26B-A4B's),
converted with the parity gate on, against transformers' own classes at 1e-4, every token
routed as HF routes it; streamed = whole; the round trip; greedy generation
(tests/test_generate.py runs these cases too); a mutation per new mechanism, localised."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from gqa_convert import convert, convert_in_memory
from gqa_convert.config import from_hf, load_hf_config
from gqa_convert.model.moe import MoEMLP
from gqa_convert.verify import verify
from tests import mutations as M
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens
from tests.numerics import (
    ROUTING_MARGIN,
    assert_follows_hf_rounding,
    assert_misplaced_cast,
    needs_torch_2_13,
    rounding_ratios,
    routing_gap,
)
from tests.test_families import (
    assert_gate_and_round_trip,
    assert_hooked_transformer_refuses,
    assert_streamed_equals_whole,
    component_errors,
)
from tests.test_interop import needs_tl
from tests.test_parity import assert_logits_match, hf_and_ours

WINDOW = 8
LOCAL, GLOBAL = "sliding_attention", "full_attention"
# Six layers, local and global in turn: with two KV-shared layers, the shared local layer
# (4) attends layer 2's K/V, the shared global one (5) layer 3's; layer 0 is a local layer
# it must not read.
SHARED = {"num_hidden_layers": 6, "layer_types": [LOCAL, GLOBAL] * 3}
# E2B / E4B-like: per-layer inputs of width 8 (their own table, of the same vocabulary),
# the K/V-shared layers' MLPs twice as wide.
PER_LAYER = {
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": 128,
    "use_double_wide_mlp": True,
}
# 31B-like: global layers with k = v and one KV head of their own.
K_EQ_V = {"attention_k_eq_v": True, "num_global_key_value_heads": 1}
# 26B-A4B-like: every layer's dense MLP with experts beside it, 8 of width 32, 2 per token
# (tests/hf_models.py makes the router's scale and per-expert scales random, not ones).
MOE = {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32}

CASES = {
    "gemma4-per-layer-shared-kv": (
        "gemma4_text",
        {"sliding_window": WINDOW, **SHARED, "num_kv_shared_layers": 2, **PER_LAYER},
        40,
    ),
    "gemma4-k-eq-v": (
        "gemma4_text",
        {
            "sliding_window": WINDOW,
            "layer_types": [LOCAL, LOCAL, GLOBAL],
            **K_EQ_V,
            "hidden_size_per_layer_input": 0,  # 31B's: no per-layer inputs
        },
        40,
    ),
    "gemma4-all-final-cap": (
        "gemma4_text",
        {
            "sliding_window": WINDOW,
            **SHARED,
            "num_kv_shared_layers": 2,
            **PER_LAYER,
            **K_EQ_V,
            "final_logit_softcapping": 3.0,
        },
        40,
    ),
    # the MoE variant alone: no K/V sharing, no k = v, no per-layer inputs
    "gemma4-moe-plain": (
        "gemma4_text",
        {
            "sliding_window": WINDOW,
            "layer_types": [LOCAL, LOCAL, GLOBAL],
            "hidden_size_per_layer_input": 0,
            **MOE,
        },
        40,
    ),
    # with every switch: K/V sharing (double-wide dense MLPs there), per-layer inputs, k = v
    "gemma4-moe-all": (
        "gemma4_text",
        {
            "sliding_window": WINDOW,
            **SHARED,
            "num_kv_shared_layers": 2,
            **PER_LAYER,
            **K_EQ_V,
            **MOE,
        },
        40,
    ),
}
MOE_CASES = [case for case in CASES if "moe" in case]


def source(tmp_path, case):
    family, overrides, n_pos = CASES[case]
    return make_hf_checkpoint(tmp_path / "src", family, **overrides), n_pos


@pytest.mark.parametrize("path", ["sdpa", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hf(tmp_path, case, path):
    src, n_pos = source(tmp_path, case)
    assert n_pos > WINDOW
    ours, theirs = hf_and_ours(src, n_pos, use_fast_path=path == "sdpa")
    assert_logits_match(ours, theirs)


@pytest.mark.parametrize("case", CASES)
def test_convert_with_the_gate_then_load_and_round_trip(tmp_path, case):
    """The default gate passes, the export reproduces HF, and to-hf gives the source's bytes
    (layer_scalar, the per-layer embedding tables, no k / v of shared layers included)."""
    assert_gate_and_round_trip(tmp_path, *source(tmp_path, case))


@pytest.mark.parametrize("case", CASES)
def test_streamed_equals_whole(tmp_path, case):
    assert_streamed_equals_whole(tmp_path, *source(tmp_path, case))


# The MoE cases are in tests/test_verify_streaming.py's sub-layer MoE test (experts one at a
# time), with the tolerance argued there.
@needs_torch_2_13
@pytest.mark.parametrize("case", [c for c in CASES if "moe" not in c])
def test_sub_layer_equals_whole(tmp_path, case):
    """Sub-layer mode (verify/sublayer.py) on SRC's mapping and on an export's files: the
    per-layer input table looked up a token's rows at a time; the global (other head size,
    k = v), K/V-shared and K/V-source layers' attention and the double-wide MLPs held whole
    (they crashed, or would read wrong slices, when split like the others)."""
    from tests.test_verify_streaming import assert_same_report

    src, n_pos = source(tmp_path, case)
    out = convert(src, tmp_path / "out")
    for converted in (None, out):
        whole = verify(src, converted, seq_len=n_pos, streaming=False)
        parts = verify(src, converted, seq_len=n_pos, streaming="sub-layer")
        assert whole.passed, whole.summary()
        assert_same_report(parts, whole, "sub-layer")


@pytest.mark.parametrize("case", CASES)
def test_every_component_matches_on_a_correct_conversion(tmp_path, case):
    """Shared-K/V layers have q, q_norm and rot_q of their own, and no k / v; k = v layers
    compare v with HF's k projection; every component agrees."""
    model, errors = component_errors(*source(tmp_path, case))
    names = {name.rsplit(".", 1)[0] for name in errors}
    assert {"q", "k", "v", "q_norm", "k_norm", "rot_q", "rot_k", "ln1_post", "ln2_post"} <= names
    for i in range(model.cfg.n_layers):
        shared = model.cfg.kv_source(i) is not None
        assert (f"k.{i}" in errors) != shared and (f"rot_q.{i}" in errors)
    assert max(errors.values()) < 1e-5, errors


# A config.json with only what Gemma4TextConfig has no default for worth stating.
BASE = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "num_hidden_layers": 6,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
}


def test_the_switches_are_read_as_transformers_reads_them(tmp_path):
    """Global layers' head size and KV heads, k = v, the shared layers' sources, per-layer
    inputs, the last layer forced global, the rotary of each type."""
    src, _ = source(tmp_path, "gemma4-all-final-cap")
    cfg = convert_in_memory(src).cfg
    assert (cfg.d_head, cfg.d_head_global, cfg.n_key_value_heads_global) == (8, 16, 1)
    assert cfg.k_eq_v_global and cfg.v_norm and cfg.layer_scalar
    assert [cfg.kv_source(i) for i in range(6)] == [None] * 4 + [2, 3]
    assert (cfg.d_per_layer_input, cfg.d_vocab_per_layer) == (8, 128)
    assert [cfg.layer_d_mlp(i) for i in range(6)] == [96] * 4 + [192] * 2
    assert cfg.rope.type == "proportional" and cfg.rope.partial_rotary_factor == 0.25
    assert cfg.rope_local.type == "default" and cfg.layer_rotary_dim(1) == 16
    assert cfg.layer_rotary_dim(0) == 8 and cfg.final_logit_softcap == 3.0
    assert cfg.query_pre_attn_scalar == 1.0 and cfg.norm_offset == 0.0
    hf = {**BASE, "num_hidden_layers": 7}
    from transformers import AutoConfig

    theirs = AutoConfig.for_model(**hf)
    cfg = from_hf(hf)  # the class's defaults: 5:1 with the last layer global, 512, 256 / 512
    names = {GLOBAL: "global", LOCAL: "local"}
    assert list(cfg.attn_types) == [names[t] for t in theirs.layer_types]
    assert cfg.attn_types[-1] == "global" and cfg.sliding_window == theirs.sliding_window
    layers = theirs.per_layer_config
    assert [cfg.layer_d_head(i) for i in range(7)] == [layers[i].head_dim for i in range(7)]
    assert [cfg.layer_n_kv(i) for i in range(7)] == [
        layers[i].num_key_value_heads for i in range(7)
    ]
    assert (cfg.d_head, cfg.d_head_global) == (256, 512)
    assert cfg.n_key_value_heads_global == 2  # num_global_key_value_heads only with k = v


def test_the_moe_switches_are_read_as_transformers_reads_them(tmp_path):
    """enable_moe_block: every layer an MoE layer with its dense MLP (double-wide on the
    K/V-shared layers) beside the experts, of HF's shapes; off (the default): no MoE."""
    src, _ = source(tmp_path, "gemma4-moe-all")
    model, hf = convert_in_memory(src), load_hf(src)
    moe = model.cfg.moe
    assert (moe.n_experts, moe.top_k, moe.d_expert) == (8, 2, 32)
    assert moe.norm_topk_prob and moe.weights_in_fp32 and moe.layers == (True,) * 6
    assert moe.dense_mlp and moe.router_input_norm and moe.per_expert_scale
    for block, layer in zip(model.blocks, hf.model.layers, strict=True):
        assert isinstance(block.mlp, MoEMLP) and layer.enable_moe_block
        assert block.mlp.dense.W_in.shape == layer.mlp.up_proj.weight.T.shape
        assert block.mlp.W_gate.shape == layer.router.proj.weight.T.shape
        assert block.mlp.experts[7].W_out.shape == layer.experts.down_proj[7].T.shape
    assert [b.mlp.dense.W_in.shape[1] for b in model.blocks] == [96] * 4 + [192] * 2
    assert from_hf(BASE).moe is None and from_hf({**BASE, "enable_moe_block": False}).moe is None


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_gate_routes_every_token_as_hf(tmp_path, case):
    """The gate reads Gemma 4's router (the layer's own, not the MLP's) on every layer:
    routing agreement 1.0 on each, its logits compared as the `router` component."""
    src, n_pos = source(tmp_path, case)
    report = verify(src, seq_len=n_pos).to_dict()
    assert report["passed"] and report["routing_agreement"] == 1.0
    n_layers = load_hf_config(src).n_layers
    assert sorted(int(i) for i in report["routing_agreement_per_layer"]) == list(range(n_layers))
    _, errors = component_errors(src, n_pos)
    assert all(f"router.{i}" in errors for i in range(n_layers))
    assert max(errors.values()) < 1e-5, errors


def test_inspect_and_the_card_show_the_moe(tmp_path):
    """inspect: every stored tensor counted; active = total less the (n_experts - top_k)
    experts a token skips in each layer (the dense MLP beside them always runs); the MoE
    options in words. The model card lists the dense MLP beside the experts."""
    from safetensors import safe_open

    from gqa_convert import convert
    from gqa_convert.inspection import inspect_checkpoint

    src, _ = source(tmp_path, "gemma4-moe-plain")
    info = inspect_checkpoint(src)
    with safe_open(src / "model.safetensors", "pt") as f:
        total = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
        per_layer = f.get_slice("model.layers.0.experts.gate_up_proj").get_shape()
    skipped = 3 * (8 - 2) * 3 * 48 * 32  # layers * unused experts * 3 matrices of 48 x 32
    assert per_layer == [8, 64, 48] and info["parameters"] == total
    assert info["active_parameters_per_token"] == total - skipped
    moe = info["quirks"]["moe"]
    assert "8 experts of width 32, top 2 per token, weights renormalised" in moe
    assert "per-expert scales" in moe and "dense MLP beside the experts" in moe
    card = (convert(src, tmp_path / "out") / "README.md").read_text()
    assert "`blocks.{l}.mlp.dense.W_gate`, `.W_in` / `.W_out` (beside the experts)" in card
    assert "| routing agreement (MoE) | 1 |" in card


ROUTING_HOOKS = (
    "hook_router_logits",
    "hook_expert_weights",
    "hook_expert_indices",
    "hook_topk_weights",
)


def test_moe_routing_on_the_same_input_is_hfs(tmp_path):
    """On the same residual stream, our router's logits are HF's router.proj's (to fp32
    rounding: the RMS norm's rsqrt against HF's pow), hook_expert_weights its softmax, and the
    chosen experts and their weights (renormalised, times per_expert_scale) HF's; the layer's
    MoE output (dense + experts, before post_feedforward_layernorm) too."""
    src, _ = source(tmp_path, "gemma4-moe-plain")
    hf, model = load_hf(src), convert_in_memory(src)
    mlp, layer = model.blocks[1].mlp, hf.model.layers[1]
    resid = torch.randn(2, 40, 48)
    seen = {}
    for name in ROUTING_HOOKS:
        getattr(mlp, name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o))
    with torch.no_grad():
        ours = mlp(model.blocks[1].ln2(resid), resid)
        flat = resid.reshape(-1, 48)
        probs, weights, indices = layer.router(flat)
        logits = layer.router.proj(
            layer.router.norm(flat) * layer.router.scale * layer.router.scalar_root_size
        )
        experts = layer.experts(layer.pre_feedforward_layernorm_2(flat), indices, weights)
        theirs = layer.post_feedforward_layernorm_1(
            layer.mlp(layer.pre_feedforward_layernorm(resid))
        ) + layer.post_feedforward_layernorm_2(experts.view(resid.shape))
    torch.testing.assert_close(seen["hook_router_logits"].reshape(-1, 8), logits)
    torch.testing.assert_close(seen["hook_expert_weights"], probs)
    assert routing_gap((logits,), 2).min() > ROUTING_MARGIN  # no near-tie to break
    order, hf_order = seen["hook_expert_indices"].sort(-1), indices.sort(-1)
    assert torch.equal(order.values, hf_order.values)
    ours_w = seen["hook_topk_weights"].gather(-1, order.indices)
    torch.testing.assert_close(ours_w, weights.gather(-1, hf_order.indices))
    assert not torch.allclose(weights, weights / layer.router.per_expert_scale[indices])
    torch.testing.assert_close(ours, theirs)


def test_moe_hooks_are_the_moe_hook_points(tmp_path):
    """Gemma 4's MoE layers have the MoE hook points of model/moe.py (router, experts, per
    expert, rows = tokens routed) and the dense MLP's own (`mlp.dense`, TL's GatedMLP
    names); zeroing hook_topk_weights leaves the dense branch alone: the layer's output is
    then the dense MLP's through its norm."""
    src, n_pos = source(tmp_path, "gemma4-moe-plain")
    model = convert_in_memory(src)
    tokens = random_tokens(n_pos)
    mlp = "blocks.0.mlp."
    names = [mlp + h for h in ROUTING_HOOKS]
    names += [f"{mlp}experts.3.hook_{h}" for h in ("gate", "pre", "post", "out")]
    names += [f"{mlp}dense.hook_{h}" for h in ("pre", "pre_linear", "post")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    rows = 2 * n_pos
    assert cache[mlp + "hook_router_logits"].shape == (2, n_pos, 8)
    assert cache[mlp + "hook_expert_weights"].shape == (rows, 8)
    assert cache[mlp + "hook_expert_indices"].shape == cache[mlp + "hook_topk_weights"].shape
    routed = int((cache[mlp + "hook_expert_indices"] == 3).sum())
    assert routed > 0 and cache[f"{mlp}experts.3.hook_post"].shape == (routed, 32)
    assert cache[f"{mlp}dense.hook_post"].shape == (2, n_pos, 96)
    block = model.blocks[0]
    seen = {}
    block.mlp.dense.register_forward_hook(lambda m, a, o: seen.__setitem__("dense", o))
    with torch.no_grad():
        out = model.run_with_hooks(
            tokens,
            fwd_hooks=[
                (mlp + "hook_topk_weights", lambda t, hook: torch.zeros_like(t)),
                ("blocks.0.hook_mlp_out", lambda t, hook: seen.__setitem__("out", t)),
            ],
        )
    assert out is not None
    # the experts' branch is ln_experts_post(0) = 0: what is left is the dense branch
    torch.testing.assert_close(
        seen["out"], block.ln2_post(block.mlp.ln_dense_post(seen["dense"])), rtol=0, atol=0
    )


@needs_tl
def test_hooked_transformer_refuses_gemma4(tmp_path):
    """TL 3.9 has none of Gemma 4's mechanisms: refused, naming the first (its rope)."""
    src, _ = source(tmp_path, "gemma4-k-eq-v")
    assert_hooked_transformer_refuses(tmp_path, src, "proportional")


def kv_from_wrong_layer(model):
    """The shared local layer (4) attends layer 0's K/V, not layer 2's (the first layer of
    its type instead of the last): a converter's wrong reading of the rule."""
    model.blocks[0].attn.cfg = replace(model.blocks[0].attn.cfg, kv_store=True)
    model.blocks[4].attn.cfg = replace(model.blocks[4].attn.cfg, kv_source=0)
    return model


# (case, mutation of (cfg, state) or of the model, where the gate must say it diverges)
MUTATIONS = {
    "norm-1-plus-w": ("gemma4-k-eq-v", M.config_field("norm_offset", 1.0), (0, "ln1")),
    "v-norm-off": ("gemma4-k-eq-v", M.config_field("v_norm", False), (0, "attn_out")),
    "proportional-rope-as-partial": (
        "gemma4-k-eq-v",
        lambda cfg, state: (replace(cfg, rope=replace(cfg.rope, type="default")), state),
        (2, "rot_q"),
    ),
    "layer-scalar-ignored": (
        "gemma4-k-eq-v",
        lambda cfg, state: (
            cfg,
            {n: torch.ones_like(t) if n.endswith("layer_scalar") else t for n, t in state.items()},
        ),
        (0, "resid_post"),
    ),
    "per-layer-embedding-dropped": (
        "gemma4-per-layer-shared-kv",
        M.tensor_zeroed("embed_per_layer.W_E"),
        (0, "resid_post"),
    ),
    "per-layer-norm-dropped": (
        "gemma4-per-layer-shared-kv",
        M.norm_to_ones("blocks.1.per_layer.ln_post.w"),
        (1, "resid_post"),
    ),
    "kv-shared-from-the-wrong-layer": (
        "gemma4-per-layer-shared-kv",
        kv_from_wrong_layer,
        (4, "attn_out"),
    ),
    # MoE: the router's scale dropped changes its logits; the per-expert scales ignored, or
    # the experts' norm after them dropped, only what the experts add (ln2_post's input)
    "moe-router-scale-dropped": (
        "gemma4-moe-plain",
        M.tensor_to_ones("blocks.0.mlp.router_scale"),
        (0, "router"),
    ),
    "moe-per-expert-scale-ignored": (
        "gemma4-moe-all",
        M.tensor_to_ones("blocks.1.mlp.per_expert_scale"),
        (1, "ln2_post"),
    ),
    "moe-experts-post-norm-dropped": (
        "gemma4-moe-plain",
        M.norm_to_ones("blocks.0.mlp.ln_experts_post.w"),
        (0, "ln2_post"),
    ),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_gemma4_bug_fails_the_gate_where_it_is(tmp_path, name):
    case, mutation, where = MUTATIONS[name]
    src, n_pos = source(tmp_path, case)
    if mutation is kv_from_wrong_layer:
        model = kv_from_wrong_layer(convert_in_memory(src))
    else:
        model = M.mutated_model(src, mutation)
    report = verify(src, model=model, seq_len=n_pos)
    assert not report.passed
    assert report.first_divergence == {"layer": where[0], "component": where[1]}


def v_normalised_in_dtype(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The planted weightless RMSNorm of v in the compute dtype (HF's: in fp32, cast back)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@needs_torch_2_13
@pytest.mark.exactness
@pytest.mark.parametrize("case", ["gemma4-per-layer-shared-kv", "gemma4-k-eq-v"])
def test_bfloat16_follows_hf_rounding(tmp_path, case, monkeypatch):
    """In bf16 our casts are HF's (tests/numerics.py's rounding ratio, both attention paths;
    measured 0 here): sqrt(d_model) rounded to bf16, the per-layer inputs (sqrt(p) rounded,
    the projection scaled, normed and summed in the dtype), the per-layer gate op by op, v
    of the k = v layers normalised in fp32, K/V shared across layers. Planted, each above
    ROUNDING_RATIO on both paths (measured): the embedding scale as a Python float (as for
    Gemma 1-3); the per-layer gate's activation and product in fp32, rounded once (0.42);
    v's norm in bf16 (0.49-0.80)."""
    family, overrides, n_pos = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **overrides)
    assert_follows_hf_rounding(src, n_pos, M.config_field("embedding_multiplier_in_dtype", False))
    tokens = random_tokens(n_pos, batch=1)
    if overrides.get("hidden_size_per_layer_input"):
        gate = M.per_layer_gate_in_fp32(convert_in_memory(src))
        assert_misplaced_cast(rounding_ratios(src, tokens, torch.bfloat16, gate))
    from gqa_convert.model import attention

    monkeypatch.setattr(attention, "rms_normalize", v_normalised_in_dtype)
    assert_misplaced_cast(rounding_ratios(src, tokens, torch.bfloat16))
