"""to_hooked_transformer: an export as a transformer-lens 3.x HookedTransformer, logits = HF's.

Skipped where transformer-lens is not installed (`pip install -e '.[tl]'`), except in CI
(`CI` set), where they run and fail with the install hint instead of hiding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from gqa_convert import convert
from gqa_convert.errors import BadInputError, UnsupportedModelError
from gqa_convert.export import load_export
from gqa_convert.interop import INSTALL_HINT, to_hooked_transformer
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens
from tests.numerics import assert_logits_match
from tests.test_parity import LLAMA3_ROPE

# In CI these tests run (and fail with the install hint) rather than skip.
needs_tl = pytest.mark.skipif(
    importlib.util.find_spec("transformer_lens") is None and not os.environ.get("CI"),
    reason=f"transformer-lens not installed: {INSTALL_HINT}",
)


# (family, overrides, prompt length)
CASES = {
    "llama-gqa4": ("llama", {}, 40),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}, 40),
    "llama-mha": ("llama", {"num_key_value_heads": 8}, 40),
    "llama-head_dim-12": ("llama", {"head_dim": 12}, 40),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, 40),
    "llama3-rope-past-original-len": ("llama", {"rope_parameters": LLAMA3_ROPE}, 64),
    "mistral-window-8": ("mistral", {"sliding_window": 8}, 40),
    "qwen2-biases": ("qwen2", {}, 40),
    "qwen2-sliding-upper-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
        40,
    ),
}


def export(tmp_path: Path, case: str) -> tuple[Path, Path, int]:
    family, overrides, n_pos = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **overrides)
    return src, convert(src, tmp_path / "out"), n_pos


def hf_logits(src: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf(src)(tokens).logits


def tl_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)  # HookedTransformer: tokens [batch, pos] -> logits


def edit_config(out: Path, **changes) -> None:
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@needs_tl
@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hf(tmp_path, case):
    src, out, n_pos = export(tmp_path, case)
    tokens = random_tokens(n_pos)
    assert_logits_match(tl_logits(to_hooked_transformer(out), tokens), hf_logits(src, tokens))


@needs_tl
@pytest.mark.parametrize("case", ["llama-gqa4", "qwen2-biases"])
def test_parameters_are_the_exports_names_and_shapes(tmp_path, case):
    _, out, _ = export(tmp_path, case)
    _, written = load_export(out)
    model = to_hooked_transformer(out)
    params = dict(model.named_parameters())
    for name, tensor in written.items():
        assert torch.equal(params[name], tensor), name
    zero = set(params) - set(written)
    leaves = {name.rsplit(".", 1)[-1] for name in zero}
    qkv = set() if case == "qwen2-biases" else {"b_Q", "_b_K", "_b_V"}
    assert leaves == {"b_O", "b_in", "b_out", "b_U", *qkv}
    assert all(not params[name].any() for name in zero)
    assert all(p.requires_grad for p in params.values())
    attn = model.blocks[0].attn
    assert attn._W_K.shape == (2, 64, 8)  # [n_kv_heads, d_model, d_head], unexpanded
    assert torch.equal(attn.W_K, torch.repeat_interleave(attn._W_K, 4, dim=0))


@needs_tl
@pytest.mark.parametrize(
    ("case", "drop"),
    [
        ("mistral-window-8", {"attn_types": ["global"] * 3, "sliding_window": None}),
        ("llama3-rope-past-original-len", {"rope": {"theta": 500_000.0}}),
    ],
)
def test_dropping_a_quirk_is_caught(tmp_path, case, drop):
    """The comparison sees a lost sliding window or llama3 scaling: the mapping matters."""
    src, out, n_pos = export(tmp_path, case)
    edit_config(out, **drop)
    tokens = random_tokens(n_pos)
    diff = (tl_logits(to_hooked_transformer(out), tokens) - hf_logits(src, tokens)).abs()
    assert diff.max() > 1e-3


@needs_tl
@pytest.mark.parametrize("flags", ["fold_ln", "center_unembed", "fold_value_biases"])
def test_processing_is_off_unless_asked_and_exact_when_asked(tmp_path, flags):
    src, out, n_pos = export(tmp_path, "qwen2-biases")
    tokens = random_tokens(n_pos)
    theirs = hf_logits(src, tokens)
    plain = to_hooked_transformer(out)
    model = to_hooked_transformer(out, **{flags: True})
    ours = tl_logits(model, tokens)
    if flags == "center_unembed":  # logits shift by a constant per position
        assert not torch.allclose(plain.W_U.mean(-1), torch.zeros(()), atol=1e-3)
        assert torch.allclose(model.W_U.mean(-1), torch.zeros(()), atol=1e-6)
        ours, theirs = ours.log_softmax(-1), theirs.log_softmax(-1)
    if flags == "fold_ln":
        assert plain.cfg.normalization_type == "RMS"
        assert model.cfg.normalization_type == "RMSPre"
    if flags == "fold_value_biases":
        assert plain.blocks[0].attn._b_V.any() and not model.blocks[0].attn._b_V.any()
    assert_logits_match(ours, theirs)


@needs_tl
def test_a_rope_type_tl_cannot_express_is_refused(tmp_path):
    _, out, _ = export(tmp_path, "llama-gqa4")
    edit_config(out, rope={"theta": 1e4, "type": "dynamic", "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match=r"rope\.type = 'dynamic'"):
        to_hooked_transformer(out)


@needs_tl
def test_export_missing_tensors_lists_them_all(tmp_path):
    """A config that promises q/k/v biases the files lack: all 9 named, nothing loaded."""
    _, out, _ = export(tmp_path, "llama-gqa4")
    edit_config(out, qkv_bias=True)
    with pytest.raises(BadInputError, match="9 problems") as err:
        to_hooked_transformer(out)
    assert "blocks.2.attn._b_V: missing from the export" in str(err.value)


@pytest.mark.parametrize("installed", ["none", "4.x"])
def test_without_hooked_transformer_the_error_says_how_to_install(tmp_path, monkeypatch, installed):
    _, out, _ = export(tmp_path, "llama-gqa4")
    # None: `import transformer_lens` raises; an empty module: 4.x, HookedTransformer gone.
    fake = None if installed == "none" else types.ModuleType("transformer_lens")
    monkeypatch.setitem(sys.modules, "transformer_lens", fake)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[tl\]'"):
        to_hooked_transformer(out)


TEXT = (
    "The quick brown fox jumps over the lazy dog. Grouped-query attention shares each key "
    "and value head among several query heads, which makes the KV cache smaller."
)


@needs_tl
@pytest.mark.slow
def test_smollm2_logits_equal_hf(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    out = convert(smollm2_dir, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(out)  # the export carries the tokenizer
    model = to_hooked_transformer(out, tokenizer=tokenizer)
    tokens = model.to_tokens(TEXT, prepend_bos=False)
    assert tokens[0].tolist() == tokenizer(TEXT).input_ids
    # 7.8e-5 here: 1e-4 is near fp32's floor for this 30-layer model (|logits| ~ 33; HF's own
    # eager and sdpa paths differ by 5.6e-5 on this prompt, by ~1e-3 at 1024 tokens).
    assert_logits_match(tl_logits(model, tokens), hf_logits(smollm2_dir, tokens))
