"""The weight map at real sizes (Llama-3-8B/70B, Mistral-7B, Qwen3-8B, Phi-3-mini, Phi-4-mini,
OLMo2-7B, Granite-3-8B, SmolLM3-3B, Gemma-2-2B/9B, Gemma-3-1B/4B, Mixtral-8x7B, Qwen3-30B-A3B,
OLMoE-1B-7B, GLM-4.5, GLM-4.5-Air, ERNIE-4.5-21B-A3B, Hunyuan-A13B, and the dense families of
2026: Seed-OSS-36B, InternLM3-8B, Helium-2B, ERNIE-4.5-0.3B, OLMo-3-32B, EXAONE 4, Ministral-8B,
Ministral 3,
GLM-4-9B, StarCoder2-3B, Apertus-8B, Command R / R+, Command R7B, Hunyuan-7B, Granite SWA 2B;
gpt-oss-20b / 120b; Llama-4-Scout / Maverick text; each dict says where its numbers come from)
on the meta device, config.json as shipped on the Hub (Gemma-3-4B: its `text_config`, as a
Gemma3ForCausalLM). The source names and shapes are the Hub files': the meta model's state dict
through transformers' own save-time conversion (per-expert tensors from its fused in-memory
experts; the identity for dense models)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

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
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "sliding_window": None,
    "use_sliding_window": False,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
PHI3_MINI = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
PHI4_MINI = {  # GQA, rotary on 3/4 of each head, longrope (factors illustrative)
    **PHI3_MINI,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "vocab_size": 200064,
    "max_position_embeddings": 131072,
    "partial_rotary_factor": 0.75,
    "rope_scaling": {
        "type": "longrope",
        "long_factor": [1.0 + i / 8 for i in range(48)],
        "short_factor": [1.0] * 48,
    },
    "sliding_window": 262144,
    "tie_word_embeddings": True,
}
OLMO2_7B = {
    "architectures": ["Olmo2ForCausalLM"],
    "model_type": "olmo2",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 100352,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500000,
    "rope_scaling": None,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
GRANITE_3_8B = {
    "architectures": ["GraniteForCausalLM"],
    "model_type": "granite",
    "hidden_size": 4096,
    "intermediate_size": 12800,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 49155,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "embedding_multiplier": 12.0,
    "attention_multiplier": 0.0078125,
    "residual_multiplier": 0.22,
    "logits_scaling": 16.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
SMOLLM3_3B = {
    "architectures": ["SmolLM3ForCausalLM"],
    "model_type": "smollm3",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 128256,
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000000.0,
    "no_rope_layer_interval": 4,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}
# google/gemma-2-2b config.json (transformers 4.42 era: no layer_types, both act fields).
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "attention_bias": False,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 256000,
    "torch_dtype": "float32",
}
# google/gemma-2-9b config.json
GEMMA2_9B = {
    **GEMMA2_2B,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
}
# google/gemma-3-1b-pt config.json (rope_local_base_freq, sliding_window_pattern: no
# layer_types, no per-layer-type rope_parameters)
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "vocab_size": 262144,
    "torch_dtype": "bfloat16",
}
# google/gemma-3-4b-pt config.json, its text_config (the language model of
# Gemma3ForConditionalGeneration) as a Gemma3ForCausalLM: linear rope x8 on global layers.
GEMMA3_4B_TEXT = {
    **GEMMA3_1B,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "max_position_embeddings": 131072,
    "num_attention_heads": 8,
    "num_hidden_layers": 34,
    "num_key_value_heads": 4,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
    "vocab_size": 262208,
}
# Mixtures of experts, config.json of mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B and
# allenai/OLMoE-1B-7B-0924; ACTIVE: the active parameters per token their model cards state
# (12.9B, 3.3B, 1.3B), within 0.1B.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
    "router_aux_loss_coef": 0.02,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "rope_scaling": None,
    "sliding_window": None,
    "use_sliding_window": False,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "hidden_size": 2048,
    "intermediate_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": False,
    "vocab_size": 50304,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "clip_qkv": None,
    "attention_bias": False,
    "pad_token_id": 1,
    "eos_token_id": 50279,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
# The dense families of 2026 (issue 26). Where a number is not in the source named, it is
# the transformers config class's default, which its docstring names as that model's.
# ByteDance-Seed/Seed-OSS-36B-Instruct, its model card: 64 layers, 80 / 8 query / KV heads
# of 128, hidden 5120, rope theta 1e7, 512K context; vocabulary 155136 and MLP 27648 as
# SeedOssConfig (the card: "155K").
SEED_OSS_36B = {
    "architectures": ["SeedOssForCausalLM"],
    "model_type": "seed_oss",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 80,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 155136,
    "max_position_embeddings": 524288,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e7,
    "attention_bias": True,
    "attention_out_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# internlm/internlm3-8b-instruct: InternLM3Config's defaults ("InternLM3-8B style": 48 layers,
# 32 / 2 heads of 128, hidden 4096) in the Hub's spellings (qkv_bias, bias); the rope scaling
# (dynamic, factor 6) illustrative.
INTERNLM3_8B = {
    "architectures": ["InternLM3ForCausalLM"],
    "model_type": "internlm3",
    "hidden_size": 4096,
    "intermediate_size": 10240,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 128512,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 50000000,
    "rope_scaling": {"factor": 6.0, "rope_type": "dynamic"},
    "qkv_bias": False,
    "bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# kyutai/helium-1-preview-2b: HeliumConfig's defaults (24 layers, 20 heads of 128 without
# grouping, hidden 2560, theta 100000).
HELIUM_2B = {
    "architectures": ["HeliumForCausalLM"],
    "model_type": "helium",
    "hidden_size": 2560,
    "intermediate_size": 7040,
    "num_hidden_layers": 24,
    "num_attention_heads": 20,
    "num_key_value_heads": 20,
    "head_dim": 128,
    "vocab_size": 48000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-8,
    "rope_theta": 100000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# baidu/ERNIE-4.5-0.3B-PT: 18 layers, 16 / 2 heads of 128, hidden 1024, MLP 3072, vocabulary
# 103424, theta 500000, 131072 context (apxml.com's ERNIE-4.5-0.3B-Base page, and
# Ernie4_5Config's defaults), tied embeddings, no biases.
ERNIE45_03B = {
    "architectures": ["Ernie4_5ForCausalLM"],
    "model_type": "ernie4_5",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 18,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 103424,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_bias": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
# allenai/Olmo-3-32B: 64 layers, hidden 5120, 40 / 8 heads, window 4096 on three layers of
# four, YaRN on the global layers only, 8192-token pretraining context extended 8x (the
# OLMo 3 report, as summarised by apxml.com and emergentmind.com); MLP width and vocabulary
# (OLMo 2's 100352) illustrative.
OLMO3_32B = {
    "architectures": ["Olmo3ForCausalLM"],
    "model_type": "olmo3",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 100352,
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-6,
    "sliding_window": 4096,
    "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    "rope_parameters": {
        "full_attention": {
            "rope_type": "yarn",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
    },
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
OLMO3_32B["layer_types"] = OLMO3_32B["layer_types"] * 16
# LGAI-EXAONE/EXAONE-4.0-32B's scheme (its model card and the transformers docs: local and
# global layers 3:1, a 4K window, no RoPE on global layers, QK-Reorder-Norm) on
# Exaone4Config's default shape (32 layers of 4096, 32 heads, vocabulary 102400).
EXAONE4 = {
    "architectures": ["Exaone4ForCausalLM"],
    "model_type": "exaone4",
    "hidden_size": 4096,
    "intermediate_size": 16384,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 102400,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": 4096,
    "sliding_window_pattern": 4,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# mistralai/Ministral-8B-Instruct-2410, its model card: 36 layers, dim 4096, 32 / 8 heads of
# 128, MLP 12288, vocabulary 131072, attention "ragged (128k, 32k, 32k, 32k)" (one global
# layer, then three with a 32768 window), 8,019,808,256 parameters; theta 1e8 (apxml.com).
MINISTRAL_8B = {
    "architectures": ["MinistralForCausalLM"],
    "model_type": "ministral",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000000.0,
    "sliding_window": 32768,
    "layer_types": (["full_attention"] + ["sliding_attention"] * 3) * 9,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# Ministral 3: Ministral3Config's defaults (34 layers of 4096, 32 / 8 heads of 128, yarn x16
# from 16384 with llama_4_scaling_beta 0.1), its rope as the class writes it.
MINISTRAL3 = {
    "architectures": ["Ministral3ForCausalLM"],
    "model_type": "ministral3",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 34,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 16.0,
        "original_max_position_embeddings": 16384,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# THUDM/GLM-4-9B-0414: Glm4Config's defaults (its docstring's checkpoint): 40 layers of 4096,
# 32 / 2 heads of 128, MLP 13696 (fused gate_up_proj), vocabulary 151552, rotary on half of
# each head, q/k/v biases.
GLM4_9B = {
    "architectures": ["Glm4ForCausalLM"],
    "model_type": "glm4",
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 151552,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# bigcode/starcoder2-3b: Starcoder2Config's defaults (30 layers of 3072, 24 / 2 heads, MLP
# 12288, vocabulary 49152, use_bias, tied) with the card's 4096-token sliding window.
STARCODER2_3B = {
    "architectures": ["Starcoder2ForCausalLM"],
    "model_type": "starcoder2",
    "hidden_size": 3072,
    "intermediate_size": 12288,
    "num_hidden_layers": 30,
    "num_attention_heads": 24,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 16384,
    "norm_epsilon": 1e-5,
    "rope_theta": 999999.4420358813,
    "sliding_window": 4096,
    "hidden_act": "gelu_pytorch_tanh",
    "use_bias": True,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
# swiss-ai/Apertus-8B-2509: 32 layers of 4096, 32 heads, MLP 14336, vocabulary 131072, 65536
# context (the TevunahAi quantisation's card, quoting the base model); 8 KV heads (grouped
# attention, altools.ai's summary) illustrative; ApertusConfig's llama3 rope.
APERTUS_8B = {
    "architectures": ["ApertusForCausalLM"],
    "model_type": "apertus",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 131072,
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-5,
    "hidden_act": "xielu",
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 12000000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# CohereForAI/c4ai-command-r-v01: CohereConfig's defaults (its docstring's checkpoint: 40
# layers of 8192, 64 heads without grouping, MLP 22528, vocabulary 256000, logit_scale 0.0625,
# tied, theta 8e6 in the Hub file, illustrative here).
COMMAND_R = {
    "architectures": ["CohereForCausalLM"],
    "model_type": "cohere",
    "hidden_size": 8192,
    "intermediate_size": 22528,
    "num_hidden_layers": 40,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "vocab_size": 256000,
    "max_position_embeddings": 8192,
    "layer_norm_eps": 1e-5,
    "rope_theta": 8000000.0,
    "logit_scale": 0.0625,
    "use_qk_norm": False,
    "tie_word_embeddings": True,
    "torch_dtype": "float16",
}
# CohereForAI/c4ai-command-r-plus (104B parameters, its model card): the q/k LayerNorms per
# head; 64 layers of 12288, 96 / 8 heads, MLP 33792 illustrative, checked against the card's
# 104B below.
COMMAND_R_PLUS = {
    **COMMAND_R,
    "hidden_size": 12288,
    "intermediate_size": 33792,
    "num_hidden_layers": 64,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "logit_scale": 0.8333333333333334,
    "use_qk_norm": True,
}
# Cohere 2 (Command R7B): windows of 4096 on three layers of four, rotary on them only
# (Cohere2Config's pattern), 32 layers of 4096 with 32 / 8 heads, illustrative.
COHERE2_R7B = {
    "architectures": ["Cohere2ForCausalLM"],
    "model_type": "cohere2",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 256000,
    "max_position_embeddings": 8192,
    "layer_norm_eps": 1e-5,
    "rope_theta": 50000.0,
    "logit_scale": 0.25,
    "sliding_window": 4096,
    "sliding_window_pattern": 4,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
# tencent/Hunyuan-7B: HunYuanDenseV1Config's defaults (32 layers of 4096, MLP 11008,
# vocabulary 290943) with grouped attention, head_dim 128 and the Hub's "dynamic" rope with
# alpha, illustrative.
HUNYUAN_7B = {
    "architectures": ["HunYuanDenseV1ForCausalLM"],
    "model_type": "hunyuan_v1_dense",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 290943,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# ibm-granite/granite-swash-2b: GraniteSWAConfig's defaults (its docstring's checkpoint: 24
# layers of 2560, 20 / 4 heads, MLP 8192, window 128, every fourth layer global from layer 0,
# tied), with Granite's multipliers and a per-layer theta (0: NoPE) illustrative.
GRANITE_SWA_2B = {
    "architectures": ["GraniteSWAForCausalLM"],
    "model_type": "granite_swa",
    "hidden_size": 2560,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "vocab_size": 100352,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "layer_rope_theta": [0 if i % 4 == 0 else 10000.0 for i in range(24)],
    "sliding_window": 128,
    "embedding_multiplier": 12.0,
    "attention_multiplier": 0.015625,
    "residual_multiplier": 0.22,
    "logits_scaling": 8.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
# openai/gpt-oss-20b config.json (its dense form: the Hub's quantization_config, MXFP4 on
# the experts, left out; layer_types as stated there: sliding first, alternating); the model
# card: 20.91B total / 3.61B active parameters (120b: 116.83B / 5.13B), within 0.1B; its
# active count leaves the embedding out (the unembedding in), unlike Mixtral's.
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "rms_norm_eps": 1e-5,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "vocab_size": 201088,
    "torch_dtype": "bfloat16",
}
GPT_OSS_120B = {
    **GPT_OSS_20B,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "num_hidden_layers": 36,
    "num_local_experts": 128,
}
# config.json of zai-org/GLM-4.5 and GLM-4.5-Air (GLM-4.6: GLM-4.5's shapes); their model
# cards: 355B total / 32B active, 106B / 12B, in whole billions. The totals: within 1%
# (transformers builds no multi-token-prediction layer: 352.8B and 106.9B, measured). The
# active counts exclude the embedding and unembedding matrices (with them: 33.6B and 13.4B,
# measured; without: 32.1B and 12.2B), checked within 0.5B, the cards' rounding.
GLM45 = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 92,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "use_qk_norm": True,
    "attention_bias": True,
    "partial_rotary_factor": 0.5,
    "num_nextn_predict_layers": 1,
    "vocab_size": 151552,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
GLM45_AIR = {
    **GLM45,
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 46,
    "n_routed_experts": 128,
    "first_k_dense_replace": 1,
    "use_qk_norm": False,
}
# baidu/ERNIE-4.5-21B-A3B(-PT): Ernie4_5_MoeConfig's defaults, its docstring's checkpoint (28
# layers of 2560, 20 / 4 heads of 128, dense MLP 12288 on layer 0, then 64 experts of 1536, 6
# per token, 2 shared experts (a shared MLP of 3072), vocabulary 103424, tied, theta 5e5),
# moe_layer_end_index 27 as in copies of its config.json (Ascend MindIE's and
# llm-memory-calculator's test fixtures); the model card's table: 28 layers, 20 / 4 heads,
# 64 / 6 text experts, 2 shared, 21B total / 3B active. Measured: 21.83B total (the card's
# "21B" truncates), 3.35B active with the (tied) embedding, 3.08B without; both round to 3B.
ERNIE45_21B_A3B = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "moe_num_experts": 64,
    "moe_num_shared_experts": 2,
    "moe_k": 6,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": 27,
    "moe_layer_interval": 1,
    "use_bias": False,
    "vocab_size": 103424,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
# tencent/Hunyuan-A13B: models/config.json of Tencent-Hunyuan/Hunyuan-A13B on GitHub (as
# stored in its fork tianyu1412/Hunyuan-A13B; there model_type "hunyuan", the remote code's
# name, here transformers' hunyuan_v1_moe, the Hub's): 32 layers of 4096, 32 / 8 heads of
# 128, 64 experts of 3072 (per-layer lists moe_intermediate_size, moe_topk: top 8 on every
# layer, num_shared_expert: 1 shared MLP of intermediate_size 3072), vocabulary 128167,
# tied, rope "dynamic" with alpha 1000 (its extra yarn-style keys as shipped; transformers
# reads alpha). The model card's list: 80B total / 13B active, 32 layers, 32 heads, 1 shared
# and 64 routed experts, top-8, hidden 4096, expert hidden 3072. Measured: 80.39B total,
# 12.75B active with the (tied) embedding (12.22B without: Tencent's 13B counts it).
HUNYUAN_A13B = {
    "architectures": ["HunYuanMoEV1ForCausalLM"],
    "model_type": "hunyuan_v1_moe",
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 3072,
    "max_position_embeddings": 32768,
    "moe_intermediate_size": [3072] * 32,
    "moe_topk": [8] * 32,
    "num_attention_heads": 32,
    "num_experts": 64,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_shared_expert": [1] * 32,
    "rms_norm_eps": 1e-5,
    "rope_scaling": {
        "alpha": 1000.0,
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "type": "dynamic",
    },
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "use_mixed_mlp_moe": True,
    "use_qk_norm": True,
    "vocab_size": 128167,
    "torch_dtype": "bfloat16",
}
ACTIVE = {
    "mixtral-8x7b": 12.9e9,
    "qwen3-30b-a3b": 3.3e9,
    "olmoe-1b-7b": 1.3e9,
    "gpt-oss-20b": 3.61e9,
    "gpt-oss-120b": 5.13e9,
    "glm-4.5": 32e9,
    "glm-4.5-air": 12e9,
    "ernie-4.5-21b-a3b": 3e9,
    "hunyuan-a13b": 13e9,
}
# The model cards' totals, where a test checks them.
TOTAL = {
    "gpt-oss-20b": 20.91e9,
    "gpt-oss-120b": 116.83e9,
    "glm-4.5": 355e9,
    "glm-4.5-air": 106e9,
    "ernie-4.5-21b-a3b": 21e9,
    "hunyuan-a13b": 80e9,
}
# How far our (active, total) counts may be from the cards': 0.1B (cards to 0.01B) unless
# named here. Cards in whole billions: active within 0.5B (the rounding), totals within 1%
# (GLM, Hunyuan) or, for ERNIE's "21B" (21.8B counted), the billion it truncates.
CARD_TOLERANCE = {
    "glm-4.5": (0.5e9, 0.01 * 355e9),
    "glm-4.5-air": (0.5e9, 0.01 * 106e9),
    "ernie-4.5-21b-a3b": (0.5e9, 1e9),
    "hunyuan-a13b": (0.5e9, 0.01 * 80e9),
}
# How many vocabulary matrices a card leaves out of "active": OpenAI's the embedding (a
# lookup), Z.ai's the embedding and the unembedding; Tencent's and Baidu's (tied) none.
VOCAB_OUT_OF_ACTIVE = {"gpt-oss-20b": 1, "gpt-oss-120b": 1, "glm-4.5": 2, "glm-4.5-air": 2}
# Llama 4, the `text_config` of meta-llama/Llama-4-Scout-17B-16E and
# Llama-4-Maverick-17B-128E (config.json as shipped, read as a Llama4ForCausalLM); their model
# cards: 17B active, 109B / 400B total (text and vision; the vision encoder and projector,
# under 1B, are not in these counts). LLAMA4_CARDS: (active, total, tolerance): the cards'
# figures are rounded to the billion.
LLAMA4_SCOUT_TEXT = {
    "architectures": ["Llama4ForCausalLM"],
    "model_type": "llama4_text",
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 202048,
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "attention_chunk_size": 8192,
    "attn_scale": 0.1,
    "floor_scale": 8192,
    "max_position_embeddings": 10485760,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 16.0,
        "high_freq_factor": 1.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA4_MAVERICK_TEXT = {
    **LLAMA4_SCOUT_TEXT,
    "num_local_experts": 128,
    "interleave_moe_layer_step": 2,
    "use_qk_norm": False,
    "max_position_embeddings": 1048576,
    "rope_scaling": None,
}
LLAMA4_CARDS = {"llama-4-scout-text": (17e9, 109e9), "llama-4-maverick-text": (17e9, 400e9)}
MODELS = {
    "llama-3-8b": LLAMA3_8B,
    "llama-3.1-8b": LLAMA31_8B,
    "llama-3-70b": LLAMA3_70B,
    "mistral-7b": MISTRAL_7B,
    "qwen3-8b": QWEN3_8B,
    "phi-3-mini": PHI3_MINI,
    "phi-4-mini": PHI4_MINI,
    "olmo2-7b": OLMO2_7B,
    "granite-3-8b": GRANITE_3_8B,
    "smollm3-3b": SMOLLM3_3B,
    "gemma-2-2b": GEMMA2_2B,
    "gemma-2-9b": GEMMA2_9B,
    "gemma-3-1b": GEMMA3_1B,
    "gemma-3-4b-text": GEMMA3_4B_TEXT,
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "olmoe-1b-7b": OLMOE_1B_7B,
    "glm-4.5": GLM45,
    "glm-4.5-air": GLM45_AIR,
    "ernie-4.5-21b-a3b": ERNIE45_21B_A3B,
    "hunyuan-a13b": HUNYUAN_A13B,
    "seed-oss-36b": SEED_OSS_36B,
    "internlm3-8b": INTERNLM3_8B,
    "helium-2b": HELIUM_2B,
    "ernie-4.5-0.3b": ERNIE45_03B,
    "olmo3-32b": OLMO3_32B,
    "exaone4": EXAONE4,
    "ministral-8b": MINISTRAL_8B,
    "ministral3": MINISTRAL3,
    "glm-4-9b": GLM4_9B,
    "starcoder2-3b": STARCODER2_3B,
    "apertus-8b": APERTUS_8B,
    "command-r": COMMAND_R,
    "command-r-plus": COMMAND_R_PLUS,
    "cohere2-r7b": COHERE2_R7B,
    "hunyuan-7b": HUNYUAN_7B,
    "granite-swa-2b": GRANITE_SWA_2B,
    "gpt-oss-20b": GPT_OSS_20B,
    "gpt-oss-120b": GPT_OSS_120B,
    "llama-4-scout-text": LLAMA4_SCOUT_TEXT,
    "llama-4-maverick-text": LLAMA4_MAVERICK_TEXT,
}


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"])
def test_stacked_experts_map_at_real_shapes(name):
    """transformers' in-memory layout (experts stacked in gate_up_proj / down_proj) maps to
    the same targets and shapes as the Hub's per-expert tensors."""
    config = AutoConfig.for_model(**MODELS[name])
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    memory = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    hub = revert_weight_conversion(hf_model, hf_model.state_dict())
    cfg, stacked, _ = plan_tasks(MODELS[name], memory)
    _, per_expert, _ = plan_tasks(MODELS[name], {k: tuple(v.shape) for k, v in hub.items()})
    assert {t.target: t.target_shape for t in stacked} == {
        t.target: t.target_shape for t in per_expert
    }
    last = cfg.n_experts - 1
    task = next(t for t in stacked if t.target == f"blocks.0.mlp.experts.{last}.W_in")
    assert task.expert == last and task.rows == (cfg.d_expert, 2 * cfg.d_expert)
    tensor = torch.empty(memory[task.source], device="meta")
    assert tuple(apply_layout(task, tensor, cfg).shape) == (cfg.d_model, cfg.d_expert)


@pytest.mark.parametrize("name", MODELS)
def test_map_real_shapes_on_meta(name):
    hf_config = MODELS[name]
    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    hub = revert_weight_conversion(hf_model, hf_model.state_dict())  # the names saved
    hf_shapes = {k: tuple(v.shape) for k, v in hub.items()}

    cfg, tasks, dropped = plan_tasks(hf_config, hf_shapes)
    assert dropped == (["lm_head.weight"] if cfg.tie_word_embeddings else [])
    assert {t.source for t in tasks} == set(hf_shapes) - set(dropped)  # every HF tensor used
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
    tied = {"unembed.W_U"} if cfg.tie_word_embeddings else set()
    # Every number HF saves (parameters, and buffers it saves: xIELU's beta / eps) is ours.
    assert sum(v.numel() for k, v in hub.items() if k not in dropped) == sum(
        state[t.target].numel() for t in tasks if t.target not in tied
    )
    if name == "mistral-7b":
        assert set(cfg.attn_types) == {"local"} and cfg.sliding_window == 4096
    if name == "llama-3.1-8b":
        assert cfg.rope.type == "llama3" and cfg.rope.original_max_position_embeddings == 8192
    if name == "qwen3-8b":
        assert cfg.qk_norm == "head" and state["blocks.0.attn.q_norm.w"].shape == (128,)
    if name == "phi-3-mini":  # fused qkv_proj [3 * 3072, 3072] -> three [32, 3072, 96]
        assert [
            t.rows for t in tasks if t.source == "model.layers.0.self_attn.qkv_proj.weight"
        ] == [
            (0, 3072),
            (3072, 6144),
            (6144, 9216),
        ]
        assert set(cfg.attn_types) == {"local"} and cfg.sliding_window == 2047
    if name == "phi-4-mini":
        assert cfg.rotary_dim == 96 and cfg.rope.type == "longrope"
        assert cfg.rope.original_max_position_embeddings == 4096
        assert attn._W_K.shape == (8, 3072, 128)
    if name == "olmo2-7b":
        assert cfg.norm_placement == "post" and cfg.qk_norm == "proj"
        assert state["blocks.0.attn.k_norm.w"].shape == (4096,)
    if name == "granite-3-8b":
        assert (cfg.embedding_multiplier, cfg.attention_multiplier) == (12.0, 0.0078125)
        assert (cfg.residual_multiplier, cfg.logits_scaling) == (0.22, 16.0)
    if cfg.moe is not None:
        from gqa_convert.inspection import active_parameters

        moe, e, i = cfg.moe, cfg.moe.n_experts - 1, cfg.moe.d_expert
        first = cfg.moe.layers.index(True)
        last = model.blocks[cfg.n_layers - 1].mlp
        assert last.W_gate.shape == (m, moe.n_experts) and len(last.experts) == moe.n_experts
        assert state[f"blocks.{first}.mlp.experts.{e}.W_in"].shape == (m, i)
        assert state[f"blocks.{first}.mlp.experts.{e}.W_out"].shape == (i, m)
        total = sum(p.numel() for p in hf_model.parameters())
        active = active_parameters(cfg, total)
        active -= VOCAB_OUT_OF_ACTIVE.get(name, 0) * cfg.d_vocab * cfg.d_model
        active_tolerance, total_tolerance = CARD_TOLERANCE.get(name, (0.1e9, 0.1e9))
        if name in ACTIVE:
            assert abs(active - ACTIVE[name]) < active_tolerance
        if name in TOTAL:
            assert abs(total - TOTAL[name]) < total_tolerance
    if name.startswith("gpt-oss"):  # 64 q heads of 64 (4096 wide) on a 2880 stream
        assert (n, k, h, m) == (64, 8, 64, 2880) and cfg.attn_sinks
        assert cfg.attn_types == ("local", "global") * (cfg.n_layers // 2)
        assert cfg.rope.type == "yarn" and cfg.rope.factor == 32.0 and cfg.rope.theta == 150000
        last = cfg.moe.n_experts - 1
        task = next(t for t in tasks if t.target == f"blocks.0.mlp.experts.{last}.W_in")
        assert task.expert == last and task.interleave == (1, 2)
        assert state[f"blocks.0.mlp.experts.{last}.b_in"].shape == (2880,)
        assert state["blocks.0.mlp.b_gate"].shape == (cfg.moe.n_experts,)
    if name == "mixtral-8x7b":
        assert (cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.norm_topk_prob) == (8, 2, True)
        assert set(cfg.attn_types) == {"global"}  # sliding_window null
    if name == "qwen3-30b-a3b":
        assert (cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.d_expert) == (128, 8, 768)
        assert cfg.qk_norm == "head" and all(cfg.moe.layers)
    if name == "olmoe-1b-7b":
        assert cfg.qk_norm == "proj" and cfg.norm_placement == "pre"
        assert (cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.norm_topk_prob) == (64, 8, False)
    if name.startswith("glm-4.5"):  # dense first layers, a shared expert, sigmoid router
        dense = {"glm-4.5": 3, "glm-4.5-air": 1}[name]
        assert cfg.moe.layers == (False,) * dense + (True,) * (cfg.n_layers - dense)
        assert (cfg.moe.router, cfg.moe.routed_scaling_factor) == ("sigmoid", 2.5)
        assert cfg.moe.d_shared_expert == cfg.moe.d_expert and cfg.rotary_dim == 64
        assert state[f"blocks.{dense}.mlp.e_score_correction_bias"].shape == (cfg.n_experts,)
        assert state[f"blocks.{dense}.mlp.shared_expert.W_out"].shape == (cfg.d_expert, m)
        assert f"blocks.{dense - 1}.mlp.W_in" in state and cfg.qkv_bias and not cfg.o_bias
        assert (cfg.qk_norm == "head") == (name == "glm-4.5")
    if name == "ernie-4.5-21b-a3b":  # layer 0 dense; 2 shared experts of 1536: one of 3072
        assert cfg.moe.layers == (False,) + (True,) * 27 and cfg.tie_word_embeddings
        assert (cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.d_expert) == (64, 6, 1536)
        assert cfg.moe.d_shared_expert == 3072 and cfg.moe.router_in_fp32
        assert state["blocks.1.mlp.e_score_correction_bias"].shape == (64,)
        assert state["blocks.0.mlp.W_in"].shape == (m, 12288) and (n, k, h) == (20, 4, 128)
    if name == "hunyuan-a13b":  # moe_topk [8] * 32 read as 8; every layer MoE + shared MLP
        assert all(cfg.moe.layers) and (cfg.moe.n_experts, cfg.moe.top_k) == (64, 8)
        assert cfg.moe.d_expert == cfg.moe.d_shared_expert == 3072 and cfg.tie_word_embeddings
        assert (cfg.rope.type, cfg.rope.alpha) == ("ntk_alpha", 1000.0)
        assert cfg.qk_norm_after_rotary and (n, k, h, m) == (32, 8, 128, 4096)
    if name == "smollm3-3b":
        assert cfg.tie_word_embeddings  # SmolLM3Config's default
        assert [i for i, r in enumerate(cfg.rope_layers) if not r] == list(range(3, 36, 4))
    if name.startswith("gemma"):  # the layer pattern transformers derives from the file
        assert hf_model.config.layer_types == [
            {"local": "sliding_attention", "global": "full_attention"}[t] for t in cfg.attn_types
        ]
    if name.startswith("gemma-2"):
        assert cfg.attn_types == ("local", "global") * (cfg.n_layers // 2)
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (50.0, 30.0)
        assert cfg.sliding_window == 4096 and cfg.query_pre_attn_scalar == 256
        assert cfg.norm_placement == "sandwich" and cfg.tie_word_embeddings
        assert state["blocks.0.ln2_post.w"].shape == (cfg.d_model,)
    if name.startswith("gemma-3"):
        assert [i for i, t in enumerate(cfg.attn_types) if t == "global"] == list(
            range(5, cfg.n_layers, 6)
        )
        assert cfg.rope.theta == 1e6 and cfg.rope_local.theta == 1e4
        assert cfg.rope_local.type == "default" and cfg.attn_logit_softcap is None
        assert cfg.qk_norm == "head" and state["blocks.0.attn.q_norm.w"].shape == (256,)
    if name == "gemma-3-1b":
        assert cfg.sliding_window == 512 and cfg.rope.type == "default"
        assert attn._W_K.shape == (1, 1152, 256)  # MQA
    if name == "seed-oss-36b":
        assert (cfg.qkv_bias, cfg.o_bias, cfg.d_head) == (True, False, 128)
        assert state["blocks.0.attn.b_Q"].shape == (80, 128)
    if name == "internlm3-8b":
        assert cfg.family == "internlm3" and not cfg.qkv_bias and cfg.rope.type == "dynamic"
    if name in ("helium-2b", "ernie-4.5-0.3b"):
        assert cfg.rotary_adjacent_pairs and cfg.d_head == 128
    if name == "ernie-4.5-0.3b":
        assert cfg.tie_word_embeddings and cfg.rotary_in_fp32 and not cfg.mlp_bias
    if name == "olmo3-32b":
        assert cfg.attn_types == ("local", "local", "local", "global") * 16
        assert (cfg.rope.type, cfg.rope_local.type) == ("yarn", "default")
        assert cfg.qk_norm == "proj" and state["blocks.0.attn.k_norm.w"].shape == (1024,)
    if name == "exaone4":
        assert cfg.attn_types == ("local", "local", "local", "global") * 8
        assert cfg.rope_layers == (True, True, True, False) * 8  # global layers: no rotary
        assert cfg.norm_placement == "post" and cfg.qk_norm == "head"
    if name == "ministral-8b":
        assert sum(p.numel() for p in hf_model.parameters()) == 8_019_808_256
        assert cfg.attn_types == ("global", "local", "local", "local") * 9
        assert cfg.sliding_window == 32768
    if name == "ministral3":
        assert (cfg.query_scale_beta, cfg.query_scale_length) == (0.1, 16384)
        assert cfg.rope.type == "yarn" and set(cfg.attn_types) == {"global"}
    if name == "glm-4-9b":  # gate_up_proj [2 * 13696, 4096] -> W_gate, W_in
        assert cfg.rotary_dim == 64 and cfg.norm_placement == "sandwich"
        assert [t.rows for t in tasks if t.source == "model.layers.0.mlp.gate_up_proj.weight"] == [
            (0, 13696),
            (13696, 27392),
        ]
    if name == "starcoder2-3b":
        assert (cfg.norm_type, cfg.norm_bias, cfg.gated_mlp) == ("layer", True, False)
        assert state["blocks.0.mlp.b_in"].shape == (12288,) and state["ln_final.b"].shape == (m,)
        assert set(cfg.attn_types) == {"local"}
    if name == "apertus-8b":
        assert cfg.act_fn == "xielu" and cfg.rope.type == "llama3"
        assert state["blocks.0.mlp.act_fn.alpha_p"].shape == (1,)
        assert state["blocks.0.mlp.act_fn.beta"].shape == ()
    if name.startswith("command-r"):
        assert cfg.parallel_attn_mlp and cfg.norm_type == "layer" and not cfg.norm_bias
        assert "blocks.0.ln2.w" not in state and cfg.rotary_adjacent_pairs
    if name == "command-r-plus":
        assert state["blocks.0.attn.q_norm.w"].shape == (96, 128)
        assert state["blocks.0.attn.k_norm.w"].shape == (8, 128)
        assert abs(sum(p.numel() for p in hf_model.parameters()) - 104e9) < 1e9
    if name == "cohere2-r7b":
        assert cfg.attn_types == ("local", "local", "local", "global") * 8
        assert cfg.rope_layers == (True, True, True, False) * 8 and cfg.logit_scale == 0.25
    if name == "hunyuan-7b":
        assert (cfg.rope.type, cfg.rope.alpha) == ("ntk_alpha", 1000.0)
        assert cfg.qk_norm_after_rotary and state["blocks.0.attn.k_norm.w"].shape == (128,)
    if name == "granite-swa-2b":
        assert cfg.attn_types == ("global", "local", "local", "local") * 6
        assert [i for i, r in enumerate(cfg.rope_layers) if not r] == list(range(0, 24, 4))
        assert cfg.attn_sinks and state["blocks.0.attn.sinks"].shape == (20,)
    if name == "gemma-3-4b-text":
        assert cfg.sliding_window == 1024
        assert (cfg.rope.type, cfg.rope.factor) == ("linear", 8.0)


@pytest.mark.parametrize("name", LLAMA4_CARDS)
def test_llama4_parameter_counts_match_the_model_cards(name):
    """Text part only (embedding, 48 layers, final norm, lm_head; the vision encoder and
    projector excluded): active parameters (the router's top-1 expert, the shared expert
    and every dense MLP of a token) round to the cards' 17B; totals round to 109B (Scout:
    107.8B here, 109B with the vision tower) and 400B (Maverick)."""
    from gqa_convert.config import from_hf
    from gqa_convert.inspection import active_parameters

    hf_config = MODELS[name]
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    total = sum(p.numel() for p in hf_model.parameters())
    cfg = from_hf(hf_config)
    active, card_total = LLAMA4_CARDS[name]
    assert abs(active_parameters(cfg, total) - active) < 0.5e9  # 17.2B
    assert card_total - 1.5e9 < total < card_total + 1e9  # 107.8B / 400.6B
    layers = cfg.moe.layers
    if name == "llama-4-scout-text":
        assert all(layers) and cfg.moe.n_experts == 16 and cfg.qk_norm == "weightless"
        assert cfg.rope.type == "llama3" and cfg.rope.factor == 16.0
    else:  # Maverick: dense and MoE layers alternate, MoE on odd layers; no q/k norm
        assert layers == (False, True) * 24 and cfg.moe.n_experts == 128 and cfg.qk_norm is None
    assert cfg.d_mlp == 16384 and cfg.moe.d_expert == cfg.moe.d_shared_expert == 8192
    assert [i for i, r in enumerate(cfg.rope_layers) if not r] == list(range(3, 48, 4))
    assert cfg.chunked_layers == cfg.rope_layers and cfg.attention_chunk_size == 8192
    assert cfg.temperature_tuning and (cfg.query_scale_beta, cfg.query_scale_length) == (
        0.1,
        8192,
    )


# google/gemma-4-31B (text): 60 layers of 5376, 32 query heads, 16 KV heads of 256 on the
# sliding layers (window 1024), MLP 21504, vocabulary 262144 (apxml.com/models/gemma-4-31b);
# global layers (every sixth, the last included) of head size 512 with 4 KV heads of their
# own and k = v, final soft-cap 30, tied (the model card of mlboydaisuke/Gemma-4-31B-CoreAI,
# a port of google/gemma-4-31B-it-qat-q4_0-unquantized); the card's 30.7B checked below.
GEMMA4_31B = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "hidden_size": 5376,
    "intermediate_size": 21504,
    "num_hidden_layers": 60,
    "num_attention_heads": 32,
    "num_key_value_heads": 16,
    "num_global_key_value_heads": 4,
    "head_dim": 256,
    "global_head_dim": 512,
    "attention_k_eq_v": True,
    "sliding_window": 1024,
    "vocab_size": 262144,
    "hidden_size_per_layer_input": 0,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def test_gemma4_31b_maps_on_meta():
    """Every tensor of transformers' Gemma4ForCausalLM at 31B's shapes is mapped (no v_proj
    on the global layers), to the shapes our model has, and the count is the card's 30.7B."""
    config = AutoConfig.for_model(**GEMMA4_31B)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    hub = revert_weight_conversion(hf_model, hf_model.state_dict())
    hf_shapes = {k: tuple(v.shape) for k, v in hub.items()}
    cfg, tasks, dropped = plan_tasks(GEMMA4_31B, hf_shapes)
    assert dropped == ["lm_head.weight"]
    assert {t.source for t in tasks} == set(hf_shapes) - set(dropped)
    meta = {t.source: torch.empty(t.source_shape, device="meta") for t in tasks}
    state = {t.target: apply_layout(t, meta[t.source], cfg) for t in tasks}
    model = GQATransformer.from_state_dict(cfg, state, device="meta")
    ours = dict(model.named_parameters())
    assert all(ours[target].shape == tensor.shape for target, tensor in state.items())
    assert [i for i, t in enumerate(cfg.attn_types) if t == "global"] == list(range(5, 60, 6))
    local, glob = model.blocks[0].attn, model.blocks[59].attn
    assert local._W_K.shape == local._W_V.shape == (16, 5376, 256)
    assert glob.W_Q.shape == (32, 5376, 512) and glob._W_K.shape == (4, 5376, 512)
    assert glob._W_V is None and glob.W_V.shape == (32, 5376, 512)  # k = v
    assert cfg.rope.type == "proportional" and cfg.layer_rotary_dim(59) == 512
    total = sum(v.numel() for k, v in hub.items() if k not in dropped)
    assert total == sum(state[t.target].numel() for t in tasks if t.target != "unembed.W_U")
    assert abs(total - 30.7e9) < 0.05e9


# google/gemma-4-E2B / E4B (text): 35 layers of 1536, 8 / 1 heads, MLP 6144, 4 sliding : 1
# global, the last 20 layers K/V-shared with double-wide MLPs; 42 layers of 2560, 8 / 2
# heads, MLP 10240, 5 : 1, the last 18 shared; both head sizes 256 / 512, window 512,
# per-layer inputs of 256, vocabulary 262144, soft-cap 30, no k = v (the E2B text config
# quoted by public test fixtures, e.g. a `real_gemma4_e2b_text_config`, and a keras-style
# CONFIGS table "gemma4_2b" / "gemma4_4b" found by the code search; E4B's use_double_wide_mlp
# is cut off there: false, as its parameter count says, below). Model cards: E2B 2.3B
# effective parameters, E4B 4.5B ("effective": without the per-layer embedding table).
GEMMA4_E2B = {
    **GEMMA4_31B,
    "hidden_size": 1536,
    "intermediate_size": 6144,
    "num_hidden_layers": 35,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "num_global_key_value_heads": None,
    "attention_k_eq_v": False,
    "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7,
    "hidden_size_per_layer_input": 256,
    "vocab_size_per_layer_input": 262144,
    "num_kv_shared_layers": 20,
    "use_double_wide_mlp": True,
}
GEMMA4_E4B = {
    **GEMMA4_E2B,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 42,
    "num_key_value_heads": 2,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 7,
    "num_kv_shared_layers": 18,
    "use_double_wide_mlp": False,
}


@pytest.mark.parametrize(
    ("hf_config", "effective", "tolerance"),
    [(GEMMA4_E2B, 2.3e9, 0.05e9), (GEMMA4_E4B, 4.5e9, 0.15e9)],
    ids=["e2b", "e4b"],
)
def test_gemma4_e_models_map_on_meta(hf_config, effective, tolerance):
    """Per-layer inputs, K/V-shared layers (no k / v tensors), E2B's double-wide MLPs: every
    tensor transformers' Gemma4ForCausalLM has is mapped to our shapes; the count without
    the per-layer table is the card's effective size (E4B's card: 4.5B, ours 4.64B)."""
    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    hub = revert_weight_conversion(hf_model, hf_model.state_dict())
    hf_shapes = {k: tuple(v.shape) for k, v in hub.items()}
    cfg, tasks, dropped = plan_tasks(hf_config, hf_shapes)
    assert {t.source for t in tasks} == set(hf_shapes) - set(dropped)
    meta = {t.source: torch.empty(t.source_shape, device="meta") for t in tasks}
    state = {t.target: apply_layout(t, meta[t.source], cfg) for t in tasks}
    model = GQATransformer.from_state_dict(cfg, state, device="meta")
    ours = dict(model.named_parameters())
    assert all(ours[target].shape == tensor.shape for target, tensor in state.items())
    n = cfg.n_layers
    shared = hf_config["num_kv_shared_layers"]
    assert [cfg.kv_source(i) is not None for i in range(n)] == [False] * (n - shared) + [
        True
    ] * shared
    assert model.blocks[n - 1].attn._W_K is None and cfg.attn_types[-1] == "global"
    wide = 2 if hf_config["use_double_wide_mlp"] else 1
    assert model.blocks[n - 1].mlp.W_in.shape == (cfg.d_model, wide * cfg.d_mlp)
    assert state["embed_per_layer.W_E"].shape == (262144, n, 256)
    total = sum(v.numel() for k, v in hub.items() if k not in dropped)
    assert total == sum(state[t.target].numel() for t in tasks if t.target != "unembed.W_U")
    assert abs(total - state["embed_per_layer.W_E"].numel() - effective) < tolerance


# google/gemma-4-26B-A4B (text): 30 layers of 2816, 16 query heads, 8 KV heads of 256 on the
# sliding layers (window 1024), a dense MLP of 2112 beside 128 experts of 704 (top 8) on every
# layer, global layers (every sixth, the last included) of head size 512 with 2 KV heads of
# their own and k = v, no per-layer inputs, vocabulary 262144, soft-cap 30, tied (the
# text_config of a 26B-A4B-derived checkpoint's config.json quoted in a public test, found by
# the code search; one other quotes intermediate_size 9216 and 4 global KV heads, which give
# 27.1B, not the card's total). Model card: 25.2B total, 3.8B active; checked below.
GEMMA4_26B_A4B = {
    **GEMMA4_31B,
    "hidden_size": 2816,
    "intermediate_size": 2112,
    "num_hidden_layers": 30,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_global_key_value_heads": 2,
    "enable_moe_block": True,
    "num_experts": 128,
    "top_k_experts": 8,
    "moe_intermediate_size": 704,
}


def test_gemma4_26b_a4b_maps_on_meta():
    """Every tensor of transformers' Gemma4ForCausalLM at 26B-A4B's shapes is mapped (the
    router's scales, the stacked experts sliced per expert, the dense MLP beside them, the
    five norms of the MLP block), to our shapes; total and active counts are the card's."""
    from gqa_convert.inspection import active_parameters

    config = AutoConfig.for_model(**GEMMA4_26B_A4B)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    hub = revert_weight_conversion(hf_model, hf_model.state_dict())
    hf_shapes = {k: tuple(v.shape) for k, v in hub.items()}
    assert hf_shapes["model.layers.0.experts.gate_up_proj"] == (128, 2 * 704, 2816)
    cfg, tasks, dropped = plan_tasks(GEMMA4_26B_A4B, hf_shapes)
    assert dropped == ["lm_head.weight"]
    assert {t.source for t in tasks} == set(hf_shapes) - set(dropped)
    meta = {t.source: torch.empty(t.source_shape, device="meta") for t in tasks}
    state = {t.target: apply_layout(t, meta[t.source], cfg) for t in tasks}
    model = GQATransformer.from_state_dict(cfg, state, device="meta")
    ours = dict(model.named_parameters())
    assert all(ours[target].shape == tensor.shape for target, tensor in state.items())
    mlp = model.blocks[29].mlp
    assert mlp.W_gate.shape == (2816, 128) and mlp.per_expert_scale.shape == (128,)
    assert mlp.experts[127].W_in.shape == (2816, 704) and mlp.dense.W_in.shape == (2816, 2112)
    assert model.blocks[29].attn._W_V is None and model.blocks[29].attn._W_K.shape[0] == 2
    total = sum(v.numel() for k, v in hub.items() if k not in dropped)
    assert total == sum(state[t.target].numel() for t in tasks if t.target != "unembed.W_U")
    assert abs(total - 25.2e9) < 0.05e9
    assert abs(active_parameters(cfg, total) - 3.8e9) < 0.05e9
