"""model/fused.py: Q/K/V projected with fused copies in HF's layout during `generate`. The
copies give transformers' own q/k/v_proj outputs exactly, are made once per call, follow
weights a hook edits, and are dropped when the call ends (greedy tokens against HF's
`generate` for every family: tests/test_generate.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gqa_convert import convert_in_memory
from gqa_convert.model.fused import fused_projections
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v biases
def pair(request, tmp_path_factory):
    src = make_hf_checkpoint(tmp_path_factory.mktemp("m") / "src", request.param)
    return load_hf(src), convert_in_memory(src)


def attentions(model):
    return [block.attn for block in model.blocks]


@pytest.mark.exactness
def test_fused_q_k_v_equal_transformers_projections_exactly(pair):
    """hook_q / hook_k / hook_v inside the block are HF's q_proj / k_proj / v_proj outputs
    on the same layer input, bit for bit, viewed as [batch, pos, heads, d_head]."""
    hf, ours = pair
    tokens = random_tokens(9, batch=2)
    seen: dict[str, torch.Tensor] = {}

    def record(act, hook):
        seen[hook.name] = act.clone()

    keep = [(lambda name: name.split(".")[-1] in ("hook_q", "hook_k", "hook_v"), record)]
    inputs = []
    grab = ours.blocks[1].ln1.register_forward_hook(lambda m, a, out: inputs.append(out))
    try:
        with torch.no_grad(), fused_projections(ours), ours.hooks(fwd_hooks=keep):
            assert all(attn.fused is not None for attn in attentions(ours))
            ours(tokens)
    finally:
        grab.remove()
    assert all(attn.fused is None for attn in attentions(ours))
    x = inputs[0]  # layer 1's attention input [batch, pos, d_model]
    ref = hf.model.layers[1].self_attn
    n, k, h = ours.cfg.n_heads, ours.cfg.n_key_value_heads, ours.cfg.d_head
    with torch.no_grad():
        for name, proj, heads in (("q", ref.q_proj, n), ("k", ref.k_proj, k), ("v", ref.v_proj, k)):
            mine = seen[f"blocks.1.attn.hook_{name}"]
            assert mine.shape == (2, 9, heads, h)
            # Exact on every CPU: HF's op (F.linear) on the same input, over a weight of the
            # same values in the same contiguous [out, in] layout, and the same bias
            assert torch.equal(mine.flatten(2), proj(x)), name


def test_copies_are_made_once_per_call_and_dropped_after_it(pair):
    _, ours = pair
    attn = ours.blocks[0].attn
    copies = []

    def record(act, hook):
        copies.append(attn.fused._copies["q"].weight)

    with ours.hooks(fwd_hooks=[("blocks.0.attn.hook_q", record)]):
        ours.generate(random_tokens(5, batch=1), max_new_tokens=6, eos_token_id=[])
    assert len(copies) == 6 and all(c is copies[0] for c in copies[1:])
    assert copies[0].shape == (ours.cfg.n_heads * ours.cfg.d_head, ours.cfg.d_model)
    assert copies[0].is_contiguous()
    assert all(a.fused is None for a in attentions(ours))

    def boom(new):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ours.generate(random_tokens(5, batch=1), max_new_tokens=3, on_token=boom)
    assert all(a.fused is None for a in attentions(ours))


def test_weights_edited_during_generate_are_used_from_the_next_step(pair):
    """A hook-time edit (in place, or a new Parameter) is seen: with W_Q and W_K zeroed,
    q and k are exactly their biases from the next step on; stale copies would not be."""
    _, ours = pair
    attn = ours.blocks[0].attn
    saved = {name: p.detach().clone() for name, p in attn.named_parameters()}
    qs, ks = [], []
    hooks = [
        ("blocks.0.attn.hook_q", lambda act, hook: qs.append(act.clone())),
        ("blocks.0.attn.hook_k", lambda act, hook: ks.append(act.clone())),
    ]

    def edit(new):
        if len(qs) == 2:  # after the prefill and one decode step
            with torch.no_grad():
                attn.W_Q.zero_()
            attn._W_K = nn.Parameter(torch.zeros_like(attn._W_K))

    try:
        with ours.hooks(fwd_hooks=hooks):
            ours.generate(
                random_tokens(5, batch=1), max_new_tokens=5, eos_token_id=[], on_token=edit
            )
    finally:
        with torch.no_grad():
            attn._W_K = nn.Parameter(saved["_W_K"])
            attn.W_Q.copy_(saved["W_Q"])
    assert len(qs) == 5
    for q, k in zip(qs[:2], ks[:2], strict=True):
        assert not torch.equal(q, attn.b_Q.expand_as(q))
        assert not torch.equal(k, attn._b_K.expand_as(k))
    for q, k in zip(qs[2:], ks[2:], strict=True):
        assert torch.equal(q, attn.b_Q.detach().expand_as(q))
        assert torch.equal(k, attn._b_K.detach().expand_as(k))


def test_nested_blocks_keep_the_outer_copies(pair):
    _, ours = pair
    with fused_projections(ours):
        outer = [a.fused for a in attentions(ours)]
        with fused_projections(ours):
            assert [a.fused for a in attentions(ours)] == outer
        assert [a.fused for a in attentions(ours)] == outer
    assert all(a.fused is None for a in attentions(ours))
