"""The controller side of the engine: one checkpoint, loaded once on every rank.

``Engine.run(plan)`` executes one plan on all ranks and returns the last stage's outputs.
With TP = PP = 1 the ranks can be this very process (``in_process``), which avoids the
per-call hand-off to worker processes; otherwise a ``ProcessGroupPool`` holds the ranks.

On GPUs an engine runs on the devices it is given (``devices``: CUDA ordinals, rank r on the
r-th; default: the first ones visible), never on whatever GPU happens to be current, so
several engines in one process can use different GPUs. Each rank sizes its KV cache from the
memory free after its weights; when fewer rows fit than ``max_batch`` asks for, the engine
serves a smaller batch and logs it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from shared.checkpoint.opener import Checkpoint, open_checkpoint
from shared.inference import ranks
from shared.inference.device_step import DecodePlan
from shared.dtypes import parse_dtype
from shared.parallel.devices import assign_devices, visible_devices
from shared.parallel.dims import ParallelDims
from shared.parallel.launcher import ProcessGroupPool, RemoteError
from shared.parallel.state import ParallelContext

DEFAULT_MAX_SEQ = 2048
log = logging.getLogger("llama_svc.engine")


class LengthError(ValueError):
    """A prompt plus its new tokens do not fit the model or the cache."""


def special_token_ids(tokenizer) -> dict[str, list[int]]:
    """Vocab ids whose text holds a newline, and those ending in a colon (for Megatron's
    ``prevent_newline_after_colon``)."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    return {"newline": [i for i, t in enumerate(texts) if "\n" in t],
            "colon": [i for i, t in enumerate(texts) if t.rstrip(" ").endswith(":")]}


@dataclass(frozen=True)
class EngineInfo:
    model: str
    tp: int
    pp: int
    dtype: str
    device: str
    max_batch: int
    max_seq: int


class Engine:
    def __init__(self, load: str | Path, tensor_parallel_size: int | None = None,
                 pipeline_parallel_size: int | None = None, dtype: str | torch.dtype | None = None,
                 max_batch: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 in_process: bool | None = None, threads: int = 1, cuda_graphs: bool = True,
                 timeout_s: float = 600.0, pool=None, source: Checkpoint | None = None,
                 devices=None, decode_plan: DecodePlan | None = None):
        """``pool``: an existing process pool (anything with ``run(dims, fn, *args)``) to load
        into instead of starting one; it is left running on ``close``. ``devices``: the CUDA
        ordinals of this engine's ranks (default: the visible ones from 0). ``decode_plan``:
        how the ranks run a step (default: ``DecodePlan.for_device``)."""
        self.source = source or open_checkpoint(load)
        self.cfg = self.source.config
        stored = self.source.layout
        tp = tensor_parallel_size or stored.tp
        pp = pipeline_parallel_size or stored.pp
        self.dims = ParallelDims(tp=tp, pp=pp)
        self.dims.check_model(self.cfg)
        self.tokenizer = self.source.tokenizer()
        self.eos_ids = self.source.eos_ids(self.tokenizer)
        self.dtype = parse_dtype(dtype) or self.source.dtype
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.max_seq = min(max_seq_len or DEFAULT_MAX_SEQ, self.cfg.max_position_embeddings)
        self.in_process = (tp * pp == 1 and pool is None) if in_process is None else in_process
        if self.in_process and tp * pp != 1:
            raise ValueError("in-process mode needs TP = PP = 1")
        self.threads, self.timeout_s = threads, timeout_s
        if pool is not None:  # the pool placed its ranks already
            self.devices = tuple(getattr(pool, "devices", ()))[: self.dims.world_size]
        elif torch.cuda.is_available():
            self.devices = assign_devices(self.dims.world_size, visible_devices() if devices is None else devices,
                                          f"a TP{tp} x PP{pp} engine")
        else:
            self.devices = ()
        self._key = f"engine-{uuid.uuid4().hex}"  # this engine's model state on each rank
        self._load_args = (self._key, self.source, self.dtype, max_batch, self.max_seq, prefill_chunk, cuda_graphs,
                           decode_plan)
        self.loaded: list[dict] = []
        self._special: dict[str, tuple[int, ...]] | None = None
        self._lock = threading.Lock()
        self._pool = pool
        self._own_pool = pool is None
        self._ctx: ParallelContext | None = None
        self.restarts = 0
        self._start()

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.source.served_name, self.dims.tp, self.dims.pp, str(self.dtype).replace("torch.", ""),
                          self.device, self.max_batch, self.max_seq)

    @property
    def device(self) -> str:
        return f"cuda:{self.devices[0]}" if self.devices else "cpu"

    def _scope(self):
        """The in-process engine's GPU as the current device of the calling thread."""
        return torch.cuda.device(self._ctx.device) if self._ctx.device.type == "cuda" else contextlib.nullcontext()

    def _start(self) -> None:
        if self.in_process:
            self._ctx = ParallelContext.single(self.device)
            with self._scope():
                self.loaded = [ranks.load(self._ctx, *self._load_args)]
        else:
            if self._own_pool:
                self._pool = ProcessGroupPool(self.dims.world_size, threads=self.threads, timeout_s=self.timeout_s,
                                              devices=self.devices or None)
            try:
                self.loaded = [r for r in self._pool.run(self.dims, ranks.load, *self._load_args) if r is not None]
            except BaseException:
                if self._own_pool:
                    self._pool.close(force=True)
                raise
        fits = min(r["max_batch"] for r in self.loaded)
        if fits < self.max_batch:
            log.warning("%s: the KV cache holds %d sequences of %d tokens in the GPU memory left after the weights; "
                        "max batch reduced from %d to %d", self.source.served_name, fits, self.max_seq, self.max_batch,
                        fits)
            self.max_batch = fits

    def local_rank_engine(self) -> ranks.RankEngine:
        """The rank state of an in-process engine (benchmarks and checks look inside it)."""
        if not self.in_process or self._ctx is None:
            raise RuntimeError("only an open in-process engine has its rank in this process")
        from shared.parallel.launcher import process_state

        return process_state()[self._key]

    def device_scope(self):
        """Make this in-process engine's GPU the calling thread's current device (a no-op on CPU)."""
        return self._scope()

    def special_ids(self) -> dict[str, tuple[int, ...]]:
        """Newline and colon-ending token ids, computed on first use (decodes the whole vocab)."""
        if self._special is None:
            self._special = {k: tuple(v) for k, v in special_token_ids(self.tokenizer).items()}
        return self._special

    def check_lengths(self, prompt_len: int, max_new: int) -> None:
        """Raise LengthError unless prompt + new tokens fit the positions and the cache."""
        if prompt_len == 0:
            raise LengthError("the prompt is empty after tokenization; give some text (or add_BOS=true)")
        total = prompt_len + max_new
        limit = min(self.max_seq, self.cfg.max_position_embeddings)
        if total > limit:
            raise LengthError(
                f"the prompt has {prompt_len} tokens and {max_new} new tokens were asked for: {total} > {limit}, "
                f"the most this server holds per sequence (max positions {self.cfg.max_position_embeddings}, "
                f"cache {self.max_seq}); shorten the prompt or ask for fewer tokens")

    def run(self, plan: ranks.Plan) -> dict[int, ranks.SlotOutput]:
        """Execute one plan on every rank. On failure the ranks are reset (or restarted) and
        the error re-raised: every sequence that was in the cache is lost."""
        with self._lock:
            try:
                if self.in_process:
                    with self._scope():
                        return ranks.run_plan(self._ctx, self._key, plan) or {}
                results = self._pool.run(self.dims, ranks.run_plan, self._key, plan)
                return results[self.dims.rank(0, self.dims.pp - 1)] or {}
            except BaseException:
                self._recover()
                raise

    def _recover(self) -> None:
        self.restarts += 1
        if self.in_process:
            ranks.reset(self._ctx, self._key)
            return
        # a failed rank may have left its peers inside a collective: the pool is then rebuilt
        # (ours here, a shared one by its owner on the next run) and the model reloaded
        if self._own_pool and self._pool.broken:
            self._start()
            return
        try:
            if all(self._pool.run(self.dims, ranks.reset, self._key, timeout_s=60)):
                return
            self._pool.run(self.dims, ranks.load, *self._load_args)
        except RemoteError:
            if not self._own_pool:
                raise
            self._pool.close(force=True)
            self._start()

    def close(self) -> None:
        with self._lock:
            if self.in_process:
                if self._ctx is not None:
                    ranks.unload(self._ctx, self._key)
                    self._ctx = None
            elif self._pool is not None:
                if self._own_pool:
                    self._pool.close()
                else:
                    self._pool.run(self.dims, ranks.unload, self._key)
                self._pool = None

    # ---- a blocking batch API (reference comparisons, benchmarks) ------------------------------
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new: int, steps: int = 16,
                     **sampling) -> list[ranks.SlotOutput]:
        """Run the given token prompts to completion, at most ``max_batch`` at a time."""
        outs: list[ranks.SlotOutput] = []
        for start in range(0, len(prompts), self.max_batch):
            group = prompts[start: start + self.max_batch]
            for p in group:
                self.check_lengths(len(p), max_new)
            specs = [ranks.SlotSpec(slot=i, prompt=list(p), max_new=max_new, stop_ids=tuple(self.eos_ids),
                                **sampling) for i, p in enumerate(group)]
            merged = {i: ranks.SlotOutput() for i in range(len(group))}
            plan = ranks.Plan(admit=specs, steps=steps)
            while True:
                res = self.run(plan)
                for s, o in res.items():
                    m = merged[s]
                    m.tokens += o.tokens
                    m.logprobs += o.logprobs
                    m.finish = o.finish or m.finish
                    if o.prompt_logprobs is not None:
                        m.prompt_logprobs = o.prompt_logprobs
                if all(m.finish for m in merged.values()):
                    break
                plan = ranks.Plan(steps=steps)
            self.run(ranks.Plan(release=list(range(len(group)))))
            outs += [merged[i] for i in range(len(group))]
        return outs


__all__ = ["Engine", "EngineInfo", "LengthError", "parse_dtype", "special_token_ids"]
