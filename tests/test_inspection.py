"""`inspect` reads config.json and safetensors headers only, never tensor bytes."""

from __future__ import annotations

import struct

import pytest

import gqa_convert.checkpoint
from gqa_convert.inspection import inspect_checkpoint
from tests.hf_models import make_hf_checkpoint


def scramble_tensor_bytes(folder) -> None:
    """Overwrite every byte after each shard's header: headers intact, data garbage."""
    for path in folder.glob("*.safetensors"):
        data = bytearray(path.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        data[8 + n :] = bytes(range(256)) * (len(data[8 + n :]) // 256) + b"\xff" * (
            len(data[8 + n :]) % 256
        )
        path.write_bytes(bytes(data))


def test_inspect_sharded_checkpoint_reads_no_tensor_data(tmp_path, monkeypatch):
    src = make_hf_checkpoint(
        tmp_path / "src", "mistral", max_shard_size="60KB", sliding_window=8, num_key_value_heads=2
    )
    before = inspect_checkpoint(src)
    scramble_tensor_bytes(src)

    def no_reads(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(gqa_convert.checkpoint, "read_array", no_reads)
    after = inspect_checkpoint(src)
    assert after == before
    assert len(after["files"]) > 1
    assert after["architecture"] == "MistralForCausalLM"
    assert after["n_heads"] == 8 and after["n_key_value_heads"] == 2 and after["group_size"] == 4
    assert after["head_to_kv_head"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert after["sliding_window"] == 8 and after["local_attention_layers"] == [0, 1, 2]
    assert after["dtypes"] == {"float32": sum(f["tensors"] for f in after["files"].values())}
    tensors = 9 * 3 + 3  # 9 per layer, embed, final norm, lm_head
    assert sum(f["tensors"] for f in after["files"].values()) == tensors


def test_inspect_describes_a_truncated_checkpoint_that_convert_refuses(tmp_path):
    from tests.cli_subprocess import run_cli

    src = make_hf_checkpoint(tmp_path / "src", "llama", max_shard_size="60KB")
    complete = inspect_checkpoint(src)
    assert complete["truncated_files"] == {}
    shard = sorted(src.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    shard.write_bytes(data[: 8 + n + 10])  # header intact, tensor bytes cut off
    info = inspect_checkpoint(src)
    assert info["truncated_files"] == {shard.name: {"bytes": 8 + n + 10, "header_says": len(data)}}
    info["files"][shard.name]["bytes"] = complete["files"][shard.name]["bytes"]
    assert {**info, "truncated_files": {}} == complete
    run = run_cli("convert", src, tmp_path / "out")
    assert run.code == 3 and shard.name in run.message and "truncated" in run.message


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_hf(tmp_path, tied):
    from tests.hf_models import make_hf_model

    model = make_hf_model("qwen2", tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "src")
    info = inspect_checkpoint(tmp_path / "src")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["tied_embeddings"] is tied and info["qkv_bias"] is True


# The child's own peak: VmHWM belongs to the address space exec made, where ru_maxrss survives
# exec and can report the pytest process that forked it (2.3 GB once the suite had loaded
# real models, against 1.0-1.2 GB for verify itself).
VERIFY_PEAK = """
import re, sys
from pathlib import Path
from gqa_convert.verify import verify
report = verify(sys.argv[1])
assert report.passed, report.summary()
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(report.tokens, hwm_kb * 1024)
"""


@pytest.mark.slow
def test_the_verify_memory_estimate_bounds_a_measured_verify_run(tmp_path):
    """A large vocabulary and the longest default input: the logit statistics' float64
    temporaries (1.8 GB here before they were chunked) must fit in the upper bound."""
    import subprocess
    import sys

    src = make_hf_checkpoint(tmp_path / "src", "mistral", vocab_size=32000, sliding_window=900)
    estimate = inspect_checkpoint(src)["estimated_peak_memory_bytes"]["verify"]
    run = subprocess.run(
        [sys.executable, "-c", VERIFY_PEAK, str(src)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    tokens, peak = map(int, run.stdout.split())
    assert tokens == 964  # the default: 64 past the window
    assert peak <= estimate, (peak / 1e6, estimate / 1e6)


def test_inspect_lists_the_family_quirks(tmp_path):
    phi = make_hf_checkpoint(tmp_path / "phi", "phi3", partial_rotary_factor=0.5)
    olmo = make_hf_checkpoint(tmp_path / "olmo", "olmo2")
    granite = make_hf_checkpoint(tmp_path / "granite", "granite", logits_scaling=4.0)
    assert inspect_checkpoint(phi)["quirks"] == {
        "rotary_dim": "4 of 8 (partial rotary)",
        "fused": {"qkv_proj": "W_Q, _W_K, _W_V", "gate_up_proj": "W_gate, W_in"},
    }
    assert set(inspect_checkpoint(olmo)["quirks"]) == {
        *("qk_norm", "norm_placement"),
        *("norm_weight_in_fp32", "rotary_in_fp32"),  # OLMo2's bf16 rounding, named too
    }
    # GraniteConfig defaults attention_multiplier to 1.0: scores are not scaled by 1/sqrt(d)
    assert inspect_checkpoint(granite)["quirks"] == {
        "attention_multiplier": 1.0,
        "logits_scaling": 4.0,
    }
    assert inspect_checkpoint(granite)["rope"] == {"theta": 10000.0, "type": "default"}
