from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, MistralConfig

from shared.config import ModelConfig, UnsupportedModelError

LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
}


def test_llama31_reads_theta_scaling_and_every_eos():
    cfg = ModelConfig.from_hf(LLAMA31)
    assert cfg.rope_theta == 5e5 and cfg.num_kv_heads == 8 and cfg.head_dim == 128
    assert cfg.rope_scaling.kind == "llama3" and cfg.rope_scaling.factor == 8.0
    assert cfg.rope_scaling.original_max_position_embeddings == 8192
    assert cfg.eos_token_ids == (128001, 128008, 128009)


def test_transformers5_rope_parameters_are_read():
    hf = LlamaConfig(rope_theta=5e5, rope_scaling=LLAMA31["rope_scaling"], max_position_embeddings=131072).to_dict()
    assert "rope_parameters" in hf
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling.kind == "llama3"


def test_mistral_v03_without_window_is_accepted():
    cfg = ModelConfig.from_hf(MistralConfig(vocab_size=32768, rope_theta=1e6, sliding_window=None).to_dict())
    assert cfg.model_type == "mistral" and cfg.rope_theta == 1e6 and cfg.vocab_size == 32768


def test_json_round_trip_and_hf_round_trip():
    cfg = ModelConfig.from_hf(LLAMA31)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


@pytest.mark.parametrize("patch,needle", [
    ({"num_local_experts": 8}, "mixture-of-experts"),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}, "sliding-window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"attention_bias": True}, "o_proj"),
    ({"model_type": "gpt2"}, "gpt2"),
])
def test_unsupported_architectures_are_refused(patch, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        ModelConfig.from_hf({**LLAMA31, **patch})


def test_sliding_window_message_says_how_to_fix():
    with pytest.raises(UnsupportedModelError, match="max_position_embeddings to at most 4096"):
        ModelConfig.from_hf({**LLAMA31, "model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768})


def test_gqa_ratio_must_divide():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf({**LLAMA31, "num_key_value_heads": 5})


@pytest.mark.parametrize("vocab,tp,padded", [(32000, 1, 32000), (32000, 4, 32256), (32000, 8, 32768),
                                             (128256, 8, 129024), (49152, 3, 49152), (333, 2, 512)])
def test_vocab_padding(vocab, tp, padded):
    assert ModelConfig.from_hf({**LLAMA31, "vocab_size": vocab}).padded_vocab_size(tp) == padded
