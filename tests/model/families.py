"""Tiny random HF models of each Llama-family variant, for parity tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

BASE = dict(vocab_size=333, hidden_size=64, intermediate_size=96, num_hidden_layers=4, max_position_embeddings=256,
            rms_norm_eps=1e-5)

FAMILIES = {
    # Llama-2: multi-head attention, theta 1e4
    "llama2": (LlamaConfig, LlamaForCausalLM, dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4)),
    # Llama-3: GQA 8/2, theta 5e5
    "llama3": (LlamaConfig, LlamaForCausalLM, dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5)),
    # Llama-3.1 scaling with a short original context, so test positions lie beyond it
    "llama3.1": (LlamaConfig, LlamaForCausalLM, dict(
        num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                                         sliding_window=None, head_dim=32)),
    "tied": (LlamaConfig, LlamaForCausalLM, dict(num_attention_heads=6, num_key_value_heads=2, rope_theta=1e5,
                                                  tie_word_embeddings=True, hidden_size=96)),
    "qkv_bias": (Qwen2Config, Qwen2ForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                                      use_sliding_window=False, tie_word_embeddings=False)),
}


def make_hf_model(family: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = config_cls(**{**BASE, **extra})
    model = model_cls(cfg).eval()
    # random norms and biases too, so a swapped or missing tensor cannot go unnoticed
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model
