"""gpt-oss: tiny random GptOssForCausalLM checkpoints (4 experts, 2 per token; 8 query / 2 KV
heads of 16, q width 128 != d_model 64; q / k / v / o biases; attention sinks; sliding window
6 on every other layer, shorter than the inputs; yarn rotary; a router with a bias, top-k then
softmax; stacked experts with interleaved gate / up columns and biases; the clamped SwiGLU at a
limit the tiny model reaches) converted with the gate against transformers' own classes, in
dense form and from MXFP4 experts; the mutations the gate must localise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gqa_convert import GQATransformer, convert, convert_in_memory
from gqa_convert.config import from_hf, load_hf_config
from gqa_convert.to_hf import export_to_hf
from gqa_convert.verify import verify
from tests import mutations as M
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens
from tests.numerics import (
    assert_follows_hf_rounding,
    assert_misplaced_cast,
    needs_torch_2_13,
    rounding_ratios,
)
from tests.test_export import hf_tensors
from tests.test_families import (
    assert_gate_and_round_trip,
    assert_hooked_transformer_refuses,
    assert_localised,
    assert_streamed_equals_whole,
    component_errors,
)
from tests.test_interop import needs_tl
from tests.test_moe import assert_expert_0_kept_away
from tests.test_parity import assert_logits_match, hf_and_ours

# (family, overrides, prompt length): layer 0 and 2 sliding (window 6), layer 1 full, as
# GptOssConfig's default layer_types; or the file's own layer_types, without attention biases.
CASES = {
    "gpt_oss-window-6": ("gpt_oss", {"sliding_window": 6}, 40),
    "gpt_oss-layer-types-no-attention-bias": (
        "gpt_oss",
        {
            "sliding_window": 5,
            "attention_bias": False,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
        },
        40,
    ),
}


def source(tmp_path, case):
    family, overrides, n_pos = CASES[case]
    return make_hf_checkpoint(tmp_path / "src", family, **overrides), n_pos


def test_the_config_reads_what_gpt_oss_config_holds(tmp_path):
    """Every setting as GptOssForCausalLM reads it from the same file."""
    src, _ = source(tmp_path, "gpt_oss-window-6")
    cfg, hf = load_hf_config(src), load_hf(src)
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model) == (8, 2, 16, 64)
    assert cfg.attn_types == ("local", "global", "local") and cfg.sliding_window == 6
    assert hf.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert cfg.attn_sinks and cfg.qkv_bias and cfg.o_bias and cfg.norm_weight_in_fp32
    rope = cfg.rope
    assert (rope.type, rope.theta, rope.factor, rope.truncate) == ("yarn", 150000.0, 32.0, False)
    assert rope.attention_factor == pytest.approx(hf.model.rotary_emb.attention_scaling)
    moe = cfg.moe
    assert (moe.n_experts, moe.top_k, moe.d_expert) == (4, 2, 32)
    assert moe.router_bias and moe.softmax_after_topk and moe.expert_bias and moe.clamped_swiglu
    assert (moe.swiglu_alpha, moe.swiglu_limit) == (1.702, 0.5) and all(moe.layers)
    other = load_hf_config(source(tmp_path / "2", "gpt_oss-layer-types-no-attention-bias")[0])
    assert other.attn_types == ("global", "local", "local")
    assert not (other.qkv_bias or other.o_bias)


def test_hub_defaults_are_gpt_oss_configs():
    """A config.json that leaves fields out gets GptOssConfig's defaults (yarn factor 32 at
    theta 150000, 128 experts, 4 per token, window 128 on even layers, biases on)."""
    from transformers import GptOssConfig

    hf = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"}
    hf |= {"hidden_size": 2880, "num_hidden_layers": 4, "num_attention_heads": 64}
    hf |= {"intermediate_size": 2880, "vocab_size": 201088, "max_position_embeddings": 131072}
    cfg, theirs = from_hf(hf), GptOssConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    assert (cfg.d_head, cfg.n_key_value_heads) == (theirs.head_dim, theirs.num_key_value_heads)
    assert cfg.eps == theirs.rms_norm_eps
    assert cfg.moe.n_experts == theirs.num_local_experts and cfg.moe.top_k == 4
    assert cfg.sliding_window == theirs.sliding_window == 128
    names = {"local": "sliding_attention", "global": "full_attention"}
    assert [names[t] for t in cfg.attn_types] == theirs.layer_types
    params = theirs.rope_parameters
    assert (cfg.rope.type, cfg.rope.theta, cfg.rope.factor) == (
        params["rope_type"],
        params["rope_theta"],
        params["factor"],
    )
    assert cfg.qkv_bias and cfg.o_bias and cfg.moe.swiglu_limit == theirs.swiglu_limit


@pytest.mark.parametrize("path", ["sdpa", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hf(tmp_path, case, path):
    src, n_pos = source(tmp_path, case)
    assert_logits_match(*hf_and_ours(src, n_pos, use_fast_path=path == "sdpa"))


@pytest.mark.parametrize("case", CASES)
def test_convert_with_the_gate_then_load_and_round_trip(tmp_path, case):
    """The gate passes with every token routed as HF routes it, the export reproduces HF, and
    to-hf writes the stacked, interleaved experts back bit for bit."""
    src, n_pos = source(tmp_path, case)
    verification, original = assert_gate_and_round_trip(tmp_path, src, n_pos)
    report = verification["report"]
    assert report["passed"] and report["routing_agreement"] == 1.0
    assert sorted(int(i) for i in report["routing_agreement_per_layer"]) == [0, 1, 2]
    assert "model.layers.0.mlp.experts.gate_up_proj" in original


def test_bfloat16_experts_round_trip_bit_for_bit(tmp_path):
    """A bf16 checkpoint (the dtype gpt-oss's dense experts ship in) converts without
    --dtype and comes back from to-hf with the same bytes."""
    src = make_hf_checkpoint(tmp_path / "src", "gpt_oss", sliding_window=6, dtype=torch.bfloat16)
    out = convert(src, tmp_path / "out", verify=False)
    back = export_to_hf(out, tmp_path / "back")
    original, returned = hf_tensors(src), hf_tensors(back)
    assert set(original) == set(returned)
    assert original["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name


def test_streamed_equals_whole(tmp_path):
    src, n_pos = source(tmp_path, "gpt_oss-window-6")
    assert_streamed_equals_whole(tmp_path, src, n_pos)
    streamed = verify(src, seq_len=n_pos, streaming=True)
    assert streamed.routing_agreement == 1.0


def test_every_component_matches_on_a_correct_conversion(tmp_path):
    _, errors = component_errors(*source(tmp_path, "gpt_oss-window-6"))
    assert {f"router.{i}" for i in range(3)} <= set(errors)
    assert max(errors.values()) < 1e-5, errors


def test_gate_and_up_columns_land_where_hf_reads_them(tmp_path):
    """W_gate / b_gate and W_in / b_in of expert e are the even and odd columns of HF's
    gate_up_proj[e] and gate_up_proj_bias[e], which GptOssExperts._apply_gate reads as gate
    and up; the router's bias is HF's."""
    src, _ = source(tmp_path, "gpt_oss-window-6")
    hf, model = load_hf(src), convert_in_memory(src)
    theirs, ours = hf.model.layers[1].mlp, model.blocks[1].mlp
    x = torch.randn(5, 64)
    with torch.no_grad():
        for e in range(4):
            gate_up = x @ theirs.experts.gate_up_proj[e] + theirs.experts.gate_up_proj_bias[e]
            expert = ours.experts[e]
            torch.testing.assert_close(x @ expert.W_gate + expert.b_gate, gate_up[:, ::2])
            torch.testing.assert_close(x @ expert.W_in + expert.b_in, gate_up[:, 1::2])
        assert torch.equal(ours.b_gate, theirs.router.bias)
        assert torch.equal(ours.W_gate.T, theirs.router.weight)


def test_the_clamp_is_reached(tmp_path):
    """The tiny model's expert pre-activations cross the clamp limit (else a dropped clamp
    could not show)."""
    src, n_pos = source(tmp_path, "gpt_oss-window-6")
    model = convert_in_memory(src)
    with torch.no_grad():
        tokens = random_tokens(n_pos)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_pre" in n)
    limit = model.cfg.moe.swiglu_limit
    pre = torch.cat([t.flatten() for n, t in cache.items() if ".experts." in n])
    assert (pre > limit).any() and (pre < -limit).any()


@pytest.mark.exactness
def test_routing_is_hfs_bit_for_bit_on_the_same_input(tmp_path):
    """Router logits (with the bias), chosen experts and their weights (softmax over the k,
    in the logits' dtype) equal GptOssTopKRouter's exactly: the same F.linear, topk and
    softmax on the same tensors. hook_expert_weights holds the logits top-k picks from."""
    src, _ = source(tmp_path, "gpt_oss-window-6")
    hf, model = load_hf(src), convert_in_memory(src)
    mlp, router = model.blocks[0].mlp, hf.model.layers[0].mlp.router
    seen = {}
    for name in ("hook_router_logits", "hook_expert_weights", "hook_expert_indices"):
        getattr(mlp, name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o))
    mlp.hook_topk_weights.register_forward_hook(lambda m, a, o: seen.__setitem__("w", o))
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        mlp(x)
        logits, weights, indices = router(x.reshape(-1, 64))
    assert torch.equal(seen["hook_router_logits"].reshape(-1, 4), logits)
    assert torch.equal(seen["hook_expert_weights"], logits)
    assert torch.equal(seen["hook_expert_indices"], indices)
    assert torch.equal(seen["w"], weights)


def test_an_expert_kept_away_by_a_hook(tmp_path):
    """-inf in a column of hook_expert_weights (the logits top-k picks from) keeps every
    token away from that expert; the output changes where tokens had picked it."""

    def no_expert_0(logits, hook):
        return logits.masked_fill(torch.arange(logits.shape[-1]) == 0, float("-inf"))

    assert_expert_0_kept_away(*source(tmp_path, "gpt_oss-window-6"), no_expert_0)


def test_the_sinks_share_shows_in_the_pattern_and_has_a_hook(tmp_path):
    """hook_pattern is what the model uses: each row sums to 1 - the sink's share, HF's
    attention weights (eager: the softmax with the sink column, the column dropped); a
    hook on hook_sinks setting them to -inf gives rows summing to 1, and changes the output."""
    src, n_pos = source(tmp_path, "gpt_oss-window-6")
    hf, model = load_hf(src), convert_in_memory(src)
    tokens = random_tokens(n_pos, batch=1)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        out = hf(tokens, output_attentions=True)
    for layer in range(3):
        ours = cache[f"blocks.{layer}.attn.hook_pattern"]
        theirs = out.attentions[layer]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        share = 1 - ours.sum(-1)  # the sink's
        assert (share > 0).all() and share.mean() > 0.05  # a real share, every row
    assert cache["blocks.0.attn.hook_sinks"].shape == (8,)
    assert torch.equal(cache["blocks.0.attn.hook_sinks"], model.blocks[0].attn.sinks)

    def no_sinks(sinks, hook):
        return torch.full_like(sinks, float("-inf"))

    with torch.no_grad(), model.hooks([("blocks.1.attn.hook_sinks", no_sinks)]):
        ablated, after = model.run_with_cache(tokens, names_filter=lambda n: "hook_pattern" in n)
    torch.testing.assert_close(
        after["blocks.1.attn.hook_pattern"].sum(-1), torch.ones(1, 8, n_pos), atol=1e-6, rtol=0
    )
    assert (ablated - logits).abs().max() > 1e-3


@needs_tl
def test_hooked_transformer_refuses_the_sinks(tmp_path):
    src = source(tmp_path, "gpt_oss-window-6")[0]
    assert_hooked_transformer_refuses(tmp_path, src, "attn_sinks")


def de_interleaved(layer: int = 0) -> M.Mutation:
    """gate / up read as the two halves of gate_up_proj's columns (Phi-3's and Mixtral's
    fused layout) where gpt-oss interleaves them: each expert's W_gate the first d_expert
    columns of the interleaved matrix, W_in the rest; the biases alike."""

    def mutate(cfg, state):
        for e in range(cfg.n_experts):
            for w, b in (("W_gate", "W_in"), ("b_gate", "b_in")):
                gate, up = (state[f"blocks.{layer}.mlp.experts.{e}.{n}"] for n in (w, b))
                both = torch.stack((gate, up), dim=-1).flatten(-2)  # [..., (i 2)]: HF's
                gate, up = both.chunk(2, dim=-1)
                state[f"blocks.{layer}.mlp.experts.{e}.{w}"] = gate.contiguous()
                state[f"blocks.{layer}.mlp.experts.{e}.{b}"] = up.contiguous()
        return cfg, state

    return mutate


def sinks_dropped() -> M.Mutation:
    """The sinks left out (a converter that maps gpt-oss onto Llama's attention)."""
    from dataclasses import replace

    def mutate(cfg, state):
        state = {n: t for n, t in state.items() if not n.endswith("attn.sinks")}
        return replace(cfg, attn_sinks=False), state

    return mutate


# (mutation, where the gate must say the first divergence is: layer, component, and the
# first routed expert whose own output is off where every expert's is)
MUTATIONS = {
    "sinks-dropped": (sinks_dropped(), (0, "attn_out")),
    "gate-up-de-interleaved": (de_interleaved(layer=0), (0, "mlp_out", 0)),
    "clamp-removed": (M.moe_field("clamped_swiglu", False), (0, "mlp_out", 0)),
    "router-bias-ignored": (M.tensor_zeroed("blocks.1.mlp.b_gate"), (1, "router")),
    "softmax-before-topk": (M.moe_field("softmax_after_topk", False), (0, "mlp_out")),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_gpt_oss_bug_fails_the_gate_where_it_is(tmp_path, name):
    mutation, where = MUTATIONS[name]
    src, n_pos = source(tmp_path, "gpt_oss-window-6")
    assert_localised(src, mutation, n_pos, where)


def test_inspect_reports_total_and_active_parameters(tmp_path):
    """Active: every parameter but the (n_experts - top_k) / n_experts of each layer's
    experts (weights and biases) a token skips, counted on HF's own modules."""
    from gqa_convert.inspection import inspect_checkpoint

    src, _ = source(tmp_path, "gpt_oss-window-6")
    hf = load_hf(src)
    info = inspect_checkpoint(src)
    total = sum(p.numel() for p in hf.parameters())
    skipped = sum(
        sum(p.numel() for p in layer.mlp.experts.parameters()) * (4 - 2) // 4
        for layer in hf.model.layers
    )
    assert info["parameters"] == total
    assert info["active_parameters_per_token"] == total - skipped
    assert info["quirks"]["experts_stacked"].startswith("gate_up_proj")


# ---- MXFP4 experts (the Hub's form) -------------------------------------------------------


def test_mxfp4_source_converts_with_the_gate(tmp_path):
    """The experts written as MXFP4 blocks / scales (tests/quantized.py, as the Hub's
    checkpoints store them): convert dequantises them as they stream and the gate passes
    against transformers' own dequantised GptOssForCausalLM (Mxfp4Config(dequantize=True)),
    whole and streamed; the export's experts are the dequantised values exactly, and
    to-hf writes the dense checkpoint."""
    from tests.quantized import write_mxfp4

    src, n_pos = source(tmp_path, "gpt_oss-window-6")
    dense = write_mxfp4(src)  # the dequantised experts, by an independent numpy reading
    out = convert(src, tmp_path / "out", verify=True)
    manifest = json.loads((out / "conversion.json").read_text())
    assert manifest["verification"]["status"] == "passed"
    assert manifest["verification"]["report"]["routing_agreement"] == 1.0
    streamed = verify(src, out, seq_len=n_pos, streaming=True)
    assert streamed.passed and streamed.routing_agreement == 1.0
    model = GQATransformer.from_pretrained(out, dtype=torch.float32)
    for name, array in dense.items():  # [E, d_model, 2 * d_expert]
        layer = int(name.split(".")[2])
        expert = model.blocks[layer].mlp.experts[1]
        which = expert.W_gate if "gate_up" in name else expert.W_out
        want = array[1][:, ::2] if "gate_up" in name else array[1]
        assert np.array_equal(which.detach().float().numpy(), want), name
    back = export_to_hf(out, tmp_path / "back")
    tensors = hf_tensors(back)
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    assert not any(n.endswith(("_blocks", "_scales")) for n in tensors)


def test_mxfp4_bug_is_caught_by_the_gate(tmp_path):
    """The nibbles read high first (a swapped-nibble dequantiser) fail the gate at the
    first layer's experts, naming the first routed one (each expert's own output is off)."""
    from gqa_convert.sources import mxfp4
    from tests.quantized import write_mxfp4

    src, n_pos = source(tmp_path, "gpt_oss-window-6")
    write_mxfp4(src)
    original = mxfp4.dequantize_mxfp4

    def swapped(blocks, scales):
        return original((blocks << 4) | (blocks >> 4), scales)

    mxfp4.dequantize_mxfp4 = swapped
    try:
        model = convert_in_memory(src)
    finally:
        mxfp4.dequantize_mxfp4 = original
    report = verify(src, model=model, seq_len=n_pos)
    assert not report.passed
    assert report.first_divergence == {"layer": 0, "component": "mlp_out", "expert": 0}


@needs_torch_2_13
@pytest.mark.exactness
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_follows_hf_rounding(tmp_path, case):
    """In bf16 our casts are HF's (tests/numerics.py's rounding ratio, both attention paths;
    measured 0 here): the sinks' softmax in the compute dtype after its row max is
    subtracted (GptOss's eager attention; our fp32 softmax was 0.70-0.78 of HF's own error
    and failed the second case's bf16 gate), the clamped SwiGLU op by op in the dtype, the
    norms' fp32 weight product. Planted, each above ROUNDING_RATIO on both paths (measured):
    the sinks' softmax in fp32 (0.70-0.78), the SwiGLU in fp32 rounded once (0.59-0.68)."""
    src, n_pos = source(tmp_path, case)
    assert_follows_hf_rounding(src, n_pos, M.config_field("sinks_softmax_in_dtype", False))
    tokens = random_tokens(n_pos, batch=1)
    swiglu = M.swiglu_in_fp32(convert_in_memory(src))
    assert_misplaced_cast(rounding_ratios(src, tokens, torch.bfloat16, swiglu))
