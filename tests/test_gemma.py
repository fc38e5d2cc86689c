"""Gemma, Gemma 2 and Gemma 3 (text): tiny random HF models with randomised norms, prompts
longer than the sliding window, soft-caps small enough to bind (attention 5, final 3),
converted with the parity gate on, against transformers' own classes at 1e-4; the round
trip; the mutations each must catch where they are; bf16; TransformerLens 3.9."""

from __future__ import annotations

import json

import pytest
import torch

from gqa_convert import GQATransformer, convert, convert_in_memory
from gqa_convert.config import from_hf, load_hf_config
from gqa_convert.errors import UnsupportedModelError
from gqa_convert.verify import verify
from tests import mutations as M
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens
from tests.numerics import assert_follows_hf_rounding
from tests.test_families import (
    assert_gate_and_round_trip,
    assert_streamed_equals_whole,
    component_errors,
)
from tests.test_interop import needs_tl
from tests.test_parity import assert_logits_match, hf_and_ours

WINDOW = 8
# Gemma 2: caps that bind, a score scale that is not d_head's (8), a window the prompts cross.
GEMMA2 = {
    "sliding_window": WINDOW,
    "attn_logit_softcapping": 5.0,
    "final_logit_softcapping": 3.0,
    "query_pre_attn_scalar": 12,
}
# Gemma 3: two local layers then a global one; each layer type its own rotary (local theta
# 100, global theta 10000 with linear scaling by 4).
GEMMA3 = {
    "sliding_window": WINDOW,
    "query_pre_attn_scalar": 12,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
    },
}

# (HF config class key in tests/hf_models.py, overrides, prompt length)
CASES = {
    "gemma-mqa-tied": ("gemma", {"num_key_value_heads": 1}, 40),
    "gemma-untied": ("gemma", {"tie_word_embeddings": False}, 40),
    "gemma2": ("gemma2", GEMMA2, 40),
    "gemma2-mha": ("gemma2", {**GEMMA2, "num_key_value_heads": 8}, 40),
    "gemma3": ("gemma3_text", GEMMA3, 40),
    "gemma3-final-cap": ("gemma3_text", {**GEMMA3, "final_logit_softcapping": 3.0}, 40),
}


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
    """The default gate passes, the export reproduces HF, and to-hf gives the source's bytes."""
    assert_gate_and_round_trip(tmp_path, *source(tmp_path, case))


def test_norm_weights_are_stored_as_hf_stores_them(tmp_path):
    """The export holds HF's raw w (the offset lives in our norm), so a bf16 source's
    norm bytes survive: storing 1 + w would round."""
    src = make_hf_checkpoint(tmp_path / "src", "gemma2", dtype=torch.bfloat16, **GEMMA2)
    model = convert_in_memory(src)
    hf = load_hf(src, torch.bfloat16)
    layer = hf.model.layers[1]
    pairs = {
        "ln1": layer.input_layernorm,
        "ln1_post": layer.post_attention_layernorm,
        "ln2": layer.pre_feedforward_layernorm,
        "ln2_post": layer.post_feedforward_layernorm,
    }
    for name, norm in pairs.items():
        assert torch.equal(getattr(model.blocks[1], name).w, norm.weight), name
    assert not torch.equal(
        (1 + layer.input_layernorm.weight.float()).bfloat16().float() - 1,
        layer.input_layernorm.weight.float(),
    )


# (case, mutation, where the gate must say the first divergence is)
MUTATIONS = {
    "gemma-norm-offset-dropped": (
        "gemma-mqa-tied",
        M.config_field("norm_offset", 0.0),
        (0, "ln1"),
    ),
    "gemma-embedding-scale-missing": (
        "gemma-mqa-tied",
        M.config_field("embedding_multiplier", 1.0),
        (-1, "embed"),
    ),
    "gemma2-attention-soft-cap-dropped": (
        "gemma2",
        M.config_field("attn_logit_softcap", None),
        (0, "attn_out"),
    ),
    "gemma2-final-soft-cap-dropped": (
        "gemma2",
        M.config_field("final_logit_softcap", None),
        (3, "final_logits"),
    ),
    "gemma2-post-norms-missing": ("gemma2", M.post_norms_dropped(), (0, "ln1_post")),
    "gemma2-score-scale-d_head": (
        "gemma2",
        M.config_field("query_pre_attn_scalar", None),
        (0, "attn_out"),
    ),
    "gemma2-local-global-shifted": ("gemma2", M.attn_types_shifted(), (1, "attn_out")),
    # Gemma 3: a layer's type also picks its rotary, which is where it first shows.
    "gemma3-local-global-shifted": ("gemma3", M.attn_types_shifted(), (0, "rot_q")),
    "gemma3-local-rope-on-global-layer": ("gemma3", M.local_rope_on_global_layers(), (2, "rot_q")),
    "gemma3-q-norm-offset-dropped": (
        "gemma3",
        M.config_field("norm_offset", 0.0),
        (0, "ln1"),
    ),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_gemma_bug_fails_the_gate_where_it_is(tmp_path, name):
    case, mutation, (layer, component) = MUTATIONS[name]
    src, n_pos = source(tmp_path, case)
    report = verify(src, model=M.mutated_model(src, mutation), seq_len=n_pos)
    assert not report.passed
    assert report.first_divergence == {"layer": layer, "component": component}


@pytest.mark.parametrize("case", ["gemma-mqa-tied", "gemma2", "gemma3"])
def test_every_component_matches_on_a_correct_conversion(tmp_path, case):
    """The gate's localisation reads Gemma's own points (four norms per block, q_norm /
    k_norm after the head transpose in Gemma 3, per-layer-type rotary): on a correct
    conversion all of them agree."""
    model, errors = component_errors(*source(tmp_path, case))
    names = {name.rsplit(".", 1)[0] for name in errors}
    expected = {"ln1", "q", "k", "v", "rot_q", "rot_k", "attn_out", "ln2", "mlp_out"}
    if model.cfg.norm_placement == "sandwich":
        expected |= {"ln1_post", "ln2_post"}
    if model.cfg.qk_norm:
        expected |= {"q_norm", "k_norm"}
    assert expected <= names, names
    assert max(errors.values()) < 1e-5, errors


def test_soft_caps_bind(tmp_path):
    """The caps of the tests change HF's own output (so a dropped cap shows)."""
    src, n_pos = source(tmp_path, "gemma2")
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        capped = load_hf(src)(tokens).logits
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            hf = load_hf(src)
            setattr(hf.config, field, None)
            for layer in hf.model.layers:
                layer.self_attn.attn_logit_softcapping = hf.config.attn_logit_softcapping
            assert (hf(tokens).logits - capped).abs().max() > 1e-2, field


def test_gemma2_reference_is_eager(tmp_path):
    """The gate's reference runs Gemma 2 with eager attention, the only one of transformers'
    that soft-caps the scores (5.24 picks it by itself; 5.9 would pick SDPA, which drops the
    cap), and says so."""
    src, n_pos = source(tmp_path, "gemma2")
    report = verify(src, seq_len=n_pos)
    assert report.passed and report.reference["attn_implementation"] == "eager"
    assert report.regimes["sliding_window"] == {"size": WINDOW, "exercised": True}


@pytest.mark.exactness
@pytest.mark.parametrize("case", ["gemma-mqa-tied", "gemma2", "gemma3"])
def test_bfloat16_follows_hf_rounding(tmp_path, case):
    """On a bf16 source in bf16, our casts are HF's: sqrt(d_model) rounded to bf16 before
    the product, the (1 + w) norms scaled in fp32, then cast. Our logits are much closer
    to HF's bf16 ones than those are to fp32 (tests/numerics.py says why that is the test
    that holds on every CPU: the last bits of a matmul depend on the kernel), on both
    attention paths; the gate passes at its bf16 tolerance."""
    family, overrides, n_pos = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, dtype=torch.bfloat16, **overrides)
    # Planted: the scale multiplied as a Python float (Granite's way), 1.2 of HF's own error
    # against fp32 (measured).
    assert_follows_hf_rounding(src, n_pos, M.config_field("embedding_multiplier_in_dtype", False))


def test_gemma3_legacy_rope_and_pattern_spelling(tmp_path):
    """Hub configs written before transformers 5: rope_theta + rope_scaling (global),
    rope_local_base_freq (local), sliding_window_pattern instead of layer_types."""
    src, n_pos = source(tmp_path, "gemma3")
    modern = load_hf_config(src)
    path = src / "config.json"
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters")
    config.pop("layer_types")
    config["sliding_window_pattern"] = 3
    config["rope_theta"] = params["full_attention"]["rope_theta"]
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    path.write_text(json.dumps(config))
    assert load_hf(src).config.layer_types == ["sliding_attention"] * 2 + ["full_attention"]
    assert load_hf_config(src) == modern
    assert_logits_match(*hf_and_ours(src, n_pos))


BASE = {
    "hidden_size": 48,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_hidden_layers": 12,
    "intermediate_size": 96,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}


@pytest.mark.parametrize(
    ("architecture", "extra"),
    [
        ("GemmaForCausalLM", {"hidden_act": "gelu"}),  # GemmaConfig's legacy spelling
        ("GemmaForCausalLM", {}),
        ("Gemma2ForCausalLM", {"hidden_activation": "gelu"}),  # exact gelu: Gemma2 keeps it
        ("Gemma2ForCausalLM", {"sliding_window": 16}),
        ("Gemma3ForCausalLM", {}),
        ("Gemma3ForCausalLM", {"sliding_window_pattern": 4, "rope_theta": 5e5}),
        ("Gemma3ForCausalLM", {"attn_logit_softcapping": 50.0, "final_logit_softcapping": None}),
    ],
)
def test_config_reads_as_transformers_does(architecture, extra):
    """Defaults and spellings as the config classes read them: activation, window, layer
    pattern, soft-caps (Gemma 3's attention never caps), the score scale, the thetas."""
    from transformers import AutoConfig

    hf = {"architectures": [architecture], **BASE, **extra}
    model_type = {"GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2"}
    theirs = AutoConfig.for_model(model_type.get(architecture, "gemma3_text"), **hf)
    cfg = from_hf(hf)
    act = getattr(theirs, "hidden_activation", None) or theirs.hidden_act
    assert cfg.act_fn == act
    names = {"full_attention": "global", "sliding_attention": "local"}
    types = getattr(theirs, "layer_types", None) or ["full_attention"] * 12
    assert list(cfg.attn_types) == [names[t] for t in types]
    if "local" in cfg.attn_types:
        assert cfg.sliding_window == theirs.sliding_window
    caps = tuple(getattr(theirs, f"{name}_logit_softcapping", None) for name in ("attn", "final"))
    if architecture == "Gemma3ForCausalLM":  # Gemma3Attention does not pass its cap on
        caps = (None, caps[1])
    if architecture == "GemmaForCausalLM":
        caps = (None, None)
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == caps
    assert cfg.query_pre_attn_scalar == getattr(theirs, "query_pre_attn_scalar", None)
    params = theirs.rope_parameters
    if architecture == "Gemma3ForCausalLM":
        assert cfg.rope.theta == params["full_attention"]["rope_theta"]
        assert cfg.rope_local.theta == params["sliding_attention"]["rope_theta"]
    else:
        assert cfg.rope.theta == params["rope_theta"] and cfg.rope_local is None
    assert cfg.tie_word_embeddings == theirs.tie_word_embeddings
    assert cfg.embedding_multiplier == 48**0.5 and cfg.norm_offset == 1.0


def test_bidirectional_gemma_is_refused():
    hf = {"architectures": ["Gemma3ForCausalLM"], **BASE, "use_bidirectional_attention": True}
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        from_hf(hf)


TL_CASES = ["gemma-mqa-tied", "gemma-untied", "gemma2", "gemma3", "gemma3-final-cap"]


@needs_tl
@pytest.mark.parametrize("case", TL_CASES)
def test_hooked_transformer_logits_equal_hf(tmp_path, case):
    """TL 3.9 holds 1 + w in its norms and sqrt(d_model) * W_E in its embedding (its own
    Gemma processing); the interop gives it those, computed from our HF-raw export."""
    from gqa_convert.interop import to_hooked_transformer

    src, n_pos = source(tmp_path, case)
    out = convert(src, tmp_path / "out")
    model = to_hooked_transformer(out)
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        assert_logits_match(model(tokens), load_hf(src)(tokens).logits)
    ours = GQATransformer.from_pretrained(out)
    torch.testing.assert_close(model.blocks[0].ln1.w, 1 + ours.blocks[0].ln1.w)


@pytest.mark.parametrize("case", ["gemma-mqa-tied", "gemma2", "gemma3"])
def test_streamed_and_whole_model_reports_agree(tmp_path, case):
    """The streamed HF side (Gemma's layers one at a time, masks and rotary per layer type
    from its own forward, the soft-capped logits of its ForCausalLM) gives the whole
    model's report, on SRC's mapping and on an export's files."""
    assert_streamed_equals_whole(tmp_path, *source(tmp_path, case))


# Post-norms dropped cannot be written as a Gemma 2 export: its weight map names them.
FILE_MUTATIONS = [name for name in MUTATIONS if name != "gemma2-post-norms-missing"]


def test_an_export_without_its_post_norms_is_refused(tmp_path):
    from gqa_convert.errors import BadInputError

    src, n_pos = source(tmp_path, "gemma2")
    out = convert(src, tmp_path / "out")
    dropped = ("blocks.1.ln1_post.w", "blocks.1.ln2_post.w")
    M.mutate_export(out, lambda cfg, state: (cfg, {n: state[n] for n in state if n not in dropped}))
    with pytest.raises(BadInputError, match=r"blocks\.1\.ln1_post\.w: missing"):
        verify(src, out, seq_len=n_pos)


@pytest.mark.parametrize("name", FILE_MUTATIONS)
def test_every_gemma_mutation_fails_streamed_from_files_at_the_same_place(tmp_path, name):
    """The same bugs written into an export folder (as a converter with them would write
    it), verified from its files streamed: the same verdict and place as whole-model."""
    from tests.test_verify_streaming import assert_same_report

    case, mutation, (layer, component) = MUTATIONS[name]
    src, n_pos = source(tmp_path, case)
    out = M.mutate_export(convert(src, tmp_path / "out"), mutation)
    streamed = verify(src, out, seq_len=n_pos, streaming=True)
    assert not streamed.passed
    assert streamed.first_divergence == {"layer": layer, "component": component}
    assert_same_report(streamed, verify(src, out, seq_len=n_pos, streaming=False))


def test_model_card_says_how_norm_weights_relate_to_tl(tmp_path):
    src, _ = source(tmp_path, "gemma3")
    out = convert(src, tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "`ln1_post.w`, `ln2_post.w`, `attn.q_norm.w`" in card
    assert "x * (1 + w)" in card and "TransformerLens 3.9's processed Gemma" in card
    llama = convert(make_hf_checkpoint(tmp_path / "llama", "llama"), tmp_path / "llama-out")
    assert "Norm weights" not in (llama / "README.md").read_text()
