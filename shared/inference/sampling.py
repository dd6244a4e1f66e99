"""Token selection on the last pipeline stage: greedy, temperature, top-k, top-p, min-p.

Filtering follows Megatron's ``sample``: temperature first, then top-k or top-p (nucleus:
the smallest prefix of the sorted distribution whose mass exceeds ``top_p``; the most likely
token is always kept). Every sampled row draws from its own ``torch.Generator``, so a
request's tokens depend only on its seed and its logits, not on its batch neighbours.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  min_p: float = 0.0) -> torch.Tensor:
    """One row (V,) of fp32 logits -> filtered, temperature-scaled logits (-inf where removed)."""
    x = logits / temperature
    if top_k > 0:
        k = min(top_k, x.shape[-1])
        kth = torch.topk(x, k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[1:] = drop[:-1].clone()  # keep the token that crosses the threshold
        drop[0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return x


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
               generator: torch.Generator) -> int:
    x = filter_logits(logits.float(), temperature, top_k, top_p, min_p)
    probs = x.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_top_p(top_p: float, decay: float, bound: float) -> float:
    """Megatron's per-token nucleus decay: top_p *= decay, floored at bound."""
    if top_p > 0.0 and decay > 0.0:
        top_p *= decay
        if bound > 0.0:
            top_p = max(top_p, bound)
    return top_p
