"""Tiny random HF checkpoints, built locally with transformers, for every family and quirk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)


def make_hf_model(family: str = "llama", seed: int = 0, **overrides: Any):
    """A random HF model whose norms and biases are not 1 and 0 (so a dropped one shows)."""
    torch.manual_seed(seed)
    params = {**TINY, **overrides}
    if family != "llama":
        params.pop("attention_bias", None)
    config = CONFIG_CLASSES[family](**params)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def save_hf_checkpoint(
    model, folder: Path, *, dtype: torch.dtype | None = None, max_shard_size: str | None = None
) -> Path:
    """save_pretrained into `folder`, optionally cast and sharded; returns `folder`."""
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def make_hf_checkpoint(
    folder: Path, family: str = "llama", *, dtype=None, max_shard_size=None, **kw
):
    return save_hf_checkpoint(
        make_hf_model(family, **kw), folder, dtype=dtype, max_shard_size=max_shard_size
    )


def to_legacy_rope_spelling(folder: Path) -> dict:
    """Rewrite config.json with `rope_theta` + `rope_scaling`, as pre-transformers-5 Hub files."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    config["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **params}
    path.write_text(json.dumps(config, indent=2))
    return config


def load_hf(folder: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def random_tokens(n_pos: int, vocab: int = 128, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n_pos), generator=torch.Generator().manual_seed(seed))
