"""A tiny random Llama with SmolLM2's real tokenizer, as an HF dir and as a native checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.assets import smollm2_hf_dir


def tiny_hf_dir(root: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / "tiny-hf"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    src = smollm2_hf_dir()
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=1e4,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the default init, so greedy has clear winners
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            (out / name).write_bytes((src / name).read_bytes())
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    return out


def tiny_native_dir(root: Path) -> Path:
    from shared.checkpoint.hf import open_hf
    from shared.checkpoint.layout import Layout
    from shared.checkpoint.native import write_checkpoint
    from shared.tokenizer import save_tokenizer

    out = root / "tiny-native"
    if (out / "manifest.json").exists():
        return out
    hf = tiny_hf_dir(root)
    cfg, raw, src = open_hf(hf)
    save_tokenizer(hf, out / "tokenizer")
    write_checkpoint(out, cfg, Layout(1, 1), src, dtype=torch.float32, source_config=raw,
                     generation_config=json.loads((hf / "generation_config.json").read_text()),
                     tokenizer={"dir": "tokenizer"})
    return out


def megatron_cli(url: str, prompt: str, tokens_to_generate: int, headers: dict | None = None,
                 **fields) -> tuple[int, str]:
    """One round of Megatron-LM's text-generation client (``tools/text_generation_cli.py``), as it
    talks to a server: ``requests.put`` of ``json.dumps`` of the body with a JSON content type; a
    200 shows ``response.json()['text'][0]``, anything else ``response.json()['message']`` (a body
    without ``message`` makes it crash, here a KeyError)."""
    import requests

    data = {"prompts": [prompt], "tokens_to_generate": tokens_to_generate, **fields}
    response = requests.put(url, data=json.dumps(data),
                            headers={"Content-Type": "application/json", **(headers or {})}, timeout=120)
    if response.status_code != 200:
        return response.status_code, response.json()["message"]
    return response.status_code, response.json()["text"][0]


def assert_chat_top_logprobs(oai, model: str, content: str) -> None:
    """Chat ``logprobs``/``top_logprobs`` through the openai SDK: three alternatives at every
    generated position, the chosen token first (greedy)."""
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                    max_completion_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    positions = r.choices[0].logprobs.content
    assert len(positions) == r.usage.completion_tokens == 4
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in positions)
