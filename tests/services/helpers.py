"""Helpers of the service tests (the tiny HF checkpoints they use come from ``shared.samples``)."""

from __future__ import annotations

from pathlib import Path


def hf_greedy(ckpt: Path, prompt: str, n: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0], skip_special_tokens=True)
