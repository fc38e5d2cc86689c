"""Mixtures of experts (Mixtral, Qwen3-MoE, OLMoE): tiny random HF models with 4 experts, 2 per
token, converted with the parity gate on, against transformers' own classes at 1e-4; routing
agreement; the round trip to the Hub's per-expert layout; TransformerLens 3.9; the mutations
the gate must localise."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gqa_convert import GQATransformer, convert, convert_in_memory
from gqa_convert.config import from_hf, load_hf_config
from gqa_convert.errors import UnsupportedModelError
from gqa_convert.model.moe import MoEMLP
from gqa_convert.to_hf import export_to_hf
from gqa_convert.verify import verify
from tests import mutations as M
from tests.hf_models import load_hf, make_hf_checkpoint, make_hf_model, random_tokens
from tests.numerics import (
    ROUTING_MARGIN,
    assert_follows_hf_rounding,
    assert_misplaced_cast,
    rounding_ratios,
    routing_gap,
)
from tests.test_export import hf_tensors
from tests.test_families import assert_gate_and_round_trip, component_errors, divergence
from tests.test_interop import needs_tl
from tests.test_parity import assert_logits_match, hf_and_ours

# (family, overrides, prompt length). Mixtral's prompts cross its window; Qwen3-MoE has a
# dense layer among MoE ones, by mlp_only_layers or by decoder_sparse_step.
CASES = {
    "mixtral-window-8": ("mixtral", {"sliding_window": 8}, 40),
    "mixtral-mqa": ("mixtral", {"num_key_value_heads": 1}, 40),
    "qwen3-moe-dense-layer-1": ("qwen3_moe", {"mlp_only_layers": [1], "norm_topk_prob": True}, 40),
    "qwen3-moe-sparse-step-2": ("qwen3_moe", {"decoder_sparse_step": 2}, 40),
    "qwen3-moe-sliding": ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 6}, 40),
    "olmoe": ("olmoe", {}, 40),
    "olmoe-norm-topk": ("olmoe", {"norm_topk_prob": True}, 40),
}


def source(tmp_path, case):
    family, overrides, n_pos = CASES[case]
    return make_hf_checkpoint(tmp_path / "src", family, **overrides), n_pos


@pytest.mark.parametrize("path", ["sdpa", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hf(tmp_path, case, path):
    src, n_pos = source(tmp_path, case)
    assert_logits_match(*hf_and_ours(src, n_pos, use_fast_path=path == "sdpa"))


@pytest.mark.parametrize("case", CASES)
def test_convert_with_the_gate_then_load_and_round_trip(tmp_path, case):
    """The gate passes with every token routed as HF routes it, the export reproduces HF, and
    to-hf writes the Hub's per-expert tensors back bit for bit."""
    src, n_pos = source(tmp_path, case)
    verification, original = assert_gate_and_round_trip(tmp_path, src, n_pos)
    report = verification["report"]
    assert report["passed"] and report["routing_agreement"] == 1.0
    moe_layers = [i for i, moe in enumerate(load_hf_config(src).moe.layers) if moe]
    assert sorted(int(i) for i in report["routing_agreement_per_layer"]) == moe_layers
    assert any(".experts.3." in name for name in original)  # the Hub's per-expert names


@pytest.mark.parametrize("case", ["mixtral-window-8", "qwen3-moe-dense-layer-1"])
def test_streamed_verification_covers_the_moe_layers(tmp_path, case):
    """Layer-streamed, each MoE layer (router and experts) is held alone, read through
    transformers' loader on HF's side, and compared like a dense one."""
    src, _ = source(tmp_path, case)
    out = convert(src, tmp_path / "out", verify=False)
    streamed = verify(src, out, streaming=True, seq_len=40)
    whole = verify(src, out, streaming=False, seq_len=40)
    assert streamed.mode == "streamed" and whole.mode == "whole"
    assert streamed.passed and streamed.routing_agreement == 1.0
    assert streamed.layer_rel_err == whole.layer_rel_err
    assert streamed.routing_agreement_per_layer == whole.routing_agreement_per_layer


def test_each_layer_has_the_mlp_hf_has(tmp_path):
    """Qwen3-MoE's mlp_only_layers / decoder_sparse_step pick the same layers as HF's."""
    for overrides in ({"mlp_only_layers": [0, 2]}, {"decoder_sparse_step": 2}, {}):
        hf = make_hf_model("qwen3_moe", num_hidden_layers=4, **overrides)
        cfg = from_hf(hf.config.to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]})
        theirs = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
        assert list(cfg.moe.layers) == theirs, overrides
        model = GQATransformer(cfg)
        assert [isinstance(b.mlp, MoEMLP) for b in model.blocks] == theirs


@pytest.mark.exactness
def test_routing_hooks_see_what_hf_routes(tmp_path):
    """hook_router_logits, hook_expert_weights (TL's: the whole softmax, rows = tokens),
    hook_expert_indices and hook_topk_weights hold HF's router logits, its softmax, chosen
    experts and weights; each expert's hook_out sees only its tokens."""
    src, n_pos = source(tmp_path, "mixtral-window-8")
    hf, model = load_hf(src), convert_in_memory(src)
    tokens = random_tokens(n_pos, batch=1)
    seen, theirs = {}, {}
    mlp = model.blocks[1].mlp
    for name in ROUTING_HOOKS:
        getattr(mlp, name).register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o))
    routed = {}
    for e, expert in enumerate(mlp.experts):
        expert.hook_out.register_forward_hook(lambda m, i, o, e=e: routed.__setitem__(e, o))
    hf.model.layers[1].mlp.gate.register_forward_hook(
        lambda m, i, o: theirs.update(zip(("logits", "weights", "indices"), o, strict=True))
    )
    with torch.no_grad():
        model(tokens), hf(tokens)
    torch.testing.assert_close(seen["hook_router_logits"][0], theirs["logits"], atol=1e-5, rtol=0)
    # The router inputs are ours and HF's layer-1 streams (fp32 rounding apart): the same
    # experts on every CPU because every token's top-k boundary is clear.
    assert routing_gap(theirs["logits"], 2).min() > ROUTING_MARGIN
    assert seen["hook_expert_weights"].shape == (n_pos, 4)  # [batch * pos, n_experts]
    probs = theirs["logits"].float().softmax(-1)
    torch.testing.assert_close(seen["hook_expert_weights"], probs, atol=1e-6, rtol=0)
    assert torch.equal(seen["hook_expert_indices"], theirs["indices"])
    torch.testing.assert_close(seen["hook_topk_weights"], theirs["weights"])
    counts = torch.bincount(theirs["indices"].flatten(), minlength=4)
    assert {e: out.shape[0] for e, out in routed.items()} == {
        e: int(c) for e, c in enumerate(counts) if c
    }


ROUTING_HOOKS = (
    "hook_router_logits",
    "hook_expert_weights",
    "hook_expert_indices",
    "hook_topk_weights",
)


@pytest.mark.exactness
@pytest.mark.parametrize("case", ["mixtral-window-8", "qwen3-moe-dense-layer-1", "olmoe"])
def test_on_the_same_input_routing_is_hfs_bit_for_bit(tmp_path, case):
    """Router logits, chosen experts and their weights equal HF's router's exactly, so a tie
    between two experts is broken as HF breaks it (the reference decides): experts 0 and 1
    are given the same router row, a tie on every token. Exact on every CPU: both sides
    run the same F.linear on the same input and the same contiguous weight, then the same
    softmax and topk."""
    src, _ = source(tmp_path, case)
    hf, model = load_hf(src), convert_in_memory(src)
    i = next(i for i in range(3) if model.cfg.is_moe_layer(i))
    mlp = model.blocks[i].mlp
    with torch.no_grad():
        hf.model.layers[i].mlp.gate.weight[1] = hf.model.layers[i].mlp.gate.weight[0]
        mlp.W_gate[:, 1] = mlp.W_gate[:, 0]
    x = torch.randn(2, 40, 64)
    seen = {}
    for name in ROUTING_HOOKS:
        getattr(mlp, name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o))
    with torch.no_grad():
        mlp(x)
        logits, weights, indices = hf.model.layers[i].mlp.gate(x)
    assert torch.equal(seen["hook_router_logits"].reshape(-1, 4), logits)
    # the same softmax (F.softmax in fp32) on the same logits
    assert torch.equal(seen["hook_expert_weights"], F.softmax(logits, dim=-1, dtype=torch.float))
    assert torch.equal(seen["hook_expert_indices"], indices)
    assert torch.equal(seen["hook_topk_weights"], weights)
    # Tokens where the tie sits at the top-k boundary: one of the two tied experts is taken.
    assert ((indices == 0).any(-1) ^ (indices == 1).any(-1)).any()


def test_an_expert_ablated_by_a_hook_changes_the_output(tmp_path):
    """TL's way to keep every token away from an expert: zero its column of
    hook_expert_weights, which top-k picks from. In block 0 no token then picks expert 0;
    the logits change at every token that picked it, and at none before the first one."""

    def no_expert_0(probs, hook):
        return probs * (torch.arange(probs.shape[-1]) != 0)

    assert_expert_0_kept_away(*source(tmp_path, "olmoe"), no_expert_0)


def assert_expert_0_kept_away(src, n_pos: int, no_expert_0) -> None:
    """`no_expert_0` on block 0's hook_expert_weights: no token picks expert 0, and the
    logits change at every token that picked it, and at none before the first one."""
    model = convert_in_memory(src)
    tokens = random_tokens(n_pos, batch=1)
    name = "blocks.0.mlp.hook_expert_indices"
    with torch.no_grad():
        clean, before = model.run_with_cache(tokens, names_filter=name)
        with model.hooks([("blocks.0.mlp.hook_expert_weights", no_expert_0)]):
            ablated, after = model.run_with_cache(tokens, names_filter=name)
    assert (after[name] != 0).all()
    uses_0 = (before[name] == 0).any(-1)  # [pos] (batch 1)
    changed = (ablated - clean).abs().amax(-1)[0] > 0
    first = int(uses_0.int().argmax())  # the first position block 0 routes to expert 0
    assert uses_0.any() and not changed[:first].any()  # causal: earlier positions untouched
    assert changed[uses_0].all()


@needs_tl
@pytest.mark.parametrize(
    "case", ["mixtral-window-8", "olmoe", "olmoe-norm-topk", "qwen3-moe-sliding"]
)
def test_hooked_transformer_logits_equal_hf(tmp_path, case):
    from gqa_convert.interop import to_hooked_transformer

    src, n_pos = source(tmp_path, case)
    model = to_hooked_transformer(convert(src, tmp_path / "out"))
    assert type(model.blocks[0].mlp).__name__ == "MoE"
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        assert_logits_match(model(tokens), load_hf(src)(tokens).logits)


@needs_tl
def test_hooked_transformer_refuses_dense_layers_among_moe_layers(tmp_path):
    from gqa_convert.interop import to_hooked_transformer

    src, _ = source(tmp_path, "qwen3-moe-dense-layer-1")
    with pytest.raises(UnsupportedModelError, match=r"dense MLP layers \[1\]"):
        to_hooked_transformer(convert(src, tmp_path / "out"))


# (case, mutation, where the gate must say the first divergence is)
MUTATIONS = {
    "two-experts-swapped": ("mixtral-window-8", M.experts_swapped(layer=1), (1, "mlp_out", 0)),
    "router-transposed": ("olmoe", M.router_transposed(layer=1), (1, "router")),
    "top-k-not-renormalised": ("mixtral-window-8", M.topk_not_renormalised(), (0, "mlp_out")),
    "expert-gate-and-in-exchanged": (
        "qwen3-moe-dense-layer-1",
        M.expert_gate_and_in_exchanged(layer=2, expert=1),
        (2, "mlp_out", 1),
    ),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_an_moe_bug_fails_the_gate_where_it_is(tmp_path, name):
    case, mutation, where = MUTATIONS[name]
    layer = where[0]
    src, n_pos = source(tmp_path, case)
    report = verify(src, model=M.mutated_model(src, mutation), seq_len=n_pos)
    assert not report.passed
    assert report.first_divergence == divergence(where)
    if name == "router-transposed":  # the tokens go to other experts, and the gate says so
        assert report.routing_agreement_per_layer[1] < 1.0
        assert any(f.startswith("routing of MoE layer 1") for f in report.failures)
    else:  # the router of the broken layer, on the same input, routes as HF's
        assert report.routing_agreement_per_layer[layer] == 1.0


@pytest.mark.parametrize("case", ["mixtral-window-8", "qwen3-moe-dense-layer-1", "olmoe"])
def test_every_component_matches_on_a_correct_conversion(tmp_path, case):
    """The router's logits are a component of each MoE layer; on a correct conversion every
    component of every layer agrees."""
    model, errors = component_errors(*source(tmp_path, case))
    routers = {name for name in errors if name.startswith("router.")}
    assert routers == {f"router.{i}" for i in range(3) if model.cfg.is_moe_layer(i)}
    assert max(errors.values()) < 1e-5, errors


GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


@pytest.mark.exactness
@pytest.mark.parametrize("case", ["mixtral-window-8", "qwen3-moe-dense-layer-1", "olmoe"])
def test_bfloat16_follows_hf_rounding(tmp_path, case):
    """In bf16 a token's weighted expert outputs are summed as transformers' default experts
    forward sums them (in fp32 for Mixtral's fp32 weights, then cast): our logits are far
    closer to HF's bf16 ones than those are to fp32 (tests/numerics.py); summing them one
    index_add_ at a time in bf16 was 0.03-0.04 off on Mixtral (measured). Planted: the norm
    weight in the other dtype (0.7 to 1.2 of HF's own error, measured), and on Mixtral its
    fp32 expert weights cast to bf16 first (0.6)."""
    if case.startswith("mixtral") and not GROUPED_MM:
        pytest.skip(
            "torch without grouped_mm (2.6): transformers' experts forward takes its fallback, "
            "whose bf16 rounding ours does not follow; on this Mixtral 1 token in 384 then "
            "routes differently and the bf16 gate fails at block 2 (a known limitation)"
        )
    src, n_pos = source(tmp_path, case)
    cfg = convert_in_memory(src).cfg
    report = assert_follows_hf_rounding(
        src, n_pos, M.config_field("norm_weight_in_fp32", not cfg.norm_weight_in_fp32)
    )
    if cfg.moe.weights_in_fp32:
        bug = M.mutated_model(src, M.moe_field("weights_in_fp32", False))
        tokens = random_tokens(n_pos, batch=1)
        assert_misplaced_cast(rounding_ratios(src, tokens, torch.bfloat16, bug))
    # Routing in bf16 is reported, not gated: a token whose k-th and (k+1)-th experts are
    # within one bf16 rounding of each other may go either way on another CPU's kernels.
    # Measured 1.0 on this model under three CPU capabilities; 0.95 leaves room for such a
    # near-tie and still fails a router that is wrong (a transposed one: 0.63-0.67, measured).
    assert report.routing_agreement >= 0.95


def fused_checkpoint(folder, family, **overrides):
    """A checkpoint in transformers' in-memory layout: the state dict saved as is (experts
    stacked in experts.gate_up_proj / down_proj, Mixtral's router as mlp.gate)."""
    from safetensors.torch import save_file

    model = make_hf_model(family, **overrides)
    model.save_pretrained(folder)
    state = {n: t.contiguous() for n, t in model.state_dict().items()}
    assert any(n.endswith("experts.gate_up_proj") for n in state)
    save_file(state, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("case", ["mixtral-window-8", "qwen3-moe-dense-layer-1", "olmoe"])
def test_fused_experts_convert_too(tmp_path, case):
    """The stacked layout converts through the same gate (HF's reference loads it as is),
    our model equals HF's, and to-hf writes the Hub's per-expert layout, which HF reads
    back to the same model."""
    family, overrides, n_pos = CASES[case]
    src = fused_checkpoint(tmp_path / "src", family, **overrides)
    out = convert(src, tmp_path / "out", verify=True)
    report = json.loads((out / "conversion.json").read_text())["verification"]["report"]
    assert report["passed"] and report["routing_agreement"] == 1.0
    assert verify(src, seq_len=n_pos).passed  # ours as views of HF's stacked tensors
    from gqa_convert.inspection import inspect_checkpoint

    quirks = inspect_checkpoint(src)["quirks"]
    assert quirks["experts_stacked"] == "gate_up_proj, down_proj"
    ours, theirs = hf_and_ours(src, n_pos, lambda _: GQATransformer.from_pretrained(out))
    assert_logits_match(ours, theirs)
    back = export_to_hf(out, tmp_path / "back")
    assert any(".experts.3." in name for name in hf_tensors(back))
    assert not any(name.endswith("gate_up_proj") for name in hf_tensors(back))
    original, returned = load_hf(src).state_dict(), load_hf(back).state_dict()
    assert set(original) == set(returned)
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name


def test_clip_qkv_is_refused_naming_the_field():
    hf = make_hf_model("olmoe").config.to_dict() | {"architectures": ["OlmoeForCausalLM"]}
    with pytest.raises(UnsupportedModelError, match="clip_qkv"):
        from_hf({**hf, "clip_qkv": 8.0})


@pytest.mark.parametrize("case", ["mixtral-window-8", "qwen3-moe-dense-layer-1"])
def test_inspect_reports_total_and_active_parameters(tmp_path, case):
    """Active: every parameter but the (n_experts - top_k) / n_experts of each MoE layer's
    experts that a token skips, counted on HF's own modules."""
    from gqa_convert.inspection import inspect_checkpoint

    src, _ = source(tmp_path, case)
    hf = load_hf(src)
    info = inspect_checkpoint(src)
    total = sum(p.numel() for p in hf.parameters())
    skipped = 0
    for layer in hf.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            n, k = experts.num_experts, hf.config.num_experts_per_tok
            skipped += sum(p.numel() for p in experts.parameters()) * (n - k) // n
    assert info["parameters"] == total
    assert info["active_parameters_per_token"] == total - skipped < total
    assert "4 experts" in info["quirks"]["moe"]


def test_the_model_card_shows_the_experts_and_the_routing_agreement(tmp_path):
    src, _ = source(tmp_path, "qwen3-moe-dense-layer-1")
    card = (convert(src, tmp_path / "out") / "README.md").read_text()
    assert "| dense layers [1]: `blocks.{l}.mlp.W_gate`" in card
    assert (
        "`blocks.{l}.mlp.experts.{e}.W_gate`, `.W_in` / `.W_out` | `[64, 40]` / `[40, 64]`" in card
    )
    assert "| routing agreement (MoE) | 1 |" in card


# Every MoE family's router in a bf16 model as transformers 5.24 holds it. GLM-4.5, ERNIE 4.5
# MoE (`_keep_in_fp32_modules_strict`) and Hunyuan MoE (its nn.Linear made fp32) keep the
# router's weight and correction bias in fp32 and compute the logits from the input cast to
# fp32; Mixtral, Qwen3-MoE, OLMoE, gpt-oss and Llama 4 cast the router with the model and
# compute the logits in bf16 (softmax / sigmoid in fp32 after). Ours: `router_in_fp32`
# (configs/*.toml). family: (HF's router under the layer, the logits' index in its output).
ROUTERS = {
    "glm4_moe": ("mlp.gate", 0),
    "ernie4_5_moe": ("mlp.gate", 0),
    "hunyuan_v1_moe": ("mlp.gate", 0),
    "mixtral": ("mlp.gate", 0),
    "qwen3_moe": ("mlp.gate", 0),
    "olmoe": ("mlp.gate", 0),
    "gpt_oss": ("mlp.router", 0),
    "llama4_text": ("feed_forward.router", 1),  # Llama4Router: (scores, logits)
}
FP32_ROUTERS = ("glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe")


def bf16_routes(model, hf, path: str, at: int, n_tokens: int = 4096):
    """Our first MoE layer's router and HF's on the same bf16 input of `n_tokens` random
    rows: (our logits, HF's, our chosen experts sorted, HF's sorted, HF's router)."""
    layer = model.cfg.moe.layers.index(True)
    router, mlp = hf.model.layers[layer].get_submodule(path), model.blocks[layer].mlp
    x = torch.randn(1, n_tokens, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    seen = {}
    for name in ("hook_router_logits", "hook_expert_indices"):
        getattr(mlp, name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o))
    with torch.no_grad():
        mlp(x)
        out = router(x[0])
    theirs = out[at]
    chosen = out[2] if at == 0 else theirs.topk(model.cfg.moe.top_k, dim=-1).indices
    ours = seen["hook_router_logits"].reshape(theirs.shape)
    mine = seen["hook_expert_indices"].sort(-1).values
    return ours, theirs, mine, chosen.sort(-1).values, router


@pytest.mark.exactness
@pytest.mark.parametrize("family", ROUTERS)
def test_bfloat16_router_is_hfs_on_the_same_input(tmp_path, family):
    """In a bf16 model, on the same bf16 input, our router's logits equal HF's bit for bit and
    in HF's dtype (fp32 where HF keeps the router in fp32): the same F.linear on the same
    tensors; so the chosen experts are HF's (but at exact ties, which either topk may break
    its own way). Planted, the old cast: the fp32 routers' tensors rounded to bf16 (a model
    cast whole) move the logits, and on 4096 random rows choose other experts for tokens
    whose HF routing gap is clear (measured 11, 10, 7 tokens on GLM, ERNIE, Hunyuan)."""
    path, at = ROUTERS[family]
    src = make_hf_checkpoint(tmp_path / "src", family)
    hf = load_hf(src, torch.bfloat16)
    model = convert_in_memory(src).to(torch.bfloat16)
    ours, theirs, mine, chosen, router = bf16_routes(model, hf, path, at)
    fp32 = family in FP32_ROUTERS
    assert model.cfg.moe.router_in_fp32 == fp32
    assert theirs.dtype == (torch.float32 if fp32 else torch.bfloat16)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    gap = routing_gap(theirs, model.cfg.moe.top_k, router)
    assert (gap > 0).float().mean() > 0.9  # few exact ties: the comparison is not vacuous
    assert torch.equal(mine[gap > 0], chosen[gap > 0])
    if fp32:
        planted = M.mutated_model(src, M.router_rounded()).to(torch.bfloat16)
        ours, theirs, mine, chosen, router = bf16_routes(planted, hf, path, at)
        assert not torch.equal(ours, theirs)
        flipped = (mine != chosen).any(-1) & (gap > ROUTING_MARGIN)
        assert flipped.any(), "the planted rounding chose no other expert"


@pytest.mark.exactness
@pytest.mark.parametrize("family", FP32_ROUTERS)
def test_bfloat16_routing_agreement_with_an_fp32_router(tmp_path, family):
    """The bf16 gate on 256 positions (more tokens, more near-ties than the default prompt):
    every token of every MoE layer chooses HF's experts. Before the router stayed in fp32,
    ours rounded it to bf16 with the model: under ATEN_CPU_CAPABILITY avx512, GLM-4.5 then
    agreed on 0.990 and failed the gate (a logit 1.1 off), Hunyuan MoE on 0.9987, ERNIE 4.5
    MoE on 1.0. Whether a rounded router flips a whole model's choice depends on near-ties
    that another CPU's kernels move (GLM-4.5's agreed on 1.0 under `default`), so the planted
    rounding is asserted on the same input (test_bfloat16_router_is_hfs_on_the_same_input)."""
    src = make_hf_checkpoint(tmp_path / "src", family)
    report = verify(src, dtype="bfloat16", seq_len=256)
    assert report.passed, report.failures
    assert report.routing_agreement == 1.0


@pytest.mark.parametrize("family", FP32_ROUTERS)
def test_a_bfloat16_export_keeps_an_fp32_router(tmp_path, family):
    """An fp32 source exported in bf16 keeps the router's weight and correction bias F32
    (cfg.keeps_fp32), everything else BF16, and passes the bf16 gate: with the router
    rounded to bf16 the GLM-4.5 export failed it (KL 0.098, layer 1's mlp_out, measured)."""
    from gqa_convert.checkpoint import read_weights

    src = make_hf_checkpoint(tmp_path / "src", family)
    out = convert(src, tmp_path / "out", dtype="bfloat16", verify=True)
    codes = {name: info.dtype for name, info in read_weights(out).items()}
    routers = {n for n in codes if n.endswith((".mlp.W_gate", "e_score_correction_bias"))}
    routers = {n for n in routers if convert_in_memory(src).cfg.keeps_fp32(n)}
    assert routers and {codes[n] for n in routers} == {"F32"}
    assert {codes[n] for n in codes if n not in routers} == {"BF16"}
