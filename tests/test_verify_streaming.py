"""Layer-streamed verification: the same reports as whole-model, in bounded memory."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gqa_convert import convert
from gqa_convert.errors import InsufficientMemoryError, UsageError
from gqa_convert.inspection import inspect_checkpoint
from gqa_convert.memory import Estimate, choose_mode
from gqa_convert.verify import placement_from_device_map, resolve_device, verify
from tests import mutations as M
from tests.cli_subprocess import run_cli
from tests.hf_models import make_hf_checkpoint
from tests.test_families import CASES as FAMILY_CASES
from tests.test_families import MUTATIONS as FAMILY_MUTATIONS
from tests.test_families import source as family_source
from tests.test_parity import CASES
from tests.test_verify import EXPORT_MUTATIONS

FIGURES = (
    "max_abs_logit_diff",
    "mean_abs_logit_diff",
    "max_abs_logprob_diff",
    "kl_mean",
    "kl_max",
    "top1_agreement",
    "top5_overlap",
    "embed_rel_err",
    "ln_final_rel_err",
)


def assert_same_report(streamed, whole):
    assert (streamed.mode, whole.mode) == ("streamed", "whole")
    assert streamed.passed == whole.passed
    assert streamed.first_divergence == whole.first_divergence
    assert streamed.tokens == whole.tokens and streamed.failures == whole.failures
    for name in FIGURES:
        a, b = getattr(streamed, name), getattr(whole, name)
        assert a == b or abs(a - b) <= 1e-6, name
    assert len(streamed.layer_rel_err) == len(whole.layer_rel_err)
    for a, b in zip(streamed.layer_rel_err, whole.layer_rel_err, strict=True):
        assert a == b or abs(a - b) <= 1e-6
    if whole.components is not None:
        assert streamed.components.keys() == whole.components.keys()
        for name, b in whole.components.items():
            a = streamed.components[name]
            assert a == b or abs(a - b) <= 1e-6 or (math.isinf(a) and math.isinf(b)), name


@pytest.mark.parametrize("case", CASES)
def test_streamed_and_whole_model_reports_agree(tmp_path, case):
    family, overrides, save, _ = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **save, **overrides)
    whole, streamed = verify(src, streaming=False), verify(src, streaming=True)
    assert whole.passed, whole.summary()
    assert_same_report(streamed, whole)
    # And reading an export's files, the bytes `convert` ships.
    out = convert(src, tmp_path / "out")
    assert_same_report(verify(src, out, streaming=True), verify(src, out, streaming=False))


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_streamed_and_whole_model_reports_agree_on_every_family(tmp_path, case):
    """Qwen3, Phi-3, OLMo2, Granite, SmolLM3 and each rope type: the streamed HF side (its
    layer classes, per-layer masks and rotary, what its forward does around the layers)
    gives the whole model's report, at a length past every threshold of the case."""
    src, n_pos = family_source(tmp_path, case)
    whole = verify(src, seq_len=n_pos, streaming=False)
    streamed = verify(src, seq_len=n_pos, streaming=True)
    assert whole.passed, whole.summary()
    assert_same_report(streamed, whole)
    out = convert(src, tmp_path / "out")
    assert_same_report(
        verify(src, out, seq_len=n_pos, streaming=True),
        verify(src, out, seq_len=n_pos, streaming=False),
    )


@pytest.mark.parametrize("name", FAMILY_MUTATIONS)
def test_every_family_mutation_fails_streamed_at_the_same_place(tmp_path, name):
    case, mutation, (layer, component) = FAMILY_MUTATIONS[name]
    src, _ = family_source(tmp_path, case)
    out = M.mutate_export(convert(src, tmp_path / "out"), mutation)
    streamed = verify(src, out, seq_len=40, streaming=True)
    assert not streamed.passed
    assert streamed.first_divergence == {"layer": layer, "component": component}
    assert_same_report(streamed, verify(src, out, seq_len=40, streaming=False))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama") / "src", "llama")


@pytest.mark.parametrize("name", EXPORT_MUTATIONS)
def test_every_mutation_fails_streamed_at_the_same_place(tmp_path, llama, name):
    mutation, layer, component = EXPORT_MUTATIONS[name]
    out = M.mutate_export(convert(llama, tmp_path / "out"), mutation)
    streamed = verify(llama, out, seq_len=64, streaming=True)
    assert not streamed.passed
    assert streamed.first_divergence == {"layer": layer, "component": component}
    assert_same_report(streamed, verify(llama, out, seq_len=64, streaming=False))


def test_a_nan_in_an_export_is_named_alike_streamed(tmp_path, llama):
    """A NaN weight in block 1: both modes name the same first non-finite stream point,
    position and side, and fail with the same lines."""

    def nan_weight(cfg, state):
        state["blocks.1.mlp.W_out"][0, 0] = float("nan")
        return cfg, state

    out = M.mutate_export(convert(llama, tmp_path / "out"), nan_weight)
    streamed = verify(llama, out, seq_len=32, streaming=True)
    whole = verify(llama, out, seq_len=32, streaming=False)
    assert not streamed.passed and streamed.mode == "streamed"
    assert "resid_post.1" in streamed.nonfinite_activations
    assert "resid_post.0" not in streamed.nonfinite_activations
    assert streamed.nonfinite_activations["resid_post.1"]["side"] == "ours"
    assert streamed.nonfinite_activations == whole.nonfinite_activations
    assert streamed.nonfinite_logits == whole.nonfinite_logits
    assert streamed.failures == whole.failures


def test_sliding_window_ignored_fails_streamed(tmp_path):
    mistral = make_hf_checkpoint(tmp_path / "src", "mistral", sliding_window=8)
    out = M.mutate_export(convert(mistral, tmp_path / "out"), M.sliding_window_ignored())
    streamed = verify(mistral, out, seq_len=64, streaming=True)
    assert streamed.first_divergence == {"layer": 0, "component": "attn_out"}
    assert_same_report(streamed, verify(mistral, out, seq_len=64, streaming=False))


def test_progress_is_called_once_per_layer(llama):
    calls = []
    report = verify(llama, seq_len=16, streaming=True, progress=lambda *a: calls.append(a))
    assert calls == [(1, 3), (2, 3), (3, 3)] and report.mode == "streamed"
    assert report.peak_memory_bytes > 0 and report.memory["device"] == "cpu"


def test_the_mode_follows_the_budget():
    need = Estimate(whole=10_000, streamed=2_000)
    assert choose_mode(need, 20_000, None)[0] == "whole"
    assert choose_mode(need, 5_000, None)[0] == "streamed"
    assert choose_mode(need, 20_000, True)[0] == "streamed"
    with pytest.raises(InsufficientMemoryError, match="needs about"):
        choose_mode(need, 1_000, None)
    with pytest.raises(InsufficientMemoryError, match="drop --no-streaming"):
        choose_mode(need, 5_000, False)


def test_devices_and_device_maps():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="expected cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda:0")
    device_of = placement_from_device_map(
        {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
         "lm_head": "cpu"}
    )  # fmt: skip
    assert device_of("embed") == torch.device("cuda", 0)
    assert device_of(1) == torch.device("cuda", 1)
    assert device_of("final") == torch.device("cpu")
    assert placement_from_device_map({"": 2})(5) == torch.device("cuda", 2)


def test_inspect_reports_both_estimates(llama):
    estimates = inspect_checkpoint(llama)["estimated_peak_memory_bytes"]
    assert 0 < estimates["verify_streamed"] < estimates["verify"]


@pytest.mark.slow
def test_a_budget_smaller_than_one_layer_is_refused_before_loading(llama):
    run = run_cli("verify", llama, "--max-memory", "1MB")
    assert run.code == 3, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert "needs about" in run.message and "1.0 MB" in run.message
    assert "--max-memory" in run.message


@pytest.mark.parametrize(("size", "message"), [("1.5", "give a unit"), ("lots", "cannot read")])
@pytest.mark.slow
def test_a_budget_without_a_unit_is_a_usage_error(llama, size, message):
    """`--max-memory 1.5` was 1.5 bytes ("a budget of 0.0 MB"): a number needs its unit."""
    run = run_cli("verify", llama, "--max-memory", size)
    assert run.code == 2 and "--max-memory" in run.message and message in run.message, run.stderr
    assert run.stderr.strip() == f"error: {run.message}"


@pytest.mark.slow
def test_convert_takes_the_same_memory_options(tmp_path, llama):
    run = run_cli("convert", llama, tmp_path / "out", "--max-memory", "1MB")
    assert run.code == 3 and "needs about" in run.message
    assert not (tmp_path / "out").exists()
    run = run_cli("convert", llama, tmp_path / "out", "--streaming", "--seq-len", 16)
    assert run.code == 0, run.stderr
    manifest = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert manifest["verification"]["report"]["mode"] == "streamed"


# A checkpoint whose float32 weights (1.04 GB) exceed the budget below: random bf16, built
# tensor by tensor (scripts/build_llama8b_shaped.py with a smaller shape).
MID_SHAPE = dict(layers=16, d_model=1024, n_heads=8, n_kv=2, d_head=128, d_mlp=4096, vocab=8000)
BUDGET = 1_300_000_000


# A child's ru_maxrss starts at its parent's high-water mark (fork, or vfork + exec, carry
# it over), and pytest may be gigabytes by now: the CLI is spawned by a tiny launcher
# (`python -S`, ~10 MB) instead, as scripts/bench.py does, so the peak it reports is its own.
LAUNCHER = """
import os, sys
out, err, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
actions = [(os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
           (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def spawn_cli(tmp_path, *args):
    import subprocess
    import sys

    from tests.cli_subprocess import Run, cli_command, cli_env

    out, err = tmp_path / "stdout", tmp_path / "stderr"
    argv = [sys.executable, "-S", "-c", LAUNCHER, str(out), str(err), *cli_command(*args)]
    code = subprocess.run(argv, env=cli_env()).returncode
    return Run(code, out.read_text(), err.read_text())


@pytest.mark.slow
def test_streaming_verifies_within_a_budget_the_whole_model_exceeds(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_llama8b_shaped.py"
    spec = importlib.util.spec_from_file_location("build_llama8b_shaped", path)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    src = builder.build(tmp_path / "mid", MID_SHAPE, shard_bytes=200_000_000)

    bounded = spawn_cli(tmp_path, "verify", src, "--json", "--max-memory", f"{BUDGET}B")
    assert bounded.code == 0, bounded.stderr
    streamed = json.loads(bounded.stdout)
    assert streamed["mode"] == "streamed" and streamed["passed"] is True
    assert (
        streamed["memory"]["estimate"]["whole"]
        > BUDGET
        >= streamed["memory"]["estimate"]["streamed"]
    )
    whole_run = spawn_cli(tmp_path, "verify", src, "--json", "--no-streaming")
    assert whole_run.code == 0, whole_run.stderr
    whole = json.loads(whole_run.stdout)
    assert whole["mode"] == "whole"
    # Peak RSS is each child's own ru_maxrss: whole-model would not have kept to the budget.
    assert whole["peak_memory_bytes"] > BUDGET > streamed["peak_memory_bytes"]
    assert streamed["peak_memory_bytes"] < 0.6 * whole["peak_memory_bytes"]
    assert streamed["max_abs_logit_diff"] == pytest.approx(whole["max_abs_logit_diff"], abs=1e-6)
