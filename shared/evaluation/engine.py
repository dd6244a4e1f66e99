"""Our TP/PP model behind a process-group pool, for scoring and greedy decoding.

Each rank loads only its own shard (from a native checkpoint or straight from an HF directory)
once into ``worker_state()``; later calls pass token batches. Log-probs are computed on the
last pipeline stage and only the per-continuation results travel back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from shared.checkpoint.layout import VOCAB, Layout, param_specs, shard
from shared.checkpoint.safe_io import CheckpointError
from shared.config import ModelConfig
from shared.evaluation.batching import ScoreBatch, score_from_logits
from shared.model import load_stage
from shared.parallel.dims import ParallelDims
from shared.parallel.launcher import ProcessGroupPool, worker_state
from shared.parallel.pipeline import broadcast_from_last_stage, pipeline_forward

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_SLOT = "evaluation"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use fp32 or bf16")
    return DTYPES[name]


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from; everything a rank needs to load its shard."""
    kind: str            # "native" | "hf"
    directory: str
    config: dict         # ModelConfig.to_dict()
    divisible_by: int = 128

    @property
    def cfg(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config)


def open_source(path: str | Path) -> ModelSource:
    """A native checkpoint (has manifest.json) or an HF checkpoint directory (has config.json)."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} is not a directory; pass a native checkpoint or an HF model directory")
    from shared.checkpoint.native import declared_format, load_manifest

    if declared_format(d) == "native":
        m = load_manifest(d)
        return ModelSource("native", str(d.resolve()), m.config.to_dict(), m.layout.divisible_by)
    if (d / "config.json").exists():
        from shared.checkpoint.hf import read_hf_config

        return ModelSource("hf", str(d.resolve()), ModelConfig.from_hf(read_hf_config(d)).to_dict())
    raise CheckpointError(f"{d} has neither manifest.json (a converted checkpoint) nor config.json (an HF model)")


def load_tokenizer_for(src: ModelSource):
    from shared.tokenizer import load_source_tokenizer, load_tokenizer

    return load_tokenizer(src.directory) if src.kind == "native" else load_source_tokenizer(src.directory)


def _local_state(ctx, src: ModelSource, layout: Layout, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    cfg = src.cfg
    if src.kind == "native":
        from shared.checkpoint.native import load_rank_state_dict

        return load_rank_state_dict(src.directory, ctx.tp_rank, ctx.pp_rank, target=layout, dtype=dtype)
    from shared.checkpoint.safe_io import open_hf_weights

    weights = open_hf_weights(Path(src.directory))
    state = {}
    try:
        for spec in param_specs(cfg, layout):
            if spec.pp_rank(cfg, layout) != ctx.pp_rank:
                continue
            hf = [weights.get(n) for n in spec.hf_names]
            if spec.kind == VOCAB:
                hf = [t[: cfg.vocab_size] for t in hf]  # an embedding padded in the HF file
            state[spec.local_name(cfg, layout)] = shard(spec, hf, cfg, layout)[ctx.tp_rank].to(dtype)
    finally:
        weights.close()
    return state


# ---- rank functions (module level: spawned workers import them) ---------------------------------

def rank_load(ctx, key: str, src: ModelSource, dtype: torch.dtype) -> None:
    slot = worker_state().setdefault(_SLOT, {})
    if key in slot:
        return
    slot.clear()  # one model per worker: a new checkpoint evicts the last
    layout = Layout(ctx.dims.tp, ctx.dims.pp, src.divisible_by)
    state = _local_state(ctx, src, layout, dtype)
    slot[key] = load_stage(src.cfg, ctx, state, dtype=dtype, vocab_divisible_by=src.divisible_by)


def rank_unload(ctx, key: str) -> None:
    worker_state().get(_SLOT, {}).pop(key, None)


def _stage(key: str):
    try:
        return worker_state()[_SLOT][key]
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
    worker_state()[_SLOT + ".gen"] = {"cache": cache, "tok": tok, "pos": lens.to(dev).clone()}
    return rank_generate_more(ctx, key, steps - 1, first=tok)


def rank_generate_more(ctx, key: str, steps: int, first: torch.Tensor | None = None):
    stage = _stage(key)
    st = worker_state()[_SLOT + ".gen"]
    out = [first] if first is not None else []
    for _ in range(steps):
        logits = pipeline_forward(stage, ctx, st["tok"].unsqueeze(1), position_ids=st["pos"].unsqueeze(1),
                                  cache=st["cache"])
        st["tok"] = _next_tokens(stage, ctx, logits[:, -1] if logits is not None else None, st["tok"].shape[0])
        st["pos"] = st["pos"] + 1
        out.append(st["tok"])
    return torch.stack(out, 1).cpu() if ctx.rank == 0 and out else None


def rank_generate_end(ctx, key: str) -> None:
    worker_state().pop(_SLOT + ".gen", None)


# ---- the controller side ------------------------------------------------------------------------

class ShardedModel:
    """Our model at TP x PP in a process-group pool (its own, or one passed in and left open:
    anything with ``run(dims, fn, *args, timeout_s=)``)."""

    def __init__(self, path: str | Path, dtype: str | torch.dtype = "fp32", tp: int = 1, pp: int = 1,
                 pool: ProcessGroupPool | None = None, timeout_s: float = 900.0):
        self.source = open_source(path)
        self.cfg = self.source.cfg
        self.dtype = parse_dtype(dtype)
        self.dims = ParallelDims(tp, pp)
        self.dims.check_model(self.cfg)
        self.tokenizer = load_tokenizer_for(self.source)
        self.key = f"{self.source.kind}:{self.source.directory}:{dtype_label(self.dtype)}:tp{tp}pp{pp}"
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
