"""The dense GQA families of 2026 (issue 26): Seed-OSS, InternLM3, Helium, ERNIE 4.5, OLMo 3,
EXAONE 4, Ministral, Ministral 3, GLM-4, StarCoder2, Apertus, Cohere, Cohere 2, Hunyuan dense,
Granite SWA. Tiny random HF models built by transformers' own classes (norms, biases, sinks
and xIELU parameters randomised so a dropped one shows; prompts longer than every window),
converted with the parity gate on, against transformers at 1e-4 on both attention paths;
the round trip; streamed = whole; the mutation of each new mechanism, localised; the config
read as transformers reads it; bf16; TransformerLens 3.9 where it can express the family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gqa_convert import GQATransformer, convert_in_memory
from gqa_convert.config import RopeConfig, from_hf
from gqa_convert.verify import verify
from tests import mutations as M
from tests.hf_models import make_hf_checkpoint, random_tokens
from tests.test_families import (
    DYNAMIC,
    GRANITE,
    assert_gate_and_round_trip,
    assert_hooked_transformer_equals_hf,
    assert_hooked_transformer_refuses,
    assert_localised,
    assert_streamed_equals_whole,
    component_errors,
)
from tests.test_interop import needs_tl
from tests.test_parity import LLAMA3_ROPE, assert_logits_match, hf_and_ours

YARN_FULL = {
    "rope_type": "yarn",
    "rope_theta": 10_000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
}
MINISTRAL3_YARN = {
    **YARN_FULL,
    "rope_theta": 1e6,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}


NTK_ALPHA = {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10_000.0}

# (HF config class key in tests/hf_models.py, overrides, prompt length)
CASES = {
    # Seed-OSS: q/k/v biases on by default, o_proj's under attention_out_bias, MLP biases.
    "seed_oss": ("seed_oss", {}, 40),
    "seed_oss-o-and-mlp-bias-tied-head_dim-12": (
        "seed_oss",
        # seed 2: a model whose greedy continuations are not one token repeated
        {
            "attention_out_bias": True,
            "mlp_bias": True,
            "tie_word_embeddings": True,
            "head_dim": 12,
            "seed": 2,
        },
        40,
    ),
    # InternLM3: the Hub's qkv_bias / bias spellings, every projection biased; dynamic rope.
    "internlm3": ("internlm3", {}, 40),
    "internlm3-biases": ("internlm3", {"qkv_bias": True, "bias": True}, 40),
    "internlm3-mqa-dynamic": (
        "internlm3",
        {"num_key_value_heads": 1, "rope_parameters": DYNAMIC, "max_position_embeddings": 24},
        40,
    ),
    # Helium: interleaved rotary, fp32 norm weights, q/k/v (never o) biases.
    "helium": ("helium", {}, 40),
    "helium-qkv-bias-mha": ("helium", {"attention_bias": True, "num_key_value_heads": 8}, 40),
    # ERNIE 4.5: interleaved rotary in fp32, all projections biased by use_bias, tied.
    "ernie4_5-tied": ("ernie4_5", {}, 40),
    "ernie4_5-use-bias-untied-head_dim-12": (
        "ernie4_5",
        {"use_bias": True, "tie_word_embeddings": False, "head_dim": 12},
        40,
    ),
    # OLMo 3: OLMo2's block, three local layers to one global, a rotary per layer type.
    "olmo3-window-3-to-1": ("olmo3", {"sliding_window": 8, "num_hidden_layers": 4}, 40),
    "olmo3-rope-per-layer-type": (
        "olmo3",
        {
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": YARN_FULL,
            },
            "max_position_embeddings": 64,
        },
        40,
    ),
    # EXAONE 4: post-norms, q/k norm per head, no rotary on global layers when windowed.
    "exaone4-nope-global": ("exaone4", {"sliding_window": 8, "sliding_window_pattern": 2}, 40),
    "exaone4-no-window-mha": (
        "exaone4",
        {"sliding_window": None, "layer_types": ["full_attention"] * 3, "num_key_value_heads": 8},
        40,
    ),
    # Ministral: windows on the layers layer_types names; Ministral 3: yarn and the query
    # scale past original_max_position_embeddings (16 < 40).
    "ministral-layer-types": (
        "ministral",
        {
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"] * 1 + ["sliding_attention"],
        },
        40,
    ),
    "ministral-mqa-window": ("ministral", {"sliding_window": 6, "num_key_value_heads": 1}, 40),
    "ministral3-query-scale": (
        "ministral3",
        {"rope_parameters": MINISTRAL3_YARN, "max_position_embeddings": 64},
        40,
    ),
    "ministral3-window-tied": (
        "ministral3",
        {
            "rope_parameters": MINISTRAL3_YARN,
            "max_position_embeddings": 64,
            "sliding_window": 8,
            "tie_word_embeddings": True,
        },
        40,
    ),
    # GLM-4: sandwich norms, interleaved rotary on half of each head, q/k/v biases, fused
    # gate_up_proj.
    "glm4": ("glm4", {}, 40),
    "glm4-full-rotary-no-bias-tied-mqa": (
        "glm4",
        {
            "partial_rotary_factor": 1.0,
            "attention_bias": False,
            "tie_word_embeddings": True,
            "num_key_value_heads": 1,
        },
        40,
    ),
    # StarCoder2: LayerNorm with bias, ungated tanh-GELU MLP, biases everywhere, window.
    # (seeds: models whose greedy continuations are not one or two tokens repeated)
    "starcoder2-window": ("starcoder2", {"sliding_window": 8, "seed": 7}, 40),
    "starcoder2-no-bias-untied": (
        "starcoder2",
        {"use_bias": False, "tie_word_embeddings": False},
        40,
    ),
    # Apertus: renamed pre-norms, q/k norm, ungated xIELU MLP with learned parameters, llama3
    # rope past its original length (16 < 40).
    "apertus-xielu-llama3": (
        "apertus",
        {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 64},
        40,
    ),
    "apertus-gelu-attention-bias": (
        "apertus",
        {
            "attention_bias": True,
            "hidden_act": "gelu_pytorch_tanh",
            "rope_parameters": LLAMA3_ROPE,
            "seed": 7,
        },
        40,
    ),
    # Cohere: parallel block, LayerNorms in fp32, interleaved rotary in fp32, logit scale;
    # Command R+'s q/k LayerNorms with a weight per head.
    "cohere-tied": ("cohere", {}, 40),
    "cohere-qk-norm-biases-untied": (
        "cohere",
        {
            "use_qk_norm": True,
            "attention_bias": True,
            "tie_word_embeddings": False,
            "logit_scale": 0.5,
        },
        40,
    ),
    # Cohere 2: windows 3:1 (by its pattern, or layer_types), global layers without rotary.
    "cohere2-nope-global": ("cohere2", {"sliding_window": 8, "num_hidden_layers": 4}, 40),
    "cohere2-layer-types-biases": (
        "cohere2",
        {
            "sliding_window": 8,
            "attention_bias": True,
            "logit_scale": 1.0,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "seed": 3,
        },
        40,
    ),
    # Hunyuan: q/k norms after rotary; the Hub's "dynamic" rope with alpha (fixed NTK).
    "hunyuan": ("hunyuan_v1_dense", {}, 40),
    "hunyuan-ntk-alpha-mqa": (
        "hunyuan_v1_dense",
        {"rope_parameters": NTK_ALPHA, "num_key_value_heads": 1},
        40,
    ),
    # Granite SWA: Granite's multipliers, sinks, every 4th layer global from layer 0, a
    # theta per layer (0: no rotary).
    "granite_swa-sinks": (
        "granite_swa",
        {"sliding_window": 8, "num_hidden_layers": 4, **GRANITE, "seed": 2},
        40,
    ),
    "granite_swa-rope-thetas-nope-untied": (
        "granite_swa",
        {"sliding_window": 8, "layer_rope_theta": [1e4, 0, 100.0], "tie_word_embeddings": False},
        40,
    ),
}


def source(tmp_path, case):
    family, overrides, n_pos = CASES[case]
    return make_hf_checkpoint(tmp_path / "src", family, **overrides), n_pos


@pytest.mark.parametrize("path", ["sdpa", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hf(tmp_path, case, path):
    src, n_pos = source(tmp_path, case)
    ours, theirs = hf_and_ours(src, n_pos, use_fast_path=path == "sdpa")
    assert_logits_match(ours, theirs)


@pytest.mark.parametrize("case", CASES)
def test_convert_with_the_gate_then_load_and_round_trip(tmp_path, case):
    """The default gate passes, the export reproduces HF, and to-hf gives the source's bytes."""
    assert_gate_and_round_trip(tmp_path, *source(tmp_path, case))


@pytest.mark.parametrize("case", CASES)
def test_every_component_matches_on_a_correct_conversion(tmp_path, case):
    """The gate's localisation reads each family's own points (its norm names, q/k norms
    before or after rotary, no rot_q / rot_k where HF rotates nothing): on a correct
    conversion all of them agree."""
    model, errors = component_errors(*source(tmp_path, case))
    names = {name.rsplit(".", 1)[0] for name in errors}
    expected = {"ln1", "q", "k", "v", "attn_out", "mlp_out", "resid_post"}
    if any(model.cfg.rope_layers):
        expected |= {"rot_q", "rot_k"}
    if not model.cfg.parallel_attn_mlp:
        expected.add("ln2")
    if model.cfg.norm_placement == "sandwich":
        expected |= {"ln1_post", "ln2_post"}
    if model.cfg.qk_norm:
        expected |= {"q_norm", "k_norm"}
    assert expected <= names, names
    assert max(errors.values()) < 1e-5, errors


# (case, mutation, where the gate must say the first divergence is): one per new mechanism.
MUTATIONS = {
    "seed_oss-o-bias-unread": (
        "seed_oss-o-and-mlp-bias-tied-head_dim-12",
        M.tensor_zeroed("blocks.1.attn.b_O"),
        (1, "attn_out"),
    ),
    "seed_oss-mlp-bias-unread": (
        "seed_oss-o-and-mlp-bias-tied-head_dim-12",
        M.tensor_zeroed("blocks.1.mlp.b_gate"),
        (1, "mlp_out"),
    ),
    "internlm3-qkv_bias-spelling-unread": (
        "internlm3-biases",
        M.tensor_zeroed("blocks.0.attn._b_K"),
        (0, "k"),
    ),
    "helium-interleaved-rotary-as-rotate-half": (
        "helium",
        M.config_field("rotary_adjacent_pairs", False),
        (0, "rot_q"),
    ),
    "ernie4_5-mlp-bias-unread": (
        "ernie4_5-use-bias-untied-head_dim-12",
        M.tensor_zeroed("blocks.2.mlp.b_out"),
        (2, "mlp_out"),
    ),
    "olmo3-local-rope-on-global-layer": (
        "olmo3-rope-per-layer-type",
        M.local_rope_on_global_layers(),
        (1, "rot_q"),
    ),
    "olmo3-window-ignored": ("olmo3-window-3-to-1", M.sliding_window_ignored(), (0, "attn_out")),
    "exaone4-rotary-on-a-nope-global-layer": (
        "exaone4-nope-global",
        M.config_field("rope_layers", (True, True, True)),
        (1, "rot_q"),
    ),
    "exaone4-q-norm-dropped": (
        "exaone4-nope-global",
        M.norm_to_ones("blocks.0.attn.q_norm.w"),
        (0, "q_norm"),
    ),
    "ministral-layer-types-unread": (
        "ministral-layer-types",
        M.config_field("attn_types", ("local", "local", "local")),
        (1, "attn_out"),
    ),
    "glm4-post-norms-missing": ("glm4", M.post_norms_dropped(), (0, "ln1_post")),
    "glm4-interleaved-partial-rotary-as-rotate-half": (
        "glm4",
        M.config_field("rotary_adjacent_pairs", False),
        (0, "rot_q"),
    ),
    "starcoder2-layernorm-bias-unread": (
        "starcoder2-window",
        M.tensor_zeroed("blocks.1.ln2.b"),
        (1, "ln2"),
    ),
    "starcoder2-ungated-mlp-bias-unread": (
        "starcoder2-window",
        M.tensor_zeroed("blocks.0.mlp.b_in"),
        (0, "mlp_out"),
    ),
    "apertus-renamed-norm-unread": (
        "apertus-xielu-llama3",
        M.norm_to_ones("blocks.1.ln2.w"),
        (1, "ln2"),
    ),
    "apertus-xielu-parameter-unread": (
        "apertus-xielu-llama3",
        M.tensor_zeroed("blocks.0.mlp.act_fn.alpha_n"),
        (0, "mlp_out"),
    ),
    "cohere-logit-scale-dropped": (
        "cohere-qk-norm-biases-untied",
        M.config_field("logit_scale", 1.0),
        (3, "final_logits"),
    ),
    "cohere-layernorm-as-rmsnorm": ("cohere-tied", M.config_field("norm_type", "rms"), (0, "ln1")),
    "cohere-parallel-block-as-serial": ("cohere-tied", M.parallel_block_as_serial(), (0, "ln2")),
    "cohere-interleaved-rotary-as-rotate-half": (
        "cohere-tied",
        M.config_field("rotary_adjacent_pairs", False),
        (0, "rot_q"),
    ),
    "cohere-per-head-k-norm-dropped": (
        "cohere-qk-norm-biases-untied",
        M.norm_to_ones("blocks.0.attn.k_norm.w"),
        (0, "k_norm"),
    ),
    "cohere2-rotary-on-a-nope-global-layer": (
        "cohere2-nope-global",
        M.config_field("rope_layers", (True,) * 4),
        (3, "rot_q"),
    ),
    "hunyuan-qk-norm-before-rotary": (
        "hunyuan",
        M.config_field("qk_norm_after_rotary", False),
        (0, "q_norm"),
    ),
    "hunyuan-ntk-alpha-ignored": (
        "hunyuan-ntk-alpha-mqa",
        M.config_field("rope", RopeConfig(theta=10_000.0)),
        (0, "rot_q"),
    ),
    "granite_swa-sink-unread": (
        "granite_swa-sinks",
        M.tensor_zeroed("blocks.1.attn.sinks"),
        (1, "attn_out"),
    ),
    "granite_swa-layer-theta-ignored": (
        "granite_swa-rope-thetas-nope-untied",
        M.config_field("rope_thetas", ()),
        (2, "rot_q"),
    ),
    "granite_swa-global-layers-shifted": (
        "granite_swa-rope-thetas-nope-untied",
        M.attn_types_shifted(),
        (0, "attn_out"),
    ),
    "ministral3-query-scale-dropped": (
        "ministral3-query-scale",
        M.config_field("query_scale_beta", None),
        (0, "attn_out"),
    ),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_family_bug_fails_the_gate_where_it_is(tmp_path, name):
    case, mutation, where = MUTATIONS[name]
    assert_localised(source(tmp_path, case)[0], mutation, CASES[case][2], where)


# One case per family: the streamed HF side (its layers one at a time, masks and rotary
# per layer from its own forward) gives the whole model's report, on SRC's mapping and on
# an export's files.
STREAMED = [
    "seed_oss",
    "internlm3-biases",
    "helium",
    "ernie4_5-use-bias-untied-head_dim-12",
    "olmo3-rope-per-layer-type",
    "exaone4-nope-global",
    "ministral-layer-types",
    "ministral3-window-tied",
    "glm4",
    "starcoder2-window",
    "apertus-xielu-llama3",
    "cohere-qk-norm-biases-untied",
    "cohere2-nope-global",
    "hunyuan-ntk-alpha-mqa",
    "granite_swa-rope-thetas-nope-untied",
]


@pytest.mark.parametrize("case", STREAMED)
def test_streamed_and_whole_model_reports_agree(tmp_path, case):
    assert_streamed_equals_whole(tmp_path, *source(tmp_path, case))


@pytest.mark.exactness  # bf16: rerun under every CPU capability (scripts/cpu_matrix.sh)
@pytest.mark.parametrize("case", STREAMED)
def test_bfloat16_source_passes_the_gate(tmp_path, case):
    """A bf16 source verified in bf16 passes at the bf16 tolerances (README); each case's
    max logit difference is reported by the gate, and none reaches the tolerance."""
    family, overrides, n_pos = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, dtype=torch.bfloat16, **overrides)
    report = verify(src, dtype="bfloat16", seq_len=n_pos)
    assert report.passed, report.failures


BASE = {
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "intermediate_size": 96,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}

# (model_type, config.json fields beyond BASE): defaults and spellings each class reads.
CONFIG_VARIANTS = [
    ("seed_oss", {}),  # head_dim 128, q/k/v biases, no o bias: the class's defaults
    ("seed_oss", {"head_dim": None, "attention_out_bias": True, "mlp_bias": True}),
    ("internlm3", {}),
    ("internlm3", {"qkv_bias": True, "bias": True, "head_dim": 16}),
    ("helium", {"attention_bias": True}),  # theta 100000, head_dim 128
    ("ernie4_5", {}),  # theta 500000, tied, head_dim 128
    ("ernie4_5", {"use_bias": True, "tie_word_embeddings": False, "head_dim": 8}),
    ("olmo3", {}),  # 3:1 layers, window 4096, theta 500000 on both types
    ("olmo3", {"rope_theta": 1000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("exaone4", {}),  # every 4th layer global, without rotary
    ("exaone4", {"sliding_window": 16, "layer_types": ["full_attention"] * 4}),
    ("exaone4", {"sliding_window": None, "layer_types": ["full_attention"] * 4}),
    # MinistralConfig derives no head_dim (its model fails without one): stated.
    ("ministral", {"head_dim": 8}),  # window 4096 on every layer
    ("ministral", {"head_dim": 16, "layer_types": ["sliding_attention", "full_attention"] * 2}),
    ("ministral3", {}),  # yarn, head_dim 128, llama_4_scaling_beta 0.1: the class's rope
    ("ministral3", {"sliding_window": 16, "layer_types": ["full_attention"] * 4}),  # unread
    ("glm4", {}),  # rotary on half of each head of 128, q/k/v biases
    ("glm4", {"partial_rotary_factor": 0.25, "head_dim": 16, "attention_bias": False}),
    ("starcoder2", {}),  # use_bias, tied, no window
    ("starcoder2", {"use_bias": False, "sliding_window": 16}),
    ("apertus", {}),  # llama3 rope at theta 12e6, xIELU
    ("cohere", {}),  # theta 500000, tied, no q/k norms
    ("cohere", {"use_qk_norm": True, "attention_bias": True}),
    ("cohere2", {"head_dim": 16}),  # windows 3:1, rotary on local layers only
    ("cohere2", {"sliding_window_pattern": 2}),
    (
        "hunyuan_v1_dense",
        {"head_dim": 8, "rope_scaling": {"type": "dynamic", "alpha": 50.0, "factor": 1.0}},
    ),
    ("granite_swa", {}),  # window 128, layers 0 (and 4...) global, tied
    ("granite_swa", {"layer_rope_theta": [1e4, 0, 5e5, 0]}),
]


# Models whose mask is one for every layer, by config.sliding_window (Ministral3Model,
# Starcoder2Model: create_sliding_window_causal_mask when it is set), whatever layer_types
# the config holds.
UNIFORM_WINDOW = {"ministral3", "starcoder2"}


@pytest.mark.parametrize(("model_type", "extra"), CONFIG_VARIANTS)
def test_config_reads_as_transformers_does(model_type, extra):
    """Defaults and spellings as the config classes and models read them: head_dim, the
    biases each projection has, tied embeddings, each layer's type and rotary."""
    hf = {"model_type": model_type, **BASE, **extra}
    theirs = AutoConfig.for_model(model_type, **{k: v for k, v in hf.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(theirs)
    cfg = from_hf(hf)
    ours = rotary_of(cfg)
    layer = model.model.layers[0]
    attn = layer.self_attn
    assert cfg.d_head == attn.head_dim
    assert cfg.qkv_bias == (attn.q_proj.bias is not None)
    assert cfg.o_bias == (attn.o_proj.bias is not None)
    assert cfg.mlp_bias == any(p.endswith("bias") for p, _ in layer.mlp.named_parameters())
    assert cfg.tie_word_embeddings == theirs.tie_word_embeddings
    hf_types = getattr(theirs, "layer_types", None) or ["full_attention"] * cfg.n_layers
    if model_type in UNIFORM_WINDOW:  # the model masks every layer alike, layer_types unread
        window = theirs.sliding_window is not None
        hf_types = ["sliding_attention" if window else "full_attention"] * cfg.n_layers
    assert list(cfg.attn_types) == [
        {"full_attention": "global", "sliding_attention": "local"}[t] for t in hf_types
    ]
    # Each layer's rotary frequencies are HF's (those its rotary embedding computes).
    rotary = model.model.rotary_emb
    positions = torch.arange(7)[None]
    for i in range(cfg.n_layers):
        if not cfg.rope_layers[i]:
            continue
        layer_rotary = rotary
        if hasattr(model.model, "rotary_embs"):  # Granite SWA: one per layer theta
            theta = theirs.layer_rope_theta[i]
            layer_rotary = next(
                e
                for e in model.model.rotary_embs
                if e.config.rope_parameters["rope_theta"] == theta
            )
        args = (hf_types[i],) if isinstance(rotary.rope_type, dict) else ()  # per layer type
        cos, _ = layer_rotary(torch.zeros(1, dtype=torch.float32), positions, *args)
        ours_cos, _ = ours.rotary(7, torch.float32, torch.device("cpu"), layer=i)
        hf_cos = cos[0]
        interleaved = torch.equal(hf_cos[..., 0::2], hf_cos[..., 1::2])  # Cohere's own table
        if cfg.rotary_adjacent_pairs and not interleaved:  # HF interleaves it when rotating
            hf_cos = hf_cos[..., : hf_cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
        torch.testing.assert_close(ours_cos, hf_cos, atol=1e-6, rtol=0)


def rotary_of(cfg):
    """Our model of `cfg` on the meta device, with its rotary frequencies (real tensors)."""
    with torch.device("meta"):
        model = GQATransformer(cfg)
    model.reset_rotary()
    return model


TL_CASES = [
    *("seed_oss", "internlm3", "helium", "helium-qkv-bias-mha", "ernie4_5-tied"),
    *("olmo3-window-3-to-1", "olmo3-rope-per-layer-type", "ministral-layer-types"),
    "ministral-mqa-window",
    *("glm4", "glm4-full-rotary-no-bias-tied-mqa", "starcoder2-window"),
    *("starcoder2-no-bias-untied", "apertus-xielu-llama3", "apertus-gelu-attention-bias"),
]
TL_REFUSED = {
    "cohere-tied": "logit_scale",
    "cohere-qk-norm-biases-untied": "qk_norm",
    "cohere2-layer-types-biases": "parallel_attn_mlp",
    "hunyuan": "qk_norm_after_rotary",
    "granite_swa-sinks": "attn_sinks",
    "exaone4-nope-global": "norm_placement",
    "ministral3-query-scale": "query_scale_beta",
    "internlm3-mqa-dynamic": "dynamic",
    "seed_oss-o-and-mlp-bias-tied-head_dim-12": "mlp_bias",
    "internlm3-biases": "mlp_bias",
    "ernie4_5-use-bias-untied-head_dim-12": "mlp_bias",
}


@needs_tl
@pytest.mark.parametrize("case", TL_CASES)
def test_hooked_transformer_logits_equal_hf(tmp_path, case):
    assert_hooked_transformer_equals_hf(tmp_path, *source(tmp_path, case))


@needs_tl
@pytest.mark.parametrize("case", TL_REFUSED)
def test_hooked_transformer_refuses_what_tl_lacks(tmp_path, case):
    assert_hooked_transformer_refuses(tmp_path, source(tmp_path, case)[0], TL_REFUSED[case])


def test_new_modules_carry_transformerlens_hooks(tmp_path):
    """LayerNorm's hook_scale (sqrt(var + eps)) and hook_normalized, the ungated MLP's hook_pre
    / hook_post (TL's names): cached without changing the logits; a scale returned by a hook
    is the one used."""
    src, n_pos = source(tmp_path, "starcoder2-window")
    model = convert_in_memory(src)
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        plain = model(tokens, use_fast_path=False)  # caching the pattern takes this path
        logits, cache = model.run_with_cache(tokens)
    # Hooked, the LayerNorm runs step by step (TL's way) where torch's fused layer_norm ran:
    # the same fp32 arithmetic in another order, a few ulp apart (1.4e-6 measured).
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    x = cache["blocks.1.hook_resid_mid"]
    var = x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(cache["blocks.1.ln2.hook_scale"], (var + model.cfg.eps).sqrt())
    normalized = (x - x.mean(-1, keepdim=True)) / (var + model.cfg.eps).sqrt()
    torch.testing.assert_close(cache["blocks.1.ln2.hook_normalized"], normalized)
    assert cache["blocks.0.mlp.hook_pre"].shape == (2, n_pos, model.cfg.d_mlp)
    gelu = torch.nn.functional.gelu(cache["blocks.0.mlp.hook_pre"], approximate="tanh")
    torch.testing.assert_close(cache["blocks.0.mlp.hook_post"], gelu)
    with torch.no_grad():
        doubled = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.ln2.hook_scale", lambda s, hook: 2 * s)]
        )
    assert (doubled - plain).abs().max() > 1e-3


def test_internlm3_is_read_by_its_model_type(tmp_path):
    """transformers saves an InternLM3 as LlamaForCausalLM with model_type internlm3: its
    config class (head_dim 128 by default, qkv_bias / bias) is InternLM3Config, and so is
    our family; the Hub's InternLM3ForCausalLM name maps to it too."""
    src, _ = source(tmp_path, "internlm3-biases")
    model = convert_in_memory(src)
    assert model.cfg.family == "internlm3" and model.cfg.architecture == "LlamaForCausalLM"
    hub = {"architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3", **BASE}
    assert from_hf(hub).family == "internlm3" and from_hf(hub).d_head == 128
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **BASE}
    assert from_hf(llama).family == "llama" and from_hf(llama).d_head == 8


# Each family's quirks as `inspect` names them (keys of its "quirks").
INSPECT_QUIRKS = {
    "seed_oss-o-and-mlp-bias-tied-head_dim-12": {"mlp_bias"},
    "internlm3-biases": {"mlp_bias"},
    "helium": {"rotary_adjacent_pairs", "norm_weight_in_fp32"},
    "ernie4_5-tied": {"rotary_adjacent_pairs", "rotary_in_fp32"},
    "olmo3-rope-per-layer-type": {"qk_norm", "norm_placement", "rope_local"},
    "exaone4-nope-global": {"qk_norm", "norm_placement", "no_rope_layers"},
    "ministral3-query-scale": {"query_scale"},
    "glm4": {"norm_placement", "rotary_adjacent_pairs", "rotary_dim", "fused", "o_bias"},
    "starcoder2-window": {"norm_type", "mlp", "mlp_bias", "act_fn"},
    "apertus-xielu-llama3": {"qk_norm", "mlp", "act_fn"},
    "cohere-qk-norm-biases-untied": {
        *("parallel_attn_mlp", "norm_type", "rotary_adjacent_pairs", "rotary_in_fp32"),
        *("logit_scale", "qk_norm"),
    },
    "cohere2-nope-global": {"parallel_attn_mlp", "no_rope_layers", "logit_scale"},
    "hunyuan-ntk-alpha-mqa": {"qk_norm"},
    "granite_swa-rope-thetas-nope-untied": {"attn_sinks", "rope_thetas", "no_rope_layers"},
}


@pytest.mark.parametrize("case", INSPECT_QUIRKS)
def test_inspect_names_the_quirks(tmp_path, case):
    from gqa_convert.inspection import inspect_checkpoint

    src, _ = source(tmp_path, case)
    info = inspect_checkpoint(src)
    assert INSPECT_QUIRKS[case] <= set(info["quirks"]), info["quirks"]
    if case.startswith("hunyuan"):
        assert info["rope"]["type"] == "ntk_alpha" and "after rotary" in info["quirks"]["qk_norm"]
