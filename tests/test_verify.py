"""The logit-parity gate: correct conversions pass, broken ones fail and say where."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from gqa_convert import convert, convert_in_memory
from gqa_convert.cli import app
from gqa_convert.config import from_hf, load_hf_config
from gqa_convert.errors import ParityError, UsageError
from gqa_convert.export import MANIFEST_NAME
from gqa_convert.verify import (
    TOLERANCES,
    ParityFailure,
    default_seq_len,
    load_reference,
    regimes,
    verify,
)
from tests import mutations as M
from tests.hf_models import make_hf_checkpoint, random_tokens
from tests.test_parity import CASES

JSON_KEYS = {
    "passed": bool,
    "dtype": str,
    "tokens": int,
    "max_abs_logit_diff": float,
    "mean_abs_logit_diff": float,
    "max_abs_logprob_diff": float,
    "kl_mean": float,
    "kl_max": float,
    "top1_agreement": float,
    "tolerances": dict,
}


def save_char_tokenizer(folder, bos: str | None = None):
    """A character-level tokenizer (96 ids) that fits the tiny models' 128-token vocab;
    with `bos`, one more id, which it puts before every text (as Llama's tokenizer does)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(string.printable[:95])}}
    if bos is not None:
        vocab[bos] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama") / "src", "llama")


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return make_hf_checkpoint(
        tmp_path_factory.mktemp("mistral") / "src", "mistral", sliding_window=8
    )


# ---- correct conversions pass ------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_a_correct_conversion_passes(tmp_path, case):
    family, overrides, save, _ = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **save, **overrides)
    report = verify(src)
    assert report.passed, report.summary()
    assert report.first_divergence is None and report.failures == []
    assert report.max_abs_logit_diff < 1e-4 and report.top1_agreement == 1.0
    assert report.inputs == "random" and report.tokens == default_seq_len(load_hf_config(src))
    # The default length crosses every small sliding window and llama3 original length.
    assert report.not_exercised == []
    assert all(r["exercised"] for r in report.regimes.values())
    if "window" in case or "llama3" in case:
        assert report.regimes


@pytest.mark.exactness
@pytest.mark.parametrize("case", ["llama-bf16-source", "llama3-rope-past-original-len"])
def test_bf16_compute_passes_with_the_bf16_tolerance(tmp_path, case):
    family, overrides, save, _ = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **save, **overrides)
    report = verify(src, dtype="bfloat16")
    assert report.passed, report.summary()
    assert report.tolerances == TOLERANCES["bfloat16"]
    # Well inside the tolerance, not just under it.
    assert report.max_abs_logit_diff < TOLERANCES["bfloat16"].max_abs_logit_diff / 4


def test_rotary_frequencies_stay_fp32_when_the_model_is_cast(llama):
    """The bug the bf16 gate found: `.to(bfloat16)` rounded the rotary frequencies."""
    model = convert_in_memory(llama).to(torch.bfloat16)
    assert model.rotary_inv_freq.dtype == torch.float32
    cos, _ = model.rotary(64, torch.bfloat16)
    exact = torch.outer(torch.arange(64.0), convert_in_memory(llama).rotary_inv_freq).cos()
    assert (cos[:, : exact.shape[1]].float() - exact).abs().max() < 1e-2


# ---- broken conversions fail, and the report names where ----------------------------------

EXPORT_MUTATIONS = {
    "swap-kv-heads-layer-1": (M.swap_kv_heads(layer=1), 1, "k"),
    "grouping-h-mod-n_kv-layer-1": (M.grouping_modulo(layer=1), 1, "q"),
    "grouping-h-mod-n_kv-all-layers": (M.grouping_modulo(layer=None), 0, "q"),
    "rope-theta-500k": (M.wrong_rope_theta(5e5), 0, "rot_q"),
    "rope-theta-1-percent": (M.wrong_rope_theta(10_100.0), 0, "rot_q"),
    "ln1-ones-layer-1": (M.norm_to_ones("blocks.1.ln1.w"), 1, "ln1"),
    "ln2-ones-layer-2": (M.norm_to_ones("blocks.2.ln2.w"), 2, "ln2"),
    "final-norm-ones": (M.norm_to_ones("ln_final.w"), 3, "ln_final"),
    "w_o-transposed-layer-1": (M.w_o_transposed(layer=1), 1, "attn_out"),
}


@pytest.mark.parametrize("name", EXPORT_MUTATIONS)
def test_a_broken_export_fails_and_names_the_layer(tmp_path, llama, name):
    mutation, layer, component = EXPORT_MUTATIONS[name]
    out = M.mutate_export(convert(llama, tmp_path / "out"), mutation)
    report = verify(llama, out, seq_len=64)
    assert not report.passed
    assert report.first_divergence == {"layer": layer, "component": component}
    assert report.max_abs_logit_diff > 10 * report.tolerances.max_abs_logit_diff
    if component not in ("ln_final",):
        # Every block before the broken one matched; the broken one did not.
        assert all(e <= report.tolerances.activation_rtol for e in report.layer_rel_err[:layer])
        assert report.layer_rel_err[layer] > report.tolerances.activation_rtol
        order = list(report.components)
        assert all(report.components[c] < 1e-4 for c in order[: order.index(component)])


def test_a_passing_gate_runs_each_layer_once_and_a_failing_one_rechecks_up_to_the_break(llama):
    """The verdict reads the free-running figures only: on a correct conversion each HF layer
    and each block of ours runs once per input (no teacher forcing). On a broken one, a
    second pass runs both on HF's stream from block 0 up to the broken block, no further."""
    hf = load_reference(llama)
    n_layers = len(hf.model.layers)
    for model, broken in (
        (convert_in_memory(llama), None),
        (M.mutated_model(llama, M.swap_kv_heads(layer=1)), 1),
    ):
        calls = {"hf": [0] * n_layers, "ours": [0] * n_layers}
        hooks = [
            layer.register_forward_hook(lambda *_, c=calls[side], i=i: c.__setitem__(i, c[i] + 1))
            for side, layers in (("hf", hf.model.layers), ("ours", model.blocks))
            for i, layer in enumerate(layers)
        ]
        try:
            report = verify(llama, model=model, reference=hf, seq_len=32)
        finally:
            for hook in hooks:
                hook.remove()
        assert report.passed is (broken is None)
        again = [int(broken is not None and i <= broken) for i in range(n_layers)]
        want = [report.sequences * (1 + a) for a in again]
        assert calls == {"hf": want, "ours": want}
        if broken is not None:
            assert report.first_divergence == {"layer": 1, "component": "k"}


def test_sliding_window_ignored_fails_past_the_window(tmp_path, mistral):
    out = M.mutate_export(convert(mistral, tmp_path / "out"), M.sliding_window_ignored())
    report = verify(mistral, out, seq_len=64)
    assert not report.passed
    assert report.first_divergence == {"layer": 0, "component": "attn_out"}
    assert report.regimes["sliding_window"] == {"size": 8, "exercised": True}


def test_sliding_window_ignored_is_invisible_inside_the_window_and_the_report_says_so(mistral):
    model = M.mutated_model(mistral, M.sliding_window_ignored())
    report = verify(mistral, model=model, seq_len=6)
    assert report.passed  # nothing to see within 6 tokens of an 8-token window
    assert report.regimes["sliding_window"] == {"size": 8, "exercised": False}
    assert len(report.not_exercised) == 1 and "sliding_window" in report.not_exercised[0]


def test_grouping_in_weights_equals_the_grouping_bug_in_the_model(llama):
    """The weight simulation of `h % n_kv` is the behaviour bug itself (same logits)."""
    tokens = random_tokens(24)
    with torch.no_grad():
        by_weights = M.mutated_model(llama, M.grouping_modulo(layer=1))(tokens)
        by_model = M.grouping_modulo_behaviour(convert_in_memory(llama), layer=1)(tokens)
        correct = convert_in_memory(llama)(tokens)
    torch.testing.assert_close(by_weights, by_model, atol=1e-5, rtol=0)
    assert (by_weights - correct).abs().max() > 0.1
    report = verify(llama, model=M.grouping_modulo_behaviour(convert_in_memory(llama)), seq_len=64)
    # As a model bug, q / k / v match and the attention output is where it breaks.
    assert report.first_divergence == {"layer": 1, "component": "attn_out"}


@pytest.mark.exactness
def test_kv_swap_is_caught_in_bf16_too(llama):
    report = verify(llama, model=M.mutated_model(llama, M.swap_kv_heads()), dtype="bfloat16")
    assert not report.passed and report.first_divergence == {"layer": 1, "component": "k"}


# ---- inputs and options ------------------------------------------------------------------


def test_default_length_covers_small_windows_and_reports_large_ones():
    hf = {
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "vocab_size": 128,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
    }
    small = from_hf({**hf, "sliding_window": 200})
    assert default_seq_len(small) == 264
    assert regimes(small, 264)[1] == []
    large = from_hf({**hf, "sliding_window": 4096})
    assert default_seq_len(large) == 1024
    found, missed = regimes(large, 1024)
    assert found["sliding_window"]["exercised"] is False and "--seq-len 4160" in missed[0]
    llama3 = replace(
        from_hf({**hf, "architectures": ["LlamaForCausalLM"]}),
        rope=replace(small.rope, type="llama3", original_max_position_embeddings=8192),
    )
    assert "llama3_original_max_position_embeddings" in regimes(llama3, 1024)[1][0]


def test_text_inputs_from_the_tokenizer_with_extra_prompts(tmp_path):
    src = save_char_tokenizer(make_hf_checkpoint(tmp_path / "src", "llama"))
    report = verify(src, prompts=["Hello, world!", "x" * 100], seq_len=40)
    assert report.passed and report.inputs == "tokenizer"
    assert report.sequences == 3 and report.tokens == 40 + 13 + 40  # prompts cut to seq_len


def test_prompts_need_a_tokenizer(llama):
    with pytest.raises(UsageError, match="no tokenizer"):
        verify(llama, prompts=["hello"])


def test_an_unembedding_bug_is_named_after_the_last_block(llama):
    def scale_unembed(cfg, state):
        state["unembed.W_U"] = state["unembed.W_U"] * 1.01
        return cfg, state

    report = verify(llama, model=M.mutated_model(llama, scale_unembed), seq_len=32)
    assert not report.passed and report.first_divergence == {"layer": 3, "component": "unembed"}
    assert max(report.layer_rel_err) < 1e-4 and report.ln_final_rel_err < 1e-4


def test_tolerances_can_be_overridden(llama):
    model = M.mutated_model(llama, M.wrong_rope_theta(10_100.0))
    assert not verify(llama, model=model, seq_len=32).passed
    loose = {"max_abs_logit_diff": 1.0, "kl_max": 1.0, "activation_rtol": 1.0}
    report = verify(llama, model=model, seq_len=32, tolerances=loose)
    assert report.passed and report.tolerances.max_abs_logit_diff == 1.0
    assert report.tolerances.min_top1_agreement == TOLERANCES["float32"].min_top1_agreement
    with pytest.raises(UsageError, match="unknown tolerance"):
        verify(llama, tolerances={"atol": 1.0})


def test_api_convert_gate(tmp_path, llama, theta_bug):
    out = convert(llama, tmp_path / "out", verify=True, verify_options={"seq_len": 32})
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["verification"]["status"] == "passed"
    assert manifest["verification"]["report"]["tokens"] == 32
    src = theta_500k(tmp_path / "src")
    with pytest.raises(ParityFailure) as caught:
        convert(src, tmp_path / "out2", verify=True, verify_options={"seq_len": 32})
    assert isinstance(caught.value, ParityError) and caught.value.report.passed is False
    assert "layer 0, rot_q" in str(caught.value)
    assert not (tmp_path / "out2").exists()


def test_the_gate_checks_the_written_bytes_in_their_dtype(tmp_path, llama):
    """A bf16 export of an fp32 source is checked in bf16 (float32 cannot pass its rounding,
    which a check of the mapping alone would never see)."""
    out = convert(llama, tmp_path / "out", dtype="bfloat16", verify_options={"seq_len": 32})
    report = json.loads((out / MANIFEST_NAME).read_text())["verification"]["report"]
    assert report["passed"] is True and report["dtype"] == "bfloat16"
    with pytest.raises(ParityFailure, match="parity failed \\(float32\\)"):
        convert(
            llama,
            tmp_path / "fp32-check",
            dtype="bfloat16",
            verify_options={"seq_len": 32, "dtype": "float32"},
        )
    assert not (tmp_path / "fp32-check").exists()


# ---- the command line -------------------------------------------------------------------


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_verify_json_shape(llama):
    result = run_cli("verify", llama, "--json", "--seq-len", 32)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key, kind in JSON_KEYS.items():
        assert isinstance(report[key], kind), key
    assert report["passed"] is True and report["first_divergence"] is None
    assert report["dtype"] == "float32" and report["tokens"] == 32
    assert set(report["tolerances"]) >= {"max_abs_logit_diff", "kl_max"}


def test_cli_verify_a_broken_export_exits_5(tmp_path, llama):
    out = M.mutate_export(convert(llama, tmp_path / "out"), M.swap_kv_heads())
    result = run_cli("verify", llama, out, "--json", "--seq-len", 32)
    assert result.exit_code == ParityError.exit_code == 5
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert report["first_divergence"] == {"layer": 1, "component": "k"}
    table = run_cli("verify", llama, out, "--seq-len", 32)
    assert table.exit_code == 5
    assert "first divergence: layer 1, k" in table.output and "FAILED" in table.output
    # The table says which figures decide and which are only reported.
    rows = {line.split("│")[1].strip(): line for line in table.output.splitlines() if "│" in line}
    for name in (
        "mean |logit diff|",
        "max |log-prob diff|",
        "KL(HF || ours) mean",
        "top-5 overlap",
    ):
        assert "not gated" in rows[name], name
    for name in ("max |logit diff|", "KL(HF || ours) max", "top-1 agreement"):
        assert "not gated" not in rows[name] and ("<=" in rows[name] or ">=" in rows[name])


def test_cli_verify_prompts(tmp_path):
    src = save_char_tokenizer(make_hf_checkpoint(tmp_path / "src", "llama"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    result = run_cli(
        "verify", src, "--json", "--seq-len", 32, "--prompt", "third", "--prompts-file", prompts
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inputs"] == "tokenizer" and report["sequences"] == 4


@pytest.fixture
def theta_bug(monkeypatch):
    """A converter that reads rope theta as 10000 whatever config.json says."""
    import gqa_convert.mapping as mapping

    def buggy(hf):
        cfg = from_hf(hf)
        return replace(cfg, rope=replace(cfg.rope, theta=10_000.0))

    monkeypatch.setattr(mapping, "from_hf", buggy)


def theta_500k(folder):
    params = {"rope_type": "default", "rope_theta": 5e5}
    return make_hf_checkpoint(folder, "llama", rope_parameters=params)


def test_cli_convert_verifies_and_saves_the_report(tmp_path, llama):
    out = tmp_path / "out"
    result = run_cli("convert", llama, out, "--seq-len", 32)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    verification = json.loads((out / MANIFEST_NAME).read_text())["verification"]
    assert verification["status"] == "passed" and verification["report"]["passed"] is True


def test_cli_convert_refuses_a_failing_conversion_and_writes_nothing(tmp_path, theta_bug):
    src, out = theta_500k(tmp_path / "src"), tmp_path / "out"
    result = run_cli("convert", src, out, "--seq-len", 32)
    assert result.exit_code == 5
    assert (
        "first divergence: layer 0, rot_q" in result.output and "nothing written" in result.output
    )
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_cli_convert_force_writes_and_records_the_failure(tmp_path, theta_bug):
    src, out = theta_500k(tmp_path / "src"), tmp_path / "out"
    result = run_cli("convert", src, out, "--seq-len", 32, "--force")
    assert result.exit_code == 0, result.output
    verification = json.loads((out / MANIFEST_NAME).read_text())["verification"]
    assert verification["status"] == "failed-forced"
    assert verification["report"]["first_divergence"] == {"layer": 0, "component": "rot_q"}


def test_cli_convert_no_verify_skips_and_records_it(tmp_path, theta_bug):
    src, out = theta_500k(tmp_path / "src"), tmp_path / "out"
    result = run_cli("convert", src, out, "--no-verify")
    assert result.exit_code == 0, result.output
    verification = json.loads((out / MANIFEST_NAME).read_text())["verification"]
    assert verification == {"status": "skipped", "report": None}


@pytest.mark.slow
def test_cli_verify_subprocess_exit_code_and_json(tmp_path, llama):
    out = M.mutate_export(convert(llama, tmp_path / "out"), M.w_o_transposed())
    result = subprocess.run(
        [sys.executable, "-m", "gqa_convert.cli", "verify", str(llama), str(out), "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 5, result.stderr
    report = json.loads(result.stdout)
    assert report["first_divergence"] == {"layer": 1, "component": "attn_out"}
    assert "parity failed" in result.stderr and "Traceback" not in result.stderr


# ---- SmolLM2-135M -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir):
    return load_reference(smollm2_dir, "float32")


@pytest.mark.slow
def test_smollm2_correct_conversion_passes(smollm2_dir, smollm2_reference):
    report = verify(smollm2_dir, seq_len=192, reference=smollm2_reference)
    assert report.passed, report.summary()
    assert report.inputs == "tokenizer" and report.top1_agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mutation", "where"),
    [
        (M.swap_kv_heads(layer=1), {"layer": 1, "component": "k"}),
        (M.wrong_rope_theta(10_000.0), {"layer": 0, "component": "rot_q"}),
    ],
    ids=["swap-kv-heads-layer-1", "rope-theta-1e4"],
)
def test_smollm2_mutations_fail_at_the_right_layer(smollm2_dir, smollm2_reference, mutation, where):
    model = M.mutated_model(smollm2_dir, mutation)
    report = verify(smollm2_dir, model=model, seq_len=96, reference=smollm2_reference)
    assert not report.passed
    assert report.first_divergence == where


@pytest.mark.slow
def test_smollm2_bf16_compute_passes(smollm2_dir):
    report = verify(smollm2_dir, dtype="bfloat16", seq_len=128)
    assert report.passed, report.summary()


@pytest.mark.slow
def test_a_tokenizer_transformers_cannot_read_is_bad_input(tmp_path):
    from tests.cli_subprocess import run_cli

    src = make_hf_checkpoint(tmp_path / "src", "llama")
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    run = run_cli("verify", src)
    assert run.code == 3, run.stderr
    assert str(src) in run.message and "tokenizer" in run.message
    assert "Traceback" not in run.stderr


# ---- non-finite values fail the gate and are named -----------------------------------------


def test_a_nan_column_in_the_unembedding_fails_with_figures_that_are_not_zero(tmp_path, llama):
    """Python's max(0.0, nan) is 0.0: the report once said max |logit diff| 0 for this."""

    def nan_column(cfg, state):
        state["unembed.W_U"][:, 7] = float("nan")
        return cfg, state

    out = M.mutate_export(convert(llama, tmp_path / "out"), nan_column)
    result = run_cli("verify", llama, out, "--json", "--seq-len", 32)
    assert result.exit_code == 5, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is False
    for key in ("max_abs_logit_diff", "kl_max", "max_abs_logprob_diff", "mean_abs_logit_diff"):
        assert report[key] in ("inf", "nan"), (key, report[key])
    assert report["nonfinite_logits"][0] == {
        "sequence": 0,
        "position": 0,
        "token_id": report["nonfinite_logits"][0]["token_id"],
        "side": "ours",
    }
    assert "non-finite logits at 32 position(s)" in report["failures"][0]


def nan_at(position: int):
    """A forward hook putting NaN into one position of a [batch, pos, d] output."""

    def hook(_module, _inputs, out):
        out = out.clone()
        out[:, position] = float("nan")
        return out

    return hook


def test_a_nan_at_one_position_fails_and_is_named(llama):
    """One NaN position of 128 leaves top-1 agreement at 0.992 (over 0.99): it passed."""
    model = convert_in_memory(llama)
    model.ln_final.register_forward_hook(nan_at(5))
    report = verify(llama, model=model)
    assert not report.passed
    assert report.tokens == 128 and report.top1_agreement >= 127 / 128
    first = report.nonfinite_logits[0]
    assert (first["sequence"], first["position"], first["side"]) == (0, 5, "ours")
    assert report.nonfinite_activations["ln_final"]["position"] == 5
    assert report.nonfinite_activations["ln_final"]["side"] == "ours"
    assert report.max_abs_logit_diff == float("inf")
    assert "position 5" in report.summary() and "our model" in report.summary()


def test_a_nan_on_the_hf_side_is_named_as_the_hf_models(llama):
    reference = load_reference(llama)
    reference.model.layers[1].register_forward_hook(
        lambda m, i, out: nan_at(3)(m, i, out[0] if isinstance(out, tuple) else out)
    )
    report = verify(llama, reference=reference, seq_len=16)
    assert not report.passed
    assert report.nonfinite_activations["resid_post.1"] == {
        "sequence": 0,
        "position": 3,
        "side": "hf",
        "token_id": report.nonfinite_activations["resid_post.1"]["token_id"],
    }
    assert "embed" not in report.nonfinite_activations
    assert "resid_post.0" not in report.nonfinite_activations
    assert any("the HF model" in f for f in report.failures)


# ---- edited exports fail cleanly -----------------------------------------------------------


def add_a_layer(cfg, state):
    """One more block, a copy of the last: an edit no HF checkpoint of SRC has."""
    last = cfg.n_layers - 1
    for name in [n for n in state if n.startswith(f"blocks.{last}.")]:
        state[name.replace(f"blocks.{last}.", f"blocks.{cfg.n_layers}.", 1)] = state[name].clone()
    grown = replace(
        cfg,
        n_layers=cfg.n_layers + 1,
        attn_types=(*cfg.attn_types, "global"),
        rope_layers=(*cfg.rope_layers, True),
    )
    return grown, state


def edit_export_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.slow
def test_an_export_with_one_layer_more_than_src_is_bad_input(tmp_path, llama):
    from tests.cli_subprocess import run_cli as run_process

    out = M.mutate_export(convert(llama, tmp_path / "out"), add_a_layer)
    run = run_process("verify", llama, out, "--seq-len", 16)
    assert run.code == 3, run.stderr
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr
    assert "n_layers = 4" in run.message and "3" in run.message and str(out) in run.message


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        ({"d_mlp": 100}, ("9 problems", "blocks.0.mlp.W_gate", "[64, 96]", "[64, 100]")),
        (
            {"n_layers": 2, "attn_types": ["global"] * 2, "rope_layers": [True] * 2},
            ("not implied by config.json", "blocks.2."),
        ),
        (
            {"n_layers": 4, "attn_types": ["global"] * 4, "rope_layers": [True] * 4},
            ("missing from the export", "blocks.3."),
        ),
        ({"attn_types": ["global"] * 2}, ("attn_types", "2 entries", "n_layers = 3")),
        ({"attn_types": ["global", "local", "global"]}, ("attn_types", "sliding_window")),
        ({"rope": {"thetta": 1.0}}, ("config.json", "thetta")),
        ({"rope_layers": [True] * 2}, ("rope_layers", "2 entries", "n_layers = 3")),
    ],
    ids=[
        "shape",
        "fewer-layers",
        "more-layers",
        "attn_types-length",
        "local-no-window",
        "rope",
        "rope_layers-length",
    ],
)
@pytest.mark.slow
def test_an_export_disagreeing_with_its_config_is_bad_input(tmp_path, llama, edit, names):
    from gqa_convert.errors import BadInputError
    from gqa_convert.to_hf import export_to_hf
    from tests.cli_subprocess import run_cli as run_process

    out = convert(llama, tmp_path / "out")
    edit_export_config(out, **edit)
    run = run_process("verify", llama, out, "--seq-len", 16)
    assert run.code == 3, run.stderr
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr
    for name in names:
        assert name in run.message, run.stderr
    with pytest.raises(BadInputError) as caught:
        export_to_hf(out, tmp_path / "back")
    assert all(name in str(caught.value).splitlines()[0] for name in names), caught.value
    assert not (tmp_path / "back").exists()


def test_an_attn_types_of_the_wrong_length_is_not_reset_to_global(tmp_path, mistral):
    """It was: the window silently dropped, so the export ran as a different model."""
    from gqa_convert import GQATransformer
    from gqa_convert.errors import BadInputError

    out = convert(mistral, tmp_path / "out")
    edit_export_config(out, attn_types=["local"] * 2)
    with pytest.raises(BadInputError, match=r"attn_types has 2 entries, n_layers = 3"):
        GQATransformer.from_pretrained(out)


def test_a_vocab_json_and_merges_txt_tokenizer_is_used_and_the_report_says_so(tmp_path):
    """A BPE tokenizer without tokenizer.json (as transformers' slow files) was ignored:
    the check silently ran on random ids."""
    from tokenizers.pre_tokenizers import ByteLevel

    src = make_hf_checkpoint(tmp_path / "src", "qwen2", vocab_size=260)
    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}  # 256 byte ids
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    report = verify(src, prompts=["Hello"], seq_len=24)
    assert report.passed, report.summary()
    assert report.inputs == "tokenizer" and report.sequences == 2
    assert report.tokens == 24 + 5  # "Hello": five bytes, five ids
    assert "vocab.json" in report.inputs_detail and "1 prompt" in report.inputs_detail
    random = verify(make_hf_checkpoint(tmp_path / "bare", "llama"), seq_len=8)
    assert random.inputs == "random" and "random token ids" in random.inputs_detail
