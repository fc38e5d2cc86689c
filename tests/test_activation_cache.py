"""`ActivationCache` (model/activation_cache.py) against TransformerLens 3.9's on the same
export: every public method, called with the same arguments on our cache and on TL's
(`run_with_cache` of our model and of `to_hooked_transformer`), gives the same tensors (within
`assert_same_activation`'s bound, tests/test_hooks.py) and the same labels; and the
decompositions add up to the residual stream they decompose (ours alone)."""

from __future__ import annotations

import pytest
import torch

from gqa_convert.model.activation_cache import ActivationCache, Slice, get_act_name
from tests.hf_models import random_tokens
from tests.test_hooks import assert_same_activation, builder
from tests.test_interop import needs_tl

# Dense: b_O (accumulated_bias), Gemma 2's sandwich norms and scaled embedding; a MoE.
CASES = ["llama-attention-bias", "gemma2", "mixtral-window-8"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return builder(tmp_path_factory)


def directions(d_model: int, n: int) -> torch.Tensor:
    return torch.randn(d_model, n, generator=torch.Generator().manual_seed(5))


def method_calls(cfg, dense: bool) -> list[tuple[str, dict]]:
    """(method, keyword arguments): each method, across its options."""
    project2, project1 = directions(cfg.d_model, 3), directions(cfg.d_model, 1)[:, 0]
    calls = [
        ("accumulated_resid", {}),
        ("accumulated_resid", {"incl_mid": True, "return_labels": True}),
        ("accumulated_resid", {"layer": 1, "mlp_input": True, "apply_ln": True}),
        ("accumulated_resid", {"apply_ln": True, "pos_slice": -1, "return_labels": True}),
        ("accumulated_resid", {"layer": -1, "apply_ln": True, "incl_mid": True}),
        ("accumulated_resid", {"layer": 2, "apply_ln": True, "pos_slice": (2, 9)}),
        ("decompose_resid", {"return_labels": True}),
        ("decompose_resid", {"mode": "attn", "layer": 2, "apply_ln": True}),
        ("decompose_resid", {"mode": "mlp", "mlp_input": True, "layer": 1, "apply_ln": True}),
        ("decompose_resid", {"incl_embeds": False, "apply_ln": True, "pos_slice": [0, 5, 7]}),
        ("stack_head_results", {"return_labels": True}),
        ("stack_head_results", {"layer": 2, "incl_remainder": True, "apply_ln": True}),
        ("stack_head_results", {"pos_slice": -1, "incl_remainder": True, "return_labels": True}),
        ("stack_head_results", {"layer": 0}),
        ("stack_activation", {"activation_name": "pattern"}),
        ("stack_activation", {"activation_name": "scale", "layer": 2, "sublayer_type": "ln2"}),
        ("get_full_resid_decomposition", {"expand_neurons": False, "return_labels": True}),
        (
            "get_full_resid_decomposition",
            {"layer": 1, "mlp_input": True, "apply_ln": True, "expand_neurons": False},
        ),
        (
            "get_full_resid_decomposition",
            {"expand_neurons": False, "apply_ln": True, "project_output_onto": project2},
        ),
    ]
    if dense:  # neurons: TL's MoE has no W_out (nor do ours: an error, tested below)
        calls += [
            ("get_full_resid_decomposition", {"return_labels": True}),
            ("get_full_resid_decomposition", {"apply_ln": True, "pos_slice": -1}),
            (
                "get_full_resid_decomposition",
                {"apply_ln": True, "pos_slice": (1, 4), "project_output_onto": project2},
            ),
            ("get_full_resid_decomposition", {"project_output_onto": project1}),
            ("stack_neuron_results", {"layer": 2, "return_labels": True}),
            (
                "stack_neuron_results",
                {"layer": 1, "neuron_slice": (0, 10), "incl_remainder": True, "apply_ln": True},
            ),
            (
                "stack_neuron_results",
                {"layer": 2, "apply_ln": True, "project_output_onto": project2},
            ),
            (
                "stack_neuron_results",
                {"layer": 3, "incl_remainder": True, "project_output_onto": project1},
            ),
            (
                "stack_neuron_results",
                {
                    "layer": 3,
                    "incl_remainder": True,
                    "apply_ln": True,
                    "project_output_onto": project2,
                    "pos_slice": -1,
                },
            ),
            ("get_neuron_results", {"layer": 1, "neuron_slice": [1, 3, 8], "pos_slice": (0, 6)}),
            ("get_neuron_results", {"layer": 2, "project_output_onto": project1}),
        ]
    return calls


def assert_same_result(what: str, ours, theirs) -> None:
    if isinstance(theirs, tuple):  # (tensor, labels)
        assert ours[1] == theirs[1], what
        ours, theirs = ours[0], theirs[0]
    assert_same_activation(what, ours, theirs)


def caches(built, case, tokens):
    ours, tl, _ = built(case)
    with torch.no_grad():
        return ours.run_with_cache(tokens)[1], tl.run_with_cache(tokens)[1]


@needs_tl
@pytest.mark.parametrize("case", CASES)
def test_every_method_gives_tls_result(built, case):
    ours, _, n_pos = built(case)
    cache, theirs = caches(built, case, random_tokens(n_pos))
    assert isinstance(cache, ActivationCache) and len(cache) == len(theirs) + len(
        [k for k in cache if k not in theirs.cache_dict]
    )
    with torch.no_grad():
        for method, kwargs in method_calls(ours.cfg, dense=ours.cfg.moe is None):
            what = f"{method}({', '.join(kwargs)})"
            assert_same_result(
                what, getattr(cache, method)(**kwargs), getattr(theirs, method)(**kwargs)
            )
        # apply_ln_to_stack and logit_attrs take a stack: each its own cache's
        stack, tl_stack = cache.decompose_resid(), theirs.decompose_resid()
        for kwargs in (
            {"layer": 1, "mlp_input": True},
            {"layer": 2, "batch_slice": 1},
            {"pos_slice": -1, "batch_slice": [1, 0]},
        ):
            pos = Slice(kwargs.get("pos_slice"))
            assert_same_result(
                f"apply_ln_to_stack({kwargs})",
                cache.apply_ln_to_stack(pos.apply(stack, -2), **kwargs),
                theirs.apply_ln_to_stack(pos.apply(tl_stack, -2), **kwargs),
            )
        tokens = random_tokens(n_pos)
        for args, kwargs in (
            ((tokens,), {}),
            ((tokens[:, -1],), {"incorrect_tokens": tokens[:, 0], "pos_slice": -1}),
            ((5,), {"incorrect_tokens": 7}),
        ):
            pos = Slice(kwargs.get("pos_slice"))
            assert_same_result(
                f"logit_attrs({kwargs})",
                cache.logit_attrs(pos.apply(stack, -2), *args, **kwargs),
                theirs.logit_attrs(pos.apply(tl_stack, -2), *args, **kwargs),
            )


@needs_tl
@pytest.mark.parametrize("case", CASES)
def test_shorthand_keys_and_dict_methods_as_tls(built, case):
    ours, _, n_pos = built(case)
    cache, theirs = caches(built, case, random_tokens(n_pos))
    for key in (
        ("resid_post", 0),
        ("q", 1, "attn"),
        ("scale", 2, "ln1"),
        ("normalized", -1, "ln2"),
        ("k", -1),
        ("pattern", 0),
        "pre1" if ours.cfg.moe is None else "v2",
        "scale",
        "embed",
        "blocks.1.hook_mlp_out",
    ):
        name = get_act_name(*key) if isinstance(key, tuple) and key[1] >= 0 else None
        assert_same_activation(str(key), cache[key], theirs[key])
        if name:
            assert torch.equal(cache[key], cache[name])
    assert set(theirs.keys()) <= set(cache.keys()) and list(cache) == list(cache.keys())
    assert all(torch.equal(v, cache[k]) for k, v in cache.items())
    assert "blocks.0.hook_resid_pre" in cache and repr(cache).startswith("ActivationCache")
    # rows of a batch; a batch of one without its batch dimension
    row, tl_row = cache.apply_slice_to_batch_dim(1), theirs.apply_slice_to_batch_dim(1)
    assert not row.has_batch_dim and row["resid_pre", 1].ndim == 2
    assert_same_result(
        "row", row.accumulated_resid(apply_ln=True), tl_row.accumulated_resid(apply_ln=True)
    )
    one, tl_one = caches(built, case, random_tokens(n_pos, batch=1))
    one.remove_batch_dim(), tl_one.remove_batch_dim()
    assert not one.has_batch_dim and one["resid_post", 0].shape == (n_pos, ours.cfg.d_model)
    for method, kwargs in (
        ("accumulated_resid", {"apply_ln": True, "incl_mid": True}),
        ("decompose_resid", {"apply_ln": True, "pos_slice": -1}),
        ("stack_head_results", {"apply_ln": True, "incl_remainder": True}),
    ):
        assert_same_result(
            method, getattr(one, method)(**kwargs), getattr(tl_one, method)(**kwargs)
        )
    with pytest.raises(ValueError, match="batch of 2"):
        cache.remove_batch_dim()
    assert cache.to("cpu") is cache


@needs_tl  # (the fixture builds TL's model too)
@pytest.mark.parametrize("case", CASES)
def test_the_decompositions_add_up_to_the_residual_stream(built, case):
    """Ours alone: the embedding and every attn_out and mlp_out add up to each layer's
    resid_pre (Gemma's scaled embedding included); in a pre-norm model (no norm after the
    sublayers, which TL's decompositions ignore too) the heads plus b_O to attn_out and the
    full decomposition (neurons, heads, embedding, biases) to the final resid_post. fp32
    sums of the same terms in another order: 1e-5 of the scale."""
    model, _, n_pos = built(case)
    with torch.no_grad():
        _, cache = model.run_with_cache(random_tokens(n_pos))
        for layer in range(model.cfg.n_layers + 1):
            resid = (
                cache["resid_pre", layer] if layer < model.cfg.n_layers else cache["resid_post", -1]
            )
            assert_same_activation(f"layer {layer}", cache.decompose_resid(layer).sum(0), resid)
        if model.cfg.norm_placement != "pre":
            return
        heads = cache.stack_head_results(layer=2)[-model.cfg.n_heads :].sum(0)
        assert_same_activation("heads", heads + model.blocks[1].attn.b_O, cache["attn_out", 1])
        if model.cfg.moe is None:
            full = cache.get_full_resid_decomposition().sum(0)
            assert_same_activation("full", full, cache["resid_post", -1])
        else:
            with pytest.raises(ValueError, match="mixture of experts"):
                cache.stack_neuron_results(2)
