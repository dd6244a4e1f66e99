"""What every rank runs: load the model once, then execute the controller's plans.

A plan admits new sequences into free cache rows (chunked prefill, one sequence at a time),
releases finished rows and runs up to ``steps`` decode steps over all live rows. Every rank
gets the same plan; the last stage samples and broadcasts each step's tokens, so all ranks
know which rows finished (EOS, stop ids, length) without another message. Only the last
stage's TP rank 0 returns the outputs.

KV cache rows are contiguous views, never gathered: a decode step covers rows 0..hi-1 where
hi is one past the highest live row (free or finished rows in between run a dummy token at
position 0 of their own row, which nobody reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from shared.checkpoint.layout import Layout
from shared.inference.sampling import next_top_p, sample_row
from shared.inference.source import ModelSource
from shared.model import KVCache, load_stage
from shared.parallel.launcher import worker_state
from shared.parallel.pipeline import broadcast_from_last_stage, pipeline_forward
from shared.parallel.state import ParallelContext



@dataclass(kw_only=True)
class SamplingParams:
    """How one sequence picks its tokens; shared by requests (scheduler) and slots (ranks)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    min_p: float = 0.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    prompt_logprobs: bool = False
    # Megatron's prevent_newline_after_colon: after a token in colon_ids, newline_ids are banned
    colon_ids: tuple[int, ...] = ()
    newline_ids: tuple[int, ...] = ()

    def sampling(self) -> dict:
        """This object's SamplingParams fields, e.g. to build a SlotSpec from a request."""
        return {f.name: getattr(self, f.name) for f in fields(SamplingParams)}


@dataclass
class SlotSpec(SamplingParams):
    """One sequence as the ranks see it (token ids only; text is the controller's business)."""

    slot: int
    prompt: list[int]
    max_new: int


@dataclass
class Plan:
    admit: list[SlotSpec] = field(default_factory=list)
    release: list[int] = field(default_factory=list)
    steps: int = 0


@dataclass
class SlotOutput:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None  # "stop" (a stop id) | "length"
    prompt_logprobs: list[float] | None = None


def cpu_weight_layout(stage: torch.nn.Module) -> str:
    """Store every fp32 matrix in the layout the CPU reads fastest; returns which.

    A decode step is a matrix-vector product per weight and bound by reading the weights.
    With the native kernels (``shared.kernels``) matrices become 8-column panels, streamed
    once per step at memory speed; otherwise they are stored transposed (same values, shape
    and names), which torch's kernel reads ~1.4x faster than row-major.
    """
    from shared import kernels

    packed = kernels.available()
    with torch.no_grad():
        for p in stage.parameters():
            if p.dim() == 2 and packed and kernels.packable(p):
                p.requires_grad_(False)
                p.data = kernels.pack(p.data)
            elif p.dim() == 2:
                p.data = p.data.t().contiguous().t()
    return "packed" if packed else "column-major"


class CacheRows(KVCache):
    """Rows [lo, hi) of a cache, as views (writes land in the parent)."""

    def __init__(self, parent: KVCache, lo: int, hi: int):
        self.k, self.v = parent.k[:, lo:hi], parent.v[:, lo:hi]
        self.batch, self.max_seq = hi - lo, parent.max_seq


class _Slot:
    def __init__(self, spec: SlotSpec, device):
        self.spec = spec
        self.gen = torch.Generator(device="cpu").manual_seed(spec.seed)
        self.pos = len(spec.prompt) - 1  # the position at which ``last`` is (or was) fed
        self.last = spec.prompt[-1]
        self.count = 0
        self.top_p = spec.top_p
        self.done = spec.max_new == 0
        self.stop = torch.tensor(spec.stop_ids, dtype=torch.long, device=device)
        self.colon = frozenset(spec.colon_ids)
        self.newline = torch.tensor(spec.newline_ids, dtype=torch.long, device=device)


class Worker:
    """Per-rank engine state, kept in ``worker_state()`` between plans."""

    def __init__(self, ctx: ParallelContext, source: ModelSource, dtype: torch.dtype | None,
                 max_batch: int, max_seq: int, prefill_chunk: int, cuda_graphs: bool):
        self.ctx = ctx
        cfg = source.config()
        stored = source.stored_layout()
        layout = Layout(ctx.dims.tp, ctx.dims.pp, stored.divisible_by)
        state = source.local_state(layout, ctx.tp_rank, ctx.pp_rank, dtype)
        self.stage = load_stage(cfg, ctx, state, dtype=dtype, vocab_divisible_by=stored.divisible_by)
        del state
        if ctx.device.type == "cpu":
            self.weight_layout = cpu_weight_layout(self.stage)
        self.cfg = cfg
        self.cache = self.stage.new_cache(max_batch, max_seq)
        self.max_batch, self.max_seq, self.prefill_chunk = max_batch, max_seq, prefill_chunk
        self.slots: dict[int, _Slot] = {}
        self.graphs = None
        if cuda_graphs and ctx.device.type == "cuda" and ctx.dims.pp == 1:
            from shared.inference.cuda_graphs import GraphedDecode

            self.graphs = GraphedDecode(self.stage, self.cache)

    # ---- one plan -----------------------------------------------------------------------
    def run(self, plan: Plan) -> dict[int, SlotOutput] | None:
        for s in plan.release:
            self.slots.pop(s, None)
        out: dict[int, SlotOutput] = {}
        for spec in plan.admit:
            if spec.slot in self.slots or not 0 <= spec.slot < self.max_batch:
                raise ValueError(f"cache row {spec.slot} is busy or out of range")
            self.slots[spec.slot] = _Slot(spec, self.ctx.device)
            out[spec.slot] = self._prefill(self.slots[spec.slot])
        for _ in range(plan.steps):
            if not self._decode(out):
                break
        return out if self.ctx.is_last_stage and self.ctx.tp_rank == 0 else None

    def _prefill(self, slot: _Slot) -> SlotOutput:
        spec, dev = slot.spec, self.ctx.device
        ids = torch.tensor(spec.prompt, dtype=torch.long, device=dev).unsqueeze(0)  # (1, S)
        rows = CacheRows(self.cache, spec.slot, spec.slot + 1)
        result = SlotOutput(prompt_logprobs=[] if spec.prompt_logprobs else None)
        last = None
        for a in range(0, ids.shape[1], self.prefill_chunk):
            b = min(a + self.prefill_chunk, ids.shape[1])
            pos = torch.arange(a, b, device=dev).unsqueeze(0)
            logits = pipeline_forward(self.stage, self.ctx, ids[:, a:b], position_ids=pos, cache=rows, kv_len=b)
            if logits is None:
                continue
            if spec.prompt_logprobs:
                # log p(token t | tokens < t) for t in a+1 .. b (the next chunk's first token too)
                targets = ids[0, a + 1: b + 1]
                lp = torch.log_softmax(logits[0, : targets.shape[0]].float(), -1)
                result.prompt_logprobs += lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
            last = logits[0, -1:]
        if slot.done:
            result.finish = "length"  # scoring: nothing to generate
        else:
            self._sample([slot], last, [result])
        return result

    def _decode(self, out: dict[int, SlotOutput]) -> bool:
        live = sorted(s for s, slot in self.slots.items() if not slot.done)
        if not live:
            return False
        hi = live[-1] + 1
        dev = self.ctx.device
        ids = torch.zeros(hi, 1, dtype=torch.long)
        pos = torch.zeros(hi, 1, dtype=torch.long)
        for s in live:
            ids[s, 0], pos[s, 0] = self.slots[s].last, self.slots[s].pos
        ids, pos = ids.to(dev), pos.to(dev)
        kv_len = int(pos.max()) + 1
        if self.graphs is not None:
            logits = self.graphs(ids, pos, kv_len)
        else:
            logits = pipeline_forward(self.stage, self.ctx, ids, position_ids=pos,
                                      cache=CacheRows(self.cache, 0, hi), kv_len=kv_len)
        slots = [self.slots[s] for s in live]
        results = [out.setdefault(s, SlotOutput()) for s in live]
        rows = logits[torch.tensor(live, device=dev), -1] if logits is not None else None
        self._sample(slots, rows, results)
        return True

    def _sample(self, slots: list[_Slot], logits: torch.Tensor | None, results: list[SlotOutput]) -> None:
        """Pick each slot's next token on the last stage, share it, and advance the slots."""
        n = len(slots)
        tokens = None
        if logits is not None:
            logits = logits.float()
            logp = torch.log_softmax(logits, -1)
            tokens = torch.empty(n, dtype=torch.long, device=logits.device)
            for i, slot in enumerate(slots):
                row, spec = logits[i], slot.spec
                if slot.count < spec.min_tokens and slot.stop.numel():
                    row = row.index_fill(0, slot.stop, float("-inf"))
                if slot.last in slot.colon and slot.newline.numel():
                    row = row.index_fill(0, slot.newline, float("-inf"))
                if spec.greedy:
                    tokens[i] = row.argmax()
                else:
                    tokens[i] = sample_row(row.cpu(), spec.temperature, spec.top_k, slot.top_p, spec.min_p, slot.gen)
            chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
        tokens = broadcast_from_last_stage(tokens, self.ctx, (n,), torch.long)
        for i, (slot, tok) in enumerate(zip(slots, tokens.tolist())):
            spec = slot.spec
            slot.last, slot.pos, slot.count = tok, slot.pos + 1, slot.count + 1
            slot.top_p = next_top_p(slot.top_p, spec.top_p_decay, spec.top_p_bound)
            results[i].tokens.append(tok)
            if logits is not None:
                results[i].logprobs.append(chosen[i])
            if tok in spec.stop_ids:
                slot.done, results[i].finish = True, "stop"
            elif slot.count >= spec.max_new or slot.pos >= self.max_seq:
                slot.done, results[i].finish = True, "length"


# ---- rank functions (module level, so spawned workers can import them) ---------------------

# A process may hold several engines' models (e.g. two small models in one generate worker):
# each engine's state lives under its own key.

def load(ctx: ParallelContext, key: str, source: ModelSource, dtype: torch.dtype | None, max_batch: int,
         max_seq: int, prefill_chunk: int, cuda_graphs: bool) -> dict:
    w = Worker(ctx, source, dtype, max_batch, max_seq, prefill_chunk, cuda_graphs)
    worker_state()[key] = w
    return {"rank": ctx.rank, "dtype": str(w.stage.dtype), "device": str(ctx.device)}


def run_plan(ctx: ParallelContext, key: str, plan: Plan) -> dict[int, SlotOutput] | None:
    w = worker_state().get(key)
    if w is None:
        raise RuntimeError("no model is loaded on this rank; call load first")
    with torch.no_grad():
        return w.run(plan)


def reset(ctx: ParallelContext, key: str) -> bool:
    """Forget every sequence (after a failed plan); the weights stay. False if none are loaded."""
    w = worker_state().get(key)
    if w is not None:
        w.slots.clear()
    return w is not None


def unload(ctx: ParallelContext, key: str) -> None:
    worker_state().pop(key, None)
