"""The real SmolLM2-135M-Instruct (LlamaForCausalLM, 9 heads / 3 KV heads, tied) and
Gemma-3-270M (Gemma3ForCausalLM: MQA, sandwich and q/k norms with the (1 + w) offset, 5 local
: 1 global layers, a rotary per layer type), converted through files, against transformers on
a few hundred tokens of real text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa_convert import GQATransformer, convert
from tests.numerics import assert_logits_match

TEXT = """The history of the bicycle begins in the early nineteenth century, when inventors in
Europe tried to build a machine that a person could ride without a horse. The first designs had
no pedals: the rider pushed against the ground with both feet. Pedals attached to the front
wheel came later, and the large front wheels of the penny-farthing followed, because a bigger
wheel travelled further with each turn of the pedals. Those machines were fast but dangerous,
and a fall from the high seat could be serious. The safety bicycle of the eighteen-eighties
solved the problem with two wheels of equal size and a chain that drove the rear wheel. Air-filled
tyres made the ride comfortable, and within a few years millions of people in cities and in the
countryside used bicycles to get to work, to visit friends, and to travel for pleasure. Women in
particular gained a new freedom of movement, and the bicycle changed clothing, courtship and the
shape of towns. Today the bicycle remains one of the most efficient ways to turn human effort
into motion, and many cities build lanes and parking for the riders who choose it every day."""


@pytest.mark.slow
def test_smollm2_logits_equal_hf_on_real_text(smollm2_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokens = tokenizer(TEXT, return_tensors="pt").input_ids
    assert tokens.shape[1] >= 200
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    config = hf.config
    assert config.num_attention_heads == 9 and config.num_key_value_heads == 3
    assert config.tie_word_embeddings
    ours = GQATransformer.from_pretrained(convert(smollm2_dir, tmp_path / "smol"))
    assert ours.cfg.group_size == 3 and ours.cfg.rope.theta == config.rope_parameters["rope_theta"]
    with torch.no_grad():
        theirs = hf(tokens).logits
        mine = ours(tokens)
    assert_logits_match(mine, theirs)  # and top-1 equal wherever HF's is clear
    # A trained model, not noise: it predicts the text's next token well above chance.
    hits = (theirs[0, :-1].argmax(-1) == tokens[0, 1:]).float().mean()
    assert hits > 0.3


@pytest.mark.slow
def test_gemma3_logits_equal_hf_on_real_text(gemma3_dir, tmp_path):
    """Converted with the gate on; 600 tokens cross the 512-token window of the local layers."""
    import json

    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    tokens = tokenizer(" ".join([TEXT] * 3), return_tensors="pt").input_ids[:, :600]
    assert tokens.shape[1] == 600
    hf = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    config = hf.config
    assert type(hf).__name__ == "Gemma3ForCausalLM" and config.num_key_value_heads == 1
    assert config.sliding_window == 512 < tokens.shape[1]
    out = convert(gemma3_dir, tmp_path / "gemma3", verify=True)
    manifest = json.loads((out / "conversion.json").read_text())
    assert manifest["verification"]["status"] == "passed"
    ours = GQATransformer.from_pretrained(out)
    assert ours.cfg.rope.theta == config.rope_parameters["full_attention"]["rope_theta"]
    assert ours.cfg.rope_local.theta == config.rope_parameters["sliding_attention"]["rope_theta"]
    with torch.no_grad():
        theirs = hf(tokens).logits
        mine = ours(tokens)
    assert_logits_match(mine, theirs)
    hits = (theirs[0, :-1].argmax(-1) == tokens[0, 1:]).float().mean()
    assert hits > 0.3  # a trained model: well above chance on real text
