"""The weight map at real sizes (Llama-3-8B, Llama-3-70B, Mistral-7B) on the meta device."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gqa_convert.mapping import apply_layout, plan_tasks
from gqa_convert.model.decoder import GQATransformer

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA31_8B = {
    **LLAMA3_8B,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
LLAMA3_70B = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
MODELS = {
    "llama-3-8b": LLAMA3_8B,
    "llama-3.1-8b": LLAMA31_8B,
    "llama-3-70b": LLAMA3_70B,
    "mistral-7b": MISTRAL_7B,
}


@pytest.mark.parametrize("name", MODELS)
def test_map_real_shapes_on_meta(name):
    hf_config = MODELS[name]
    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}

    cfg, tasks, dropped = plan_tasks(hf_config, hf_shapes)
    assert dropped == []
    assert {t.source for t in tasks} == set(hf_shapes)  # every HF tensor is used
    meta = {t.source: torch.empty(t.source_shape, device="meta") for t in tasks}
    state = {t.target: apply_layout(t, meta[t.source], cfg) for t in tasks}
    for t in tasks:
        assert tuple(state[t.target].shape) == t.target_shape

    model = GQATransformer.from_state_dict(cfg, state, device="meta")
    ours = dict(model.named_parameters())
    for target, tensor in state.items():
        assert ours[target].shape == tensor.shape, target
    n, k, m, h = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head
    attn = model.blocks[cfg.n_layers - 1].attn
    assert attn.W_Q.shape == (n, m, h) and attn._W_K.shape == (k, m, h)
    assert attn.W_K.shape == (n, m, h) and attn.W_O.shape == (n, h, m)
    assert sum(p.numel() for p in hf_model.parameters()) == sum(
        state[t.target].numel() for t in tasks
    )
    if name == "mistral-7b":
        assert set(cfg.attn_types) == {"local"} and cfg.sliding_window == 4096
    if name == "llama-3.1-8b":
        assert cfg.rope.type == "llama3" and cfg.rope.original_max_position_embeddings == 8192
