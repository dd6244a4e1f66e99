"""One served checkpoint: engine + scheduler + the request formats (Megatron PUT /api, OpenAI).

``GenerationRuntime`` is what the standalone server and the generate worker wrap. It is
thread-safe: handler threads validate and tokenize, then submit sequences; one scheduler
thread drives the ranks. Requests are validated with the wire models of ``shared.protocol``
(the gateway uses the same ones) before anything is queued, so a bad request can never reach
the ranks.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from shared.inference.engine import Engine, LengthError
from shared.inference.scheduler import (Delta, GenerationFailed, Overloaded, Scheduler, SeqRequest, SeqResult,
                                        Sequence)
from shared.protocol import RequestError, parse
from shared.protocol.megatron import MESSAGES, MegatronRequest
from shared.protocol.openai import ChatRequest, CompletionRequest

__all__ = ["GenerationRuntime", "Overloaded", "RequestError"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _StatsCollector:
    """The scheduler's running totals, exposed as counters at scrape time."""

    def __init__(self, runtime: "GenerationRuntime"):
        self.runtime = runtime

    def collect(self):
        st = self.runtime.scheduler.stats
        for name, doc, value in (("generate_generated_tokens", "Tokens generated since start", st.generated_tokens),
                                 ("generate_prompt_tokens", "Prompt tokens prefilled since start", st.prompt_tokens),
                                 ("generate_engine_failures", "Plans that failed on the ranks", st.engine_failures),
                                 ("generate_engine_busy_seconds", "Time spent running plans", st.busy_s)):
            yield CounterMetricFamily(name, doc, value=value)


class GenerationRuntime:
    def __init__(self, load: str | Path, tensor_parallel_size: int | None = None,
                 pipeline_parallel_size: int | None = None, dtype: str | None = None, max_batch: int = 8,
                 max_queue: int = 256, max_seq_len: int | None = None, steps_per_plan: int = 8,
                 in_process: bool | None = None, model_name: str | None = None, threads: int = 1,
                 devices=None):
        self.engine = Engine(load, tensor_parallel_size, pipeline_parallel_size, dtype, max_batch=max_batch,
                             max_seq_len=max_seq_len, in_process=in_process, threads=threads, devices=devices)
        self.tokenizer = self.engine.tokenizer
        self.model_name = model_name or self.engine.info.model
        self.scheduler = Scheduler(self.engine, max_queue=max_queue, steps=steps_per_plan)
        self.created = int(time.time())
        self._tok_lock = threading.Lock()
        self._closed = False
        self._init_metrics()

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return not self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.scheduler.close()
            self.engine.close()

    def __enter__(self) -> "GenerationRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- metrics -----------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        r = self.registry = CollectorRegistry()
        self._m_requests = Counter("generate_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                   registry=r)
        self._m_latency = Histogram("generate_request_seconds", "End-to-end request latency", ["endpoint"],
                                    registry=r, buckets=LATENCY_BUCKETS)
        self._m_ttft = Histogram("generate_time_to_first_token_seconds", "Submission to first generated token",
                                 ["endpoint"], registry=r, buckets=LATENCY_BUCKETS)
        self._m_itl = Histogram("generate_inter_token_latency_seconds", "Mean time between generated tokens",
                                ["endpoint"], registry=r, buckets=LATENCY_BUCKETS)
        self._m_tokens = Counter("generate_completion_tokens", "Tokens generated for answered requests",
                                 ["endpoint"], registry=r)
        Gauge("generate_queue_depth", "Sequences waiting for a cache row", registry=r).set_function(
            lambda: self.scheduler.queued)
        Gauge("generate_running_sequences", "Sequences in the batch", registry=r).set_function(
            lambda: self.scheduler.running)
        r.register(_StatsCollector(self))

    def _observe_seqs(self, endpoint: str, seqs: list[Sequence], results: list[SeqResult]) -> None:
        self._m_tokens.labels(endpoint).inc(sum(len(r.token_ids) for r in results))
        for s, res in zip(seqs, results):
            if s.first_token_at is None:
                continue
            self._m_ttft.labels(endpoint).observe(s.first_token_at - s.submitted)
            if len(res.token_ids) > 1 and s.finished_at is not None:
                self._m_itl.labels(endpoint).observe((s.finished_at - s.first_token_at) / (len(res.token_ids) - 1))

    @property
    def metrics(self) -> dict[str, Any]:
        st = self.scheduler.stats
        return {"queued": self.scheduler.queued, "running": self.scheduler.running, "plans": st.plans,
                "generated_tokens": st.generated_tokens, "prompt_tokens": st.prompt_tokens,
                "finished": st.finished, "failed": st.failed, "engine_failures": st.engine_failures,
                "engine_restarts": self.engine.restarts, "busy_s": st.busy_s}

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    def _observe(self, endpoint: str, fn, *args):
        t0 = time.perf_counter()
        try:
            out = fn(*args)
            self._m_requests.labels(endpoint, "200").inc()
            return out
        except RequestError as e:
            self._m_requests.labels(endpoint, str(e.status_code)).inc()
            raise
        except Overloaded:
            self._m_requests.labels(endpoint, "429").inc()
            raise
        finally:
            self._m_latency.labels(endpoint).observe(time.perf_counter() - t0)

    # ---- shared helpers ----------------------------------------------------------------------
    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def _piece(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False)

    def _check_ids(self, ids, param: str) -> None:
        vocab = self.engine.cfg.vocab_size
        if any(not 0 <= int(t) < vocab for t in ids):
            raise RequestError(400, f"{param} must hold token ids in [0, {vocab})", param)

    def _submit(self, reqs: list[SeqRequest], fields: tuple[str, str] | None = None) -> list[Sequence]:
        """The sequences queued. ``fields`` names the request's new-token and prompt fields: the
        ``param`` of a length error (the prompt's when one is empty)."""
        if self._closed:
            raise RequestError(503, "the model is not loaded")
        try:
            return self.scheduler.submit(reqs)
        except LengthError as e:
            tokens, prompt = fields or (None, None)
            raise RequestError(400, str(e), prompt if any(not r.prompt_ids for r in reqs) else tokens) from None

    def _wait(self, endpoint: str, seqs: list[Sequence]) -> list[SeqResult]:
        try:
            results = [s.result() for s in seqs]
        except GenerationFailed as e:
            for s in seqs:
                s.cancel()
            raise RequestError(500, str(e)) from None
        self._observe_seqs(endpoint, seqs, results)
        return results

    def _seed(self, seed: int | None) -> int:
        return int.from_bytes(os.urandom(7), "little") if seed is None else seed

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestError(404, f"model {model!r} not found; this server serves {self.model_name!r}", "model")

    # ---- Megatron PUT /api -------------------------------------------------------------------
    def api(self, body: dict | MegatronRequest) -> dict:
        return self.api_usage(body)[0]

    def api_usage(self, body: dict | MegatronRequest) -> tuple[dict, dict]:
        """(Megatron's response, its token usage)."""
        return self._observe("api", self._api, body)

    def _api(self, body: dict | MegatronRequest) -> tuple[dict, dict]:
        req = self._parse_api(body)
        results = self._wait("api", self._submit(self._api_requests(req), ("tokens_to_generate", "prompts")))
        texts, segments, logprobs, tokens = [], [], [], []
        for prompt, res in zip(req.prompts, results):
            ids = res.prompt_ids + res.token_ids
            texts.append(prompt + res.text)
            segments.append([self._piece(t) for t in ids])
            tokens.append(ids)
            if req.logprobs:
                logprobs.append((res.prompt_logprobs or []) + res.logprobs)
        return ({"text": texts, "segments": segments, "logprobs": logprobs if req.logprobs else None,
                 "tokens": tokens}, self._usage(results))

    def _parse_api(self, body: Any) -> MegatronRequest:
        req = parse(MegatronRequest, body, MESSAGES)
        self._check_model(req.model)
        if req.beam_width is not None:
            raise RequestError(422, "beam search is not supported by this server; remove beam_width to sample or "
                                    "decode greedily (top_k=1)", "beam_width")
        if req.stop_token is not None and req.stop_token >= self.engine.cfg.vocab_size:
            raise RequestError(400, f"stop_token must be a token id in [0, {self.engine.cfg.vocab_size})",
                               "stop_token")
        return req

    def _api_requests(self, req: MegatronRequest) -> list[SeqRequest]:
        stop_ids = tuple(self.engine.eos_ids) + (() if req.stop_token is None else (req.stop_token,))
        stop = ("\n\n",) if req.stop_on_double_eol else ("\n",) if req.stop_on_eol else ()
        colon, newline = (), ()
        if req.prevent_newline_after_colon:
            sp = self.engine.special_ids()
            colon, newline = sp["colon"], sp["newline"]
        base_seed = self._seed(req.random_seed)
        bos = self.tokenizer.bos_token_id
        reqs = []
        for i, p in enumerate(req.prompts):
            ids = self._encode(p)
            if req.add_BOS and bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            reqs.append(SeqRequest(
                prompt_ids=ids, max_new=req.tokens_to_generate, greedy=req.top_k == 1, temperature=req.temperature,
                top_k=req.top_k, top_p=req.top_p, top_p_decay=req.top_p_decay, top_p_bound=req.top_p_bound,
                seed=base_seed + i, stop_ids=stop_ids, stop=stop, include_stop=True, prompt_logprobs=req.logprobs,
                skip_special_tokens=False, colon_ids=colon, newline_ids=newline))
        return reqs

    # ---- OpenAI ------------------------------------------------------------------------------
    def model_card(self) -> dict:
        info = self.engine.info
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama-svc",
                "max_model_len": info.max_seq, "tensor_parallel_size": info.tp, "pipeline_parallel_size": info.pp,
                "dtype": info.dtype}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def _sampling(self, req, max_new: int | None, top_logprobs: int) -> dict:
        """SeqRequest fields common to completions and chat (``max_new`` None: as many as fit)."""
        self._check_model(req.model)
        self._check_ids(req.stop_token_ids or [], "stop_token_ids")
        bias = []
        for k, v in (req.logit_bias or {}).items():
            if not k.lstrip("-").isdigit():
                raise RequestError(400, f"logit_bias keys must be token ids (got {k!r})", "logit_bias")
            bias.append((int(k), float(v)))
        self._check_ids([t for t, _ in bias], "logit_bias")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        top_k = 0 if req.top_k is None else req.top_k
        stop_ids = tuple(req.stop_token_ids or ()) + (() if req.ignore_eos else tuple(self.engine.eos_ids))
        return dict(max_new=max_new, greedy=temperature == 0.0 or top_k == 1 or top_p == 0.0,
                    temperature=float(temperature) or 1.0, top_k=max(top_k, 0),
                    top_p=0.0 if top_p >= 1.0 else float(top_p), min_p=req.min_p, min_tokens=req.min_tokens,
                    stop_ids=stop_ids, stop=req.stops, include_stop=req.include_stop_str_in_output,
                    skip_special_tokens=req.skip_special_tokens, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                    logit_bias=tuple(bias), top_logprobs=top_logprobs)

    def _requests(self, prompts: list[list[int]], kw: dict, n: int, seed: int | None,
                  prompt_logprobs: bool) -> list[SeqRequest]:
        base = self._seed(seed)
        limit = min(self.engine.max_seq, self.engine.cfg.max_position_embeddings)
        reqs = []
        for p in prompts:
            k = dict(kw)
            if k["max_new"] is None:
                k["max_new"] = max(0, limit - len(p))
                if k["max_new"] == 0:
                    raise RequestError(400, f"the prompt has {len(p)} tokens, which fills the context "
                                            f"({self.engine.max_seq}); shorten it", "messages")
            for _ in range(n):
                reqs.append(SeqRequest(prompt_ids=p, seed=base + len(reqs), prompt_logprobs=prompt_logprobs, **k))
        return reqs

    @staticmethod
    def _usage(results: list[SeqResult]) -> dict:
        prompt = sum(len(r.prompt_ids) for r in results)
        gen = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen}

    # completions
    def _parse_completions(self, body: Any) -> tuple[list[SeqRequest], CompletionRequest, list[list[int]]]:
        req = parse(CompletionRequest, body)
        kw = self._sampling(req, req.new_tokens(), req.logprobs or 0)
        ids = []
        for p in req.prompt_list():
            if isinstance(p, str):
                ids.append(self._encode(p))
            else:
                self._check_ids(p, "prompt")
                ids.append(list(p))
        if req.echo and req.new_tokens() == 0 and any(len(p) == 0 for p in ids):
            raise RequestError(400, "an empty prompt cannot be scored", "prompt")
        return self._requests(ids, kw, req.n, req.seed, req.logprobs is not None and req.echo), req, ids

    def _prompt_text(self, req: CompletionRequest, i: int, ids: list[list[int]]) -> str:
        p = req.prompt_list()[i]
        return p if isinstance(p, str) else self.tokenizer.decode(ids[i], skip_special_tokens=False)

    def completions(self, body: dict | CompletionRequest) -> dict:
        return self._observe("completions", self._completions, body)

    def _completions(self, body: Any) -> dict:
        reqs, req, ids = self._parse_completions(body)
        results = self._wait("completions", self._submit(reqs, _fields(req)))
        choices = []
        for i, res in enumerate(results):
            prompt = self._prompt_text(req, i // req.n, ids) if req.echo else ""
            choices.append({"index": i, "text": prompt + res.text, "finish_reason": res.finish_reason,
                            "logprobs": self._completion_logprobs(res, req)})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(results)}

    def _tops(self, alts: list[tuple[int, float]] | None) -> dict[str, float] | None:
        if alts is None:
            return None
        out: dict[str, float] = {}
        for t, v in alts:  # pieces that decode alike keep the likelier one
            out.setdefault(self._piece(t), v)
        return out

    def _completion_logprobs(self, res: SeqResult, req: CompletionRequest) -> dict | None:
        if req.logprobs is None:
            return None
        ids, lps = list(res.token_ids), list(res.logprobs)
        tops = list(res.top_logprobs or [[] for _ in ids])
        if req.echo:
            ids = res.prompt_ids + ids
            lps = [None] + (res.prompt_logprobs or []) + lps
            tops = [None] + (res.prompt_top_logprobs or [[] for _ in res.prompt_ids[1:]]) + tops
        return self._logprob_block(ids, lps, tops, req.logprobs)

    def _logprob_block(self, ids, lps, tops, k: int) -> dict:
        tokens = [self._piece(t) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        top = [self._tops(a) for a in tops] if k > 0 else None
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}

    def stream_completions(self, body: dict | CompletionRequest) -> Iterator[dict]:
        reqs, req, ids = self._observe("completions_stream", self._parse_completions, body)
        seqs = self._submit(reqs, _fields(req))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, text, finish=None, logprobs=None):
            return {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        def gen():
            if req.echo:
                for i in range(len(seqs)):
                    yield chunk(i, self._prompt_text(req, i // req.n, ids))
            done: dict[int, SeqResult] = {}
            for i, item in self._merge("completions_stream", seqs, done):
                if isinstance(item, Delta):
                    lp = None
                    if req.logprobs is not None:
                        lp = self._logprob_block(item.token_ids, item.logprobs,
                                                 item.top_logprobs or [[] for _ in item.token_ids], req.logprobs)
                    if item.text or lp is not None:
                        yield chunk(i, item.text, logprobs=lp)
                else:
                    yield chunk(i, "", item.finish_reason)
            if req.include_usage:
                yield {**chunk(0, ""), "choices": [], "usage": self._usage(list(done.values()))}
        return gen()

    # chat
    def _chat_prompt(self, req: ChatRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        norm = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        try:
            with self._tok_lock:
                text = self.tokenizer.apply_chat_template(norm, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject roles or orderings
            raise RequestError(400, f"the chat template rejected the messages: {e}", "messages") from None
        return self._encode(text, add_special_tokens=False)

    def _parse_chat(self, body: Any) -> tuple[list[SeqRequest], ChatRequest]:
        req = parse(ChatRequest, body)
        k = (req.top_logprobs or 0) if req.logprobs else 0
        kw = self._sampling(req, req.new_tokens(), k)
        return self._requests([self._chat_prompt(req)], kw, req.n, req.seed, False), req

    def _chat_logprobs(self, ids, lps, tops) -> dict:
        def entry(t, v):
            piece = self._piece(t)
            return {"token": piece, "logprob": v, "bytes": list(piece.encode())}

        return {"content": [{**entry(t, v), "top_logprobs": [entry(a, av) for a, av in (alts or [])]}
                            for t, v, alts in zip(ids, lps, tops or [None] * len(ids))]}

    def chat_completions(self, body: dict | ChatRequest) -> dict:
        return self._observe("chat", self._chat_completions, body)

    def _chat_completions(self, body: Any) -> dict:
        reqs, req = self._parse_chat(body)
        results = self._wait("chat", self._submit(reqs, _fields(req)))
        choices = []
        for i, res in enumerate(results):
            lp = self._chat_logprobs(res.token_ids, res.logprobs, res.top_logprobs) if req.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": res.text},
                            "finish_reason": res.finish_reason, "logprobs": lp})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(results)}

    def stream_chat(self, body: dict | ChatRequest) -> Iterator[dict]:
        reqs, req = self._observe("chat_stream", self._parse_chat, body)
        seqs = self._submit(reqs, _fields(req))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, delta, finish=None, logprobs=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        def gen():
            for i in range(len(seqs)):
                yield chunk(i, {"role": "assistant", "content": ""})
            done: dict[int, SeqResult] = {}
            for i, item in self._merge("chat_stream", seqs, done):
                if isinstance(item, Delta):
                    lp = (self._chat_logprobs(item.token_ids, item.logprobs, item.top_logprobs or None)
                          if req.logprobs else None)
                    if item.text or lp is not None:
                        yield chunk(i, {"content": item.text}, logprobs=lp)
                else:
                    yield chunk(i, {}, item.finish_reason)
            if req.include_usage:
                yield {**chunk(0, {}), "choices": [], "usage": self._usage(list(done.values()))}
        return gen()

    def _merge(self, endpoint: str, seqs: list[Sequence],
               results: dict[int, SeqResult]) -> Iterator[tuple[int, Delta | SeqResult]]:
        """Events of the sequences as they come; the finished ones land in ``results``."""
        for i, item in _merge(seqs):
            if isinstance(item, SeqResult):
                results[i] = item
            yield i, item
        self._observe_seqs(endpoint, seqs, [results[i] for i in range(len(seqs))])


def _fields(req: CompletionRequest | ChatRequest) -> tuple[str, str]:
    return req.tokens_field, req.PROMPT_FIELD


def _merge(seqs: list[Sequence]) -> Iterator[tuple[int, Delta | SeqResult]]:
    """Events of several sequences as they come; cancels them all if the consumer stops early."""
    iters = {i: s.events() for i, s in enumerate(seqs)}
    try:
        if len(seqs) == 1:
            for item in iters[0]:
                yield 0, item
            return
        import queue as _q

        pending = dict(iters)
        while pending:
            progressed = False
            for i in list(pending):
                try:
                    item = seqs[i]._events.get_nowait()
                except _q.Empty:
                    continue
                progressed = True
                if isinstance(item, BaseException):
                    raise item
                yield i, item
                if isinstance(item, SeqResult):
                    del pending[i]
            if not progressed:
                time.sleep(0.005)
    except GenerationFailed as e:
        raise RequestError(500, str(e)) from None
    finally:
        for s in seqs:
            if not s.finished:
                s.cancel()
