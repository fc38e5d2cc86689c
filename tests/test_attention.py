"""GroupedQueryAttention against plain multi-head attention, the head grouping, the fast path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gqa_convert.config import ModelConfig, RopeConfig
from gqa_convert.errors import UnsupportedModelError
from gqa_convert.model.attention import GroupedQueryAttention, causal_mask
from gqa_convert.model.decoder import GQATransformer
from gqa_convert.model.kv_cache import KeyValueCacheEntry
from gqa_convert.model.norm import apply_qk_norm


def tiny_cfg(n_heads=8, n_kv=2, window=None, **kw) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        family="llama",
        d_model=32,
        n_layers=2,
        n_heads=n_heads,
        n_key_value_heads=n_kv,
        d_head=6,
        d_mlp=48,
        d_vocab=50,
        n_ctx=128,
        eps=1e-5,
        sliding_window=window,
        **kw,
    )


def random_attention(cfg: ModelConfig, attn_type="global", seed=0) -> GroupedQueryAttention:
    torch.manual_seed(seed)
    attn = GroupedQueryAttention(cfg, attn_type)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


def rotary_identity(n_pos: int, d_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n_pos, d_head), torch.zeros(n_pos, d_head)


# Query head h -> KV head, written out (not computed by the code under test): HF's
# repeat_kv grouping, h // (n_heads // n_kv), for 8 query heads.
HEAD_MAP = {
    1: [0, 0, 0, 0, 0, 0, 0, 0],
    2: [0, 0, 0, 0, 1, 1, 1, 1],
    4: [0, 0, 1, 1, 2, 2, 3, 3],
    8: [0, 1, 2, 3, 4, 5, 6, 7],
}


@pytest.mark.parametrize("n_kv", [1, 2, 4, 8])
@pytest.mark.parametrize("attn_type", ["global", "local"])
def test_gqa_equals_mha_on_expanded_kv(n_kv, attn_type):
    cfg = tiny_cfg(n_kv=n_kv, window=5)
    gqa = random_attention(cfg, attn_type)
    mha = GroupedQueryAttention(dataclasses.replace(cfg, n_key_value_heads=8), attn_type)
    heads = HEAD_MAP[n_kv]
    with torch.no_grad():
        for name in ("W_Q", "W_O", "b_Q", "b_O"):
            getattr(mha, name).copy_(getattr(gqa, name))
        mha._W_K.copy_(gqa._W_K[heads])  # MHA head h gets KV head heads[h]'s weights
        mha._W_V.copy_(gqa._W_V[heads])
        mha._b_K.copy_(gqa._b_K[heads])
        mha._b_V.copy_(gqa._b_V[heads])
    x = torch.randn(2, 12, cfg.d_model)
    cos, sin = rotary_identity(12, cfg.d_head)
    for fast in (True, False):
        expected = mha(x, x, x, rotary=(cos, sin), use_fast_path=fast)
        torch.testing.assert_close(
            gqa(x, x, x, rotary=(cos, sin), use_fast_path=fast), expected, atol=1e-5, rtol=0
        )


def test_w_k_is_a_copy_edit_the_stored_tensor():
    """`W_K` / `W_V` are expanded copies (the README says so): writing into them changes
    nothing; `_W_K` is what the model uses."""
    cfg = tiny_cfg(n_heads=8, n_kv=2)
    attn = random_attention(cfg)
    before = attn._W_K.detach().clone()
    with torch.no_grad():
        attn.W_K[0].zero_()
    assert torch.equal(attn._W_K, before) and not torch.all(attn.W_K[0] == 0)


@pytest.mark.parametrize("n_kv", [1, 2, 8])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_equals_transformers_llama_attention(n_kv, window):
    """One layer against transformers' own LlamaAttention (eager, its repeat_kv and its
    rotary) on the same weights: an expectation our code does not build."""
    import einops
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = tiny_cfg(n_kv=n_kv, window=window)
    attn = random_attention(cfg, "global" if window is None else "local")
    with torch.no_grad():
        for name in ("b_Q", "_b_K", "_b_V", "b_O"):  # LlamaAttention without attention_bias
            getattr(attn, name).zero_()
    hf_cfg = LlamaConfig(
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=n_kv,
        head_dim=cfg.d_head,
        intermediate_size=cfg.d_mlp,
        vocab_size=cfg.d_vocab,
        attn_implementation="eager",
    )
    hf = LlamaAttention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        hf.q_proj.weight.copy_(einops.rearrange(attn.W_Q, "n m h -> (n h) m"))
        hf.k_proj.weight.copy_(einops.rearrange(attn._W_K, "k m h -> (k h) m"))
        hf.v_proj.weight.copy_(einops.rearrange(attn._W_V, "k m h -> (k h) m"))
        hf.o_proj.weight.copy_(einops.rearrange(attn.W_O, "n h m -> m (n h)"))
    n_pos = 10
    x = torch.randn(2, n_pos, cfg.d_model)
    cos, sin = LlamaRotaryEmbedding(hf_cfg)(x, torch.arange(n_pos)[None])
    i, j = torch.arange(n_pos)[:, None], torch.arange(n_pos)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    mask = torch.zeros(n_pos, n_pos).masked_fill(~allowed, float("-inf"))[None, None]
    with torch.no_grad():
        expected = hf(x, position_embeddings=(cos, sin), attention_mask=mask)[0]
        for fast in (True, False):
            torch.testing.assert_close(
                attn(x, x, x, rotary=(cos[0], sin[0]), use_fast_path=fast),
                expected,
                atol=1e-5,
                rtol=0,
            )


def test_head_h_reads_kv_head_h_floordiv_group():
    cfg = tiny_cfg(n_heads=8, n_kv=2)  # group 4: heads 0-3 -> KV 0, heads 4-7 -> KV 1
    attn = random_attention(cfg)
    expected = HEAD_MAP[2]
    for h, kv in enumerate(expected):
        assert torch.equal(attn.W_K[h], attn._W_K[kv])
        assert torch.equal(attn.W_V[h], attn._W_V[kv])
        assert torch.equal(attn.b_K[h], attn._b_K[kv])
    # The forward pass groups the same way: KV head j carries the constant value j.
    v = torch.arange(2.0).view(1, 1, 2, 1).expand(1, 5, 2, cfg.d_head)
    pattern = torch.softmax(torch.randn(1, 8, 5, 5), dim=-1)
    z = attn.calculate_z_scores(v, pattern)  # [batch, pos, head, d_head]
    torch.testing.assert_close(z[0, :, :, 0], torch.tensor(expected).float().expand(5, 8))
    # ... and scores: head h's scores use K of KV head h // 4 only.
    q = torch.randn(1, 5, 8, cfg.d_head)
    k = torch.randn(1, 5, 2, cfg.d_head)
    scores = attn.calculate_attention_scores(q, k)
    for h, kv in enumerate(expected):
        manual = q[0, :, h] @ k[0, :, kv].T / cfg.d_head**0.5
        torch.testing.assert_close(scores[0, h], manual)


def test_per_head_inputs_match_shared_input():
    cfg = tiny_cfg()
    attn = random_attention(cfg)
    x = torch.randn(2, 7, cfg.d_model)
    shared = attn.calculate_qkv_matrices(x, x, x)
    per_head = attn.calculate_qkv_matrices(
        x[:, :, None].expand(2, 7, 8, cfg.d_model),
        x[:, :, None].expand(2, 7, 2, cfg.d_model),
        x[:, :, None].expand(2, 7, 2, cfg.d_model),
    )
    assert [t.shape for t in shared] == [(2, 7, 8, 6), (2, 7, 2, 6), (2, 7, 2, 6)]
    for a, b in zip(shared, per_head, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n_kv", [1, 2, 8])
@pytest.mark.parametrize("window", [None, 1, 4, 100])
def test_fast_path_equals_reference(n_kv, window):
    cfg = tiny_cfg(n_kv=n_kv, window=window or 3)
    attn = random_attention(cfg, "global" if window is None else "local")
    x = torch.randn(3, 10, cfg.d_model)
    cos, sin = torch.cos(torch.randn(10, cfg.d_head)), torch.sin(torch.randn(10, cfg.d_head))
    torch.testing.assert_close(
        attn(x, x, x, rotary=(cos, sin), use_fast_path=True),
        attn(x, x, x, rotary=(cos, sin), use_fast_path=False),
        atol=1e-5,
        rtol=0,
    )


def test_a_pattern_hook_switches_to_the_reference_path_and_can_patch():
    cfg = tiny_cfg()
    attn = random_attention(cfg)
    x = torch.randn(1, 6, cfg.d_model)
    cos, sin = rotary_identity(6, cfg.d_head)
    seen = []
    handle = attn.hook_pattern.register_forward_hook(lambda m, i, out: seen.append(out))
    assert attn.needs_pattern
    attn(x, x, x, rotary=(cos, sin))
    handle.remove()
    assert seen and seen[0].shape == (1, 8, 6, 6)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(1, 8, 6))
    assert torch.all(seen[0].triu(1) == 0)  # causal
    # A hook that returns a tensor replaces the activation: uniform-on-first-token pattern.
    first = torch.zeros(1, 8, 6, 6)
    first[..., 0] = 1
    attn.hook_pattern.register_forward_hook(lambda m, i, out: first)
    out = attn(x, x, x, rotary=(cos, sin))
    # Independently: every query head h reads V of KV head HEAD_MAP[2][h] at position 0,
    # V computed here from the stored weights, not by calculate_qkv_matrices.
    with torch.no_grad():
        v = torch.einsum("bpm,kmh->bpkh", x, attn._W_V) + attn._b_V  # [1, 6, 2, d_head]
        z = v[:, :1, HEAD_MAP[2]].expand(1, 6, 8, cfg.d_head)  # [1, 6, 8, d_head]
        expected = sum(z[:, :, h] @ attn.W_O[h] for h in range(8)) + attn.b_O
    torch.testing.assert_close(out, expected)


def test_sliding_window_mask_matches_hf_rule():
    # HF keeps key j for query i when i - window < j <= i.
    mask = causal_mask(6, 6, 3, torch.device("cpu"))
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (i - 3 < j <= i)


def test_layer_id_scaling():
    cfg = tiny_cfg(scale_attn_by_inverse_layer_idx=True)
    plain = random_attention(tiny_cfg())
    scaled = GroupedQueryAttention(cfg, layer_id=3)
    scaled.load_state_dict(plain.state_dict())
    q, k = torch.randn(1, 4, 8, 6), torch.randn(1, 4, 2, 6)
    torch.testing.assert_close(
        scaled.calculate_attention_scores(q, k), plain.calculate_attention_scores(q, k) / 4
    )
    x = torch.randn(1, 4, cfg.d_model)
    cos, sin = rotary_identity(4, 6)
    torch.testing.assert_close(
        scaled(x, x, x, rotary=(cos, sin), use_fast_path=True),
        scaled(x, x, x, rotary=(cos, sin), use_fast_path=False),
    )


def test_bad_attn_type_and_local_without_window_are_refused():
    with pytest.raises(ValueError, match="attn_type"):
        GroupedQueryAttention(tiny_cfg(), "sliding")
    with pytest.raises(ValueError, match="sliding_window"):
        GroupedQueryAttention(tiny_cfg(), "local")


def test_hook_points_have_transformer_lens_names():
    names = {n for n, _ in GQATransformer(tiny_cfg()).named_modules() if "hook" in n}
    for name in (
        "hook_embed",
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_mid",
        "blocks.0.hook_resid_post",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_mlp_out",
        "blocks.1.attn.hook_q",
        "blocks.1.attn.hook_k",
        "blocks.1.attn.hook_v",
        "blocks.1.attn.hook_rot_q",
        "blocks.1.attn.hook_rot_k",
        "blocks.1.attn.hook_attn_scores",
        "blocks.1.attn.hook_pattern",
        "blocks.1.attn.hook_z",
        "blocks.1.attn.hook_result",
        "blocks.1.mlp.hook_pre",
        "blocks.1.mlp.hook_post",
    ):
        assert name in names


@pytest.mark.parametrize("attn_type", ["global", "local"])
def test_decoder_entry_equals_the_transformer_lens_entry(attn_type):
    """The decoder passes cos / sin in; the TL-signature call computes them itself."""
    cfg = tiny_cfg(window=3, rope=RopeConfig(theta=500.0))
    attn = random_attention(cfg, attn_type)
    x = torch.randn(2, 9, cfg.d_model)
    rotary = GQATransformer(cfg).rotary(9, torch.float32)
    for fast in (True, False):
        expected = attn(x, x, x, rotary=rotary, use_fast_path=fast)
        torch.testing.assert_close(attn(x, x, x, use_fast_path=fast), expected)


@pytest.mark.parametrize("attn_type", ["global", "local"])
def test_kv_cache_steps_equal_one_pass_and_stay_at_n_kv_heads(attn_type):
    cfg = tiny_cfg(window=3)
    attn = random_attention(cfg, attn_type)
    x = torch.randn(2, 9, cfg.d_model)
    entry = KeyValueCacheEntry.init_cache_entry(cfg, batch_size=2)
    outs = [attn(s, s, s, past_kv_cache_entry=entry) for s in (x[:, :4], x[:, 4:8], x[:, 8:])]
    assert entry.past_keys.shape == entry.past_values.shape == (2, 9, 2, cfg.d_head)
    torch.testing.assert_close(torch.cat(outs, dim=1), attn(x, x, x), atol=1e-5, rtol=1e-5)


def test_left_padded_row_equals_the_row_without_padding():
    attn = random_attention(tiny_cfg())
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # row 0: three pads, then five tokens
    for fast in (True, False):
        out = attn(x, x, x, attention_mask=mask, use_fast_path=fast)
        alone = attn(x[:1, 3:], x[:1, 3:], x[:1, 3:], use_fast_path=fast)
        torch.testing.assert_close(out[0, 3:], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], attn(x[1:], x[1:], x[1:])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[0, :3], attn.b_O.expand(3, 32))  # no key: z = 0


def test_config_from_a_dict_with_transformer_lens_names():
    cfg = {"n_heads": 8, "n_key_value_heads": 2, "d_model": 32, "d_head": 4}
    attn = GroupedQueryAttention(cfg)
    assert attn._W_K.shape == (2, 32, 4) and attn.W_K.shape == (8, 32, 4)
    assert not hasattr(attn, "hook_rot_q")  # TL's default positional type: no rotary here
    assert GroupedQueryAttention({**cfg, "use_qk_norm": True}).q_norm.w.shape == (4,)
    with pytest.raises(UnsupportedModelError, match="use_dynamic_ntk_rope"):
        GroupedQueryAttention({**cfg, "use_dynamic_ntk_rope": True})


LENGTH_DEPENDENT = {
    "dynamic": RopeConfig(theta=500.0, type="dynamic", factor=2.0),
    "longrope": RopeConfig(
        theta=500.0,
        type="longrope",
        factor=4.0,
        original_max_position_embeddings=6,
        attention_factor=1.1,
        long_factor=(1.0, 3.0, 9.0),
        short_factor=(1.0, 1.5, 2.0),
        partial_rotary_factor=1.0,
    ),
}


@pytest.mark.parametrize("rope", list(LENGTH_DEPENDENT))
def test_length_dependent_rope_in_the_transformer_lens_entry(rope):
    """dynamic / longrope past their threshold (n_ctx 6, original length 6): the TL-signature
    call uses the whole sequence's frequencies, as the decoder's, also through a KV cache."""
    cfg = dataclasses.replace(tiny_cfg(rope=LENGTH_DEPENDENT[rope]), n_ctx=6)
    attn = random_attention(cfg)
    x = torch.randn(2, 10, cfg.d_model)
    decoder = GQATransformer(cfg)
    full = attn(x, x, x, rotary=decoder.rotary(10, torch.float32))
    torch.testing.assert_close(attn(x, x, x), full)
    short = attn(x[:, :5], x[:, :5], x[:, :5], rotary=decoder.rotary(5, torch.float32))
    assert not torch.allclose(full[:, :5], short, atol=1e-4)  # the scaling is engaged
    torch.testing.assert_close(attn(x[:, :5], x[:, :5], x[:, :5]), short)
    entry = KeyValueCacheEntry.init_cache_entry(cfg, batch_size=2)
    attn(x[:, :5], x[:, :5], x[:, :5], past_kv_cache_entry=entry)
    last = attn(x[:, 5:], x[:, 5:], x[:, 5:], past_kv_cache_entry=entry)
    torch.testing.assert_close(last, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_family_attention_options_from_a_model_config():
    """Granite's multiplier is the score scale; a NoPE layer has no rotary (nor its hooks);
    OLMo2's projection-wide q/k norms run before the cache."""
    cfg = tiny_cfg(attention_multiplier=0.25, qk_norm="proj", rope_layers=(True, False), n_kv=8)
    rope_layer = GroupedQueryAttention(cfg, "global", 0)
    assert rope_layer.attn_scale == 4.0 and rope_layer.k_norm.w.shape == (8 * 6,)
    nope = GroupedQueryAttention(cfg, "global", 1)
    with torch.no_grad():
        for p in nope.parameters():
            p.normal_(0, 0.3)
    assert not hasattr(nope, "hook_rot_q") and hasattr(rope_layer, "hook_rot_q")
    x = torch.randn(2, 7, cfg.d_model)
    rope_layer.load_state_dict(nope.state_dict())
    identity = rotary_identity(7, cfg.d_head)
    torch.testing.assert_close(nope(x, x, x), rope_layer(x, x, x, rotary=identity))
    with pytest.raises(ValueError, match="positional_embedding_type"):
        nope(x, x, x, rotary=identity)
    entry = KeyValueCacheEntry.init_cache_entry(cfg, batch_size=2)
    steps = [nope(s, s, s, past_kv_cache_entry=entry) for s in (x[:, :3], x[:, 3:])]
    torch.testing.assert_close(torch.cat(steps, dim=1), nope(x, x, x), atol=1e-5, rtol=1e-5)
    k = nope.calculate_qkv_matrices(x, x, x)[1]
    assert not torch.allclose(entry.past_keys, k, atol=1e-3)
    torch.testing.assert_close(entry.past_keys, apply_qk_norm(nope.k_norm, k))  # normed, cached
