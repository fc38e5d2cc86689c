"""Our GroupedQueryAttention against TransformerLens 3.9's, built from the same config.

Each test builds TL's `GroupedQueryAttention` and ours from one dict (or one
`HookedTransformerConfig`), loads TL's random weights into ours through TL's own state dict,
and compares at 1e-5: expanded weights, the three `calculate_*` methods, `forward` in every
mode the issue names (and both of our paths: SDPA and the reference), a KV cache, left
padding, and every hook's activation. TL is the reference; nothing here is hand-derived.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch

from gqa_convert.config import ModelConfig, RopeConfig
from gqa_convert.errors import UnsupportedModelError
from gqa_convert.interop import hooked_transformer_config
from gqa_convert.model.attention import GroupedQueryAttention
from gqa_convert.model.decoder import GQATransformer
from gqa_convert.model.kv_cache import KeyValueCacheEntry

if importlib.util.find_spec("transformer_lens") is None and not os.environ.get("CI"):
    pytest.skip("transformer-lens not installed: pip install -e '.[tl]'", allow_module_level=True)
if importlib.util.find_spec("transformer_lens.components") is None:  # 4.x deleted them
    pytest.skip("transformer-lens 4 installed: this compares with 3.9", allow_module_level=True)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
    from transformer_lens.components import GroupedQueryAttention as TLGroupedQueryAttention

TOL = {"atol": 1e-5, "rtol": 1e-5}
BASE = {
    "n_layers": 4,
    "n_ctx": 64,
    "d_model": 32,
    "d_head": 8,
    "n_heads": 8,
    "n_key_value_heads": 2,
    "act_fn": "silu",
    "normalization_type": "RMS",
    "positional_embedding_type": "rotary",
    "rotary_base": 500.0,  # not TL's default: a base that is not read shows
    "device": "cpu",
    "dtype": torch.float32,
}
# name -> (config overrides, attn_type, layer_id)
MODES = {
    "global": ({}, "global", None),
    "local": ({"window_size": 3}, "local", None),  # window shorter than the 10 positions
    "inverse-layer-idx": ({"scale_attn_by_inverse_layer_idx": True}, "global", 2),
    "partial-rotary": ({"rotary_dim": 4}, "global", None),
    "adjacent-pairs": ({"rotary_adjacent_pairs": True, "rotary_dim": 6}, "global", None),
    "ungroup": ({"ungroup_grouped_query_attention": True}, "global", None),
    "attn-result": ({"use_attn_result": True}, "global", None),
    "mqa": ({"n_key_value_heads": 1}, "global", None),
    "mha": ({"n_key_value_heads": 8}, "global", None),
    "no-rotary": ({"positional_embedding_type": "standard"}, "global", None),
    "llama3-rope": (
        {
            "use_NTK_by_parts_rope": True,
            "NTK_by_parts_factor": 8.0,
            "NTK_original_ctx_len": 16,  # small: the scaling moves these frequencies
        },
        "global",
        None,
    ),
    "qk-norm": ({"use_qk_norm": True, "eps": 1e-6}, "global", None),
    "yarn-rope": (
        {
            "use_yarn_rope": True,
            "yarn_factor": 4.0,
            "yarn_attention_factor": 1.2,
            "yarn_original_max_position_embeddings": 16,
        },
        "global",
        None,
    ),
    "yarn-global-only-on-local": (  # TL: a local layer without yarn
        {
            "window_size": 3,
            "use_yarn_rope": True,
            "yarn_factor": 4.0,
            "yarn_attention_factor": 1.2,
            "yarn_original_max_position_embeddings": 16,
            "yarn_global_attn_only": True,
        },
        "local",
        None,
    ),
    "linear-rope": ({"rotary_scaling_factor": 4.0}, "global", None),
    # Gemma 2: scores capped before the mask (small enough to bind), another score scale
    "soft-cap": ({"attn_scores_soft_cap": 0.5, "attn_scale": 3.0}, "global", None),
    "soft-cap-local": ({"attn_scores_soft_cap": 0.5, "window_size": 3}, "local", None),
    # Gemma 3: local layers rotate at their own base
    "rotary-base-local": ({"rotary_base_local": 50.0, "window_size": 3}, "local", None),
    "linear-rope-local": ({"rotary_scaling_factor": 4.0, "window_size": 3}, "local", None),
    "local-ungroup-result": (
        {"window_size": 4, "ungroup_grouped_query_attention": True, "use_attn_result": True},
        "local",
        1,
    ),
}


def build(overrides=None, attn_type="global", layer_id=None, kind="dict", seed=0):
    """(TL's module, ours, the cfg both were built from), with the same random weights."""
    d = {**BASE, **(overrides or {})}
    cfg = d if kind == "dict" else HookedTransformerConfig(**d)
    theirs = TLGroupedQueryAttention(cfg, attn_type, layer_id)
    ours = GroupedQueryAttention(cfg, attn_type, layer_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)  # biases too: b_K / b_V must be expanded like W_K / W_V
    ours.load_state_dict(theirs.state_dict(), strict=True)  # TL's state dict, as it is
    return theirs, ours, cfg


def close(actual, expected):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("kind", ["dict", "config"])
def test_parameters_and_expanded_weights(kind):
    theirs, ours, _ = build(kind=kind)
    shapes = {n: p.shape for n, p in ours.named_parameters()}
    assert shapes == {n: p.shape for n, p in theirs.named_parameters()}
    for name in ("W_K", "W_V", "b_K", "b_V", "W_Q", "b_Q", "W_O", "b_O"):
        close(getattr(ours, name), getattr(theirs, name))
    assert ours.W_K.shape == (8, 32, 8) and ours._W_K.shape == (2, 32, 8)
    assert ours.W_K.data_ptr() != ours._W_K.data_ptr()  # a copy, not a view
    assert ours.attn_scale == theirs.attn_scale


@pytest.mark.parametrize("kind", ["dict", "config"])
@pytest.mark.parametrize("ungroup", [False, True])
def test_calculate_qkv_matrices_shared_and_per_head_inputs(kind, ungroup):
    opts = {"use_split_qkv_input": True, "ungroup_grouped_query_attention": ungroup}
    theirs, ours, _ = build(opts, kind=kind)
    kv = 8 if ungroup else 2
    per_head = (torch.randn(2, 7, 8, 32), torch.randn(2, 7, kv, 32), torch.randn(2, 7, kv, 32))
    for a, b in zip(
        ours.calculate_qkv_matrices(*per_head),
        theirs.calculate_qkv_matrices(*per_head),
        strict=True,
    ):
        close(a, b)
    # Shared inputs: TL's split mode wants per-head inputs, its plain mode takes [b, p, m].
    theirs, ours, _ = build({"ungroup_grouped_query_attention": ungroup}, kind=kind)
    x = torch.randn(2, 7, 32)
    for a, b in zip(
        ours.calculate_qkv_matrices(x, x, x), theirs.calculate_qkv_matrices(x, x, x), strict=True
    ):
        close(a, b)
    assert a.shape == (2, 7, kv, 8)


@pytest.mark.parametrize("kind", ["dict", "config"])
def test_calculate_attention_and_z_scores(kind):
    theirs, ours, _ = build({"scale_attn_by_inverse_layer_idx": True}, layer_id=1, kind=kind)
    q, k, v = torch.randn(2, 5, 8, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    close(ours.calculate_attention_scores(q, k), theirs.calculate_attention_scores(q, k))
    pattern = torch.softmax(torch.randn(2, 8, 5, 6), dim=-1)
    close(ours.calculate_z_scores(v, pattern), theirs.calculate_z_scores(v, pattern))


@pytest.mark.parametrize("kind", ["dict", "config"])
@pytest.mark.parametrize("mode", list(MODES))
def test_forward(mode, kind):
    overrides, attn_type, layer_id = MODES[mode]
    theirs, ours, _ = build(overrides, attn_type, layer_id, kind)
    x = torch.randn(3, 10, 32)
    expected = theirs(x, x, x)
    for fast in (None, False):  # SDPA and the reference path
        close(ours(x, x, x, use_fast_path=fast), expected)


@pytest.mark.parametrize(
    "mode", ["global", "local", "partial-rotary", "mqa", "ungroup", "qk-norm", "yarn-rope"]
)
def test_two_steps_through_a_kv_cache_entry(mode):
    overrides, attn_type, layer_id = MODES[mode]
    theirs, ours, cfg = build(overrides, attn_type, layer_id)
    tl_cfg = HookedTransformerConfig(**cfg)
    x = torch.randn(2, 9, 32)
    steps = [x[:, :5], x[:, 5:8], x[:, 8:]]  # a prompt, three tokens, one token
    tl_entry = TransformerLensKeyValueCacheEntry.init_cache_entry(tl_cfg, "cpu", 2)
    if mode == "ungroup":  # TL's init makes n_kv heads; under ungroup K/V come at n_heads
        tl_entry = TransformerLensKeyValueCacheEntry(
            torch.empty(2, 0, 8, 8), torch.empty(2, 0, 8, 8)
        )
    entries = [
        KeyValueCacheEntry.init_cache_entry(cfg, "cpu", 2),
        TransformerLensKeyValueCacheEntry(tl_entry.past_keys.clone(), tl_entry.past_values.clone()),
    ]  # ours, and TL's own entry class driven by our module
    for step in steps:
        expected = theirs(step, step, step, past_kv_cache_entry=tl_entry)
        for entry in entries:
            for fast in (None, False):
                frozen = KeyValueCacheEntry(entry.past_keys, entry.past_values, frozen=True)
                close(
                    ours(step, step, step, past_kv_cache_entry=frozen, use_fast_path=fast), expected
                )
            ours(step, step, step, past_kv_cache_entry=entry)
            close(entry.past_keys, tl_entry.past_keys)
            close(entry.past_values, tl_entry.past_values)
    heads = 8 if mode == "ungroup" else BASE["n_key_value_heads"] if mode != "mqa" else 1
    assert entries[0].past_keys.shape == (2, 9, heads, 8)  # held at n_kv heads
    # The last cached step equals one pass over the whole sequence, at its positions.
    close(ours(x, x, x)[:, 8:], expected)


def padded_mask() -> torch.Tensor:
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding: row 0 starts at position 4
    mask[2, :1] = 0
    return mask


@pytest.mark.parametrize(
    "mode", ["global", "local", "partial-rotary", "adjacent-pairs", "qk-norm", "yarn-rope"]
)
def test_left_padded_batch(mode):
    overrides, attn_type, layer_id = MODES[mode]
    theirs, ours, _ = build(overrides, attn_type, layer_id)
    x = torch.randn(3, 10, 32)
    mask = padded_mask()
    expected = theirs(x, x, x, attention_mask=mask)
    for fast in (None, False):
        close(ours(x, x, x, attention_mask=mask, use_fast_path=fast), expected)
    # Padding moves the rotary positions: the padded row is not the unpadded computation.
    assert not torch.allclose(expected[0, 4:], theirs(x[:1], x[:1], x[:1])[0, 4:], atol=1e-3)


def test_left_padded_two_steps_through_a_kv_cache_entry():
    theirs, ours, cfg = build()
    x, mask = torch.randn(3, 10, 32), padded_mask()
    tl_entry = TransformerLensKeyValueCacheEntry.init_cache_entry(
        HookedTransformerConfig(**cfg), "cpu", 3
    )
    entry = KeyValueCacheEntry.init_cache_entry(cfg, "cpu", 3)
    for lo, hi in ((0, 7), (7, 10)):  # the mask always spans cached + new positions
        step = x[:, lo:hi]
        expected = theirs(step, step, step, tl_entry, attention_mask=mask[:, :hi])
        close(ours(step, step, step, entry, attention_mask=mask[:, :hi]), expected)


def test_additive_attention_mask():
    theirs, ours, _ = build()
    x = torch.randn(2, 6, 32)
    additive = torch.randn(2, 1, 1, 6)
    additive[1, ..., 2] = float("-inf")
    expected = theirs(x, x, x, additive_attention_mask=additive)
    for fast in (None, False):
        close(ours(x, x, x, additive_attention_mask=additive, use_fast_path=fast), expected)


def record(module, names):
    seen, handles = {}, []
    for name in names:
        hook = module.get_submodule(name)
        handles.append(
            hook.register_forward_hook(lambda m, i, out, n=name: seen.__setitem__(n, out))
        )
    return seen, handles


@pytest.mark.parametrize(
    "mode", ["global", "local-ungroup-result", "partial-rotary", "no-rotary", "qk-norm"]
)
@pytest.mark.parametrize("with_pattern", [True, False])
def test_every_hook_sees_what_tl_sees(mode, with_pattern):
    """Same hook names; each activation equal to TL's. Without a hook on scores / pattern,
    ours runs SDPA: the other hooks must still see TL's values."""
    overrides, attn_type, layer_id = MODES[mode]
    theirs, ours, _ = build(overrides, attn_type, layer_id)
    names = {n for n, _ in theirs.named_modules() if n.startswith("hook_")}
    assert {n for n, _ in ours.named_modules() if n.startswith("hook_")} == names
    if not with_pattern:
        names -= {"hook_attn_scores", "hook_pattern"}
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    tl_seen, _ = record(theirs, names)
    our_seen, _ = record(ours, names)
    close(ours(x, x, x, attention_mask=mask), theirs(x, x, x, attention_mask=mask))
    expected = {n for n in names if n != "hook_result"} | (
        {"hook_result"} if MODES[mode][0].get("use_attn_result") else set()
    )
    assert set(tl_seen) == set(our_seen) == expected
    for name in names & set(tl_seen):
        close(our_seen[name], tl_seen[name])


def test_hook_q_sees_kv_heads_unexpanded_unless_ungrouped():
    for ungroup, heads in ((False, 2), (True, 8)):
        _, ours, _ = build({"ungroup_grouped_query_attention": ungroup})
        seen, _ = record(ours, ["hook_k", "hook_v", "hook_rot_k"])
        ours(*(torch.randn(1, 4, 32),) * 3)
        assert {n: t.shape[2] for n, t in seen.items()} == dict.fromkeys(seen, heads)


@pytest.mark.parametrize(
    "overrides, attn_type, layer_id, error, field",
    [
        (
            {"original_architecture": "Olmo2ForCausalLM"},  # TL's own OLMo q/k norms
            "global",
            None,
            UnsupportedModelError,
            "original_architecture",
        ),
        (
            {"use_dynamic_ntk_rope": True},  # Qwen-1's, not transformers' dynamic
            "global",
            None,
            UnsupportedModelError,
            "use_dynamic_ntk_rope",
        ),
        (
            {"positional_embedding_type": "alibi"},
            "global",
            None,
            UnsupportedModelError,
            "positional_embedding_type",
        ),
        (
            {"use_attention_sinks": True},
            "global",
            None,
            UnsupportedModelError,
            "use_attention_sinks",
        ),
        (
            {"attention_dir": "bidirectional"},
            "global",
            None,
            UnsupportedModelError,
            "attention_dir",
        ),
        ({}, "local", None, ValueError, "window_size"),
        ({"scale_attn_by_inverse_layer_idx": True}, "global", None, ValueError, "layer_id"),
        ({"n_key_value_heads": 3}, "global", None, ValueError, "n_key_value_heads"),
    ],
)
def test_what_is_not_implemented_is_refused_by_name(overrides, attn_type, layer_id, error, field):
    with pytest.raises(error, match=field):
        GroupedQueryAttention({**BASE, **overrides}, attn_type, layer_id)


ROPES = {
    "default": RopeConfig(theta=5e5),
    "llama3": RopeConfig(5e5, "llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=16),
    "linear": RopeConfig(5e5, "linear", 4.0),
    "yarn": RopeConfig(
        5e5,
        "yarn",
        4.0,
        original_max_position_embeddings=16,
        attention_factor=1.2,
        beta_fast=32.0,
        beta_slow=1.0,
    ),
}


@pytest.mark.parametrize("qk_norm", [None, "head"])
@pytest.mark.parametrize("attn_type", ["global", "local"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_our_decoder_entry_and_tl_entry_are_one_module(attn_type, rope, qk_norm):
    """Built from our ModelConfig, the module equals TL's built from the HookedTransformerConfig
    `to_hooked_transformer` uses; the decoder's entry (cos / sin passed in) equals the TL one."""
    rope_cfg = ROPES[rope]
    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        family="llama",
        d_model=32,
        n_layers=2,
        n_heads=8,
        n_key_value_heads=2,
        d_head=8,
        d_mlp=48,
        d_vocab=50,
        n_ctx=64,
        eps=1e-5,
        rope=rope_cfg,
        sliding_window=4,
        attn_types=(attn_type, attn_type),
        qk_norm=qk_norm,
    )
    if rope == "linear" and attn_type == "local":
        # TL applies linear scaling to global layers only: interop refuses rather than differ.
        with pytest.raises(UnsupportedModelError):
            hooked_transformer_config(cfg)
        return
    theirs = TLGroupedQueryAttention(hooked_transformer_config(cfg), attn_type, 1)
    ours = GroupedQueryAttention(cfg, attn_type, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 12, 32)
    expected = theirs(x, x, x)
    decoder_rotary = GQATransformer(cfg).rotary(12, torch.float32)
    for fast in (None, False):
        close(ours(x, x, x, use_fast_path=fast), expected)
        close(ours(x, x, x, rotary=decoder_rotary, use_fast_path=fast), expected)
    entry = KeyValueCacheEntry.init_cache_entry(cfg, batch_size=2)
    ours(x[:, :7], x[:, :7], x[:, :7], entry)
    close(ours(x[:, 7:], x[:, 7:], x[:, 7:], entry), expected[:, 7:])
    assert entry.past_keys.shape == (2, 12, 2, 8)
