"""`gqa-convert convert` end to end through typer's runner and one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

from gqa_convert import GQATransformer
from gqa_convert.checkpoint import read_weights
from gqa_convert.cli import app
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens


def test_convert_writes_a_loadable_sharded_export(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "qwen2")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--shard-size", "100KB"])
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_weights(out))
    assert all(p.stat().st_size <= 100_000 for p in out.glob("*.safetensors"))
    tokens = random_tokens(20)
    with torch.no_grad():
        ours = GQATransformer.from_pretrained(out)(tokens)
        theirs = load_hf(src)(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_convert_refuses_an_existing_out_and_keeps_it(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "gqa_convert.cli", "convert", str(src), str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 6
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"
