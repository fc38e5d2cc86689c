"""Tiny random HF checkpoints, built locally with transformers, for every family and quirk."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    ApertusConfig,
    AutoConfig,
    AutoModelForCausalLM,
    Cohere2Config,
    CohereConfig,
    Ernie4_5_MoeConfig,
    Ernie4_5Config,
    Exaone4Config,
    Gemma2Config,
    Gemma3TextConfig,
    Gemma4TextConfig,
    GemmaConfig,
    Glm4Config,
    Glm4MoeConfig,
    GptOssConfig,
    GraniteConfig,
    GraniteSWAConfig,
    HeliumConfig,
    HunYuanDenseV1Config,
    HunYuanMoEV1Config,
    InternLM3Config,
    Llama4TextConfig,
    LlamaConfig,
    Ministral3Config,
    MinistralConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Olmo3Config,
    OlmoeConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SeedOssConfig,
    SmolLM3Config,
    Starcoder2Config,
)

from gqa_convert.verify.reference import attention_implementation

CONFIG_CLASSES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "phi3": Phi3Config,
    "olmo2": Olmo2Config,
    "granite": GraniteConfig,
    "smollm3": SmolLM3Config,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
    "gemma4_text": Gemma4TextConfig,
    "mixtral": MixtralConfig,
    "qwen3_moe": Qwen3MoeConfig,
    "olmoe": OlmoeConfig,
    # The dense families of 2026 (tests/test_families_2026.py)
    "seed_oss": SeedOssConfig,
    "internlm3": InternLM3Config,
    "helium": HeliumConfig,
    "ernie4_5": Ernie4_5Config,
    "olmo3": Olmo3Config,
    "exaone4": Exaone4Config,
    "ministral": MinistralConfig,
    "ministral3": Ministral3Config,
    "glm4": Glm4Config,
    "starcoder2": Starcoder2Config,
    "apertus": ApertusConfig,
    "cohere": CohereConfig,
    "cohere2": Cohere2Config,
    "hunyuan_v1_dense": HunYuanDenseV1Config,
    "granite_swa": GraniteSWAConfig,
    "llama4_text": Llama4TextConfig,
    "gpt_oss": GptOssConfig,
    # The MoE families of 2026 (tests/test_moe_2026.py)
    "glm4_moe": Glm4MoeConfig,
    "ernie4_5_moe": Ernie4_5_MoeConfig,
    "hunyuan_v1_moe": HunYuanMoEV1Config,
}
# Special token ids some config classes default to, beyond TINY's vocabulary.
NO_SPECIAL_TOKENS = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
FAMILY_DEFAULTS = {f: NO_SPECIAL_TOKENS for f in ("phi3", "smollm3", "olmo2", "granite")}
# Gemma: head_dim stated (the config class's default is 256), and a d_model whose
# sqrt(d_model) embedding scale is not exact in bf16 (sqrt(48) = 6.93 -> 6.94).
GEMMA = {**NO_SPECIAL_TOKENS, "hidden_size": 48, "head_dim": 8}
FAMILY_DEFAULTS.update({f: GEMMA for f in ("gemma", "gemma2", "gemma3_text")})
# Gemma 4: global layers' heads twice as wide (the class's default is 512).
# Gemma 4's per-layer input table has its own vocabulary (262144 by default): TINY's.
FAMILY_DEFAULTS["gemma4_text"] = {**GEMMA, "global_head_dim": 16, "vocab_size_per_layer_input": 128}
# Mixtures of experts: 4 experts, 2 per token (Qwen3-MoE's experts narrower than its dense
# MLPs, as in Qwen3-30B-A3B).
MOE = {"num_experts_per_tok": 2}
FAMILY_DEFAULTS["mixtral"] = {**MOE, "num_local_experts": 4}
FAMILY_DEFAULTS["qwen3_moe"] = {**MOE, "num_experts": 4, "moe_intermediate_size": 40}
FAMILY_DEFAULTS["olmoe"] = {**NO_SPECIAL_TOKENS, **MOE, "num_experts": 4}
# gpt-oss: 4 experts of width 32, 2 per token; q width n_heads * head_dim = 128 != d_model;
# a clamp limit the tiny model's expert pre-activations reach (the default, 7, they never do).
FAMILY_DEFAULTS["gpt_oss"] = {
    **NO_SPECIAL_TOKENS,
    **MOE,
    "num_local_experts": 4,
    "intermediate_size": 32,
    "head_dim": 16,
    "swiglu_limit": 0.5,
}
# The 2026 families: no special token ids (several default beyond TINY's vocabulary), head_dim
# stated (several classes default to 128), and each family's own name for the norm epsilon.
FAMILIES_2026 = (
    *("seed_oss", "internlm3", "helium", "ernie4_5", "olmo3", "exaone4", "ministral"),
    *("ministral3", "glm4", "starcoder2", "apertus", "hunyuan_v1_dense", "granite_swa"),
    *("cohere", "cohere2"),
)
FAMILY_DEFAULTS.update({f: {**NO_SPECIAL_TOKENS, "head_dim": 8} for f in FAMILIES_2026})
FAMILY_DEFAULTS["starcoder2"]["norm_epsilon"] = 1e-5
# Llama 4: 4 layers (the 4th NoPE), chunks and the temperature's floor_scale shorter than
# the prompts, every other layer MoE (Maverick's interleaving), 4 experts, 1 per token.
FAMILY_DEFAULTS["llama4_text"] = {
    **NO_SPECIAL_TOKENS,
    "head_dim": 8,
    "num_hidden_layers": 4,
    "intermediate_size": 40,
    "intermediate_size_mlp": 96,
    "attention_chunk_size": 16,
    "floor_scale": 8,
    "attn_scale": 0.5,
    "num_local_experts": 4,
    "interleave_moe_layer_step": 2,
}
for f in ("cohere", "cohere2"):  # Cohere 2's head_dim is always hidden_size / heads
    FAMILY_DEFAULTS[f] = {**NO_SPECIAL_TOKENS, "layer_norm_eps": 1e-5}
# GLM-4.5: 8 experts in 4 groups of 2, the best 2 groups' experts eligible, 2 per token, a
# shared expert, the first layer dense; the correction bias random (below), so it matters.
FAMILY_DEFAULTS["glm4_moe"] = {
    **NO_SPECIAL_TOKENS,
    **MOE,
    "head_dim": 8,
    "n_routed_experts": 8,
    "moe_intermediate_size": 32,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "use_qk_norm": True,
}
# ERNIE 4.5 MoE: 8 experts, 2 per token, a shared expert, layer 0 dense, the correction
# bias random.
FAMILY_DEFAULTS["ernie4_5_moe"] = {
    **NO_SPECIAL_TOKENS,
    "head_dim": 8,
    "moe_num_experts": 8,
    "moe_k": 2,
    "moe_intermediate_size": 32,
    "moe_num_shared_experts": 1,
    "moe_layer_start_index": 1,
}
# Hunyuan MoE: 4 experts of width 32, top 2, and its shared MLP.
FAMILY_DEFAULTS["hunyuan_v1_moe"] = {
    **NO_SPECIAL_TOKENS,
    "head_dim": 8,
    "num_experts": 4,
    "moe_topk": 2,
    "intermediate_size": 32,
}
# Families whose config class reads `attention_bias`.
ATTENTION_BIAS = {
    "llama",
    "olmo2",
    "granite",
    "smollm3",
    "seed_oss",
    "internlm3",
    "helium",
    "glm4",
    "apertus",
    "cohere",
    "cohere2",
    "hunyuan_v1_dense",
    "granite_swa",
    "gpt_oss",
    "glm4_moe",
    "hunyuan_v1_moe",
}

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
    params = {**TINY, **FAMILY_DEFAULTS.get(family, {}), **overrides}
    if family not in ATTENTION_BIAS:
        params.pop("attention_bias", None)
    config = CONFIG_CLASSES[family](**params)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, **attention_implementation(config)
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Gemma 4 MoE's norms beside the experts end in _1 / _2
            if name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight")):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith(("router.scale", "router.per_expert_scale")):  # Gemma 4's: ones
                p.copy_(0.5 + torch.rand_like(p))
            elif name.endswith((".bias", "_proj_bias", ".sinks", ".alpha_p", ".alpha_n")):
                # biases (gpt-oss's experts' too), sinks, xIELU's parameters
                p.copy_(p + 0.5 * torch.randn_like(p))
        for name, b in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):  # GLM-4.5's, ERNIE's: zeros
                b.copy_(0.1 * torch.randn_like(b))
        for name, b in model.named_buffers():  # Gemma 4's, in the checkpoint
            if name.endswith(".layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
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


# Checkpoints built in this process, by their arguments: make_hf_model is a pure function of
# them (it seeds torch), so a second test asking for the same one gets a copy of the files
# (milliseconds) instead of a new model (0.1-0.4 s, more under load). Copies, so a test may
# edit its folder.
_BUILT: dict[str, Path] = {}
_BUILT_DIR: Path | None = None


def make_hf_checkpoint(
    folder: Path, family: str = "llama", *, dtype=None, max_shard_size=None, **kw
) -> Path:
    """`save_hf_checkpoint(make_hf_model(family, **kw), folder, ...)`, built once per
    process for the same arguments and copied into `folder`."""
    global _BUILT_DIR
    key = repr((family, str(dtype), max_shard_size, sorted(kw.items())))
    if key not in _BUILT:
        if _BUILT_DIR is None:
            _BUILT_DIR = Path(tempfile.mkdtemp(prefix="gqa-convert-tiny-"))
            atexit.register(shutil.rmtree, _BUILT_DIR, ignore_errors=True)
        built = _BUILT_DIR / str(len(_BUILT))
        save_hf_checkpoint(
            make_hf_model(family, **kw), built, dtype=dtype, max_shard_size=max_shard_size
        )
        _BUILT[key] = built
    shutil.copytree(_BUILT[key], folder, dirs_exist_ok=True)
    return folder


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
    config = AutoConfig.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=dtype, **attention_implementation(config)
    ).eval()


def random_tokens(n_pos: int, vocab: int = 128, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n_pos), generator=torch.Generator().manual_seed(seed))
