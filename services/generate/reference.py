"""HF transformers reference generation, compared like with like against the engine.

Same dtype, same number of new tokens (no early stop other than the same EOS ids), the
prompt tokenized the same way (``tokenizer(prompt).input_ids``), greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch


@dataclass
class Continuation:
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str


def hf_reference(model_path: str | Path, prompts: Sequence[str], tokens_to_generate: int,
                 dtype: torch.dtype = torch.float32, eos_ids: Sequence[int] | None = None) -> list[Continuation]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.checkpoint.hf import check_hf_dir
    from shared.checkpoint.opener import open_checkpoint

    check_hf_dir(Path(model_path))  # transformers opens the shards named in the index by itself
    tok = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).eval()
    if eos_ids is None:
        eos_ids = open_checkpoint(model_path, formats=("hf",)).eos_ids(tok)
    out = []
    for p in prompts:
        ids = tok(p).input_ids
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=tokens_to_generate, do_sample=False, num_beams=1,
                                 eos_token_id=list(eos_ids) or None, pad_token_id=(list(eos_ids) or [0])[0],
                                 temperature=None, top_p=None, top_k=None)
        new = gen[0, len(ids):].tolist()
        text_ids = new[:-1] if new and new[-1] in eos_ids else new
        out.append(Continuation(p, ids, new, tok.decode(text_ids, skip_special_tokens=False)))
    return out


def engine_continuations(engine, prompts: Sequence[str], tokens_to_generate: int) -> list[Continuation]:
    tok = engine.tokenizer
    ids = [tok(p).input_ids for p in prompts]
    outs = engine.generate_ids(ids, tokens_to_generate)
    res = []
    for p, i, o in zip(prompts, ids, outs):
        text_ids = o.tokens[:-1] if o.finish == "stop" else o.tokens
        res.append(Continuation(p, i, o.tokens, tok.decode(text_ids, skip_special_tokens=False)))
    return res


def first_divergence(a: Sequence[int], b: Sequence[int]) -> tuple[int, int | None, int | None] | None:
    """(index, a's token, b's token) of the first difference (None past an end), or None if identical."""
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x != y:
            return i, x, y
    return None
