"""`gqa-convert convert` end to end through typer's runner and one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gqa_convert import GQATransformer
from gqa_convert.checkpoint import read_weights
from gqa_convert.cli import app
from tests.cli_subprocess import run_cli
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


@pytest.mark.slow
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


def test_dry_run_prints_every_tensor_and_writes_nothing(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "qwen2", max_shard_size="60KB")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["convert", str(src), str(out), "--dry-run", "--dtype", "bfloat16"]
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "<-" in line]
    assert len(lines) == 3 * 12 + 3  # 12 per Qwen2 layer (9 + 3 biases), embed, norm, lm_head
    q = next(line for line in lines if line.startswith("blocks.1.attn.W_Q "))
    assert "8x64x8" in q and "bfloat16" in q and "model.layers.1.self_attn.q_proj.weight" in q
    assert "model-0000" in q  # the shard it comes from
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_inspect_json_and_to_hf_through_the_cli(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=True)
    result = CliRunner().invoke(app, ["inspect", str(src), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["tied_embeddings"] is True and info["group_size"] == 4

    out, back = tmp_path / "out", tmp_path / "back"
    assert CliRunner().invoke(app, ["convert", str(src), str(out), "--no-verify"]).exit_code == 0
    result = CliRunner().invoke(app, ["to-hf", str(out), str(back)])
    assert result.exit_code == 0, result.output
    original = load_file(src / "model.safetensors")
    returned = load_file(back / "model.safetensors")
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)


@pytest.mark.slow
def test_overwrite_replaces_only_checkpoint_folders(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    for out in (notes, tmp_path, src):  # not a checkpoint; holds SRC; is SRC
        run = run_cli("convert", src, out, "--overwrite", "--no-verify")
        assert run.code == 6, run.stderr
        assert str(out) in run.message
    assert (notes / "thesis.tex").exists() and (src / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("convert", src, empty, "--overwrite").code == 0
    assert (empty / "conversion.json").exists()


def test_the_progress_bar_counts_and_advances_in_written_bytes(tmp_path, monkeypatch):
    """Its total was the source's bytes, its steps the written ones: with --dtype bfloat16
    from float32 it stopped at half."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    import gqa_convert.cli as cli

    seen = {}

    @contextmanager
    def recording_bar(description, total):
        seen["total"], seen["done"] = total, 0
        yield SimpleNamespace(
            advance=lambda n: seen.__setitem__("done", seen["done"] + n),
            describe=lambda text: None,
        )

    monkeypatch.setattr(cli, "progress_bar", recording_bar)
    src = make_hf_checkpoint(tmp_path / "src", "llama")
    for dtype in ("auto", "bfloat16"):
        out = tmp_path / dtype
        args = ["convert", str(src), str(out), "--no-verify", "--dtype", dtype]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        written = sum(info.nbytes for info in read_weights(out).values())
        assert seen == {"total": written, "done": written}, dtype
