"""What every rank runs: load the model once, then execute the controller's plans.

A plan admits new sequences into free cache rows (chunked prefill: one sequence at a time, or
under the GPU plan all admitted prompts together), releases finished rows and runs up to
``steps`` decode steps over all live rows. Every rank gets the same plan; the last stage
samples and broadcasts each step's tokens, so all ranks know which rows finished (EOS, stop
ids, length) without another message. Only the last stage's TP rank 0 returns the outputs.

KV cache rows are contiguous views, never gathered: a decode step covers rows 0..hi-1 where
hi is one past the highest live row (free or finished rows in between run a dummy token at
position 0 of their own row, which nobody reads). How a step runs — fused ops, CUDA graphs,
sampling on the device — is the rank's ``DecodePlan`` (``device_step``); the kernels its stage
runs (packed CPU products, native decode steps) are the ``ImplPlan`` applied after loading
(``impls``). On a GPU the cache
is sized from the memory left after the weights (``memory``) before it is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from shared.checkpoint.opener import Checkpoint
from shared.inference.device_step import DecodePlan, DeviceRows, to_host
from shared.inference.impls import ImplPlan
from shared.inference.memory import MemoryPlanError, explain, plan_cache
from shared.inference.sampling import (BatchParams, next_top_p, penalize, penalize_batch, sample_batch, sample_row,
                                       top_alternatives)
from shared.model import load_stage
from shared.model.kv_cache import CacheRows
from shared.parallel.launcher import process_state
from shared.parallel.layout import Layout
from shared.parallel.p2p import exchange
from shared.parallel.pipeline import broadcast_from_last_stage, pipeline_forward
from shared.parallel.state import ParallelContext

__all__ = ["DecodePlan", "Plan", "SamplingParams", "SlotOutput", "SlotSpec", "RankEngine"]


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0  # alternatives reported per position (prompt ones too with prompt_logprobs)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

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
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, with top_logprobs
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


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
        self.generated: list[int] = []


class RankEngine:
    """Per-rank engine state, kept in ``process_state()`` between plans."""

    def __init__(self, ctx: ParallelContext, source: Checkpoint, dtype: torch.dtype | None,
                 max_batch: int, max_seq: int, prefill_chunk: int, cuda_graphs: bool,
                 plan: DecodePlan | None = None):
        self.ctx = ctx
        self.plan = plan or DecodePlan.for_device(ctx.device.type, cuda_graphs)
        cfg = source.config
        stored = source.layout
        layout = Layout(ctx.dims.tp, ctx.dims.pp, stored.divisible_by)
        state = source.rank_state(layout, ctx.tp_rank, ctx.pp_rank, dtype)
        self.stage = load_stage(cfg, ctx, state, dtype=dtype, vocab_divisible_by=stored.divisible_by)
        del state
        self.impls = ImplPlan.choose(ctx.device.type, self.stage.dtype, self.plan.compiled)
        self.impls.apply(self.stage)
        self.weight_layout = self.impls.weight_layout
        self.cfg = cfg
        self.max_seq, self.prefill_chunk = max_seq, prefill_chunk
        self.max_batch = self._cache_rows(max_batch)
        self.cache = self.stage.new_cache(self.max_batch, max_seq)
        self.slots: dict[int, _Slot] = {}
        self.rows = DeviceRows(self.max_batch, ctx.device, cfg.vocab_size) if self.plan.device_steps else None
        self.graphs = None
        if self.plan.graphs and ctx.device.type == "cuda":
            from shared.inference.cuda_graphs import StageGraphs

            inputs = self.rows.ids if ctx.is_first_stage else torch.zeros(
                self.max_batch, 1, cfg.hidden_size, dtype=self.stage.dtype, device=ctx.device)
            self.graphs = StageGraphs(self.stage, self.cache, inputs, self.rows.pos)
            self.graphs.capture()

    def _cache_rows(self, max_batch: int) -> int:
        """The cache rows that fit this rank's GPU after the weights (all ranks agree on the fewest)."""
        if self.ctx.device.type != "cuda":
            return max_batch
        free, total = torch.cuda.mem_get_info(self.ctx.device)
        plan = plan_cache(self.cfg, self.ctx.dims, max_batch, self.max_seq, self.prefill_chunk, self.stage.dtype,
                          free, total)
        rows = torch.tensor([plan.rows], device=self.ctx.device)
        for group in (self.ctx.tp_group, self.ctx.pp_group):
            if group is not None:
                dist.all_reduce(rows, op=dist.ReduceOp.MIN, group=group)
        rows = int(rows)
        if rows == 0:
            raise MemoryPlanError(explain(plan, self.cfg, self.ctx.dims, self.max_seq, str(self.ctx.device))
                                  if plan.rows == 0 else "another rank of this layout has no room for one sequence")
        return rows

    # ---- one plan -----------------------------------------------------------------------
    def run(self, plan: Plan) -> dict[int, SlotOutput] | None:
        for s in plan.release:
            self.slots.pop(s, None)
        out: dict[int, SlotOutput] = {}
        admitted = []
        for spec in plan.admit:
            if spec.slot in self.slots or not 0 <= spec.slot < self.max_batch:
                raise ValueError(f"cache row {spec.slot} is busy or out of range")
            self.slots[spec.slot] = _Slot(spec, self.ctx.device)
            admitted.append(self.slots[spec.slot])
            scored = spec.prompt_logprobs
            out[spec.slot] = SlotOutput(prompt_logprobs=[] if scored else None,
                                        prompt_top_logprobs=[] if scored and spec.top_logprobs else None)
        if admitted:
            self._admit(admitted, out)
        if self.rows is not None and (plan.admit or plan.release):
            self.rows.live = ()  # new sequences: the device state is rebuilt from the slots
        for _ in range(plan.steps):
            if not self._decode(out):
                break
        return out if self.ctx.is_last_stage and self.ctx.tp_rank == 0 else None

    def _admit(self, slots: list[_Slot], out: dict[int, SlotOutput]) -> None:
        """Prefill the admitted sequences and pick each one's first token."""
        together = [s for s in slots if not s.spec.prompt_logprobs] if self.plan.batched_prefill else []
        groups = ([together] if together else []) + [[s] for s in slots if s not in together]
        for group in groups:
            last = self._prefill_many(group) if len(group) > 1 or group[0] in together else \
                self._prefill_one(group[0], out[group[0].spec.slot])
            todo = [i for i, s in enumerate(group) if not s.done]
            for s in group:
                if s.done:
                    out[s.spec.slot].finish = "length"  # scoring: nothing to generate
            if todo:
                picked = [group[i] for i in todo]
                rows = last[todo] if last is not None else None
                self._sample(picked, rows, [out[s.spec.slot] for s in picked])

    def _prefill_one(self, slot: _Slot, result: SlotOutput) -> torch.Tensor | None:
        """One sequence in chunks; (1, V) logits of its last prompt token on the last stage."""
        spec, dev = slot.spec, self.ctx.device
        ids = torch.tensor(spec.prompt, dtype=torch.long, device=dev).unsqueeze(0)  # (1, S)
        rows = CacheRows(self.cache, spec.slot, spec.slot + 1)
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
                if spec.top_logprobs:
                    result.prompt_top_logprobs += top_alternatives(lp, spec.top_logprobs)
            last = logits[0, -1:]
        return last

    def _prefill_many(self, slots: list[_Slot]) -> torch.Tensor | None:
        """Several prompts as one batch per chunk (right-padded; at most ``prefill_chunk`` tokens a
        forward); (n, V) logits of each last prompt token on the last stage."""
        dev = self.ctx.device
        lens = [len(s.spec.prompt) for s in slots]
        width = max(1, self.prefill_chunk // len(slots))
        last: list[torch.Tensor | None] = [None] * len(slots)
        for a in range(0, max(lens), width):
            act = [i for i, n in enumerate(lens) if n > a]
            b = min(a + width, max(lens[i] for i in act))
            ids = torch.zeros(len(act), b - a, dtype=torch.long)
            for j, i in enumerate(act):
                seg = slots[i].spec.prompt[a:b]
                ids[j, : len(seg)] = torch.tensor(seg, dtype=torch.long)
            at = torch.tensor([min(lens[i], b) - 1 - a for i in act])
            rows = torch.tensor([slots[i].spec.slot for i in act])
            pos = torch.arange(a, b).unsqueeze(0).expand(len(act), b - a)
            logits = pipeline_forward(self.stage, self.ctx, ids.to(dev), position_ids=pos.to(dev), cache=self.cache,
                                      kv_len=b, cache_rows=rows.to(dev), logits_at=at.to(dev))
            if logits is not None:
                for j, i in enumerate(act):
                    if lens[i] <= b:
                        last[i] = logits[j, 0]
        return torch.stack(last) if last[0] is not None else None

    def _decode(self, out: dict[int, SlotOutput]) -> bool:
        live = tuple(sorted(s for s, slot in self.slots.items() if not slot.done))
        if not live:
            return False
        slots = [self.slots[s] for s in live]
        results = [out.setdefault(s, SlotOutput()) for s in live]
        hi = live[-1] + 1
        kv_len = max(slot.pos for slot in slots) + 1
        if self.rows is not None:
            self._decode_on_device(live, slots, results, hi, kv_len)
            return True
        dev = self.ctx.device
        ids = torch.zeros(hi, 1, dtype=torch.long)
        pos = torch.zeros(hi, 1, dtype=torch.long)
        for s in live:
            ids[s, 0], pos[s, 0] = self.slots[s].last, self.slots[s].pos
        ids, pos = ids.to(dev), pos.to(dev)
        logits = pipeline_forward(self.stage, self.ctx, ids, position_ids=pos,
                                  cache=CacheRows(self.cache, 0, hi), kv_len=kv_len)
        rows = logits[torch.tensor(live, device=dev), -1] if logits is not None else None
        self._sample(slots, rows, results)
        return True

    def _decode_on_device(self, live, slots, results, hi: int, kv_len: int) -> None:
        """One step of the GPU plan: inputs, sampling and their update stay on the device."""
        r = self.rows
        if live != r.live:
            r.load(live, slots)
        logits = self._step(hi, kv_len)
        tokens = logp = alts = None
        if logits is not None:
            rows = penalize_batch(logits[:, -1].index_select(0, r.index), r.params)
            tokens, logp = sample_batch(rows, r.params, r.last_tokens())
            alts = self._alternatives(slots, rows)
        tokens = broadcast_from_last_stage(tokens, self.ctx, (len(live),), torch.long)
        r.advance(tokens)
        self._record(slots, *to_host(tokens, logp), results, alts)

    def _step(self, hi: int, kv_len: int) -> torch.Tensor | None:
        """Logits (hi, 1, V) of the step on the last stage (None elsewhere), graphed when captured."""
        ctx, r = self.ctx, self.rows
        if self.graphs is None:
            return pipeline_forward(self.stage, ctx, r.ids[:hi], position_ids=r.pos[:hi],
                                    cache=CacheRows(self.cache, 0, hi), kv_len=kv_len)
        b = self.graphs.key(hi, kv_len)[0]
        if not ctx.is_first_stage:
            exchange([], [(self.graphs.inputs[:b], ctx.prev_rank)])
        out = self.graphs.run(hi, kv_len)
        if not ctx.is_last_stage:
            exchange([(out, ctx.next_rank)], [])
            return None
        return out[:hi]

    def _sample(self, slots: list[_Slot], logits: torch.Tensor | None, results: list[SlotOutput]) -> None:
        """Pick each slot's next token on the last stage, share it, and advance the slots."""
        n = len(slots)
        tokens = logp = alts = None
        if logits is not None and self.plan.device_steps:
            params = BatchParams.build([(s.spec, s.count, s.top_p, s.generated) for s in slots], logits.device,
                                       logits.shape[-1])
            last = torch.tensor([s.last for s in slots], dtype=torch.long, device=logits.device)
            logits = penalize_batch(logits.float(), params)
            tokens, logp = sample_batch(logits, params, last)
        elif logits is not None:
            logits = self._penalized(slots, logits.float())
            tokens, logp = self._sample_rows(slots, logits)
        if logits is not None:
            alts = self._alternatives(slots, logits)
        tokens = broadcast_from_last_stage(tokens, self.ctx, (n,), torch.long)
        self._record(slots, *to_host(tokens, logp), results, alts)

    @staticmethod
    def _penalized(slots: list[_Slot], logits: torch.Tensor) -> torch.Tensor:
        """The CPU plan's rows (n, V) with each slot's presence/frequency/repetition penalties and
        logit bias (the GPU plan's ``penalize_batch`` does the same on the device)."""
        if not any(s.spec.penalized for s in slots):
            return logits
        logits = logits.float().clone()
        for i, s in enumerate(slots):
            sp = s.spec
            if sp.penalized:
                logits[i] = penalize(logits[i], s.generated, sp.prompt, sp.presence_penalty, sp.frequency_penalty,
                                     sp.repetition_penalty, sp.logit_bias)
        return logits

    @staticmethod
    def _alternatives(slots: list[_Slot], logits: torch.Tensor) -> list | None:
        """The ``top_logprobs`` most likely (id, log-prob) of each row that asks for them."""
        k = max(s.spec.top_logprobs for s in slots)
        if k <= 0:
            return None
        alts = top_alternatives(torch.log_softmax(logits.float(), -1), k)
        return [a[: s.spec.top_logprobs] for a, s in zip(alts, slots)]

    def _sample_rows(self, slots: list[_Slot], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU plan: each row on its own, sampled rows from their own generators."""
        logp = torch.log_softmax(logits, -1)
        tokens = torch.empty(len(slots), dtype=torch.long, device=logits.device)
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
        return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def _record(self, slots: list[_Slot], tokens: list[int], logprobs: list[float] | None,
                results: list[SlotOutput], alternatives: list | None = None) -> None:
        for i, (slot, tok) in enumerate(zip(slots, tokens)):
            spec = slot.spec
            slot.last, slot.pos, slot.count = tok, slot.pos + 1, slot.count + 1
            slot.generated.append(tok)
            if alternatives is not None and spec.top_logprobs:
                results[i].top_logprobs.append(alternatives[i])
            slot.top_p = next_top_p(slot.top_p, spec.top_p_decay, spec.top_p_bound)
            results[i].tokens.append(tok)
            if logprobs is not None:
                results[i].logprobs.append(logprobs[i])
            if tok in spec.stop_ids:
                slot.done, results[i].finish = True, "stop"
            elif slot.count >= spec.max_new or slot.pos >= self.max_seq:
                slot.done, results[i].finish = True, "length"


# ---- rank functions (module level, so spawned workers can import them) ---------------------

# A process may hold several engines' models (e.g. two small models in one generate worker):
# each engine's state lives under its own key.

def load(ctx: ParallelContext, key: str, source: Checkpoint, dtype: torch.dtype | None, max_batch: int,
         max_seq: int, prefill_chunk: int, cuda_graphs: bool, plan: DecodePlan | None = None) -> dict:
    w = RankEngine(ctx, source, dtype, max_batch, max_seq, prefill_chunk, cuda_graphs, plan)
    process_state()[key] = w
    return {"rank": ctx.rank, "dtype": str(w.stage.dtype), "device": str(ctx.device), "max_batch": w.max_batch,
            "cache_bytes": w.cache.k.numel() * w.cache.k.element_size() * 2,
            "graphs": len(w.graphs.graphs) if w.graphs is not None else 0, "plan": w.plan, "ops": w.stage.ops.name}


def run_plan(ctx: ParallelContext, key: str, plan: Plan) -> dict[int, SlotOutput] | None:
    w = process_state().get(key)
    if w is None:
        raise RuntimeError("no model is loaded on this rank; call load first")
    with torch.no_grad():
        return w.run(plan)


def reset(ctx: ParallelContext, key: str) -> bool:
    """Forget every sequence (after a failed plan); the weights stay. False if none are loaded."""
    w = process_state().get(key)
    if w is not None:
        w.slots.clear()
    return w is not None


def unload(ctx: ParallelContext, key: str) -> None:
    process_state().pop(key, None)
