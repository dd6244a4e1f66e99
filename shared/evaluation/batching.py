"""Scoring batches shared by every backend: a context is run once, its continuations off its cache.

Multiple-choice tasks score several continuations of one context. A batch holds G distinct
contexts (right-padded, run once with a KV cache) and N continuations; continuation n reuses
the cache of context ``group[n]``. The first continuation token is scored from the context's
last logits, the others from a second pass over ``cont[:-1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScoreBatch:
    ctx_ids: torch.Tensor    # (G, C) right-padded with 0
    ctx_lens: torch.Tensor   # (G,)
    cont_ids: torch.Tensor   # (N, K) right-padded with 0
    cont_lens: torch.Tensor  # (N,)
    group: torch.Tensor      # (N,) context row of each continuation

    @property
    def first_rows(self) -> torch.Tensor:
        """(G,) the first continuation row of each context (its cache row in the first pass)."""
        G = self.ctx_ids.shape[0]
        first = torch.full((G,), -1, dtype=torch.long)
        for n in reversed(range(self.group.shape[0])):
            first[self.group[n]] = n
        return first

    @property
    def second_positions(self) -> torch.Tensor:
        """(N, K-1) positions of ``cont_ids[:, :-1]``: right after each context."""
        K = self.cont_ids.shape[1]
        return self.ctx_lens[self.group].unsqueeze(1) + torch.arange(K - 1).unsqueeze(0)


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def plan_batches(pairs: list[tuple[list[int], list[int]]], max_tokens: int = 1024
                 ) -> list[tuple[list[list[int]], ScoreBatch]]:
    """Group (context tokens, continuation tokens) pairs into batches of about ``max_tokens``.

    Returns [(request indices per continuation row, batch)]: identical pairs share a row.
    Longest contexts come first, so memory problems show at once.
    """
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must each have at least one token")
        groups.setdefault(tuple(ctx), {}).setdefault(tuple(cont), []).append(i)
    order = sorted(groups, key=lambda c: (-len(c), c))
    batches, current = [], []

    def cost(ctxs):
        n = sum(len(groups[c]) for c in ctxs)
        return len(ctxs) * max(len(c) for c in ctxs) + n * max(len(k) for c in ctxs for k in groups[c])

    for c in order:
        if current and cost(current + [c]) > max_tokens:
            batches.append(current)
            current = []
        current.append(c)
    if current:
        batches.append(current)

    out = []
    for ctxs in batches:
        conts, owners, group = [], [], []
        for g, c in enumerate(ctxs):
            for k, idx in groups[c].items():
                conts.append(list(k))
                owners.append(idx)
                group.append(g)
        ctx_ids, ctx_lens = _pad([list(c) for c in ctxs])
        cont_ids, cont_lens = _pad(conts)
        out.append((owners, ScoreBatch(ctx_ids, ctx_lens, cont_ids, cont_lens, torch.tensor(group, dtype=torch.long))))
    return out


def score_from_logits(batch: ScoreBatch, ctx_logits: torch.Tensor, cont_logits: torch.Tensor | None
                      ) -> list[tuple[float, bool]]:
    """(sum of log-probs, greedy?) per continuation row, from the logits of both passes.

    ``ctx_logits`` (G, C, V) of the contexts; ``cont_logits`` (N, K-1, V) of ``cont_ids[:, :-1]``
    (None when every continuation is one token). Log-softmax runs in fp32 whatever the model dtype.
    """
    dev = ctx_logits.device
    group, cont_ids = batch.group.to(dev), batch.cont_ids.to(dev)
    G = batch.ctx_ids.shape[0]
    last = ctx_logits[torch.arange(G, device=dev), batch.ctx_lens.to(dev) - 1].float()  # (G, V)
    first = torch.log_softmax(last, dim=-1)[group]                                       # (N, V)
    N, K = cont_ids.shape
    preds = first.unsqueeze(1)                                                           # (N, 1, V)
    if K > 1:
        preds = torch.cat([preds, torch.log_softmax(cont_logits.float(), dim=-1)], dim=1)  # (N, K, V)
    token_lp = preds.gather(-1, cont_ids.unsqueeze(-1)).squeeze(-1)                     # (N, K)
    greedy_tok = preds.argmax(-1) == cont_ids                                            # (N, K)
    valid = torch.arange(K, device=dev).unsqueeze(0) < batch.cont_lens.to(dev).unsqueeze(1)
    lp = torch.where(valid, token_lp, torch.zeros_like(token_lp)).sum(-1)
    greedy = (greedy_tok | ~valid).all(-1)
    return [(float(a), bool(b)) for a, b in zip(lp.cpu().tolist(), greedy.cpu().tolist())]
