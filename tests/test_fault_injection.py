"""Conversions killed part-way: OUT is absent or complete, never half-written.

The rename of the temporary folder `.OUT.tmp-HOST-PID` onto OUT is the commit point. Ctrl-C and
SIGTERM remove the temporary folder on the way out; kill -9 cannot, so the next run for the
same OUT removes the work folders of this host's dead processes.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from gqa_convert import GQATransformer
from gqa_convert.errors import BadInputError
from gqa_convert.export import HOST, load_export, remove_stale_work_folders
from tests.cli_subprocess import run_cli, start_cli, work_folders
from tests.hf_models import make_hf_checkpoint

SEED = 1234
WIDE = dict(d=1024, heads=16, kv=4, head_dim=64, mlp=4096, vocab=4096, layers=2)  # ~155 MB


@pytest.fixture(scope="session")
def big_src(tmp_path_factory) -> Path:
    """A ~155 MB fp32 Llama (two wide layers) that takes a second or two to convert."""
    src = tmp_path_factory.mktemp("big") / "src"
    src.mkdir()
    d, h, kv, hd, f, v = (WIDE[k] for k in ("d", "heads", "kv", "head_dim", "mlp", "vocab"))
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.random(shape, dtype=np.float32) - 0.5

    tensors = {
        "model.embed_tokens.weight": rand(v, d),
        "model.norm.weight": rand(d),
        "lm_head.weight": rand(v, d),
    }
    for layer in range(WIDE["layers"]):
        p = f"model.layers.{layer}."
        tensors |= {
            p + "input_layernorm.weight": rand(d),
            p + "post_attention_layernorm.weight": rand(d),
            p + "self_attn.q_proj.weight": rand(h * hd, d),
            p + "self_attn.k_proj.weight": rand(kv * hd, d),
            p + "self_attn.v_proj.weight": rand(kv * hd, d),
            p + "self_attn.o_proj.weight": rand(d, h * hd),
            p + "mlp.gate_proj.weight": rand(f, d),
            p + "mlp.up_proj.weight": rand(f, d),
            p + "mlp.down_proj.weight": rand(d, f),
        }
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "num_attention_heads": h,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "intermediate_size": f,
        "vocab_size": v,
        "num_hidden_layers": WIDE["layers"],
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "dtype": "float32",
    }
    (src / "config.json").write_text(json.dumps(config))
    return src


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_files(out: Path) -> dict[str, str | None]:
    """File name -> sha256 of a finished export (None: it holds a timestamp)."""
    stamped = {"conversion.json", "README.md"}
    return {p.name: None if p.name in stamped else sha256(p) for p in out.iterdir()}


def absent_or_complete(out: Path, reference: dict[str, str | None]) -> bool:
    """False if `out` is absent; True if complete; an assertion error if anything else."""
    if not out.exists():
        return False
    assert {p.name for p in out.iterdir()} == set(reference)
    for name, digest in reference.items():
        assert digest is None or sha256(out / name) == digest, name
    GQATransformer.from_pretrained(out)
    return True


# Four shards: kills land between files as well as in them. Verification (minutes of HF
# model on a big checkpoint, and nothing written meanwhile) is tested elsewhere.
ARGS = ("--shard-size", "50MB", "--no-verify")


@pytest.mark.slow
def test_kill_9_at_random_points_never_leaves_a_partial_out(big_src, tmp_path):
    start = time.monotonic()
    assert run_cli("convert", big_src, tmp_path / "reference", *ARGS).code == 0
    seconds = time.monotonic() - start
    reference = reference_files(tmp_path / "reference")

    out, rng, outcomes = tmp_path / "out", random.Random(SEED), []
    for attempt in range(6):
        proc = start_cli("convert", big_src, out, "--overwrite", *ARGS)
        if attempt % 2:  # anywhere: start-up, planning, writing, renaming, after
            time.sleep(rng.uniform(0, 1.2 * seconds))
        else:  # while writing
            while proc.poll() is None and not (tmp_path / f".out.tmp-{HOST}-{proc.pid}").exists():
                time.sleep(0.005)
            time.sleep(rng.uniform(0, seconds / 2))
        proc.kill()
        proc.wait()
        leftovers = work_folders(tmp_path)
        outcomes.append((proc.returncode, absent_or_complete(out, reference), leftovers))
        # A work folder is never mistaken for an export.
        for name in leftovers:
            with pytest.raises(BadInputError):
                load_export(tmp_path / name)

    assert any(leftovers for *_, leftovers in outcomes), outcomes  # kill -9 did land mid-write
    final = run_cli("convert", big_src, out, "--overwrite", *ARGS)
    assert final.code == 0, final.stderr
    assert absent_or_complete(out, reference)
    assert work_folders(tmp_path) == []  # the stale ones of the killed runs are gone


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "name"), [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")]
)
def test_an_interrupted_conversion_removes_its_temporary_folder(
    big_src, tmp_path, signum, code, name
):
    out = tmp_path / "out"
    proc = start_cli("convert", big_src, out, *ARGS)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".out.tmp-*/*.safetensors")):  # mid-write
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"error: interrupted ({name})" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert work_folders(tmp_path) == []


def test_the_next_run_removes_work_folders_of_dead_runs_only(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src")
    dead = subprocess.Popen(["true"])
    dead.wait()  # its PID now names no process
    alive = subprocess.Popen(["sleep", "60"])
    try:
        names = [
            f".out.tmp-{HOST}-{dead.pid}",  # killed while writing OUT
            f".out.old-{HOST}-{dead.pid}",  # killed while replacing OUT
            f".out.tmp-{HOST}-{alive.pid}",  # another conversion into OUT, still running
            f".out.tmp-other-host.example-{dead.pid}",  # another host's, perhaps alive there
            f".out.tmp-{dead.pid}",  # an earlier version's, host unknown
            f".other.tmp-{HOST}-{dead.pid}",  # another OUT's
        ]
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"half")
        run = run_cli("convert", src, tmp_path / "out", "--no-verify")
        assert run.code == 0, run.stderr
        assert work_folders(tmp_path) == sorted(names[2:])
        remove_stale_work_folders(tmp_path / "other")
        assert work_folders(tmp_path) == sorted(names[2:5])
    finally:
        alive.kill()
        alive.wait()


def test_a_work_folder_is_never_loaded_as_an_export(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src")
    assert run_cli("convert", src, tmp_path / "out", "--no-verify").code == 0
    shutil.copytree(tmp_path / "out", tmp_path / ".out.tmp-123")  # even a complete-looking one
    with pytest.raises(BadInputError, match="work folder"):
        GQATransformer.from_pretrained(tmp_path / ".out.tmp-123")
