"""Layer-streamed verification: the same reports as whole-model, in bounded memory."""

from __future__ import annotations

import itertools
import json
import math
import re

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


# The streamed modes: layer by layer, and a layer's modules in parts (verify/sublayer.py).
MODES = {"streamed": True, "sub-layer": "sub-layer"}


# Sub-layer mode sums o_proj's and the MLP's outputs by parts (KV-head groups, d_mlp
# chunks) on both sides, in another order than one matmul: each activation and logit moves
# by a few fp32 ulp per layer. The figures are themselves fp32 noise between two kernels
# (logit differences 2e-6 to 7e-6, relative errors about 1e-6, whole-model on the parity
# cases; 0.0 on one case in sub-layer mode), so they agree within 1e-5 (measured up to
# 3.2e-6 apart), ten times under the gate's 1e-4; layer-streamed ones within 1e-6.
TOLERANCE = {"streamed": 1e-6, "sub-layer": 1e-5}


def assert_same_report(streamed, whole, mode="streamed", tolerance=None):
    tolerance = TOLERANCE[mode] if tolerance is None else tolerance
    assert (streamed.mode, whole.mode) == (mode, "whole")
    assert streamed.passed == whole.passed
    assert streamed.first_divergence == whole.first_divergence
    assert streamed.tokens == whole.tokens and streamed.failures == whole.failures
    for name in FIGURES:
        a, b = getattr(streamed, name), getattr(whole, name)
        assert a == b or abs(a - b) <= tolerance, name
    assert len(streamed.layer_rel_err) == len(whole.layer_rel_err)
    for a, b in zip(streamed.layer_rel_err, whole.layer_rel_err, strict=True):
        assert a == b or abs(a - b) <= tolerance
    if whole.components is not None:
        assert streamed.components.keys() == whole.components.keys()
        for name, b in whole.components.items():
            a = streamed.components[name]
            assert a == b or abs(a - b) <= tolerance or (math.isinf(a) and math.isinf(b)), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_streamed_and_whole_model_reports_agree(tmp_path, case, mode):
    family, overrides, save, _ = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **save, **overrides)
    whole, streamed = verify(src, streaming=False), verify(src, streaming=MODES[mode])
    assert whole.passed, whole.summary()
    assert_same_report(streamed, whole, mode)
    # And reading an export's files, the bytes `convert` ships.
    out = convert(src, tmp_path / "out")
    assert_same_report(
        verify(src, out, streaming=MODES[mode]), verify(src, out, streaming=False), mode
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_streamed_and_whole_model_reports_agree_on_every_family(tmp_path, case, mode):
    """Qwen3, Phi-3, OLMo2, Granite, SmolLM3 and each rope type: the streamed HF side (its
    layer classes, per-layer masks and rotary, what its forward does around the layers)
    gives the whole model's report, at a length past every threshold of the case."""
    src, n_pos = family_source(tmp_path, case)
    whole = verify(src, seq_len=n_pos, streaming=False)
    streamed = verify(src, seq_len=n_pos, streaming=MODES[mode])
    assert whole.passed, whole.summary()
    assert_same_report(streamed, whole, mode)
    out = convert(src, tmp_path / "out")
    assert_same_report(
        verify(src, out, seq_len=n_pos, streaming=MODES[mode]),
        verify(src, out, seq_len=n_pos, streaming=False),
        mode,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILY_MUTATIONS)
def test_every_family_mutation_fails_streamed_at_the_same_place(tmp_path, name, mode):
    case, mutation, (layer, component) = FAMILY_MUTATIONS[name]
    src, _ = family_source(tmp_path, case)
    out = M.mutate_export(convert(src, tmp_path / "out"), mutation)
    streamed = verify(src, out, seq_len=40, streaming=MODES[mode])
    assert not streamed.passed
    assert streamed.first_divergence == {"layer": layer, "component": component}
    assert_same_report(streamed, verify(src, out, seq_len=40, streaming=False), mode)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama") / "src", "llama")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", EXPORT_MUTATIONS)
def test_every_mutation_fails_streamed_at_the_same_place(tmp_path, llama, name, mode):
    """Among them a KV-head swap in layer 1: sub-layer mode, which runs that layer's
    attention one KV head at a time, still names layer 1, k."""
    mutation, layer, component = EXPORT_MUTATIONS[name]
    out = M.mutate_export(convert(llama, tmp_path / "out"), mutation)
    streamed = verify(llama, out, seq_len=64, streaming=MODES[mode])
    assert not streamed.passed
    assert streamed.first_divergence == {"layer": layer, "component": component}
    assert_same_report(streamed, verify(llama, out, seq_len=64, streaming=False), mode)


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


@pytest.mark.parametrize("mode", MODES)
def test_sliding_window_ignored_fails_streamed(tmp_path, mode):
    mistral = make_hf_checkpoint(tmp_path / "src", "mistral", sliding_window=8)
    out = M.mutate_export(convert(mistral, tmp_path / "out"), M.sliding_window_ignored())
    streamed = verify(mistral, out, seq_len=64, streaming=MODES[mode])
    assert streamed.first_divergence == {"layer": 0, "component": "attn_out"}
    assert_same_report(streamed, verify(mistral, out, seq_len=64, streaming=False), mode)


def test_progress_is_called_once_per_layer(llama):
    calls = []
    report = verify(llama, seq_len=16, streaming=True, progress=lambda *a: calls.append(a))
    assert calls == [(1, 3), (2, 3), (3, 3)] and report.mode == "streamed"
    assert report.peak_memory_bytes > 0 and report.memory["device"] == "cpu"


def test_the_mode_follows_the_budget():
    need = Estimate(whole=10_000, streamed=2_000, sub_layer=800)
    assert choose_mode(need, 20_000, None)[0] == "whole"
    assert choose_mode(need, 5_000, None)[0] == "streamed"
    assert choose_mode(need, 20_000, True)[0] == "streamed"
    # Sub-layer only when a layer does not fit, or forced.
    assert choose_mode(need, 1_000, None)[0] == "sub-layer"
    assert choose_mode(need, 20_000, "sub-layer")[0] == "sub-layer"
    with pytest.raises(InsufficientMemoryError, match="sub-layer verification needs about"):
        choose_mode(need, 500, None)
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


@pytest.mark.slow
def test_the_sub_layer_flag(tmp_path, llama):
    run = run_cli("convert", llama, tmp_path / "out", "--sub-layer", "--seq-len", 16)
    assert run.code == 0, run.stderr
    manifest = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert manifest["verification"]["report"]["mode"] == "sub-layer"
    run = run_cli("verify", llama, "--sub-layer", "--no-streaming")
    assert run.code == 2 and "--sub-layer" in run.message, run.stderr


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


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """A 16-layer bf16 checkpoint of 1.03 GB in float32 (scripts/build_llama8b_shaped.py)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_llama8b_shaped.py"
    spec = importlib.util.spec_from_file_location("build_llama8b_shaped", path)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder.build(tmp_path_factory.mktemp("mid") / "mid", MID_SHAPE, shard_bytes=200_000_000)


@pytest.mark.slow
def test_streaming_verifies_within_a_budget_the_whole_model_exceeds(tmp_path, mid):
    src = mid
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


@pytest.mark.slow
def test_whole_model_verify_of_an_export_holds_ours_one_layer_at_a_time(tmp_path, mid):
    """`verify SRC OUT --no-streaming` holds HF's model whole and ours one layer at a time
    (Ours._cast), and its estimate counts that: the measured peak is under the estimate,
    which is under SRC's own estimate plus a tenth of one model copy. Holding all of ours
    (1.03 GB more in float32) would break the first bound."""
    out = tmp_path / "out"
    assert spawn_cli(tmp_path, "convert", mid, out, "--no-verify").code == 0
    run = spawn_cli(tmp_path, "verify", mid, out, "--json", "--no-streaming")
    assert run.code == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["mode"] == "whole" and report["passed"] is True
    need = report["memory"]["estimate"]["whole"]
    assert report["peak_memory_bytes"] <= need, (report["peak_memory_bytes"] / 1e6, need / 1e6)
    info = inspect_checkpoint(mid)  # SRC alone: ours would be views of HF's weights
    alone, copy = info["estimated_peak_memory_bytes"]["verify"], 4 * info["parameters"]
    assert alone < need < alone + copy / 10, (alone / 1e6, need / 1e6, copy / 1e6)


def test_sub_layer_mode_reads_each_layer_in_slices(tmp_path, llama, monkeypatch):
    """Sub-layer mode really splits: on both sides each layer's q/k/v/o, MLP and the
    unembedding are read as slices tiling their axis (one KV head's rows, d_mlp and
    vocabulary chunks), never whole, and the report is whole-model's."""
    from gqa_convert.config import from_hf, read_json
    from gqa_convert.verify import ours as ours_module
    from gqa_convert.verify import reference as reference_module
    from gqa_convert.verify.sublayer import read_slice

    reads: dict[tuple[str, int], set[tuple[int, int]]] = {}

    def spy(info, dim, index):
        if isinstance(index, slice):
            reads.setdefault((info.name, dim), set()).add((index.start, index.stop))
        return read_slice(info, dim, index)

    monkeypatch.setattr(reference_module, "read_slice", spy)
    monkeypatch.setattr(ours_module, "read_slice", spy)
    out = convert(llama, tmp_path / "out")
    report = verify(llama, out, seq_len=32, streaming="sub-layer")
    assert report.passed and report.mode == "sub-layer"
    assert_same_report(report, verify(llama, out, seq_len=32, streaming=False), "sub-layer")

    cfg = from_hf(read_json(llama / "config.json"))
    group, d = cfg.n_heads // cfg.n_key_value_heads, cfg.d_head
    heads = {(g * group, (g + 1) * group) for g in range(cfg.n_key_value_heads)}
    kv = {(g, g + 1) for g in range(cfg.n_key_value_heads)}
    rows = {(a * d, b * d) for a, b in heads}
    assert cfg.n_key_value_heads > 1

    def tiles(ranges, size):  # several ranges, end to end over [0, size)
        ends = sorted(ranges)
        joined = all(a[1] == b[0] for a, b in itertools.pairwise(ends))
        return len(ends) > 1 and ends[0][0] == 0 and ends[-1][1] == size and joined

    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}."
        assert reads[(hf + "self_attn.q_proj.weight", 0)] == rows
        assert reads[(hf + "self_attn.k_proj.weight", 0)] == {(a * d, b * d) for a, b in kv}
        assert reads[(hf + "self_attn.o_proj.weight", 1)] == rows
        assert tiles(reads[(hf + "mlp.down_proj.weight", 1)], cfg.d_mlp)
        assert tiles(reads[(hf + "mlp.gate_proj.weight", 0)], cfg.d_mlp)
        assert reads[(f"blocks.{i}.attn.W_Q", 0)] == heads
        assert reads[(f"blocks.{i}.attn._W_K", 0)] == kv
        assert reads[(f"blocks.{i}.attn.W_O", 0)] == heads
        assert tiles(reads[(f"blocks.{i}.mlp.W_gate", 1)], cfg.d_mlp)
        assert tiles(reads[(f"blocks.{i}.mlp.W_out", 0)], cfg.d_mlp)
    assert tiles(reads[("lm_head.weight", 0)], cfg.d_vocab)
    assert tiles(reads[("unembed.W_U", 1)], cfg.d_vocab)


@pytest.mark.parametrize("mode", [False, True], ids=["whole", "streamed"])
def test_an_exports_layers_are_cast_into_the_previous_layers_arrays(tmp_path, mode):
    """Reading an export, each layer's weights are cast (bf16 -> fp32 here) into the arrays
    the previous layer was cast into, whole-model too: the report is the one of fresh
    arrays for every layer, and a layer's broken weight is named at that layer, not the
    next (whose arrays it was cast into last)."""
    from gqa_convert.verify.ours import Ours

    llama = make_hf_checkpoint(tmp_path / "src", "llama", dtype=torch.bfloat16)
    out = convert(llama, tmp_path / "out")
    cast, arrays = Ours._cast, {}

    def spy(self, name, tensor, device, dtype):
        free = self._free.get(name)
        result = cast(self, name, tensor, device, dtype)
        arrays.setdefault(name, []).append(free is not None and result is free)
        return result

    def fresh_arrays(self, part):
        self._free = {}

    def compare(reused, fresh):
        assert reused.passed == fresh.passed and reused.first_divergence == fresh.first_divergence
        for a, b in [(getattr(reused, n), getattr(fresh, n)) for n in FIGURES] + list(
            zip(reused.layer_rel_err, fresh.layer_rel_err, strict=True)
        ):
            assert a == b or abs(a - b) <= 1e-6

    for broken in (None, "ln1-ones-layer-1"):
        if broken:
            M.mutate_export(out, EXPORT_MUTATIONS[broken][0])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Ours, "_cast", spy)
            arrays.clear()
            reused = verify(llama, out, seq_len=32, dtype="float32", streaming=mode)
            patch.setattr(Ours, "_keep_free_for", fresh_arrays)
            fresh = verify(llama, out, seq_len=32, dtype="float32", streaming=mode)
        compare(reused, fresh)
        assert reused.passed == (broken is None)
        if broken:
            assert reused.first_divergence == {"layer": 1, "component": "ln1"}
            break
        n_layers = len(reused.layer_rel_err)
        assert n_layers > 2
        for name in ("attn.W_Q", "attn._W_K", "attn.W_O", "mlp.W_in", "mlp.W_out", "ln1.w"):
            # each layer's cast but the first into the previous layer's array; none in the
            # run with fresh arrays (after the reusing one)
            assert arrays[name] == [False] + [True] * (n_layers - 1) + [False] * n_layers, name


def test_a_405b_layer_fits_16_gb_only_in_parts():
    """The estimates at Llama-3.1-405B's shape (convert's gate: the export's files read):
    one layer on each side does not fit 16 GB, one KV head's part does."""
    from gqa_convert.config import from_hf
    from gqa_convert.memory import estimate

    cfg = from_hf(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
         "intermediate_size": 53248, "num_attention_heads": 128, "num_key_value_heads": 8,
         "num_hidden_layers": 126, "vocab_size": 128256, "rms_norm_eps": 1e-5,
         "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
    )  # fmt: skip
    need = estimate(cfg, storage_bytes=2, second_copy=True)
    assert need.sub_layer < 16e9 < need.streamed < need.whole
    assert choose_mode(need, 16_000_000_000, None)[0] == "sub-layer"


def test_the_estimates_hold_gemma4s_per_layer_input_table():
    """Gemma 4 E2B's shapes (tests/test_meta_shapes.py): its per-layer input table (262144 x
    35 x 256, 2.35B) outweighs the rest of the model. Whole-model holds every parameter on
    each side (bf16 files cast to fp32: 4 bytes each, and ours views of HF's); the streamed
    embedding part holds the table cast from its bytes; sub-layer mode (ours views of SRC)
    reads it whole to look rows up. Without the table the estimates were 10.3 / 3.7 / 3.8 GB,
    each below; with it 28.7 / 17.9 / 18.0 GB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gqa_convert.config import from_hf
    from gqa_convert.memory import estimate
    from tests.test_meta_shapes import GEMMA4_E2B

    cfg = from_hf(GEMMA4_E2B)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**GEMMA4_E2B))
    params = sum(p.numel() for p in hf_model.parameters())  # tied: the embedding once
    table = hf_model.model.embed_tokens_per_layer.weight.numel()
    assert table == cfg.d_vocab_per_layer * cfg.n_layers * cfg.d_per_layer_input > params / 2
    need = estimate(cfg, storage_bytes=2)
    assert need.whole > 4 * params
    assert need.streamed > (4 + 2) * table and need.sub_layer > (4 + 2) * table


def test_a_gpt_oss_120b_layer_fits_12_gb_one_expert_at_a_time():
    """gpt-oss-120b's shape (36 layers; 128 experts of width 2880): one layer on each side
    (3.2B parameters each, 12.7 GB in float32) does not fit 12 GB; sub-layer mode holds one
    expert (25M parameters) at a time, so its estimate no longer grows with the experts."""
    import dataclasses

    from gqa_convert.config import from_hf
    from gqa_convert.memory import estimate, expert_params

    config = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
        "intermediate_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 64, "num_hidden_layers": 36, "num_local_experts": 128,
        "num_experts_per_tok": 4, "vocab_size": 201088, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "sliding_window": 128, "torch_dtype": "bfloat16",
        "layer_types": ["sliding_attention", "full_attention"] * 18,
    }  # fmt: skip
    cfg = from_hf(config)
    need = estimate(cfg, storage_bytes=2, second_copy=True)
    assert need.sub_layer < 12e9 < need.streamed < need.whole
    assert choose_mode(need, 12_000_000_000, None)[0] == "sub-layer"
    assert expert_params(cfg) == 3 * 2880 * 2880 + 3 * 2880
    few = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, n_experts=8))
    assert estimate(few, storage_bytes=2, second_copy=True).sub_layer == need.sub_layer + (
        (8 - 128) * (2880 + 1) * 2 * 4  # the router's rows only
    )


def test_sub_layer_mode_refuses_a_quantised_source(tmp_path):
    """Slices of quantised tensors are not transformers' dequantisation: refused in one line
    before anything is read."""
    from tests import quantized as Q

    src = Q.write_fp8(Q.dense_checkpoint(tmp_path / "src"))
    with pytest.raises(UsageError, match="sub-layer verification reads slices of dense"):
        verify(src, streaming="sub-layer")


# ---- MoE layers in sub-layer mode ------------------------------------------------------


def moe_cases() -> dict[str, tuple]:
    """Every MoE case of the MoE test files: (family, overrides, prompt length); the first
    of each family in the quick loop, the others slow."""
    from tests import test_gemma4, test_gpt_oss, test_llama4, test_moe, test_moe_2026

    cases = {**test_moe.CASES, **test_moe_2026.CASES, **test_gpt_oss.CASES}
    cases.update({name: test_gemma4.CASES[name] for name in test_gemma4.MOE_CASES})
    cases.update(
        {f"llama4-{name}": ("llama4_text", overrides, test_llama4.N_POS)
         for name, overrides in test_llama4.CASES.items() if name != "dense"}
    )  # fmt: skip
    quick = {"mixtral", "qwen3_moe", "olmoe", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe"}
    quick |= {"gpt_oss", "llama4_text", "gemma4_text"}
    params = []
    for name, case in cases.items():
        marks = () if case[0] in quick else (pytest.mark.slow,)
        quick.discard(case[0])
        params.append(pytest.param(case, id=name, marks=marks))
    return params


MOE_CASES = moe_cases()


@pytest.mark.parametrize("case", MOE_CASES)
def test_sub_layer_moe_reports_equal_whole(tmp_path, case):
    """MoE layers in sub-layer mode (router held, experts one at a time on both sides,
    accumulated as HF's experts forward does): the whole-model report, on SRC's mapping
    and on an export's files, the routing too. Summation order moves nothing in the experts
    (each token's top-k products are summed in HF's order, over the same [tokens, top_k]
    layout); the figures move by the attention / MLP parts' fp32 ulps, as for dense layers.

    Gemma 4's 6-layer MoE case: its whole-model figures are themselves up to 3.0e-5 (the
    max logit difference; 1.4e-5 relative error at the last layer, measured), and splitting
    the attention reorders both sides' fp32 sums, so a figure may move by its own size: the
    sub-layer run gave 1.1e-5 (every layer's error below whole's). Its figures are compared
    within 4e-5, still 25x below what a planted expert or MLP bug moves them (> 1e-3), and
    the pass, the localisation and the routing are compared exactly as for every case."""
    family, overrides, n_pos = case
    tolerance = 4e-5 if family == "gemma4_text" else None
    src = make_hf_checkpoint(tmp_path / "src", family, **overrides)
    whole = verify(src, seq_len=n_pos, streaming=False)
    sub = verify(src, seq_len=n_pos, streaming="sub-layer")
    assert whole.passed, whole.summary()
    assert_same_report(sub, whole, "sub-layer", tolerance)
    assert sub.routing_agreement_per_layer == whole.routing_agreement_per_layer
    out = convert(src, tmp_path / "out", verify=False)
    sub = verify(src, out, seq_len=n_pos, streaming="sub-layer")
    whole_out = verify(src, out, seq_len=n_pos, streaming=False)
    assert_same_report(sub, whole_out, "sub-layer", tolerance)
    assert sub.routing_agreement_per_layer == whole.routing_agreement_per_layer


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text"])
def test_an_expert_swap_is_named_in_sub_layer_mode(tmp_path, family):
    """Experts 1 and 2 of layer 1 exchanged in the export: every mode names layer 1,
    mlp_out, expert 1 (Mixtral: HF's experts built per expert by transformers' loader;
    gpt-oss: slices of its stored stack; Llama 4: its bmm over every expert)."""
    src = make_hf_checkpoint(tmp_path / "src", family)
    out = convert(src, tmp_path / "out", verify=False)
    M.mutate_export(out, M.experts_swapped(layer=1, a=1, b=2))
    sub = verify(src, out, seq_len=40, streaming="sub-layer")
    assert not sub.passed
    assert sub.first_divergence == {"layer": 1, "component": "mlp_out", "expert": 1}
    assert "layer 1, mlp_out, expert 1" in sub.summary()
    assert_same_report(sub, verify(src, out, seq_len=40, streaming=False), "sub-layer")


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("views", [False, True], ids=["files", "mapped"])
def test_sub_layer_mode_holds_one_expert_at_a_time(tmp_path, monkeypatch, family, views):
    """While an expert runs, it is the only expert of its layer held, on either side: ours'
    other `experts.{e}` are on the meta device, HF's stacked module holds [1, ...]; HF's
    loader is never handed two experts' tensors (nor a stack); a stored stack (gpt-oss) is
    read one expert's slice at a time. Holding the layer whole fails each of these."""
    from gqa_convert.model.moe import Expert, MoEMLP
    from gqa_convert.verify import reference as reference_module
    from gqa_convert.verify import sublayer
    from gqa_convert.verify.reference import Reference

    calls = {"ours": 0, "hf": 0}
    moe_forward, expert_forward = MoEMLP.forward, Expert.forward
    current: list[MoEMLP] = []

    def moe_spy(self, x):
        current.append(self)
        try:
            return moe_forward(self, x)
        finally:
            current.pop()

    def expert_spy(self, x):
        if current:
            held = [e for e in current[-1].experts if e.W_gate.device.type != "meta"]
            assert held == [self], f"{len(held)} experts held"
            calls["ours"] += 1
        return expert_forward(self, x)

    run_one = sublayer.Experts._expert

    def hf_spy(self, e, *args):
        load = self.load

        def one(e):
            got = load(e)
            assert all(t.shape[0] == 1 for t in got.values()), {n: t.shape for n, t in got.items()}
            calls["hf"] += 1
            return got

        self.load = one
        try:
            return run_one(self, e, *args)
        finally:
            self.load = load

    loader = Reference._load

    def load_spy(self, state, *args):
        experts = {m.group(0) for k in state if (m := re.search(r"experts\.(\d+\.)?", k))}
        assert experts <= {"experts.0."} and len(experts) <= 1, sorted(state)
        return loader(self, state, *args)

    slices = []

    def read_spy(info, dim, index):
        if ".experts." in info.name and isinstance(index, slice):
            slices.append((info.name, index.stop - index.start))
        return sublayer.read_slice(info, dim, index)

    monkeypatch.setattr(MoEMLP, "forward", moe_spy)
    monkeypatch.setattr(Expert, "forward", expert_spy)
    monkeypatch.setattr(sublayer.Experts, "_expert", hf_spy)
    monkeypatch.setattr(Reference, "_load", load_spy)
    monkeypatch.setattr(reference_module, "read_slice", read_spy)
    src = make_hf_checkpoint(tmp_path / "src", family)
    out = None if views else convert(src, tmp_path / "out", verify=False)
    report = verify(src, out, seq_len=40, streaming="sub-layer")
    assert report.passed and report.mode == "sub-layer"
    assert calls["ours"] > 0 and calls["hf"] > 0
    if family == "gpt_oss":  # stored stacked: read one expert at a time
        assert slices and all(n == 1 for _, n in slices)
