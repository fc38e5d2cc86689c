"""The README's "Using the converted model with TransformerLens, SAELens and nnsight": each
client's snippet, taken from README.md itself (so the two cannot drift), run as a script in a
folder holding `out`, the export of a toy Llama with a tiny tokenizer; then its results are
checked against transformers' and our own.

A client that is not installed skips its test, except in CI (the TL 4.3 one: except where
GQA_CONVERT_TL4 is set, as .ci/run's TL 4 step does), where it fails instead.
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
from pathlib import Path

import pytest
import torch

from gqa_convert import GQATransformer, convert
from tests.hf_models import load_hf, make_hf_checkpoint
from tests.test_bridge import needs_tl4
from tests.test_parity import assert_logits_match
from tests.tiny_tokenizer import save_tiny_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Using the converted model with TransformerLens, SAELens and nnsight"
TEXT = "The quick brown fox"


def snippet(client: str) -> str:
    """The first python block under `### {client}` in the section."""
    text = README.read_text()
    section = text[text.index(SECTION) :].split("\n## ", 1)[0]
    part = section[section.index(f"\n### {client}\n") :].split("\n### ", 2)[1]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


def installed(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None and not os.environ.get("CI"),
        reason=f"{module} not installed (see the README's install line)",
    )


@pytest.fixture
def run_in_folder_with_out(tmp_path, monkeypatch):
    """Run a snippet as a script (nnsight reads its source) beside `out`; its globals."""
    src = save_tiny_tokenizer(make_hf_checkpoint(tmp_path / "src", "llama"))
    convert(src, tmp_path / "out", verify=False)
    monkeypatch.chdir(tmp_path)

    def run(client: str) -> dict:
        script = tmp_path / f"snippet_{client.split()[0].lower()}.py"
        script.write_text(snippet(client))
        return runpy.run_path(str(script))

    return run, src, tmp_path / "out"


def hf_logits(src: Path, out: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)(TEXT).input_ids
    with torch.no_grad():
        return load_hf(src)(torch.tensor([ids])).logits


def test_every_client_has_its_snippet_and_install_line():
    section = README.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    for client, extra in [
        ("TransformerLens 3.9", "tl"),
        ("TransformerLens 4.3", "tl4"),
        ("SAELens", "tl,sae"),
        ("nnsight", "nnsight"),
    ]:
        assert snippet(client).strip()
        part = section.split(f"\n### {client}\n", 1)[1].split("\n### ", 1)[0]
        assert f"-e '.[{extra}]'" in part, client


@installed("transformer_lens")
def test_transformer_lens_3(run_in_folder_with_out):
    run, src, out = run_in_folder_with_out
    result = run("TransformerLens 3.9")
    assert result["keys"].shape[2] == GQATransformer.from_pretrained(out).cfg.n_key_value_heads
    assert_logits_match(result["logits"].detach(), hf_logits(src, out))


@pytest.mark.tl4
@needs_tl4
def test_transformer_lens_4(run_in_folder_with_out):
    run, src, out = run_in_folder_with_out
    result = run("TransformerLens 4.3")
    assert result["route"].path == "native"
    assert result["values"].shape[2] == GQATransformer.from_pretrained(out).cfg.n_key_value_heads
    # TL 4 prepends BOS to strings for Llama (the tiny tokenizer's <s>), as documented
    bos = result["bridge"].tokenizer.bos_token_id
    tokens = result["bridge"].to_tokens("The quick brown fox")
    assert tokens[0, 0].item() == bos
    with torch.no_grad():
        theirs = load_hf(src)(tokens).logits
    assert_logits_match(result["logits"].detach(), theirs)


@installed("sae_lens")
def test_saelens(run_in_folder_with_out):
    run, _, out = run_in_folder_with_out
    result = run("SAELens")
    sae, d_model = result["sae"], GQATransformer.from_pretrained(out).cfg.d_model
    assert sae.cfg.d_in == d_model and sae.cfg.d_sae == 4 * d_model
    assert all(len(row) == 32 for row in result["rows"]) and len(result["rows"]) >= 4
    assert all(torch.isfinite(p).all() for p in sae.parameters())


@installed("nnsight")
def test_nnsight(run_in_folder_with_out):
    run, _, out = run_in_folder_with_out
    result = run("nnsight")
    ours = GQATransformer.from_pretrained(out)
    tokens = ours.to_tokens(TEXT)

    def zero_head_0(values, hook):
        values = values.clone()
        values[:, :, 0] = 0
        return values

    # the snippet traces with grad enabled: so does this (same ops, same mode: equal bits)
    expected = ours.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_v", zero_head_0)])
    assert result["values"].shape[2] == ours.cfg.n_key_value_heads
    assert torch.equal(result["logits"], expected)
