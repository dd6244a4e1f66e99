"""Our TP/PP model behind a process-group pool, for scoring and greedy decoding.

Each rank loads only its own shard (of any checkpoint ``open_checkpoint`` opens)
once into ``process_state()``; later calls pass token batches. Log-probs are computed on the
last pipeline stage and only the per-continuation results travel back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from shared.checkpoint.layout import Layout
from shared.checkpoint.opener import Checkpoint, open_checkpoint
from shared.dtypes import dtype_name, parse_dtype
from shared.evaluation.batching import ScoreBatch, score_from_logits
from shared.model import load_stage
from shared.parallel.dims import ParallelDims
from shared.parallel.launcher import ProcessGroupPool, process_state
from shared.parallel.pipeline import broadcast_from_last_stage, pipeline_forward

_SLOT = "evaluation"


# ---- rank functions (module level: spawned workers import them) ---------------------------------

def rank_load(ctx, key: str, src: Checkpoint, dtype: torch.dtype) -> None:
    slot = process_state().setdefault(_SLOT, {})
    if key in slot:
        return
    slot.clear()  # one model per worker: a new checkpoint evicts the last
    layout = Layout(ctx.dims.tp, ctx.dims.pp, src.layout.divisible_by)
    state = src.rank_state(layout, ctx.tp_rank, ctx.pp_rank, dtype)
    slot[key] = load_stage(src.config, ctx, state, dtype=dtype, vocab_divisible_by=src.layout.divisible_by)


def rank_unload(ctx, key: str) -> None:
    process_state().get(_SLOT, {}).pop(key, None)


def _stage(key: str):
    try:
        return process_state()[_SLOT][key]
    except KeyError:
        raise RuntimeError(f"model {key} is not loaded on this worker (the pool was restarted?)") from None


def rank_score(ctx, key: str, batch: ScoreBatch) -> list[tuple[float, bool]] | None:
    stage = _stage(key)
    N, K = batch.cont_ids.shape
    C = batch.ctx_ids.shape[1]
    dev = ctx.device
    cache = stage.new_cache(N, C + K)
    first = batch.first_rows.to(dev)
    ctx_logits = pipeline_forward(stage, ctx, batch.ctx_ids.to(dev), cache=cache, cache_rows=first)
    # every continuation row starts from a copy of its context's cache row
    src = first[batch.group.to(dev)]
    cache.k.copy_(cache.k[:, src])
    cache.v.copy_(cache.v[:, src])
    cont_logits = None
    if K > 1:
        cont_logits = pipeline_forward(stage, ctx, batch.cont_ids[:, :-1].to(dev),
                                       position_ids=batch.second_positions.to(dev), cache=cache)
    if not (ctx.is_last_stage and ctx.tp_rank == 0):
        return None
    return score_from_logits(batch, ctx_logits, cont_logits)


def _next_tokens(stage, ctx, logits: torch.Tensor | None, B: int) -> torch.Tensor:
    tok = logits.argmax(-1) if ctx.is_last_stage else None
    return broadcast_from_last_stage(tok, ctx, (B,), torch.long)


def rank_generate_start(ctx, key: str, ids: torch.Tensor, lens: torch.Tensor, max_new: int, steps: int):
    """Prefill right-padded prompts and decode ``steps`` tokens; the state stays for ``rank_generate_more``."""
    stage = _stage(key)
    dev = ctx.device
    B, P = ids.shape
    cache = stage.new_cache(B, P + max_new)
    logits = pipeline_forward(stage, ctx, ids.to(dev), cache=cache)
    last = logits[torch.arange(B, device=dev), lens.to(dev) - 1] if logits is not None else None
    tok = _next_tokens(stage, ctx, last, B)
    process_state()[_SLOT + ".gen"] = {"cache": cache, "tok": tok, "pos": lens.to(dev).clone()}
    return rank_generate_more(ctx, key, steps - 1, first=tok)


def rank_generate_more(ctx, key: str, steps: int, first: torch.Tensor | None = None):
    stage = _stage(key)
    st = process_state()[_SLOT + ".gen"]
    out = [first] if first is not None else []
    for _ in range(steps):
        logits = pipeline_forward(stage, ctx, st["tok"].unsqueeze(1), position_ids=st["pos"].unsqueeze(1),
                                  cache=st["cache"])
        st["tok"] = _next_tokens(stage, ctx, logits[:, -1] if logits is not None else None, st["tok"].shape[0])
        st["pos"] = st["pos"] + 1
        out.append(st["tok"])
    return torch.stack(out, 1).cpu() if ctx.rank == 0 and out else None


def rank_generate_end(ctx, key: str) -> None:
    process_state().pop(_SLOT + ".gen", None)


# ---- the controller side ------------------------------------------------------------------------

class ShardedModel:
    """Our model at TP x PP in a process-group pool (its own, or one passed in and left open:
    anything with ``run(dims, fn, *args, timeout_s=)``)."""

    def __init__(self, path: str | Path, dtype: str | torch.dtype = "fp32", tp: int = 1, pp: int = 1,
                 pool: ProcessGroupPool | None = None, timeout_s: float = 900.0):
        self.source = open_checkpoint(path)
        self.cfg = self.source.config
        self.dtype = parse_dtype(dtype)
        self.dims = ParallelDims(tp, pp)
        self.dims.check_model(self.cfg)
        self.tokenizer = self.source.tokenizer()
        self.key = f"{self.source.format}:{Path(self.source.directory).resolve()}:{dtype_name(self.dtype)}:tp{tp}pp{pp}"
        self._own_pool = pool is None
        self.pool = pool or ProcessGroupPool(self.dims.world_size, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        try:
            self._run(rank_load, self.key, self.source, self.dtype)
        except BaseException:
            self.close()
            raise

    def _run(self, fn, *args):
        return self.pool.run(self.dims, fn, *args, timeout_s=self.timeout_s)

    def score(self, batch: ScoreBatch) -> list[tuple[float, bool]]:
        results = self._run(rank_score, self.key, batch)
        return next(r for r in results if r is not None)

    def generate(self, prompts: list[list[int]], max_new: int, done: Callable[[list[int]], bool] | None = None,
                 chunk: int = 16) -> list[list[int]]:
        """Greedy continuations (``max_new`` tokens, fewer once ``done(tokens)`` holds for every row)."""
        from shared.evaluation.batching import _pad

        ids, lens = _pad(prompts)
        steps = min(chunk, max_new)
        out = self._run(rank_generate_start, self.key, ids, lens, max_new, steps)[0].tolist()
        try:
            while steps < max_new and not (done and all(done(row) for row in out)):
                n = min(chunk, max_new - steps)
                more = self._run(rank_generate_more, self.key, n)[0].tolist()
                out = [a + b for a, b in zip(out, more)]
                steps += n
        finally:
            if not getattr(self.pool, "broken", False):
                self._run(rank_generate_end, self.key)
        return out

    def close(self) -> None:
        if self._own_pool:
            self.pool.close()
        elif not getattr(self.pool, "broken", False):
            self._run(rank_unload, self.key)
