"""The README's examples and tables, read from README.md itself so they cannot drift."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch

from gqa_convert import errors

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(containing: str) -> str:
    """The README's one ```python block that contains `containing`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} python blocks of README.md contain {containing!r}"
    return found[0]


def test_the_grouped_query_attention_example_runs_with_real_numbers(capsys):
    """The block runs as written, on initialised weights: finite outputs of the shapes its
    comments state, and the two-step cache and the left-padded row equal one pass (the
    values it prints), to float32 rounding."""
    names: dict = {}
    exec(python_block("GroupedQueryAttention(cfg"), names)
    printed = capsys.readouterr().out.split("\n")
    assert printed[0] == "torch.Size([8, 64, 8]) torch.Size([2, 64, 8])"
    assert all(float(line) < 1e-5 for line in printed[1:3]), printed
    out, q, k, v = (names[n] for n in ("out", "q", "k", "v"))
    assert out.shape == (2, 10, 64) and k.shape == v.shape == (2, 10, 2, 8)
    assert q.shape == (2, 10, 8, 8)
    assert bool(out.isfinite().all()) and out.abs().max().item() > 0.1


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_lens") is None, reason="pip install -e '.[tl]'"
)
def test_the_example_config_builds_transformer_lens_own_module():
    """TL 3.9 takes the example's dict (it needs n_layers and n_ctx) and, with the example's
    weights, computes the same output at 1e-5 (tests/test_tl_conformance.py's tolerance)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens import HookedTransformerConfig
        from transformer_lens.components import GroupedQueryAttention as TLGroupedQueryAttention

    names: dict = {}
    exec(python_block("GroupedQueryAttention(cfg"), names)
    theirs = TLGroupedQueryAttention(HookedTransformerConfig(**names["cfg"]), "global", 0)
    theirs.load_state_dict(names["attn"].state_dict(), strict=False)  # + TL's own buffers
    x = names["x"]
    with torch.no_grad():
        torch.testing.assert_close(names["out"], theirs(x, x, x), atol=1e-5, rtol=1e-5)


def test_the_exit_code_table_has_every_error_type():
    """Every exit code of gqa_convert/errors.py is a row of the README's table, and
    InsufficientMemoryError (exit 3 as bad input) is named there as "not enough memory"."""
    table = README.read_text().split("## Exit codes", 1)[1].split("\n\n", 2)[1]
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", table, re.M))
    types = [t for t in vars(errors).values() if isinstance(t, type) and issubclass(t, Exception)]
    assert {str(t.exit_code) for t in types} <= set(rows)
    assert "not enough memory" in rows[str(errors.InsufficientMemoryError.exit_code)]
