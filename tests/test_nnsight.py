"""nnsight 0.8 on our model, with no adapter: `NNsight(GQATransformer.from_pretrained(out))`.
What a trace saves is what our own hooks see, and a patch made in a trace (one KV head's values
zeroed in layer 1) gives the logits the same patch through our hooks gives.

Both sides run the same model code on the same inputs (nnsight wraps each module's forward;
it adds no torch hooks, so our model takes the same attention path), under the same grad mode:
the results are compared with torch.equal. Skipped where nnsight is not installed
(`pip install -e '.[nnsight]'`), except in CI, where they fail instead.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from gqa_convert import GQATransformer, convert
from tests.hf_models import make_hf_checkpoint, random_tokens

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nnsight") is None and not os.environ.get("CI"),
    reason="nnsight not installed: pip install -e '.[nnsight]'",
)

# (family, overrides): GQA (4 query heads a KV head), and Gemma 2's sandwich norms + MQA.
CASES = {
    "llama-gqa4": ("llama", {}),
    "gemma2-mqa": ("gemma2", {"num_key_value_heads": 1, "sliding_window": 8}),
}
LAYER, KV_HEAD = 1, 0


def export(tmp_path, case):
    family, overrides = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **overrides)
    return convert(src, tmp_path / "out", verify=False)


def zero_kv_head(values: torch.Tensor, hook=None) -> torch.Tensor:
    """values [batch, pos, n_kv_heads, d_head] with KV head KV_HEAD zeroed."""
    values = values.clone()
    values[:, :, KV_HEAD] = 0
    return values


@pytest.mark.parametrize("case", CASES)
def test_saved_activations_and_a_kv_head_patch_equal_our_hooks(tmp_path, case):
    from nnsight import NNsight

    out = export(tmp_path, case)
    ours = GQATransformer.from_pretrained(out)
    model = NNsight(GQATransformer.from_pretrained(out))
    tokens = random_tokens(24)
    attn = model.blocks[LAYER].attn
    with torch.no_grad():
        with model.trace(tokens):
            values = attn.hook_v.output.clone().save()  # [batch, pos, n_kv_heads, d_head]
            attn.hook_v.output[:, :, KV_HEAD] = 0
            z = attn.hook_z.output.save()
            patched = model.output.save()
        plain, cache = ours.run_with_cache(tokens, names_filter=f"blocks.{LAYER}.attn.hook_v")
        name = f"blocks.{LAYER}.attn.hook_v"
        with ours.hooks([(name, zero_kv_head)]):
            theirs_z = ours.run_with_cache(tokens, names_filter=f"blocks.{LAYER}.attn.hook_z")[1]
            ours_patched = ours(tokens)
    assert values.shape[2] == ours.cfg.n_key_value_heads
    assert torch.equal(values, cache[name])
    assert torch.equal(z, theirs_z[f"blocks.{LAYER}.attn.hook_z"])
    assert torch.equal(patched, ours_patched)
    assert (patched - plain).abs().max() > 1e-3  # the patch did something
    group = ours.cfg.n_heads // ours.cfg.n_key_value_heads  # query heads reading KV_HEAD
    assert not z[:, :, KV_HEAD * group : (KV_HEAD + 1) * group].any()


def test_attention_patterns_need_the_explicit_path(tmp_path):
    """nnsight adds no torch hooks, so our model keeps SDPA, which computes no pattern:
    `use_fast_path=False` in the trace makes hook_pattern run (README says so)."""
    from nnsight import NNsight

    out = export(tmp_path, "llama-gqa4")
    model = NNsight(GQATransformer.from_pretrained(out))
    ours = GQATransformer.from_pretrained(out)
    tokens = random_tokens(24)
    name = f"blocks.{LAYER}.attn.hook_pattern"
    with torch.no_grad():
        with model.trace(tokens, use_fast_path=False):
            pattern = model.blocks[LAYER].attn.hook_pattern.output.save()
        # every layer on the explicit path, as in the trace (unasked, layer 0 would use SDPA)
        _, cache = ours.run_with_cache(tokens, names_filter=name, use_fast_path=False)
    assert torch.equal(pattern, cache[name])
    with pytest.raises(Exception, match="ran past it"), torch.no_grad(), model.trace(tokens):
        model.blocks[LAYER].attn.hook_pattern.output.save()
