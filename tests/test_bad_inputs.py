"""The bad-input matrix: each broken checkpoint through the CLI, as a user runs it.

Every case asserts the exit code, that the first line of the message names the file,
tensor or field at fault, that no traceback is shown, that no OUT (and no temporary folder)
is left behind, that no code from the checkpoint ran, and that the Hub token in the
environment never shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gqa_convert.api import convert
from gqa_convert.errors import ParityError
from gqa_convert.export import load_export
from tests.cli_subprocess import (
    FAKE_TOKEN,
    assert_no_secret,
    can_drop_root,
    run_cli,
    work_folders,
)
from tests.hf_models import make_hf_model

MARKER = "PWNED"  # a file that checkpoint code would create in the test's folder if it ran


# --- the base checkpoints, built once -------------------------------------------------------


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama saved three ways: one fp32 file, 9 fp32 shards, one bf16 file."""
    root = tmp_path_factory.mktemp("bases")
    model = make_hf_model("llama")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="60KB")
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    return {p.name: p for p in root.iterdir()}


# --- ways to break a copy -------------------------------------------------------------------


def edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def index(src: Path) -> dict[str, str]:
    return json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def to_bin(src: Path) -> None:
    """Replace model.safetensors by a pytorch_model.bin holding the same state dict."""
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()


class RunsCode:
    """Pickled, it asks the unpickler to call os.system: a booby-trapped checkpoint."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def pickle_with_code(src: Path) -> None:
    to_bin(src)
    state = torch.load(src / "pytorch_model.bin")
    state["model.norm.weight"] = RunsCode(f"touch {src.parent / MARKER}")
    torch.save(state, src / "pytorch_model.bin")


def custom_code(src: Path) -> None:
    (src / "modeling_evil.py").write_text(f"open({str(src.parent / MARKER)!r}, 'w').close()\n")
    edit_config(src, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


def corrupt_header(src: Path) -> None:
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00garbage\xff" * 4
    path.write_bytes(bytes(data))


def remove_from_shard(src: Path) -> None:
    shard = index(src)["model.norm.weight"]
    edit_tensors(src / shard, lambda t: t.pop("model.norm.weight"))


def set_value(name: str, value: float) -> Callable[[Path], None]:
    def change(src: Path) -> None:
        def put(tensors):
            tensors[name].view(-1)[3] = value

        edit_tensors(next(src.glob("*.safetensors")), put)

    return change


# --- the matrix -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    base: str  # single / sharded / bf16, or "" for an empty SRC
    mutate: Callable[[Path], None] | None
    code: int
    names: tuple[str, ...]  # each must appear in the message's first line
    args: tuple[str, ...] = ()
    out: str = "out"  # OUT, relative to the test's folder


ST = "model.safetensors"
Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
EXTRA = "model.layers.0.self_attn.extra_proj.weight"

CASES = {
    "missing-config.json": Case(
        "single", lambda s: (s / "config.json").unlink(), 3, ("config.json", "not found")
    ),
    "config.json-not-json": Case(
        "single",
        lambda s: (s / "config.json").write_text("{not json"),
        3,
        ("config.json", "not valid JSON"),
    ),
    "config.json-not-an-object": Case(
        "single", lambda s: (s / "config.json").write_text("[1, 2]"), 3, ("config.json", "list")
    ),
    "config-field-wrong-type": Case(
        "single",
        lambda s: edit_config(s, tie_word_embeddings="false"),
        3,
        ("config.json", "tie_word_embeddings"),
    ),
    "unknown-architecture": Case(
        "single",
        lambda s: edit_config(s, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
        4,
        ("config.json", "GPT2LMHeadModel"),
    ),
    "heads-not-divisible-by-kv-heads": Case(
        "single",
        lambda s: edit_config(s, num_key_value_heads=3),
        3,
        ("config.json", "num_key_value_heads=3"),
    ),
    "head_dim-disagrees-with-q_proj": Case(
        "single", lambda s: edit_config(s, head_dim=12), 3, ("problems, first:", Q0, "[64, 64]")
    ),
    "auto_map-custom-code": Case("single", custom_code, 4, ("config.json", "auto_map")),
    "truncated-safetensors": Case(
        "single", lambda s: truncate(s / ST, 0.6), 3, (ST, "truncated", "tensor")
    ),
    "safetensors-shorter-than-its-header": Case(
        "single", lambda s: truncate(s / ST, 0.0005), 3, (ST, "truncated")
    ),
    "corrupt-safetensors-header": Case(
        "single", corrupt_header, 3, (ST, "corrupt safetensors header")
    ),
    "index-names-missing-shard": Case(
        "sharded",
        lambda s: (s / "model-00003-of-00009.safetensors").unlink(),
        3,
        ("model-00003-of-00009.safetensors", "missing"),
    ),
    "index-lists-tensor-absent-from-shard": Case(
        "sharded",
        remove_from_shard,
        3,
        ("model.norm.weight", "listed in model.safetensors.index.json", "not in it"),
    ),
    "index-not-json": Case(
        "sharded",
        lambda s: (s / "model.safetensors.index.json").write_text("nope"),
        3,
        ("model.safetensors.index.json", "not a valid index"),
    ),
    "index-points-outside-the-folder": Case(
        "sharded",
        lambda s: (s / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "../../etc/passwd"}})
        ),
        3,
        ("model.safetensors.index.json", "model.norm.weight", "../../etc/passwd"),
    ),
    "tensor-with-wrong-shape": Case(
        "single",
        lambda s: edit_tensors(s / ST, lambda t: t.update({UP1: torch.zeros(96, 32)})),
        3,
        (UP1, "[96, 32]", "[96, 64]"),
    ),
    "missing-layer": Case(
        "single",
        lambda s: edit_tensors(
            s / ST, lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.2.")]
        ),
        3,
        ("9 problems", "missing tensor model.layers.2."),
    ),
    "unexpected-extra-tensor": Case(
        "single",
        lambda s: edit_tensors(s / ST, lambda t: t.update({EXTRA: torch.zeros(4)})),
        3,
        ("unexpected tensor", EXTRA),
    ),
    "nan-in-a-weight": Case(
        "single", set_value(UP1, float("nan")), 3, (ST, UP1, "NaN/Inf", "--allow-nonfinite")
    ),
    "inf-in-a-bf16-weight": Case(
        "bf16", set_value(Q0, float("inf")), 3, (ST, Q0, "NaN/Inf", "--allow-nonfinite")
    ),
    "fp8-weight": Case(
        "single",
        lambda s: edit_tensors(s / ST, lambda t: t.update({Q0: t[Q0].to(torch.float8_e4m3fn)})),
        4,
        (ST, Q0, "F8_E4M3"),
    ),
    "integer-weight": Case(
        "single",
        lambda s: edit_tensors(s / ST, lambda t: t.update({UP1: t[UP1].to(torch.int32)})),
        3,
        (ST, UP1, "I32"),
    ),
    "src-is-an-empty-folder": Case("", None, 3, ("src", "empty folder")),
    "src-does-not-exist": Case("single", lambda s: shutil.rmtree(s), 3, ("src", "no such folder")),
    "src-is-a-file": Case(
        "single", lambda s: (shutil.rmtree(s), s.write_text("x")), 3, ("src", "not a folder")
    ),
    "only-pytorch_model.bin-carrying-code": Case(
        "single", pickle_with_code, 3, ("pytorch_model.bin", "refused", "posix.system")
    ),
    "pytorch_model.bin-truncated": Case(
        "single",
        lambda s: (to_bin(s), truncate(s / "pytorch_model.bin", 0.5)),
        3,
        ("pytorch_model.bin", "not a readable PyTorch checkpoint"),
    ),
    "pytorch_model.bin-not-a-state-dict": Case(
        "single",
        lambda s: (to_bin(s), torch.save({"step": 3}, s / "pytorch_model.bin")),
        3,
        ("pytorch_model.bin", "'step'", "not a tensor"),
    ),
    "out-exists": Case("single", None, 6, ("taken", "already exists", "--overwrite"), out="taken"),
    "out-parent-read-only": Case(
        "single", None, 6, ("read-only", "Permission denied"), out="read-only/out"
    ),
    "out-parent-is-a-file": Case("single", None, 6, ("a-file", "is a file"), out="a-file/out"),
    "bad-shard-size": Case("single", None, 2, ("--shard-size", "'lots'"), ("--shard-size", "lots")),
}


def prepare(case: Case, bases: dict[str, Path], folder: Path) -> tuple[Path, Path]:
    """SRC (a broken copy of a base) and OUT, in `folder`."""
    src = folder / "src"
    if case.base:
        shutil.copytree(bases[case.base], src)
    else:
        src.mkdir()
    if case.mutate:
        case.mutate(src)
    out = folder / case.out
    if case.out == "taken":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case.out.startswith("read-only/"):
        out.parent.mkdir()
        out.parent.chmod(0o555)
    elif case.out.startswith("a-file/"):
        out.parent.write_text("a file, not a folder")
    return src, out


@pytest.mark.parametrize("name", CASES)
def test_bad_input(bases, tmp_path, name):
    case = CASES[name]
    if case.out.startswith("read-only/") and not can_drop_root():
        pytest.skip("running as root without CAP_SETPCAP: a read-only folder is writable")
    src, out = prepare(case, bases, tmp_path)
    run = run_cli("convert", src, out, *case.args, drop_root=case.out.startswith("read-only/"))

    assert run.code == case.code, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") or case.code == 2, run.stderr
    for name_at_fault in case.names:
        assert name_at_fault in run.message, run.stderr
    if case.out == "taken":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    if out.parent.is_dir():
        assert work_folders(out.parent) == []
    assert not (tmp_path / MARKER).exists(), "code from the checkpoint ran"
    assert_no_secret(FAKE_TOKEN, run.stdout, run.stderr)


def test_a_listing_error_keeps_its_offenders_below_the_summary(bases, tmp_path):
    src, out = prepare(CASES["missing-layer"], bases, tmp_path)
    lines = run_cli("convert", src, out).stderr.splitlines()
    assert lines[0].startswith("error: the weights do not match config.json")
    offenders = [line.strip() for line in lines[1:]]
    assert len(offenders) == 9
    assert all(line.startswith("missing tensor model.layers.2.") for line in offenders)


def test_debug_shows_the_traceback_and_keeps_the_exit_code(bases, tmp_path):
    src, out = prepare(CASES["missing-config.json"], bases, tmp_path)
    run = run_cli("--debug", "convert", src, out)
    assert run.code == 3
    assert "Traceback" in run.stderr
    assert "BadInputError" in run.stderr
    assert "config.json: not found" in run.message
    assert_no_secret(FAKE_TOKEN, run.stdout, run.stderr)


# --- the escape hatches and the other formats work ------------------------------------------


def test_allow_nonfinite_converts_and_keeps_the_nan(bases, tmp_path):
    src, out = prepare(CASES["nan-in-a-weight"], bases, tmp_path)
    run = run_cli("convert", src, out, "--allow-nonfinite", "--no-verify")  # NaN logits
    assert run.code == 0, run.stderr
    _, state = load_export(out)
    assert torch.isnan(state["blocks.1.mlp.W_in"]).sum() == 1
    assert convert(src, tmp_path / "lib", allow_nonfinite=True, verify=False).is_dir()
    with pytest.raises(ParityError):  # the library gates by default, as the CLI does
        convert(src, tmp_path / "gated", allow_nonfinite=True)
    assert not (tmp_path / "gated").exists()


@pytest.mark.parametrize("layout", ["single", "sharded", "bf16"])
@pytest.mark.slow
def test_pytorch_model_bin_converts_like_safetensors(bases, tmp_path, layout):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(bases[layout] / "config.json", src)
    state = {}
    for file in sorted(bases[layout].glob("*.safetensors")):
        state.update(load_file(file))
    if layout == "sharded":  # two pickles and their index
        names = sorted(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[::2]}
        halves["pytorch_model-00002-of-00002.bin"] = names[1::2]
        for file, part in halves.items():
            torch.save({n: state[n] for n in part}, src / file)
        weight_map = {n: file for file, part in halves.items() for n in part}
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, src / "pytorch_model.bin")

    run = run_cli("convert", src, tmp_path / "out", "--no-verify")  # compared below instead
    assert run.code == 0, run.stderr
    cfg_bin, from_bin = load_export(tmp_path / "out")
    cfg_st, from_st = load_export(convert(bases[layout], tmp_path / "reference"))
    assert cfg_bin == cfg_st
    assert from_bin.keys() == from_st.keys()
    for name, tensor in from_st.items():
        assert from_bin[name].dtype == tensor.dtype
        assert torch.equal(from_bin[name], tensor), name


# --- security -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_token_never_reaches_output_or_files(bases, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bases["sharded"], src)
    run = run_cli("--debug", "convert", src, tmp_path / "out", "--shard-size", "100KB")
    assert run.code == 0, run.stderr
    assert_no_secret(FAKE_TOKEN, run.stdout, run.stderr, folders=(tmp_path / "out",))
    # And the check itself can fail: a file holding the token is caught.
    (tmp_path / "out" / "leak.txt").write_text(f"token={FAKE_TOKEN}")
    with pytest.raises(AssertionError):
        assert_no_secret(FAKE_TOKEN, folders=(tmp_path / "out",))


def test_the_library_never_trusts_remote_code():
    """transformers runs a checkpoint's own code only with trust_remote_code=True."""
    package = Path(__file__).parents[1] / "gqa_convert"
    for path in package.rglob("*.py"):
        for value in re.findall(r"trust_remote_code\s*=\s*(\w+)", path.read_text()):
            assert value == "False", f"{path}: trust_remote_code={value}"


def test_nonfinite_count_reads_the_bits_of_16_bit_floats():
    from gqa_convert.checkpoint import count_nonfinite

    values = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 3e38, -0.0])
    bf16 = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)  # storage
    assert count_nonfinite(bf16, "BF16", chunk=4) == 3
    assert count_nonfinite(values.to(torch.float16).numpy(), "F16", chunk=4) == 4  # 3e38: inf
    assert count_nonfinite(values.numpy(), "F32", chunk=4) == 3
    assert count_nonfinite(np.arange(4, dtype=np.int32), "I32") == 0


def test_nonfinite_count_of_held_tensors_is_exact_behind_its_sum_shortcut():
    """verify's count over torch tensors skips a chunk whose sum is finite: a NaN or an Inf
    anywhere makes it not (+Inf and -Inf in one chunk sum to NaN); finite values
    summing past the range fall back to the exact count, which is 0."""
    from gqa_convert.verify.ours import count_nonfinite

    clean = torch.randn(4096)
    assert count_nonfinite(clean, chunk=1000) == 0
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for where in ([7], [7, 3000], [5, 6], [999, 1000, 4095]):
            for kind in ("nan", "inf", "-inf", "mixed"):
                x = clean.clone().to(dtype)
                for n, i in enumerate(where):
                    value = {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(kind)
                    value = value or ("inf", "-inf", "nan")[n % 3]
                    x[i] = float(value)
                assert count_nonfinite(x, chunk=1000) == len(where), (dtype, where, kind)
    big = torch.full((3000,), 3e38)  # sums to inf in fp32: counted exactly, none
    assert count_nonfinite(big, chunk=1000) == 0
    assert count_nonfinite(torch.full((3000,), 60000.0, dtype=torch.float16), chunk=1000) == 0
    assert count_nonfinite(torch.arange(10)) == 0


def test_a_source_file_unreadable_during_export_is_bad_input_not_an_output_error(bases, tmp_path):
    """Reading SRC failed while the export was written (the copy of a tokenizer file, its
    hash): that is the input's fault, exit 3, not 6."""
    if not can_drop_root():
        pytest.skip("running as root without CAP_SETPCAP: an unreadable file is readable")
    src = tmp_path / "src"
    shutil.copytree(bases["single"], src)
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (src / "tokenizer.json").chmod(0o000)
    run = run_cli("convert", src, tmp_path / "out", "--no-verify", drop_root=True)
    assert run.code == 3, run.stderr
    assert "tokenizer.json" in run.message and "cannot read" in run.message, run.stderr
    assert not (tmp_path / "out").exists() and work_folders(tmp_path) == []
