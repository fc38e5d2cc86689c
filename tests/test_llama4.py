"""Llama 4 text (issue 27): tiny random Llama4ForCausalLM checkpoints from transformers' own
classes (4 layers, the 4th NoPE; chunks of 16 and a temperature floor_scale of 8, both
shorter than the 40-token prompts, so the chunk mask cuts and the temperature reaches
1 + attn_scale * log1p(4) at position 39), converted with the parity gate on, against
transformers at 1e-4 on both attention paths; the round trip; streamed = whole; a mutation
per mechanism, localised by the gate; greedy generation with a KV cache past a chunk
boundary, the chunked layers' caches holding at most a chunk."""

from __future__ import annotations

import pytest
import torch

from gqa_convert import convert_in_memory
from gqa_convert.config import load_hf_config
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
    assert_localised,
    assert_streamed_equals_whole,
    component_errors,
)
from tests.test_interop import needs_tl
from tests.test_parity import assert_logits_match, hf_and_ours

N_POS = 40  # > 2 chunks of 16, floor((39 + 1) / 8) = 5 temperature steps
# (overrides of tests/hf_models.py's llama4_text defaults)
CASES = {
    # tests/hf_models.py's defaults: layers 1 and 3 MoE (interleave_moe_layer_step 2), 4
    # experts, 1 per token, a shared expert
    "moe-interleaved": {},
    # every layer MoE (Scout's step 1), 2 experts per token, the 40 positions over 2 chunks
    "moe-every-layer-top-2": {"interleave_moe_layer_step": 1, "num_experts_per_tok": 2},
    # every layer dense: the attention mechanisms alone
    "dense": {"moe_layers": []},
    # no q/k norm, no temperature tuning, no chunks (layer_types then all full attention)
    "switches-off": {
        "moe_layers": [],
        "use_qk_norm": False,
        "attn_temperature_tuning": False,
        "attention_chunk_size": None,
    },
    # NoPE layers where no_rope_layers says (1: rotary), chunked layers where layer_types says
    "no-rope-layers-listed": {
        "moe_layers": [],
        "no_rope_layers": [0, 1, 1, 0],
        "layer_types": [
            "full_attention",
            "chunked_attention",
            "full_attention",
            "full_attention",
        ],
    },
    # a NoPE layer chunked (layer 0): temperature tuning counts the keys its cache dropped
    "nope-layer-chunked": {
        "moe_layers": [],
        "no_rope_layers": [0, 1, 1, 1],
        "layer_types": ["chunked_attention"] * 3 + ["full_attention"],
    },
}


def source(tmp_path, case):
    return make_hf_checkpoint(tmp_path / "src", "llama4_text", **CASES[case])


@pytest.mark.parametrize("path", ["sdpa", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hf(tmp_path, case, path):
    ours, theirs = hf_and_ours(source(tmp_path, case), N_POS, use_fast_path=path == "sdpa")
    assert_logits_match(ours, theirs)


@pytest.mark.parametrize("case", CASES)
def test_convert_with_the_gate_then_load_and_round_trip(tmp_path, case):
    assert_gate_and_round_trip(tmp_path, source(tmp_path, case), N_POS)


def test_config_reads_as_transformers_does(tmp_path):
    cfg = load_hf_config(source(tmp_path, "dense"))
    assert cfg.rope_layers == (True, True, True, False)
    assert cfg.chunked_layers == (True, True, True, False) and cfg.attention_chunk_size == 16
    assert (cfg.query_scale_beta, cfg.query_scale_length, cfg.temperature_tuning) == (0.5, 8, True)
    assert cfg.qk_norm == "weightless" and not cfg.qk_norm_on_nope_layers
    assert cfg.d_mlp == 96 and cfg.rotary_adjacent_pairs
    off = load_hf_config(source(tmp_path / "off", "switches-off"))
    assert off.qk_norm is None and off.query_scale_beta is None and not off.chunked_layers
    listed = load_hf_config(source(tmp_path / "listed", "no-rope-layers-listed"))
    assert listed.rope_layers == (False, True, True, False)
    assert listed.chunked_layers == (False, True, False, False)


@pytest.mark.parametrize("case", ["dense", "moe-interleaved"])
def test_every_component_matches_on_a_correct_conversion(tmp_path, case):
    """HF's rotated q / k (its apply_rotary_emb) and its one weightless norm of both are
    read on the rotary layers; the NoPE layer has neither; MoE layers' router logits and
    output are HF's."""
    _, errors = component_errors(source(tmp_path, case), N_POS)
    names = {name.rsplit(".", 1)[0] for name in errors}
    basic = {"ln1", "q", "k", "v", "attn_out", "ln2", "mlp_out", "resid_post"}
    rotary = {"rot_q", "rot_k", "q_norm", "k_norm"}
    assert basic | rotary <= names, names
    assert not rotary & {name.rsplit(".", 1)[0] for name in errors if name.endswith(".3")}
    if case == "moe-interleaved":
        assert {"router.1", "router.3"} <= set(errors) and "router.0" not in errors
    assert max(errors.values()) < 1e-5, errors


# (case, mutation, where the gate must say the first divergence is): one per mechanism.
MUTATIONS = {
    "temperature-tuning-off": ("dense", M.config_field("query_scale_beta", None), (3, "attn_out")),
    "chunking-off": ("dense", M.config_field("chunked_layers", ()), (0, "attn_out")),
    # no norm on our side: nothing to compare at q_norm, the first difference is the output
    "qk-norm-off": ("dense", M.config_field("qk_norm", None), (0, "attn_out")),
    "rotary-as-rotate-half": (
        "dense",
        M.config_field("rotary_adjacent_pairs", False),
        (0, "rot_q"),
    ),
    "shared-expert-dropped": (
        "moe-interleaved",
        M.tensor_zeroed("blocks.1.mlp.shared_expert.W_out"),
        (1, "mlp_out"),
    ),
    "score-scales-the-output": (
        "moe-interleaved",
        M.moe_field("score_scales_input", False),
        (1, "mlp_out"),
    ),
    # gate_up_proj's halves read the wrong way round
    "gate-up-halves-swapped": (
        "moe-interleaved",
        M.expert_gate_and_in_exchanged(layer=3, expert=0),
        (3, "mlp_out", 0),
    ),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_llama4_bug_fails_the_gate_where_it_is(tmp_path, name):
    case, mutation, where = MUTATIONS[name]
    assert_localised(source(tmp_path, case), mutation, N_POS, where)


@pytest.mark.parametrize("case", ["dense", "moe-interleaved"])
def test_streamed_and_whole_model_reports_agree(tmp_path, case):
    assert_streamed_equals_whole(tmp_path, source(tmp_path, case), N_POS)


def test_the_gate_reports_full_routing_agreement(tmp_path):
    """Every token of every MoE layer picks HF's experts (the gate's routing agreement)."""
    from gqa_convert.verify import verify

    report = verify(source(tmp_path, "moe-every-layer-top-2"), seq_len=N_POS)
    assert report.passed and report.routing_agreement == 1.0
    per_layer = report.routing_agreement_per_layer
    assert len(per_layer) == 4 and set(per_layer.values()) == {1.0}, per_layer


@pytest.mark.parametrize("case", ["moe-interleaved", "dense", "nope-layer-chunked"])
def test_greedy_generate_equals_hf(tmp_path, case):
    """fp32, 64 new tokens after three left-padded prompts (40, 33, 20 tokens): token for
    token with transformers' generate, whose chunked layers keep a sliding-window cache of
    the chunk size, as ours do (the chunk mask counts the dropped keys' positions); the
    steps cross chunk boundaries (16 tokens) and temperature steps (8) many times. Only
    prompts on which HF's every greedy step and every routing has a clear margin are used
    (as tests/test_generate.py does)."""
    from tests.test_generate import NEW, clear_prompts

    src = source(tmp_path, case)
    hf, ours = load_hf(src), convert_in_memory(src)
    gaps: list[torch.Tensor] = []
    k = hf.config.num_experts_per_tok
    handles = [
        m.register_forward_hook(lambda _m, _i, out: gaps.append(routing_gap(out[1], k)))
        for name, m in hf.named_modules()
        if name.endswith("feed_forward.router")
    ]
    try:
        tokens, mask, theirs = clear_prompts(hf, [N_POS, N_POS - 7, N_POS // 2])
    finally:
        for handle in handles:
            handle.remove()
    if gaps:
        assert min(float(g.min()) for g in gaps) > ROUTING_MARGIN
    mine = ours.generate(tokens, max_new_tokens=NEW, attention_mask=mask, eos_token_id=[])
    assert torch.equal(mine, theirs)
    assert len(set(mine[:, N_POS:].flatten().tolist())) >= 4  # not one token repeated


@pytest.mark.parametrize("case", ["dense", "nope-layer-chunked"])
def test_a_chunked_layers_cache_holds_at_most_a_chunk(tmp_path, case):
    """Unpadded prompts (no attention mask: the chunks counted from the cache's own count of
    the tokens it dropped), 64 new tokens token for token with HF's; after it a chunked
    layer's cache holds its last chunk - 1 tokens (HF's: a sliding window of the chunk
    size; a query's chunk is among them and itself), the full-attention layer every token
    fed: 3 x 15 + 103 tokens, not 4 x 103."""
    from tests.test_generate import NEW, clear_prompts

    src = source(tmp_path, case)
    hf, model = load_hf(src), convert_in_memory(src)
    tokens, mask, theirs = clear_prompts(hf, [N_POS, N_POS])
    assert bool(mask.all())
    cache = model.new_cache()
    mine = model.generate(tokens, NEW, eos_token_id=[], cache=cache)
    assert torch.equal(mine, theirs)
    cfg, fed = model.cfg, N_POS + NEW - 1  # the last token is never fed
    size = cfg.attention_chunk_size
    assert cfg.chunked_layers == (True, True, True, False) and fed > 6 * size
    held = [min(fed, size - 1) if chunked else fed for chunked in cfg.chunked_layers]
    per_token = 2 * cfg.n_key_value_heads * cfg.d_head * 4  # keys and values, fp32
    assert [layer.length for layer in cache.layers] == held == [15, 15, 15, 103]
    assert cache.nbytes == 2 * sum(held) * per_token and cache.length == fed


@pytest.mark.parametrize("case", ["dense", "moe-interleaved"])
@needs_tl
def test_hooked_transformer_refuses_llama4(tmp_path, case):
    """TL 3.9 can express none of the mechanisms: each is named (chunking alone included)."""
    from gqa_convert import convert
    from gqa_convert.errors import UnsupportedModelError
    from gqa_convert.interop import to_hooked_transformer

    out = convert(source(tmp_path, case), tmp_path / "out")
    with pytest.raises(UnsupportedModelError, match="chunked_layers") as refused:
        to_hooked_transformer(out)
    assert "temperature_tuning" in str(refused.value) and "weightless" in str(refused.value)
    if case == "moe-interleaved":
        assert "input" in str(refused.value) and "shared expert" in str(refused.value)


def test_inspect_names_the_quirks(tmp_path):
    from gqa_convert.inspection import inspect_checkpoint

    quirks = inspect_checkpoint(source(tmp_path, "moe-interleaved"))["quirks"]
    expected = {"temperature_tuning", "chunked_attention", "qk_norm", "moe_input_scaling"}
    assert expected | {"rotary_adjacent_pairs", "no_rope_layers", "moe"} <= set(quirks), quirks
    assert "no weight" in quirks["qk_norm"] and "[0, 1, 2]" in quirks["chunked_attention"]
    assert "shared expert" in quirks["moe"] and "MoE layers [1, 3]" in quirks["moe"]


@needs_torch_2_13
@pytest.mark.exactness
@pytest.mark.parametrize("case", ["no-rope-layers-listed", "moe-every-layer-top-2"])
def test_bfloat16_follows_hf_rounding(tmp_path, case):
    """In bf16 our casts are HF's (tests/numerics.py's rounding ratio, both attention paths;
    measured 0 here): the temperature-tuning scale kept in fp32 and the product with q
    rounded once (Llama4TextAttention's; the scale rounded to bf16 first was 0.11-0.86 of
    HF's own error), the router's bf16 logits, the expert input scaled by its weight.
    Planted: the norm weight in fp32; and on the case with two NoPE layers, where the
    temperature scale acts on half the layers, the scale rounded to bf16 first (0.61-0.62
    on both paths, measured; one NoPE layer in four moves the logits less: 0.11-0.17)."""
    src = source(tmp_path, case)
    assert_follows_hf_rounding(src, N_POS, M.config_field("norm_weight_in_fp32", True))
    if case == "no-rope-layers-listed":
        rounded = M.temperature_scale_rounded(convert_in_memory(src))
        tokens = random_tokens(N_POS, batch=1)
        assert_misplaced_cast(rounding_ratios(src, tokens, torch.bfloat16, rounded))
