"""Gemma 4 text (dense): tiny random Gemma4ForCausalLM checkpoints with each switch (K/V
shared from earlier layers, k = v global layers with their own KV heads, per-layer input
embeddings, global layers with twice the head size and proportional rope, a window shorter
than the prompts, a final soft-cap), converted with the parity gate on, against
transformers' own classes at 1e-4; streamed = whole; the round trip; greedy generation
(tests/test_generate.py runs these cases too); a mutation per new mechanism, localised."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gqa_convert import convert, convert_in_memory
from gqa_convert.config import from_hf
from gqa_convert.errors import UnsupportedModelError
from gqa_convert.verify import verify
from tests import mutations as M
from tests.hf_models import make_hf_checkpoint, random_tokens
from tests.numerics import assert_follows_hf_rounding, assert_misplaced_cast, rounding_ratios
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
    """The default gate passes, the export reproduces HF, and to-hf gives the source's bytes
    (layer_scalar, the per-layer embedding tables, no k / v of shared layers included)."""
    assert_gate_and_round_trip(tmp_path, *source(tmp_path, case))


@pytest.mark.parametrize("case", CASES)
def test_streamed_equals_whole(tmp_path, case):
    assert_streamed_equals_whole(tmp_path, *source(tmp_path, case))


@pytest.mark.parametrize("case", CASES)
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


@pytest.mark.parametrize(("field", "value"), [("enable_moe_block", True)])
def test_what_is_not_implemented_is_refused(field, value):
    hf = {**BASE, "num_kv_shared_layers": 2, field: value}
    with pytest.raises(UnsupportedModelError, match=field):
        from_hf(hf)


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
