"""Families beyond Llama (Qwen3, Phi-3, OLMo2, Granite, SmolLM3) and the rope scalings
(linear, dynamic, yarn, longrope): tiny random HF models, converted with the parity gate on,
against transformers' own classes at 1e-4; the round trip; the mutations each must catch."""

from __future__ import annotations

import json

import pytest
import torch

from gqa_convert import GQATransformer, convert, convert_in_memory
from gqa_convert.config import load_hf_config
from gqa_convert.errors import BadInputError, UnsupportedModelError
from gqa_convert.to_hf import export_to_hf
from gqa_convert.verify import verify
from tests import mutations as M
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens, to_legacy_rope_spelling
from tests.numerics import assert_follows_hf_rounding
from tests.test_export import hf_tensors
from tests.test_interop import needs_tl
from tests.test_parity import assert_logits_match, hf_and_ours

LINEAR = {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}
DYNAMIC = {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 3.0}
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10_000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 16.0,
    "beta_slow": 2.0,
}
YARN_MSCALE = {**YARN, "mscale": 1.2, "mscale_all_dim": 0.8, "truncate": False}
# Phi-3: 8-dim heads, rotary on half of each (4 dims: 2 factors).
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10_000.0,
    "short_factor": [1.0, 1.5],
    "long_factor": [3.0, 7.0],
    "original_max_position_embeddings": 16,
    "partial_rotary_factor": 0.5,
}
# Phi3Config keeps its own top-level original_max_position_embeddings (default 4096).
PHI3_LONGROPE = {
    "rope_parameters": LONGROPE,
    "max_position_embeddings": 64,
    "original_max_position_embeddings": 16,
}
QWEN3_SLIDING = {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}
GRANITE = {
    "embedding_multiplier": 6.0,
    "attention_multiplier": 0.2,
    "residual_multiplier": 0.4,
    "logits_scaling": 3.0,
}

# (family, overrides, prompt length): every prompt crosses its window, its
# original_max_position_embeddings or its dynamic threshold (max_position_embeddings).
CASES = {
    "qwen3": ("qwen3", {"head_dim": 12}, 40),
    "qwen3-sliding-upper-layers": ("qwen3", QWEN3_SLIDING, 40),
    "qwen3-tied-mqa": ("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 1}, 40),
    "rope-linear": ("qwen3", {"rope_parameters": LINEAR}, 40),
    "rope-dynamic-past-n_ctx": (
        "llama",
        {"rope_parameters": DYNAMIC, "max_position_embeddings": 24},
        40,
    ),
    "rope-dynamic-within-n_ctx": (
        "llama",
        {"rope_parameters": DYNAMIC, "max_position_embeddings": 24},
        20,
    ),
    "rope-yarn": ("qwen3", {"rope_parameters": YARN, "max_position_embeddings": 64}, 40),
    "rope-yarn-mscale": ("llama", {"rope_parameters": YARN_MSCALE}, 40),
    "phi3": ("phi3", {}, 40),
    "phi3-partial-rotary-window": (
        "phi3",
        {"partial_rotary_factor": 0.5, "sliding_window": 8},
        40,
    ),
    "phi3-longrope-long": ("phi3", PHI3_LONGROPE, 40),
    "phi3-longrope-short": ("phi3", PHI3_LONGROPE, 12),
    "olmo2": ("olmo2", {}, 40),
    "olmo2-mha-yarn": (
        "olmo2",
        {"num_key_value_heads": 8, "rope_parameters": YARN, "max_position_embeddings": 64},
        40,
    ),
    "granite": ("granite", GRANITE, 40),
    "smollm3-no-rope-layers": ("smollm3", {"no_rope_layers": [1, 0, 1]}, 40),
    "smollm3-nope-every-2nd": (
        "smollm3",
        {"no_rope_layer_interval": 2, "tie_word_embeddings": False},
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


def assert_gate_and_round_trip(tmp_path, src, n_pos: int) -> tuple[dict, dict]:
    """`convert` with the default gate passes, the export reproduces HF, and to-hf gives the
    source's bytes back. Returns the manifest's verification and the source's tensors."""
    out = convert(src, tmp_path / "out", verify=True)
    manifest = json.loads((out / "conversion.json").read_text())
    assert manifest["verification"]["status"] == "passed"
    ours, theirs = hf_and_ours(src, n_pos, lambda _: GQATransformer.from_pretrained(out))
    assert_logits_match(ours, theirs)

    back = export_to_hf(out, tmp_path / "back")
    original, returned = hf_tensors(src), hf_tensors(back)
    assert set(returned) == set(original)
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name
    return manifest["verification"], original


@pytest.mark.parametrize("rope", ["linear", "dynamic", "yarn"])
def test_legacy_rope_spelling_reads_the_same(tmp_path, rope):
    params = {"linear": LINEAR, "dynamic": DYNAMIC, "yarn": YARN}[rope]
    src = make_hf_checkpoint(
        tmp_path / "src", "qwen3", rope_parameters=dict(params), max_position_embeddings=24
    )
    modern = load_hf_config(src)
    legacy = to_legacy_rope_spelling(src)
    assert legacy["rope_scaling"]["rope_type"] == rope
    assert load_hf_config(src) == modern
    ours, theirs = hf_and_ours(src, 40)
    assert_logits_match(ours, theirs)


def test_phi3_legacy_longrope_with_top_level_original_length(tmp_path):
    """Phi-3's Hub configs: rope_scaling {type: "longrope", ...} and a top-level
    original_max_position_embeddings, which wins over rope_scaling's."""
    src = make_hf_checkpoint(tmp_path / "src", "phi3", **PHI3_LONGROPE)
    path = src / "config.json"
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    assert params.pop("original_max_position_embeddings") == 16
    assert config["original_max_position_embeddings"] == 16
    config["rope_scaling"] = {"type": "longrope", **params, "original_max_position_embeddings": 99}
    path.write_text(json.dumps(config))
    cfg = load_hf_config(src)
    assert cfg.rope.original_max_position_embeddings == 16 and cfg.rotary_dim == 4
    for n_pos in (12, 40):
        assert_logits_match(*hf_and_ours(src, n_pos))


def test_the_length_dependent_regimes_are_the_ones_tested(tmp_path):
    """longrope switches at 16 (not Phi3Config's 4096), dynamic at 24 (n_ctx): the cases
    above sit on both sides."""
    cases = [("phi3-longrope", 16), ("rope-dynamic", 24)]
    for prefix, threshold in cases:
        long, short = (c for c in CASES if c.startswith(prefix))
        src, n_pos = source(tmp_path / prefix, long)
        cfg = load_hf_config(src)
        assert threshold in (cfg.rope.original_max_position_embeddings, cfg.n_ctx)
        assert n_pos > threshold >= CASES[short][2]


def test_dynamic_frequencies_follow_the_length(tmp_path):
    """Dynamic NTK is the only scaling whose logits at a position depend on the length."""
    src, _ = source(tmp_path, "rope-dynamic-past-n_ctx")
    model = convert_in_memory(src)
    tokens = random_tokens(40)
    with torch.no_grad():
        short, long = model(tokens[:, :20]), model(tokens)
    torch.testing.assert_close(short, model(tokens[:, :24]).narrow(1, 0, 20))  # within n_ctx
    assert (long[:, :20] - short).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("family", "field", "overrides"),
    [
        ("llama", "partial_rotary_factor", {"partial_rotary_factor": 0.5}),
        ("qwen3", "rope_type", {"rope_parameters": {"rope_type": "mrope"}}),  # Qwen2-VL's
        ("smollm3", "no_rope_layers", {"no_rope_layers": [1, 2, 1]}),
    ],
)
def test_what_we_do_not_implement_is_refused_naming_the_field(family, field, overrides):
    from gqa_convert.config import from_hf

    hf = {
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
                "smollm3": "SmolLM3ForCausalLM",
            }[family]
        ],
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_hidden_layers": 3,
        "intermediate_size": 96,
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        **overrides,
    }
    with pytest.raises(Exception, match=field) as info:
        from_hf(hf)
    assert isinstance(info.value, UnsupportedModelError | BadInputError)


# (case, mutation, where the gate must say the first divergence is)
MUTATIONS = {
    "qwen3-q_norm-dropped": ("qwen3", M.norm_to_ones("blocks.1.attn.q_norm.w"), (1, "q_norm")),
    "phi3-qkv-split-off-by-one-head": ("phi3", M.qkv_split_shifted(layer=1), (1, "q")),
    "olmo2-post-norm-moved-before": ("olmo2", M.norm_placement("pre"), (0, "ln1")),
    "granite-residual-multiplier-ignored": (
        "granite",
        M.config_field("residual_multiplier", 1.0),
        (0, "ln2"),
    ),
    "granite-attention-multiplier-ignored": (
        "granite",
        M.config_field("attention_multiplier", None),
        (0, "attn_out"),
    ),
    "smollm3-rotary-on-a-no-rope-layer": (
        "smollm3-no-rope-layers",
        M.config_field("rope_layers", (True, True, True)),
        (1, "rot_q"),
    ),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_family_bug_fails_the_gate_where_it_is(tmp_path, name):
    case, mutation, where = MUTATIONS[name]
    assert_localised(source(tmp_path, case)[0], mutation, 40, where)


def divergence(where: tuple) -> dict:
    """(layer, component) or (layer, component, expert) as a report's first_divergence."""
    names = ("layer", "component", "expert")
    return dict(zip(names, where, strict=False))


def assert_localised(src, mutation: M.Mutation, n_pos: int, where: tuple) -> None:
    """`src` converted and broken by `mutation` fails the gate, first at `where` (layer,
    component, and on an MoE layer the routed expert whose own output is off, if one is)."""
    report = verify(src, model=M.mutated_model(src, mutation), seq_len=n_pos)
    assert not report.passed
    assert report.first_divergence == divergence(where)


def test_phi3_fused_rows_land_where_hf_reads_them(tmp_path):
    """W_Q / _W_K / _W_V and W_gate / W_in are the rows of qkv_proj / gate_up_proj that
    Phi3Attention and Phi3MLP use for q, k, v, gate and up."""
    src, _ = source(tmp_path, "phi3")
    hf, model = load_hf(src), convert_in_memory(src)
    layer, ours = hf.model.layers[2], model.blocks[2]
    x = torch.randn(1, 5, 64)
    n, k, h = 8, 2, 8
    qkv = layer.self_attn.qkv_proj(x)
    q, kk, v = qkv.split([n * h, k * h, k * h], dim=-1)
    torch.testing.assert_close(torch.einsum("bpm,nmh->bpnh", x, ours.attn.W_Q).flatten(2), q)
    torch.testing.assert_close(torch.einsum("bpm,kmh->bpkh", x, ours.attn._W_K).flatten(2), kk)
    torch.testing.assert_close(torch.einsum("bpm,kmh->bpkh", x, ours.attn._W_V).flatten(2), v)
    gate, up = layer.mlp.gate_up_proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(x @ ours.mlp.W_gate, gate)
    torch.testing.assert_close(x @ ours.mlp.W_in, up)


@pytest.mark.parametrize(
    "case", ["qwen3", "phi3-partial-rotary-window", "olmo2", "granite", "smollm3-no-rope-layers"]
)
def test_every_component_matches_on_a_correct_conversion(tmp_path, case):
    """The gate's localisation reads the family's own points (q_norm, fused qkv_proj,
    post-norms, no rotary on NoPE layers): on a correct conversion all of them agree."""
    model, errors = component_errors(*source(tmp_path, case))
    names = {name.rsplit(".", 1)[0] for name in errors}
    assert {"q", "k", "v", "rot_q", "rot_k", "attn_out", "ln1", "ln2", "mlp_out"} <= names
    assert ("q_norm" in names) == (model.cfg.qk_norm is not None)
    assert max(errors.values()) < 1e-5, errors


def component_errors(src, n_pos: int):
    """Our model of `src` and each component's error, by "{component}.{layer}", every block
    run on HF's input to it, as the gate localises."""
    from gqa_convert.verify.compare import run_hf_layer, run_our_block
    from gqa_convert.verify.ours import Ours
    from gqa_convert.verify.reference import Reference

    model = convert_in_memory(src)
    ref = Reference(src, "float32", model=load_hf(src))
    ours = Ours("float32", model=model, reference=ref)
    errors = {}
    with torch.no_grad():
        tokens = random_tokens(n_pos, batch=1)
        hidden, calls = ref.layer_calls(ref.embed(tokens), tokens)
        extra = ours.block_inputs(tokens, ours.embed(tokens))  # Gemma 4's
        for i in range(model.cfg.n_layers):
            out, acts = run_hf_layer(ref.body.layers[i], hidden, calls[i], True)
            cos, sin = ours.rotary(n_pos, i)
            kwargs = ours.block_kwargs(extra, i, hidden.device)
            _, errs = run_our_block(model.blocks[i], hidden, cos, sin, acts, **kwargs)
            errors.update({f"{name}.{i}": err for name, err in errs.items()})
            hidden = out
    return model, errors


TL_CASES = [
    "qwen3",
    "qwen3-sliding-upper-layers",
    "qwen3-tied-mqa",
    "rope-linear",
    "rope-yarn",
    "rope-yarn-mscale",
    "phi3",
    "phi3-partial-rotary-window",
    "olmo2",
    "olmo2-mha-yarn",
]
TL_REFUSED = {
    "granite": "embedding_multiplier",
    "smollm3-no-rope-layers": "no_rope_layers",
    "rope-dynamic-past-n_ctx": "dynamic",
    "phi3-longrope-long": "longrope",
}


@needs_tl
@pytest.mark.parametrize("case", TL_CASES)
def test_hooked_transformer_logits_equal_hf(tmp_path, case):
    assert_hooked_transformer_equals_hf(tmp_path, *source(tmp_path, case))


@needs_tl
@pytest.mark.parametrize("case", TL_REFUSED)
def test_hooked_transformer_refuses_what_tl_lacks(tmp_path, case):
    assert_hooked_transformer_refuses(tmp_path, source(tmp_path, case)[0], TL_REFUSED[case])


def assert_streamed_equals_whole(tmp_path, src, n_pos: int) -> None:
    """The gate passes whole-model, and streamed gives the same report: on SRC's mapping and
    on an export's files."""
    from tests.test_verify_streaming import assert_same_report

    whole = verify(src, seq_len=n_pos, streaming=False)
    assert whole.passed, whole.summary()
    assert_same_report(verify(src, seq_len=n_pos, streaming=True), whole)
    out = convert(src, tmp_path / "out")
    assert_same_report(
        verify(src, out, seq_len=n_pos, streaming=True),
        verify(src, out, seq_len=n_pos, streaming=False),
    )


def assert_hooked_transformer_equals_hf(tmp_path, src, n_pos: int) -> None:
    """`to_hooked_transformer` of `src`'s export gives HF's logits (1e-4, argmax)."""
    from gqa_convert.interop import to_hooked_transformer

    model = to_hooked_transformer(convert(src, tmp_path / "out"))
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        assert_logits_match(model(tokens), load_hf(src)(tokens).logits)


def assert_hooked_transformer_refuses(tmp_path, src, field: str) -> None:
    """`to_hooked_transformer` of `src`'s export is refused, naming `field`."""
    from gqa_convert.interop import to_hooked_transformer

    out = convert(src, tmp_path / "out")
    with pytest.raises(UnsupportedModelError, match=field):
        to_hooked_transformer(out)


def test_the_gate_compares_each_input_with_a_fresh_dynamic_rotary(tmp_path):
    """HF's dynamic NTK keeps the frequencies of the longest sequence it has seen; the gate
    resets them, so a shorter input after a longer one is still compared as HF runs it."""
    from gqa_convert.verify import load_reference

    src, _ = source(tmp_path, "rope-dynamic-past-n_ctx")
    hf = load_reference(src)
    first = verify(src, reference=hf, seq_len=64)
    second = verify(src, reference=hf, seq_len=40)
    assert first.passed and second.passed, second.failures
    assert second.regimes["dynamic_max_position_embeddings"] == {"size": 24, "exercised": True}


@pytest.mark.parametrize(
    ("case", "regime", "size"),
    [
        ("phi3-longrope-long", "longrope_original_max_position_embeddings", 16),
        ("rope-dynamic-past-n_ctx", "dynamic_max_position_embeddings", 24),
    ],
)
def test_the_default_inputs_cross_the_length_thresholds(tmp_path, case, regime, size):
    src, _ = source(tmp_path, case)
    report = verify(src)
    assert report.passed and report.regimes[regime] == {"size": size, "exercised": True}


def test_help_names_every_family():
    from gqa_convert.architectures import families
    from gqa_convert.cli import HELP

    text = HELP.lower().replace("-", "")
    assert all(family.name in text for family in families())
    assert all(rope in HELP for rope in ("linear", "dynamic", "yarn", "longrope", "llama3"))


@pytest.mark.parametrize(
    "case", ["rope-linear", "rope-dynamic-past-n_ctx", "rope-yarn", "phi3-longrope-long"]
)
def test_each_rope_scaling_is_engaged(tmp_path, case):
    """The scaled frequencies (and attention factor) move the logits: a model that read the
    rope as plain `default` at the same theta would fail the 1e-4 comparison."""
    from gqa_convert.config import RopeConfig

    src, n_pos = source(tmp_path, case)
    plain = M.config_field("rope", RopeConfig(theta=10_000.0, partial_rotary_factor=0.5))
    if not case.startswith("phi3"):
        plain = M.config_field("rope", RopeConfig(theta=10_000.0))
    model = M.mutated_model(src, plain)
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        diff = (model(tokens) - load_hf(src)(tokens).logits).abs().max()
    assert diff > 1e-3


def test_smollm3_sliding_window_without_layer_types_goes_on_the_nope_layers():
    from gqa_convert.config import from_hf

    hf = {
        "architectures": ["SmolLM3ForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_hidden_layers": 4,
        "intermediate_size": 96,
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "use_sliding_window": True,
        "sliding_window": 8,
        "no_rope_layers": [1, 0, 1, 0],
    }
    cfg = from_hf(hf)
    assert cfg.attn_types == ("global", "local", "global", "local") and cfg.sliding_window == 8
    assert cfg.rope_layers == (True, False, True, False) and cfg.tie_word_embeddings


@pytest.mark.exactness
@pytest.mark.parametrize(
    "case", ["qwen3", "phi3-longrope-long", "olmo2", "granite", "smollm3-no-rope-layers"]
)
def test_bfloat16_follows_hf_rounding(tmp_path, case):
    """In bf16 our casts are HF's (OLMo2's norms scale and its rotary rotates in fp32): our
    logits are far closer to HF's bf16 ones than those are to fp32, on both attention paths
    (tests/numerics.py: what holds on every CPU). Planted: the norm weight applied in the
    other dtype (0.9 to 1.1 of HF's own error against fp32, measured)."""
    src, n_pos = source(tmp_path, case)
    flipped = not convert_in_memory(src).cfg.norm_weight_in_fp32
    assert_follows_hf_rounding(src, n_pos, M.config_field("norm_weight_in_fp32", flipped))
