"""The core test (litgpt's): tiny random HF model -> convert -> logits equal HF's, per quirk."""

from __future__ import annotations

import pytest
import torch

from gqa_convert import GQATransformer, convert, convert_in_memory
from gqa_convert.config import load_hf_config
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens, to_legacy_rope_spelling
from tests.numerics import assert_logits_match

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500_000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# (family, overrides, save options, prompt length)
CASES = {
    "llama-gqa4": ("llama", {}, {}, 40),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}, {}, 40),
    "llama-mha": ("llama", {"num_key_value_heads": 8}, {}, 40),
    "llama-head_dim-12": ("llama", {"head_dim": 12}, {}, 40),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, {}, 40),
    "llama-bf16-source": ("llama", {}, {"dtype": torch.bfloat16}, 40),
    "llama-sharded": ("llama", {}, {"max_shard_size": "60KB"}, 40),
    "llama-attention_bias": ("llama", {"attention_bias": True}, {}, 40),
    "llama-theta-500k": (
        "llama",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
        {},
        40,
    ),
    "llama3-rope-past-original-len": ("llama", {"rope_parameters": LLAMA3_ROPE}, {}, 64),
    "mistral-window-8": ("mistral", {"sliding_window": 8}, {}, 40),
    "mistral-mqa-window-5": ("mistral", {"sliding_window": 5, "num_key_value_heads": 1}, {}, 40),
    "qwen2-biases": ("qwen2", {}, {}, 40),
    "qwen2-sliding-upper-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
        {},
        40,
    ),
}


def hf_and_ours(folder, n_pos, model_from=convert_in_memory, use_fast_path=None):
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        theirs = load_hf(folder)(tokens).logits
        ours = model_from(folder).float()(tokens, use_fast_path=use_fast_path)
    return ours, theirs


@pytest.mark.exactness
@pytest.mark.parametrize("path", ["sdpa", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hf(tmp_path, case, path):
    family, overrides, save, n_pos = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **save, **overrides)
    ours, theirs = hf_and_ours(src, n_pos, use_fast_path=path == "sdpa")
    assert_logits_match(ours, theirs)


@pytest.mark.parametrize("case", ["llama-gqa4", "llama-tied", "qwen2-biases", "llama-bf16-source"])
def test_export_round_trip_through_files(tmp_path, case):
    family, overrides, save, n_pos = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **save, **overrides)
    out = convert(src, tmp_path / "out")
    ours, theirs = hf_and_ours(src, n_pos, lambda _: GQATransformer.from_pretrained(out))
    assert_logits_match(ours, theirs)


@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_legacy_rope_spelling_reads_the_same(tmp_path, rope):
    params = LLAMA3_ROPE if rope == "llama3" else {"rope_type": "default", "rope_theta": 2e4}
    src = make_hf_checkpoint(tmp_path / "src", "llama", rope_parameters=dict(params))
    modern = load_hf_config(src)
    legacy = to_legacy_rope_spelling(src)
    assert "rope_parameters" not in legacy and legacy["rope_theta"] == params["rope_theta"]
    assert load_hf_config(src) == modern
    ours, theirs = hf_and_ours(src, 64)
    assert_logits_match(ours, theirs)


def test_a_wrong_rope_theta_is_caught_by_parity(tmp_path):
    """The comparison is sharp enough to see a rope theta read wrongly."""
    src = make_hf_checkpoint(
        tmp_path / "src", "llama", rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    )
    model = convert_in_memory(src)
    from gqa_convert.model.decoder import rotary_inv_freq

    model.rotary_inv_freq = rotary_inv_freq(type(model.cfg.rope)(theta=10_000.0), model.cfg.d_head)
    tokens = random_tokens(40)
    with torch.no_grad():
        diff = (model(tokens) - load_hf(src)(tokens).logits).abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("max_window_layers", [None, 0, 2, 30, 40])
def test_qwen2_max_window_layers_follows_transformers(max_window_layers):
    """A config.json without `layer_types` (older Qwen2 files): which layers use the window
    is what transformers' own Qwen2Config says, its default (28) and 0 included."""
    from transformers import Qwen2Config

    from gqa_convert.config import from_hf

    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_hidden_layers": 30,
        "intermediate_size": 96,
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": True,
        "sliding_window": 8,
    }
    if max_window_layers is not None:
        hf["max_window_layers"] = max_window_layers
    expected = Qwen2Config(**hf).layer_types
    names = {"full_attention": "global", "sliding_attention": "local"}
    assert list(from_hf(hf).attn_types) == [names[t] for t in expected]


def test_qwen2_with_max_window_layers_0_converts_with_parity(tmp_path):
    import json

    from gqa_convert.verify import verify

    src = make_hf_checkpoint(
        tmp_path / "src", "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0
    )
    config = json.loads((src / "config.json").read_text())
    assert config.pop("layer_types") == ["sliding_attention"] * 3
    (src / "config.json").write_text(json.dumps(config))
    assert load_hf_config(src).attn_types == ("local",) * 3
    report = verify(src, seq_len=40)
    assert report.passed, report.summary()
    assert report.regimes["sliding_window"]["exercised"]
