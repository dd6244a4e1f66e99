"""Continuous batching: many submitters, one thread driving the engine.

Sequences wait in a bounded queue; between plans (each up to ``steps`` decode steps) the
scheduler releases finished cache rows, admits waiting sequences into free rows (they are
prefilled and join the running batch), then runs the next plan. Text, stop strings and
streaming happen here on the controller; the ranks only see token ids.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence as Seq

from shared.inference.engine import Engine
from shared.inference.stop import TextTracker
from shared.inference.ranks import Plan, SamplingParams, SlotOutput, SlotSpec


class Overloaded(RuntimeError):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class GenerationFailed(RuntimeError):
    """The engine failed while this sequence was in it (other sequences are unaffected)."""


@dataclass
class SeqRequest(SamplingParams):
    prompt_ids: list[int]
    max_new: int
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True

    def spec(self, slot: int) -> SlotSpec:
        return SlotSpec(slot=slot, prompt=list(self.prompt_ids), max_new=self.max_new,
                        **{**self.sampling(), "stop_ids": tuple(self.stop_ids)})


@dataclass
class SeqResult:
    prompt_ids: list[int]
    token_ids: list[int]          # generated ids kept (a final stop id included)
    text: str                     # generated text (stop id and stop string excluded)
    finish_reason: str            # "stop" | "length"
    logprobs: list[float]         # of token_ids
    prompt_logprobs: list[float] | None = None  # of prompt tokens 1..n-1
    stop_string: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None         # per token_ids entry
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None  # per prompt token 1..n-1


@dataclass
class Delta:
    text: str
    n_tokens: int
    token_ids: list[int] = field(default_factory=list)    # the kept tokens that arrived with this text
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


class Sequence:
    """A submitted sequence: iterate ``events()`` for streaming, or call ``result()``."""

    def __init__(self, req: SeqRequest, tokenizer):
        self.req = req
        self.tracker = TextTracker(tokenizer, req.prompt_ids, req.stop, req.include_stop, req.skip_special_tokens)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_logprobs: list[float] | None = None
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
        self.slot: int | None = None
        self.cancelled = False
        self.finished = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._events: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        self.cancelled = True

    def events(self, timeout: float | None = None) -> Iterator[Delta | SeqResult]:
        """Deltas as they come, then the SeqResult; raises GenerationFailed on an engine error."""
        while True:
            item = self._events.get(timeout=timeout)
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, SeqResult):
                return

    def result(self, timeout: float | None = None) -> SeqResult:
        for item in self.events(timeout):
            if isinstance(item, SeqResult):
                return item
        raise GenerationFailed("the sequence ended without a result")

    # ---- called by the scheduler thread ------------------------------------------------------
    def absorb(self, out: SlotOutput) -> bool:
        """Take a plan's output for this sequence; returns True when the sequence is finished."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
            self.prompt_top_logprobs = out.prompt_top_logprobs
        before = len(self.tokens)
        new = list(out.tokens)
        if new and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        by_id = out.finish == "stop" and new and new[-1] in self.req.stop_ids
        text_ids = new[:-1] if by_id else new
        delta = self.tracker.add(text_ids)
        self.tokens += new
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        if self.tracker.stopped is not None:
            kept = len(self.tracker.ids)
            self.tokens, self.logprobs, self.top_logprobs = (self.tokens[:kept], self.logprobs[:kept],
                                                             self.top_logprobs[:kept])
            reason = "stop"
        elif out.finish is not None:
            delta += self.tracker.finish()
            reason = out.finish
        else:
            reason = None
        if delta or len(self.tokens) > before:
            self._events.put(Delta(delta, len(new), self.tokens[before:], self.logprobs[before:],
                                   self.top_logprobs[before:]))
        if reason is not None:
            self._finish(reason)
        return reason is not None

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finished_at = time.monotonic()
        self._events.put(SeqResult(list(self.req.prompt_ids), self.tokens, self.tracker.text, reason,
                                   self.logprobs, self.prompt_logprobs, self.tracker.stopped,
                                   self.top_logprobs if self.req.top_logprobs else None, self.prompt_top_logprobs))

    def fail(self, err: BaseException) -> None:
        self.finished = True
        self._events.put(err)


@dataclass
class SchedulerStats:
    plans: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished: int = 0
    failed: int = 0
    engine_failures: int = 0
    busy_s: float = 0.0
    extra: dict = field(default_factory=dict)


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 256, steps: int = 8):
        self.engine, self.max_queue, self.steps = engine, max_queue, steps
        self.stats = SchedulerStats()
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._release: list[int] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="generation-scheduler", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, reqs: Seq[SeqRequest]) -> list[Sequence]:
        """Queue the sequences (all or none). Raises LengthError or Overloaded before any work."""
        for r in reqs:
            self.engine.check_lengths(len(r.prompt_ids), r.max_new)
        seqs = [Sequence(r, self.engine.tokenizer) for r in reqs]
        with self._cond:
            if self._closed:
                raise GenerationFailed("the generation engine is shut down")
            free = self.engine.max_batch - len(self._running)  # rows free now: no waiting room needed
            if len(self._waiting) + len(seqs) > self.max_queue + max(0, free):
                raise Overloaded(f"the server is at capacity ({len(self._waiting)} sequences waiting, at most "
                                 f"{self.max_queue}); retry shortly", retry_after=1)
            self._waiting.extend(seqs)
            self._cond.notify()
        return seqs

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        err = GenerationFailed("the generation engine is shut down")
        for s in list(self._waiting) + list(self._running.values()):
            if not s.finished:
                s.fail(err)

    # ---- the driving thread ------------------------------------------------------------------
    def _next_plan(self) -> Plan | None:
        with self._cond:
            while not self._closed and not self._waiting and not self._running and not self._release:
                self._cond.wait()
            if self._closed:
                return None
            for slot, seq in list(self._running.items()):
                if seq.cancelled:
                    del self._running[slot]
                    self._release.append(slot)
                    seq.fail(GenerationFailed("cancelled"))
            free = [s for s in range(self.engine.max_batch) if s not in self._running]
            admit = []
            while self._waiting and free:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    seq.fail(GenerationFailed("cancelled"))
                    continue
                seq.slot = free.pop(0)
                self._running[seq.slot] = seq
                admit.append(seq.req.spec(seq.slot))
                self.stats.prompt_tokens += len(seq.req.prompt_ids)
            plan = Plan(admit=admit, release=self._release, steps=self.steps if self._running else 0)
            self._release = []
            return plan

    def _loop(self) -> None:
        while True:
            plan = self._next_plan()
            if plan is None:
                return
            t0 = time.perf_counter()
            try:
                outputs = self.engine.run(plan)
            except BaseException as e:  # noqa: BLE001 - the sequences in the cache are lost, the rest go on
                self.stats.engine_failures += 1
                err = GenerationFailed(f"generation failed: {type(e).__name__}: {str(e)[-2000:]}")
                with self._cond:
                    for seq in self._running.values():
                        seq.fail(err)
                        self.stats.failed += 1
                    self._running.clear()
                continue
            self.stats.busy_s += time.perf_counter() - t0
            self.stats.plans += 1
            with self._cond:
                for slot, out in outputs.items():
                    seq = self._running.get(slot)
                    if seq is None:
                        continue
                    self.stats.generated_tokens += len(out.tokens)
                    try:
                        done = seq.absorb(out)
                    except Exception as e:  # noqa: BLE001 - e.g. a tokenizer error: only this sequence fails
                        seq.fail(GenerationFailed(f"{type(e).__name__}: {e}"))
                        done = True
                        self.stats.failed += 1
                    if done:
                        del self._running[slot]
                        self._release.append(slot)
                        self.stats.finished += 1
                self.stats.decode_steps += max((len(o.tokens) for o in outputs.values()), default=0)
