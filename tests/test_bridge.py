"""to_transformer_bridge: an export as a TransformerLens 4.3 TransformerBridge, logits = HF's on
every family case of the family tests, natively where TL's native model expresses the family,
else through transformers; GQA hooks at n_kv heads holding what ours hold.

TransformerLens 4 cannot be installed beside 3.9 (the `tl` extra the default run uses): these
tests carry the `tl4` marker and run in a venv of their own (`.ci/run`:
`pip install -c .ci/constraints.txt -e '.[dev,tl4]'`, then `pytest -m tl4`). Elsewhere they
skip, unless GQA_CONVERT_TL4 is set (as .ci/run's TL 4 step does): then they fail instead.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

import pytest
import torch

from gqa_convert import GQATransformer, convert
from gqa_convert.errors import UnsupportedModelError
from gqa_convert.interop import bridge_route, to_transformer_bridge
from tests import test_families, test_gemma, test_moe, test_parity
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens
from tests.test_parity import assert_logits_match
from tests.tiny_tokenizer import save_tiny_tokenizer


def _tl_major() -> int:
    try:
        return int(metadata.version("transformer-lens").split(".")[0])
    except metadata.PackageNotFoundError:
        return 0


needs_tl4 = pytest.mark.skipif(
    _tl_major() < 4 and not os.environ.get("GQA_CONVERT_TL4"),
    reason="transformer-lens 4 not installed (its own venv: pip install -e '.[tl4]')",
)
pytestmark = [pytest.mark.tl4, needs_tl4]

# (family, overrides, save options, prompt length): every family case of the family tests,
# and two the native path would otherwise not meet (partial rotary, linear scaling).
CASES = {
    **{f"parity/{k}": v for k, v in test_parity.CASES.items()},
    **{f"families/{k}": (f, o, {}, n) for k, (f, o, n) in test_families.CASES.items()},
    **{f"gemma/{k}": (f, o, {}, n) for k, (f, o, n) in test_gemma.CASES.items()},
    **{f"moe/{k}": (f, o, {}, n) for k, (f, o, n) in test_moe.CASES.items()},
    "extra/phi3-partial-rotary": ("phi3", {"partial_rotary_factor": 0.5}, {}, 40),
    "extra/llama-rope-linear": ("llama", {"rope_parameters": test_families.LINEAR}, {}, 40),
}

# The cases TL's native model expresses exactly (pre-norm, global attention, default / linear /
# llama3 rotary, no q/k norm, no experts, no Granite multipliers); every other goes through
# transformers. Asserted, so a change of route shows here.
NATIVE = {
    *(f"parity/{k}" for k in test_parity.CASES if k.startswith("llama")),
    "parity/qwen2-biases",
    "families/phi3",
    "gemma/gemma-mqa-tied",
    "gemma/gemma-untied",
    "extra/phi3-partial-rotary",
    "extra/llama-rope-linear",
}


def export(tmp_path: Path, case: str, tokenizer: bool = True) -> tuple[Path, Path, int]:
    """The case's HF checkpoint (with a tiny tokenizer: boot_transformers loads one) and
    its export."""
    family, overrides, save, n_pos = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **save, **overrides)
    if tokenizer:
        save_tiny_tokenizer(src)
    return src, convert(src, tmp_path / "out", verify=False), n_pos


def hf_logits(src: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf(src)(tokens).logits


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hf(tmp_path, case):
    src, out, n_pos = export(tmp_path, case)
    bridge = to_transformer_bridge(out, "cpu", torch.float32)
    expected = "native" if case in NATIVE else "transformers"
    assert bridge.gqa_route.path == expected, bridge.gqa_route.reasons
    assert bool(bridge.gqa_route.reasons) == (expected == "transformers")
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        ours = bridge(tokens)
    assert_logits_match(ours, hf_logits(src, tokens))


def test_the_route_table_names_real_cases():
    assert set(NATIVE) <= set(CASES)


# One case per kind of attention and route: GQA native, MQA native (Gemma, tied), MHA with a
# window through transformers, GQA with q/k norms and a window through transformers, MoE.
HOOK_CASES = [
    "parity/llama-gqa4",
    "parity/qwen2-biases",
    "gemma/gemma-mqa-tied",
    "parity/mistral-window-8",
    "families/qwen3-sliding-upper-layers",
    "families/phi3-partial-rotary-window",
    "gemma/gemma2-mha",
    "moe/mixtral-mqa",
]
# [batch, pos, heads, d_head] with heads n_heads (q, z) or n_kv_heads (k, v), and patterns.
GQA_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_pattern")


@pytest.mark.parametrize("case", HOOK_CASES)
def test_gqa_hooks_have_our_names_shapes_and_values(tmp_path, case):
    """hook_k / hook_v at n_kv heads; every GQA hook and the residual stream equal ours
    (fp32, 1e-4), q and k in the route's order of dims."""
    _, out, n_pos = export(tmp_path, case)
    bridge = to_transformer_bridge(out, "cpu", torch.float32)
    model = GQATransformer.from_pretrained(out)
    cfg = model.cfg
    tokens = random_tokens(n_pos)
    names = [f"blocks.{i}.attn.{h}" for i in range(cfg.n_layers) for h in GQA_HOOKS]
    names += [f"blocks.{i}.hook_resid_post" for i in range(cfg.n_layers)]
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(tokens, names_filter=names)
        _, ours = model.run_with_cache(tokens, names_filter=names)
    order = bridge.gqa_route.qk_order
    for name in names:
        mine = ours[name]
        if order is not None and name.endswith(("hook_q", "hook_k")):
            mine = mine[..., list(order)]
        assert theirs[name].shape == mine.shape, name
        torch.testing.assert_close(theirs[name], mine, atol=1e-4, rtol=0, msg=name)
    k = theirs["blocks.0.attn.hook_k"]
    assert k.shape == (2, n_pos, cfg.n_key_value_heads, cfg.d_head)
    assert theirs["blocks.0.attn.hook_q"].shape[2] == cfg.n_heads


def test_both_paths_agree_and_native_reorders_only_q_and_k(tmp_path):
    src, out, n_pos = export(tmp_path, "parity/llama-gqa4")
    native = to_transformer_bridge(out, "cpu", torch.float32)
    via_hf = to_transformer_bridge(out, "cpu", torch.float32, path="transformers")
    assert via_hf.gqa_route.path == "transformers" and via_hf.gqa_route.qk_order is None
    tokens = random_tokens(n_pos)
    names = ["blocks.1.attn.hook_k", "blocks.1.attn.hook_v"]
    with torch.no_grad():
        a, cache_a = native.run_with_cache(tokens, names_filter=names)
        b, cache_b = via_hf.run_with_cache(tokens, names_filter=names)
    assert_logits_match(a, b)
    assert_logits_match(b, hf_logits(src, tokens))
    order = list(native.gqa_route.qk_order)
    assert order != sorted(order)  # a real reordering, checked against HF's order:
    k_native, k_hf = cache_a["blocks.1.attn.hook_k"], cache_b["blocks.1.attn.hook_k"]
    torch.testing.assert_close(k_native, k_hf[..., order], atol=1e-5, rtol=0)
    assert not torch.allclose(k_native, k_hf, atol=1e-3)
    torch.testing.assert_close(cache_a["blocks.1.attn.hook_v"], cache_b["blocks.1.attn.hook_v"])


def test_without_the_reordering_the_logits_are_wrong(tmp_path, monkeypatch):
    """The reordering of q / k dims is what makes native rotary HF's: dropped, logits move."""
    from gqa_convert.interop import bridge as module

    src, out, n_pos = export(tmp_path, "parity/llama-gqa4")
    monkeypatch.setattr(module, "native_qk_order", lambda d_head, rotary_dim: tuple(range(d_head)))
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        wrong = to_transformer_bridge(out, "cpu", torch.float32)(tokens)
    assert (wrong - hf_logits(src, tokens)).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("families/qwen3", "q/k norm"),
        ("parity/mistral-window-8", "sliding-window layers"),
        ("moe/olmoe", "a mixture of experts"),
        ("families/granite", "residual_multiplier"),
        ("families/rope-yarn-mscale", "rope type 'yarn'"),
        ("families/smollm3-no-rope-layers", "layers without rotary"),
        ("gemma/gemma2", "norm_placement = 'sandwich'"),
    ],
)
def test_native_refuses_what_it_cannot_express_naming_it(tmp_path, case, named):
    _, out, _ = export(tmp_path, case)
    assert any(named in r for r in bridge_route(GQATransformer.from_pretrained(out).cfg).reasons)
    with pytest.raises(UnsupportedModelError, match=named):
        to_transformer_bridge(out, "cpu", path="native")


def test_dtype_defaults_to_the_exports_and_n_ctx_is_capped(tmp_path):
    _, out, _ = export(tmp_path, "parity/llama-bf16-source")
    bridge = to_transformer_bridge(out, "cpu", n_ctx=32)
    assert next(bridge.parameters()).dtype == torch.bfloat16
    assert bridge.cfg.n_ctx == 32
    with pytest.raises(ValueError, match="exceeds n_ctx=32"):
        bridge(random_tokens(33))


@pytest.mark.parametrize(
    ("case", "path"),
    [
        ("parity/llama-gqa4", "native"),
        ("parity/llama-gqa4", "transformers"),
        ("gemma/gemma2", "transformers"),
        ("moe/mixtral-window-8", "transformers"),
    ],
)
def test_an_export_without_a_tokenizer_still_gives_hfs_logits(tmp_path, case, path):
    """boot_transformers needs a tokenizer file; without one the HF model is wrapped by
    build_bridge_from_module: same logits, no tokenizer."""
    src, out, n_pos = export(tmp_path, case, tokenizer=False)
    assert not (out / "tokenizer.json").exists()
    bridge = to_transformer_bridge(out, "cpu", torch.float32, path=path)
    assert bridge.tokenizer is None
    tokens = random_tokens(n_pos)
    with torch.no_grad():
        assert_logits_match(bridge(tokens), hf_logits(src, tokens))


@pytest.mark.parametrize("case", ["parity/llama-gqa4", "parity/qwen2-biases", "families/qwen3"])
def test_strings_are_tokenized_as_the_exports_tokenizer_does(tmp_path, case):
    from transformers import AutoTokenizer

    from tests.tiny_tokenizer import TEXT

    src, out, _ = export(tmp_path, case)
    bridge = to_transformer_bridge(out, "cpu", torch.float32)
    ids = AutoTokenizer.from_pretrained(out)(TEXT).input_ids
    tokens = bridge.to_tokens(TEXT, prepend_bos=False)
    assert tokens[0].tolist() == ids
    with torch.no_grad():
        assert_logits_match(bridge(TEXT, prepend_bos=False), hf_logits(src, tokens))


def test_an_export_missing_a_tensor_is_refused_naming_it(tmp_path):
    from gqa_convert.errors import BadInputError

    _, out, _ = export(tmp_path, "parity/llama-gqa4")
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "qkv_bias": True}))
    with pytest.raises(BadInputError, match="b_Q"):
        to_transformer_bridge(out, "cpu", path="native")


def test_to_hooked_transformer_under_tl4_says_which_extra(tmp_path):
    from gqa_convert.interop import to_hooked_transformer

    _, out, _ = export(tmp_path, "parity/llama-gqa4")
    with pytest.raises(ImportError, match=r"\.\[tl\]'.*to_transformer_bridge"):
        to_hooked_transformer(out)
