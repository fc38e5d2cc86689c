"""Mixtures of experts of 2026: GLM-4.5 / 4.6 (Glm4MoeForCausalLM): a sigmoid router whose
correction bias steers the choice only, grouped top-k, a routed scaling factor, a shared
expert, dense first layers; ERNIE 4.5 MoE (Ernie4_5_MoeForCausalLM): a softmax router with
a correction bias, shared experts, MoE layers by start / end / interval; Hunyuan MoE
(HunYuanMoEV1ForCausalLM): a shared MLP beside the routed experts. Tiny random HF
models converted with the parity gate on, against transformers' own classes at 1e-4, with
routing agreement 1.0; the mutations the gate must localise. And the models whose layers
are not GQA, refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    Glm4MoeLiteConfig,
    Mistral4Config,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
)

from gqa_convert import GQATransformer, convert, convert_in_memory
from gqa_convert.config import from_hf, load_hf_config
from gqa_convert.errors import UnsupportedModelError
from gqa_convert.inspection import inspect_checkpoint
from gqa_convert.model.moe import MoEMLP
from gqa_convert.verify import verify
from tests import mutations as M
from tests.cli_subprocess import run_cli
from tests.hf_models import load_hf, make_hf_checkpoint, make_hf_model, random_tokens
from tests.numerics import ROUTING_MARGIN, routing_gap
from tests.test_families import (
    assert_gate_and_round_trip,
    assert_localised,
    assert_streamed_equals_whole,
    component_errors,
)
from tests.test_interop import needs_tl
from tests.test_parity import assert_logits_match, hf_and_ours

# (family, overrides, prompt length). The default GLM case (tests/hf_models.py): 8 experts
# in 4 groups of 2, the best 2 groups eligible, 2 per token, weights renormalised then
# times 2.5, a random correction bias, one shared expert, layer 0 dense, q/k norms, q/k/v
# biases, rotary on half of each head.
CASES = {
    "glm4_moe": ("glm4_moe", {"attention_bias": True}, 40),
    # the switches off: no groups, no shared expert (zero-width tensors), no q/k norm, no
    # dense layer, weights not renormalised nor scaled, no biases, GQA 8:1 (MQA)
    "glm4_moe-plain": (
        "glm4_moe",
        {
            "n_group": 1,
            "topk_group": 1,
            "n_shared_experts": 0,
            "use_qk_norm": False,
            "first_k_dense_replace": 0,
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.0,
            "num_key_value_heads": 1,
        },
        40,
    ),
    # two dense layers first, two shared experts, top 3 in 2 of 4 groups, full rotary
    "glm4_moe-2-dense-2-shared": (
        "glm4_moe",
        {
            "num_hidden_layers": 4,
            "first_k_dense_replace": 2,
            "n_shared_experts": 2,
            "num_experts_per_tok": 3,
            "partial_rotary_factor": 1.0,
            "attention_bias": True,
        },
        40,
    ),
    # ERNIE 4.5 MoE (tests/hf_models.py): 8 experts, top 2, a shared expert, layer 0 dense
    "ernie4_5_moe": ("ernie4_5_moe", {}, 40),
    # MoE on layers 1 and 3 of 6 (interval 2, end 3: layer 5 would be one), no shared expert
    "ernie4_5_moe-interval-end": (
        "ernie4_5_moe",
        {
            "num_hidden_layers": 6,
            "moe_layer_interval": 2,
            "moe_layer_end_index": 3,
            "moe_num_shared_experts": 0,
        },
        40,
    ),
    # Hunyuan MoE (tests/hf_models.py): 4 experts, top 2, the shared MLP; q/k/v/o biases, MQA
    "hunyuan_v1_moe": ("hunyuan_v1_moe", {"attention_bias": True, "num_key_value_heads": 1}, 40),
    # moe_topk as a per-layer list, one entry per layer, all equal (Hunyuan-A13B's [8] * 32)
    "hunyuan_v1_moe-topk-list": ("hunyuan_v1_moe", {"moe_topk": [2, 2, 2]}, 40),
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
    to-hf writes the Hub's tensors back bit for bit (the correction bias, the shared expert's,
    zero-width ones included)."""
    src, n_pos = source(tmp_path, case)
    verification, original = assert_gate_and_round_trip(tmp_path, src, n_pos)
    report = verification["report"]
    assert report["passed"] and report["routing_agreement"] == 1.0
    cfg = load_hf_config(src)
    moe_layers = [i for i, moe in enumerate(cfg.moe.layers) if moe]
    assert sorted(int(i) for i in report["routing_agreement_per_layer"]) == moe_layers
    last = moe_layers[-1]
    assert cfg.moe.score_correction_bias == any(
        n.startswith(f"model.layers.{last}.") and "e_score" in n for n in original
    )
    shared = next(  # GLM's, ERNIE's shared_experts, Hunyuan's shared_mlp
        (
            t
            for n, t in original.items()
            if n.startswith(f"model.layers.{last}.mlp.shared_") and n.endswith("up_proj.weight")
        ),
        None,
    )
    if cfg.has_shared_expert:
        assert shared.shape == (cfg.moe.d_shared_expert, cfg.d_model)
    else:
        assert shared is None


@pytest.mark.parametrize("case", ["glm4_moe", "glm4_moe-2-dense-2-shared", "ernie4_5_moe"])
def test_streamed_equals_whole(tmp_path, case):
    assert_streamed_equals_whole(tmp_path, *source(tmp_path, case))


@pytest.mark.parametrize("topk", [[2, 3, 2], [2, 2]])
def test_a_per_layer_top_k_that_varies_is_refused(topk):
    """One top-k per model here: a list whose entries differ (transformers would route layer
    1 to 3 experts) or that does not name every layer is refused by name, not read as 2."""
    hf = make_hf_model("hunyuan_v1_moe").config.to_dict()
    with pytest.raises(UnsupportedModelError, match="moe_topk"):
        from_hf({**hf, "moe_topk": topk})


def test_each_layer_has_the_mlp_hf_has():
    """first_k_dense_replace picks the same dense layers as HF's, and the shared expert has
    HF's width (n_shared_experts * moe_intermediate_size)."""
    for first, shared in ((0, 1), (1, 2), (3, 0)):
        hf = make_hf_model(
            "glm4_moe", num_hidden_layers=4, first_k_dense_replace=first, n_shared_experts=shared
        )
        cfg = from_hf(hf.config.to_dict() | {"architectures": ["Glm4MoeForCausalLM"]})
        theirs = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
        assert list(cfg.moe.layers) == theirs == [i >= first for i in range(4)]
        model = GQATransformer(cfg)
        assert [isinstance(b.mlp, MoEMLP) for b in model.blocks] == theirs
        width = hf.model.layers[3].mlp.shared_experts.up_proj.out_features
        assert model.blocks[3].mlp.shared_expert.W_in.shape == (64, width) == (64, 32 * shared)


@pytest.mark.parametrize(
    "overrides",
    [
        {"moe_layer_start_index": 2, "moe_num_shared_experts": 2},
        {"moe_layer_interval": 2, "moe_layer_end_index": 2},
        {"moe_layer_start_index": 0, "moe_num_shared_experts": 0},
    ],
)
def test_ernie_layers_and_shared_expert_are_hfs(overrides):
    """moe_layer_start_index / end_index / interval pick HF's MoE layers; the shared expert
    is HF's (moe_num_shared_experts * moe_intermediate_size wide, none for 0)."""
    hf = make_hf_model("ernie4_5_moe", num_hidden_layers=5, **overrides)
    cfg = from_hf(hf.config.to_dict() | {"architectures": ["Ernie4_5_MoeForCausalLM"]})
    theirs = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert list(cfg.moe.layers) == theirs and any(theirs)
    i = theirs.index(True)
    shared = hf.model.layers[i].mlp.shared_experts
    model = GQATransformer(cfg)
    if shared is None:
        assert not hasattr(model.blocks[i].mlp, "shared_expert")
    else:
        width = shared.up_proj.out_features
        assert model.blocks[i].mlp.shared_expert.W_in.shape == (64, width)


def routes(model, tokens, **moe):
    """Each MoE layer's chosen experts (sorted per token) under `moe` (MoEConfig fields
    replaced), every layer run on the correct model's stream up to it."""
    from dataclasses import replace

    seen = {}
    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp, MoEMLP):
            block.mlp.moe = replace(block.mlp.moe, **moe)
            block.mlp.hook_expert_indices.register_forward_hook(
                lambda m, a, o, i=i: seen.__setitem__(i, o.sort(-1).values)
            )
    with torch.no_grad():
        model(tokens)
    return seen


@pytest.mark.parametrize("off", [{"n_group": 1, "topk_group": 1}, {"score_correction_bias": False}])
def test_the_groups_and_the_correction_bias_change_the_choice(tmp_path, off):
    """On the test checkpoint the grouping and the correction bias matter: without either,
    some tokens of every MoE layer choose other experts (so the gate's agreement of 1.0 and
    the mutations below test them)."""
    src, n_pos = source(tmp_path, "glm4_moe")
    tokens = random_tokens(n_pos)
    right, wrong = (routes(convert_in_memory(src), tokens, **kw) for kw in ({}, off))
    assert set(right) == {1, 2}
    for layer, chosen in right.items():
        differ = (chosen != wrong[layer]).any(-1).float().mean()
        assert 0 < differ < 1, (layer, float(differ))


ROUTING_HOOKS = (
    "hook_router_logits",
    "hook_expert_weights",
    "hook_expert_indices",
    "hook_topk_weights",
)


@pytest.mark.exactness
def test_on_the_same_input_routing_is_hfs(tmp_path):
    """On the same input, our router's logits equal HF's router's bit for bit (both the same
    fp32 F.linear), hook_expert_weights holds the sigmoid scores, and the chosen experts and
    their weights are HF's (HF's topk is unsorted: compared per expert)."""
    src, _ = source(tmp_path, "glm4_moe")
    hf, model = load_hf(src), convert_in_memory(src)
    mlp, gate = model.blocks[1].mlp, hf.model.layers[1].mlp.gate
    x = torch.randn(2, 40, 64)
    seen = {}
    for name in ROUTING_HOOKS:
        getattr(mlp, name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o))
    with torch.no_grad():
        mlp(x)
        logits, weights, indices = gate(x)
    assert torch.equal(seen["hook_router_logits"].reshape(-1, 8), logits)
    assert torch.equal(seen["hook_expert_weights"], logits.sigmoid())
    assert routing_gap((logits,), 2, gate).min() > ROUTING_MARGIN  # no near-tie to break
    order, theirs = seen["hook_expert_indices"].sort(-1), indices.sort(-1)
    assert torch.equal(order.values, theirs.values)
    ours_w = seen["hook_topk_weights"].gather(-1, order.indices)
    torch.testing.assert_close(ours_w, weights.gather(-1, theirs.indices), atol=1e-6, rtol=0)


def test_the_shared_expert_has_its_own_hooks(tmp_path):
    """shared_expert.hook_gate / hook_pre / hook_post / hook_out see every token (rows =
    batch * pos); zeroing its hook_out removes exactly its contribution (the layer's output
    is then the routed experts' sum alone, as with the shared expert dropped)."""
    src, n_pos = source(tmp_path, "glm4_moe")
    model = convert_in_memory(src)
    tokens = random_tokens(n_pos)
    names = [f"blocks.1.mlp.shared_expert.hook_{h}" for h in ("gate", "pre", "post", "out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[*names, "blocks.1.hook_mlp_out"])
        assert [tuple(cache[n].shape) for n in names] == [
            (2 * n_pos, 32),
            (2 * n_pos, 32),
            (2 * n_pos, 32),
            (2 * n_pos, 64),
        ]
        dropped = M.mutated_model(src, M.shared_expert_dropped())
        _, ref = dropped.run_with_cache(tokens, names_filter=["blocks.1.hook_mlp_out"])
        with model.hooks([(names[3], lambda out, hook: torch.zeros_like(out))]):
            _, ablated = model.run_with_cache(tokens, names_filter=["blocks.1.hook_mlp_out"])
    torch.testing.assert_close(ablated["blocks.1.hook_mlp_out"], ref["blocks.1.hook_mlp_out"])
    assert not torch.allclose(cache["blocks.1.hook_mlp_out"], ref["blocks.1.hook_mlp_out"])


# (case, mutation, where the gate must say the first divergence is)
MUTATIONS = {
    "shared-expert-dropped": ("glm4_moe", M.shared_expert_dropped(), (1, "mlp_out")),
    "correction-bias-ignored": (
        "glm4_moe",
        M.tensor_zeroed("blocks.1.mlp.e_score_correction_bias"),
        (1, "mlp_out"),
    ),
    "grouping-off": ("glm4_moe", M.moe_field("n_group", 1, topk_group=1), (1, "mlp_out")),
    "scaling-factor-off": ("glm4_moe", M.moe_field("routed_scaling_factor", 1.0), (1, "mlp_out")),
    "softmax-router": ("glm4_moe", M.moe_field("router", "softmax"), (1, "mlp_out")),
    "ernie-shared-expert-dropped": ("ernie4_5_moe", M.shared_expert_dropped(), (1, "mlp_out")),
    "hunyuan-shared-mlp-dropped": ("hunyuan_v1_moe", M.shared_expert_dropped(), (0, "mlp_out")),
    "ernie-correction-bias-ignored": (
        "ernie4_5_moe",
        M.tensor_zeroed("blocks.2.mlp.e_score_correction_bias"),
        (2, "mlp_out"),
    ),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_an_moe_bug_fails_the_gate_where_it_is(tmp_path, name):
    case, mutation, where = MUTATIONS[name]
    assert_localised(source(tmp_path, case)[0], mutation, 40, where)


def test_every_component_matches_on_a_correct_conversion(tmp_path):
    """The q/k norms, partial rotary and each MoE layer's router agree component by
    component; layer 0 (dense) has no router."""
    _, errors = component_errors(*source(tmp_path, "glm4_moe"))
    assert {name for name in errors if name.startswith("router.")} == {"router.1", "router.2"}
    assert {"q_norm.0", "k_norm.2", "rot_q.1"} <= set(errors)
    assert max(errors.values()) < 1e-5, errors


def test_multi_token_prediction_layers_are_dropped(tmp_path):
    """Published GLM-4.5 files hold a multi-token-prediction layer after the last
    (model.layers.{n_layers}.*), which transformers ignores: dropped by name, listed by
    inspect, and the conversion passes the gate."""
    from safetensors.torch import load_file

    src, n_pos = source(tmp_path, "glm4_moe")
    path = src / "model.safetensors"
    tensors = load_file(path)
    extra = {
        "model.layers.3.eh_proj.weight": torch.randn(64, 128),
        "model.layers.3.enorm.weight": torch.ones(64),
        "model.layers.3.mlp.gate.weight": torch.randn(8, 64),
    }
    save_file({**tensors, **extra}, path, metadata={"format": "pt"})
    assert sorted(inspect_checkpoint(src)["dropped_tensors"]) == sorted(extra)
    assert verify(src, seq_len=n_pos).passed


def test_inspect_reports_the_router_and_active_parameters(tmp_path):
    """Active parameters: the total less the routed experts a token skips (n_experts - top_k
    per MoE layer); the shared expert, router and correction bias are active."""
    src, _ = source(tmp_path, "glm4_moe")
    info = inspect_checkpoint(src)
    hf = load_hf(src)
    total = sum(p.numel() for p in hf.parameters()) + 2 * 8  # + the 2 correction biases
    assert info["parameters"] == total
    assert info["active_parameters_per_token"] == total - 2 * (8 - 2) * 3 * 64 * 32
    moe = info["quirks"]["moe"]
    for text in ("sigmoid router", "score correction bias", "top 2 of 4 groups", "x 2.5"):
        assert text in moe, moe
    assert "shared expert of width 32" in moe


# ---- models whose layers are not GQA ----------------------------------------------------

NOT_GQA = {
    "qwen3_5": (Qwen3_5Config, "Qwen3_5ForConditionalGeneration", "Gated DeltaNet"),
    "qwen3_5_text": (Qwen3_5TextConfig, "Qwen3_5ForCausalLM", "Gated DeltaNet"),
    "qwen3_5_moe": (Qwen3_5MoeConfig, "Qwen3_5MoeForConditionalGeneration", "Gated DeltaNet"),
    "qwen3_5_moe_text": (Qwen3_5MoeTextConfig, "Qwen3_5MoeForCausalLM", "Gated DeltaNet"),
    "qwen3_next": (Qwen3NextConfig, "Qwen3NextForCausalLM", "Gated DeltaNet"),
    "mistral4": (Mistral4Config, "Mistral4ForCausalLM", "multi-head latent attention"),
    "glm4_moe_lite": (Glm4MoeLiteConfig, "Glm4MoeLiteForCausalLM", "multi-head latent attention"),
}


def not_gqa_config(model_type: str, folder=None, architectures: bool = True) -> dict:
    """config.json as transformers' own config class writes it for `model_type`."""
    config_class, arch, _ = NOT_GQA[model_type]
    config = config_class()
    if architectures:
        config.architectures = [arch]
    if folder is not None:
        config.save_pretrained(folder)
        return json.loads((folder / "config.json").read_text())
    return config.to_dict()


@pytest.mark.parametrize("model_type", NOT_GQA)
@pytest.mark.parametrize("architectures", [True, False])
def test_models_without_gqa_layers_are_refused_with_the_reason(model_type, architectures):
    hf = not_gqa_config(model_type, architectures=architectures)
    assert hf["model_type"] == model_type
    with pytest.raises(UnsupportedModelError) as info:
        from_hf(hf)
    message = str(info.value)
    assert "\n" not in message and NOT_GQA[model_type][2] in message
    assert "not GQA" in message and "unsupported architecture" not in message


@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "mistral4"])
def test_the_cli_refuses_them_in_one_line_with_exit_4(tmp_path, model_type):
    """`inspect` and `convert` exit with UnsupportedModelError's code (4, README) and one
    line that says why, from config.json (the weights are never read); nothing is
    written."""
    src = tmp_path / "src"
    not_gqa_config(model_type, src)
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, src / "model.safetensors")
    for args in (("inspect", src), ("convert", src, tmp_path / "out")):
        run = run_cli(*args)
        assert run.code == UnsupportedModelError.exit_code == 4, run.stderr
        assert "Traceback" not in run.stderr
        assert run.stderr.strip().count("\n") == 0, run.stderr
        assert NOT_GQA[model_type][2] in run.message and "not GQA" in run.message
    assert not (tmp_path / "out").exists()


@needs_tl
@pytest.mark.parametrize("case", ["glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe"])
def test_hooked_transformer_refuses_what_tls_moe_lacks(tmp_path, case):
    """TL 3.9's MoE has a softmax router's top-k only: the sigmoid router, correction bias,
    groups, scaling and shared expert are refused by name, not converted to wrong logits."""
    from gqa_convert.interop import to_hooked_transformer

    src, _ = source(tmp_path, case)
    expected = {
        "glm4_moe": ("a sigmoid router", "e_score_correction_bias", "grouped top-k", "2.5"),
        "ernie4_5_moe": ("e_score_correction_bias", "a shared expert"),
        "hunyuan_v1_moe": ("a shared expert",),
    }[case]
    with pytest.raises(UnsupportedModelError) as info:
        to_hooked_transformer(convert(src, tmp_path / "out", verify=False))
    assert all(what in str(info.value) for what in expected), str(info.value)
