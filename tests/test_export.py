"""The export folder: manifest hashes, model card, dtype casts, tokenizer files, round trip."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gqa_convert import GQATransformer, convert
from gqa_convert.checkpoint import read_weights
from gqa_convert.export import MANIFEST_NAME
from gqa_convert.to_hf import export_to_hf
from tests.hf_models import load_hf, make_hf_checkpoint, random_tokens
from tests.test_parity import CASES


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize(
    "case",
    [
        "llama-gqa4",
        "llama-tied",
        "llama-bf16-source",
        "llama-sharded",
        "llama-attention_bias",
        "mistral-window-8",
        "qwen2-biases",
        "llama-mqa",
        "llama-head_dim-12",
    ],
)
def test_round_trip_is_bit_identical(tmp_path, case):
    family, overrides, save, _ = CASES[case]
    src = make_hf_checkpoint(tmp_path / "src", family, **save, **overrides)
    out = convert(src, tmp_path / "ours")
    back = export_to_hf(out, tmp_path / "back", shard_bytes=50_000)
    original, returned = hf_tensors(src), hf_tensors(back)
    assert set(returned) == set(original)
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype, name
        assert torch.equal(returned[name], tensor), name
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    tokens = random_tokens(16)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(tokens).logits
        # the same HF class on the same weights: the same ops, equal on any CPU
        assert torch.equal(reloaded, load_hf(src)(tokens).logits)


def test_an_edit_in_gqa_layout_reaches_hf(tmp_path):
    """Ablate one query head in our layout; the HF model of the round trip sees it."""
    src = make_hf_checkpoint(tmp_path / "src", "llama")
    out = convert(src, tmp_path / "ours")
    model = GQATransformer.from_pretrained(out)
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    shard = out / "model.safetensors"
    arrays = load_np(shard)
    arrays["blocks.1.attn.W_O"][3] = 0  # head 3 of layer 1 writes nothing
    save_np(arrays, shard, metadata={"format": "pt"})
    back = export_to_hf(out, tmp_path / "back")
    o_proj = load_file(back / "model.safetensors")["model.layers.1.self_attn.o_proj.weight"]
    d_head = model.cfg.d_head
    assert torch.all(o_proj[:, 3 * d_head : 4 * d_head] == 0)
    assert torch.all(o_proj[:, 2 * d_head : 3 * d_head] != 0)


def test_manifest_hashes_match_the_files(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "qwen2", max_shard_size="60KB")
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    # The fake tokenizer.json is not one transformers reads, so no verification.
    out = convert(src, tmp_path / "out", shard_bytes=80_000, verify=False)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    files = manifest["output"]["files"]
    on_disk = {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    assert set(files) == on_disk
    assert "tokenizer.json" in files and "model.safetensors.index.json" in files
    for name, entry in files.items():
        assert entry["sha256"] == sha256(out / name), name
        assert entry["bytes"] == (out / name).stat().st_size
    read = manifest["source"]["files"]
    assert set(read) == {p.name for p in src.iterdir()}  # config, index, shards, tokenizer...
    assert {"tokenizer.json", "generation_config.json"} <= set(files)
    for name, entry in read.items():
        assert entry["sha256"] == sha256(src / name), name
    assert manifest["verification"]["status"] == "skipped"
    assert manifest["tool"]["name"] == "gqa-convert" and manifest["created"]
    assert manifest["output"]["dtype"] == "float32"


def test_model_card_front_matter_and_body(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "mistral", sliding_window=8)
    out = convert(src, tmp_path / "out")
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: gqa-convert" in front and "- mistral" in front
    assert "base_model" not in front  # a local path is not a Hub id
    assert "GQATransformer.from_pretrained" in card and "to_hooked_transformer" in card
    assert "skipped" not in card and "| passed | True |" in card
    from gqa_convert.card import _is_hub_id

    assert _is_hub_id("HuggingFaceTB/SmolLM2-135M") and not _is_hub_id("/tmp/x/y")


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtype_cast_matches_torch(tmp_path, dtype):
    src = make_hf_checkpoint(tmp_path / "src", "llama", dtype=torch.bfloat16)
    out = convert(src, tmp_path / "out", dtype=dtype)
    ours = GQATransformer.from_pretrained(out)
    reference = GQATransformer.from_pretrained(convert(src, tmp_path / "same"))
    target = getattr(torch, dtype)
    for name, param in ours.state_dict().items():
        assert param.dtype == target, name
        assert torch.equal(param, reference.state_dict()[name].to(target)), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["hf_config"]["dtype"] == dtype


def test_overwrite_replaces_and_refusal_keeps(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama")
    out = convert(src, tmp_path / "out")
    before = sha256(out / "model.safetensors")
    other = make_hf_checkpoint(tmp_path / "src2", "llama", seed=5)
    from gqa_convert.errors import OutputError

    with pytest.raises(OutputError, match="already exists"):
        convert(other, out)
    assert sha256(out / "model.safetensors") == before
    convert(other, out, overwrite=True)
    assert sha256(out / "model.safetensors") != before
    assert set(read_weights(out)) == set(read_weights(tmp_path / "out"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_edit_to_a_tied_unembedding_reaches_hf_untied(tmp_path):
    """Scale one column of a tied export's unembed.W_U: to-hf once wrote only the embedding,
    transformers re-tied lm_head to it, and its logits differed from ours by 5, silently."""
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    src = make_hf_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=True)
    out = convert(src, tmp_path / "ours")
    arrays = load_np(out / "model.safetensors")
    arrays["unembed.W_U"][:, 5] *= 4.0
    save_np(arrays, out / "model.safetensors", metadata={"format": "pt"})
    back = export_to_hf(out, tmp_path / "back")
    config = json.loads((back / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    written = hf_tensors(back)
    assert torch.equal(written["lm_head.weight"], torch.from_numpy(arrays["unembed.W_U"]).T)
    assert torch.equal(
        written["model.embed_tokens.weight"], hf_tensors(src)["model.embed_tokens.weight"]
    )
    tokens = random_tokens(16)
    with torch.no_grad():
        theirs = load_hf(back)(tokens).logits
        ours = GQATransformer.from_pretrained(out)(tokens)
        unedited = load_hf(src)(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert (theirs[..., 5] - unedited[..., 5]).abs().max() > 0.5  # the edit is there
    # Unedited, the tied export still comes back tied and bit-identical (no lm_head).
    same = export_to_hf(convert(src, tmp_path / "plain"), tmp_path / "plain-back")
    assert json.loads((same / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in hf_tensors(same)


def special_floats() -> torch.Tensor:
    """fp32 values where rounding to bf16 / fp16 is delicate: ties both ways, the largest
    finite values (which round to inf), subnormals, signed zeros, inf and NaN."""
    bits = [
        0x3F808000,  # 1 + 2^-8: a tie, even below -> stays
        0x3F818000,  # a tie, odd below -> rounds up
        0x3F80FFFF,  # above the tie -> up
        0x3F807FFF,  # just below the tie -> down
        0x7F7FFFFF,  # float32 max -> bf16 inf
        0xFF7FFFFF,  # -max -> -inf
        0x7F7F7FFF,  # below the bf16 max's tie -> bf16 max
        0x00000001,  # smallest subnormal
        0x80400000,  # a negative subnormal
        0x00008000,  # a subnormal tie
        0x80000000,  # -0.0
        0x7F800000,  # inf
        0xFF800000,  # -inf
        0x7FC00000,  # NaN
        0xFFC00001,  # negative NaN with a payload
        0x7F800001,  # signalling NaN, whose rounding would carry into the exponent
    ]
    special = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, generator=generator) * 10.0 ** torch.randint(
        -40, 39, (4096,), generator=generator
    )
    return torch.cat([special, spread])


@pytest.mark.exactness
@pytest.mark.parametrize("dst", ["bfloat16", "float16"])
def test_our_float32_cast_equals_torchs(dst):
    """dtypes.cast, our numpy rounding, against torch's own .to(): bit for bit, NaN a NaN.
    Exact on every CPU: round-to-nearest-even is defined to the bit (subnormals included,
    which `special_floats` holds); both implement it."""
    from gqa_convert.checkpoint import DTYPES
    from gqa_convert.dtypes import CODES, cast

    values = special_floats()
    ours = cast(values.numpy(), "F32", CODES[dst])
    assert ours.dtype == DTYPES[CODES[dst]][0]
    theirs = values.to(getattr(torch, dst))
    ours = torch.from_numpy(ours.view(np.int16)).view(getattr(torch, dst))
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours), nan) and nan.sum() == 3
    assert torch.equal(ours[~nan].view(torch.int16), theirs[~nan].view(torch.int16))


@pytest.mark.exactness
def test_a_float32_source_converted_to_bfloat16_equals_torchs_cast(tmp_path):
    """Every other cast test started from bf16: this one runs the rounding, on real weights
    and a NaN (--allow-nonfinite), through convert."""
    from safetensors.torch import save_file

    src = make_hf_checkpoint(tmp_path / "src", "llama")
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    tensors["model.layers.0.mlp.up_proj.weight"].view(-1)[:16] = special_floats()[:16]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = convert(src, tmp_path / "out", dtype="bfloat16", allow_nonfinite=True, verify=False)
    written = load_file(out / "model.safetensors")
    up = written["blocks.0.mlp.W_in"]  # [d_model, d_mlp] = up_proj.T
    expected = tensors["model.layers.0.mlp.up_proj.weight"].T.to(torch.bfloat16)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(up), nan) and nan.sum() == 3
    assert torch.equal(up[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert torch.isnan(written["ln_final.w"][3]) and written["ln_final.w"].dtype == torch.bfloat16
    norm = tensors["model.norm.weight"].to(torch.bfloat16)
    assert torch.equal(written["ln_final.w"][:3], norm[:3])


def test_shards_are_preallocated_and_a_disk_too_small_fails_before_writing(tmp_path, monkeypatch):
    """Each shard's blocks are reserved before it is written (fallocate): the file holds
    exactly the tensors; ENOSPC is an output error naming the file and size before any
    tensor is written; a file system without fallocate is written as before."""
    import errno

    from gqa_convert import checkpoint
    from gqa_convert.checkpoint import TensorSpec, write_sharded
    from gqa_convert.errors import OutputError

    arrays = {f"t{i}": np.arange(1000 * (i + 1), dtype=np.float32) for i in range(3)}
    specs = [TensorSpec(n, "F32", a.shape) for n, a in arrays.items()]
    calls = []
    real = checkpoint._fallocate

    def spy(fd, nbytes):
        calls.append(nbytes)
        return real(fd, nbytes)

    monkeypatch.setattr(checkpoint, "_fallocate", spy)
    (tmp_path / "ok").mkdir()
    write_sharded(tmp_path / "ok", specs, iter(arrays.items()), 10_000)
    files = sorted((tmp_path / "ok").glob("*.safetensors"))
    assert [f.stat().st_size for f in files] == calls  # reserved = written, per shard
    loaded = {k: v for f in files for k, v in load_file(f).items()}
    assert all(np.array_equal(loaded[n].numpy(), a) for n, a in arrays.items())

    for err, works in ((errno.ENOSPC, False), (errno.EOPNOTSUPP, True)):
        out = tmp_path / f"e{err}"
        out.mkdir()
        written = []
        monkeypatch.setattr(checkpoint, "_fallocate", lambda fd, n, err=err: err)
        gen = ((n, written.append(n) or a) for n, a in arrays.items())
        if works:
            write_sharded(out, specs, gen, 10_000)
            again = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
            assert all(np.array_equal(again[n].numpy(), a) for n, a in arrays.items())
        else:
            with pytest.raises(OutputError, match=r"no space left .* 4,\d{3} bytes"):
                write_sharded(out, specs, gen, 10_000)
            assert written == []
