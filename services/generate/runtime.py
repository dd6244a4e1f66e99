"""One served checkpoint: engine + scheduler + the request formats (Megatron PUT /api, OpenAI).

``GenerationRuntime`` is what the standalone server and the generate worker wrap. It is
thread-safe: handler threads validate and tokenize, then submit sequences; one scheduler
thread drives the ranks. Validation happens before anything is queued, so a bad request can
never reach the ranks.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.inference.engine import Engine, LengthError
from shared.inference.scheduler import (Delta, GenerationFailed, Overloaded, Scheduler, SeqRequest, SeqResult,
                                        Sequence)

__all__ = ["GenerationRuntime", "Overloaded", "RequestError"]

MAX_PROMPTS = 128
MAX_N = 16
MAX_SEED = 2**63 - 1   # per-sequence seeds (seed + i) stay within a generator's 64-bit range


class RequestError(Exception):
    """A request the server refuses: ``status_code`` (400, 404, 422, 500, 503) and a message."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code, self.message = status_code, message


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(message: str, status: int = 400) -> RequestError:
    return RequestError(status, message)


class GenerationRuntime:
    def __init__(self, load: str | Path, tensor_parallel_size: int | None = None,
                 pipeline_parallel_size: int | None = None, dtype: str | None = None, max_batch: int = 8,
                 max_queue: int = 256, max_seq_len: int | None = None, steps_per_plan: int = 8,
                 in_process: bool | None = None, model_name: str | None = None, threads: int = 1):
        self.engine = Engine(load, tensor_parallel_size, pipeline_parallel_size, dtype, max_batch=max_batch,
                             max_seq_len=max_seq_len, in_process=in_process, threads=threads)
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
        self._m_latency = Histogram("generate_request_seconds", "Request latency", ["endpoint"], registry=r)
        Gauge("generate_queue_depth", "Sequences waiting for a cache row", registry=r).set_function(
            lambda: self.scheduler.queued)
        Gauge("generate_running_sequences", "Sequences in the batch", registry=r).set_function(
            lambda: self.scheduler.running)
        st = self.scheduler.stats
        Gauge("generate_generated_tokens", "Tokens generated since start", registry=r).set_function(
            lambda: st.generated_tokens)
        Gauge("generate_prompt_tokens", "Prompt tokens prefilled since start", registry=r).set_function(
            lambda: st.prompt_tokens)
        Gauge("generate_engine_failures", "Plans that failed on the ranks", registry=r).set_function(
            lambda: st.engine_failures)
        Gauge("generate_engine_busy_seconds", "Time spent running plans", registry=r).set_function(
            lambda: st.busy_s)

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

    def _submit(self, reqs: list[SeqRequest]) -> list[Sequence]:
        if self._closed:
            raise RequestError(503, "the model is not loaded")
        try:
            return self.scheduler.submit(reqs)
        except LengthError as e:
            raise RequestError(400, str(e)) from None

    @staticmethod
    def _wait(seqs: list[Sequence]) -> list[SeqResult]:
        try:
            return [s.result() for s in seqs]
        except GenerationFailed as e:
            for s in seqs:
                s.cancel()
            raise RequestError(500, str(e)) from None

    def _seed(self, seed: int | None) -> int:
        return int.from_bytes(os.urandom(7), "little") if seed is None else seed

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(404, f"model {model!r} not found; this server serves {self.model_name!r}")

    # ---- Megatron PUT /api -------------------------------------------------------------------
    def api(self, body: dict) -> dict:
        return self._observe("api", self._api, body)

    def _api(self, body: dict) -> dict:
        reqs, opts = self._parse_api(body)
        results = self._wait(self._submit(reqs))
        tok = self.tokenizer
        texts, segments, logprobs = [], [], []
        for prompt, res in zip(opts["prompts"], results):
            ids = res.prompt_ids + res.token_ids
            texts.append(prompt + res.text)
            segments.append([tok.decode([t], skip_special_tokens=False) for t in ids])
            if opts["logprobs"]:
                logprobs.append((res.prompt_logprobs or []) + res.logprobs)
        return {"text": texts, "segments": segments, "logprobs": logprobs if opts["logprobs"] else None}

    def _parse_api(self, body: Any) -> tuple[list[SeqRequest], dict]:
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        if "prompts" not in body:
            raise _bad("prompts argument required")
        if "max_len" in body:
            raise _bad("max_len is no longer used.  Replace with tokens_to_generate")
        if "sentences" in body:
            raise _bad("sentences is no longer used.  Replace with prompts")
        prompts = body["prompts"]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise _bad("prompts is not a list of strings")
        if len(prompts) == 0:
            raise _bad("prompts is empty")
        if len(prompts) > MAX_PROMPTS:
            raise _bad(f"Maximum number of prompts is {MAX_PROMPTS}")
        n = body.get("tokens_to_generate", 64)
        if not _is_int(n) or n < 0:
            raise _bad("tokens_to_generate must be an integer greater than or equal to 0")
        logprobs = body.get("logprobs", False)
        if not isinstance(logprobs, bool):
            raise _bad("logprobs must be a boolean value")
        if n == 0 and not logprobs:
            raise _bad("tokens_to_generate=0 implies logprobs should be True")
        temperature = body.get("temperature", 1.0)
        if not _is_num(temperature) or not 0.0 < temperature <= 100.0:
            raise _bad("temperature must be a positive number less than or equal to 100.0")
        top_k = body.get("top_k", 0)
        if not _is_int(top_k) or not 0 <= top_k <= 1000:
            raise _bad("top_k must be an integer equal to or greater than 0 and less than or equal to 1000")
        top_p = body.get("top_p", 0.0)
        if not _is_num(top_p) or not 0.0 <= top_p <= 1.0:
            raise _bad("top_p must be a positive float less than or equal to 1.0")
        if top_p > 0.0 and top_k > 0:
            raise _bad("cannot set both top-k and top-p samplings.")
        decay = body.get("top_p_decay", 0.0)
        if "top_p_decay" in body:
            if not _is_num(decay) or not 0.0 <= decay <= 1.0:
                raise _bad("top_p_decay must be a positive float less than or equal to 1.0")
            if top_p == 0.0:
                raise _bad("top_p_decay cannot be set without top_p")
        bound = body.get("top_p_bound", 0.0)
        if "top_p_bound" in body:
            if not _is_num(bound):
                raise _bad("top_p_bound must be a positive float less than or equal to top_p")
            if top_p == 0.0:
                raise _bad("top_p_bound cannot be set without top_p")
            if not 0.0 < bound <= top_p:
                raise _bad("top_p_bound must be greater than 0 and less than top_p")
        flags = {}
        for name in ("add_BOS", "stop_on_double_eol", "stop_on_eol", "prevent_newline_after_colon", "no_log"):
            flags[name] = body.get(name, False)
            if not isinstance(flags[name], bool):
                raise _bad(f"{name} must be a boolean value")
        if any(len(p) == 0 for p in prompts) and not flags["add_BOS"]:
            raise _bad("Empty prompts require add_BOS=true")
        seed = body.get("random_seed")
        if seed is not None:
            if not _is_int(seed):
                raise _bad("random_seed must be integer")
            if seed < 0:
                raise _bad("random_seed must be a positive integer")
            if seed > MAX_SEED:
                raise _bad(f"random_seed must be at most {MAX_SEED} (2^63-1)")
        if "beam_width" in body:
            bw = body["beam_width"]
            if not _is_int(bw):
                raise _bad("beam_width must be integer")
            if bw < 1:
                raise _bad("beam_width must be an integer > 1")
            if len(prompts) > 1:
                raise _bad("When doing beam_search, batch size must be 1")
            raise _bad("beam search is not supported by this server; remove beam_width to sample or decode "
                       "greedily (top_k=1)", 422)
        stop_ids = tuple(self.engine.eos_ids)
        if "stop_token" in body:
            st = body["stop_token"]
            if not _is_int(st):
                raise _bad("stop_token must be an integer")
            if not 0 <= st < self.engine.cfg.vocab_size:
                raise _bad(f"stop_token must be a token id in [0, {self.engine.cfg.vocab_size})")
            stop_ids += (st,)
        if "length_penalty" in body and not isinstance(body["length_penalty"], float):
            raise _bad("length_penalty must be a float")
        stop = ("\n\n",) if flags["stop_on_double_eol"] else ("\n",) if flags["stop_on_eol"] else ()
        colon, newline = (), ()
        if flags["prevent_newline_after_colon"]:
            sp = self.engine.special_ids()
            colon, newline = sp["colon"], sp["newline"]
        base_seed = self._seed(seed)
        bos = self.tokenizer.bos_token_id
        reqs = []
        for i, p in enumerate(prompts):
            ids = self._encode(p)
            if flags["add_BOS"] and bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            reqs.append(SeqRequest(
                prompt_ids=ids, max_new=n, greedy=top_k == 1, temperature=float(temperature), top_k=top_k,
                top_p=float(top_p), top_p_decay=float(decay), top_p_bound=float(bound), seed=base_seed + i,
                stop_ids=stop_ids, stop=stop, include_stop=True, prompt_logprobs=logprobs,
                skip_special_tokens=False, colon_ids=colon, newline_ids=newline))
        return reqs, {"prompts": prompts, "logprobs": logprobs}

    # ---- OpenAI ------------------------------------------------------------------------------
    def models(self) -> dict:
        info = self.engine.info
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama-svc",
            "max_model_len": info.max_seq, "tensor_parallel_size": info.tp, "pipeline_parallel_size": info.pp,
            "dtype": info.dtype}]}

    def _sampling(self, body: dict, chat: bool) -> tuple[dict, dict]:
        """Common OpenAI sampling fields -> (SeqRequest kwargs, response options)."""
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        self._check_model(body)
        max_tokens = body.get("max_completion_tokens") if chat else None
        max_tokens = body.get("max_tokens", 16 if not chat else None) if max_tokens is None else max_tokens
        if max_tokens is None:
            max_tokens = self.engine.max_seq  # chat default: as much as fits (trimmed per prompt)
            fit = True
        else:
            fit = False
            if not _is_int(max_tokens) or max_tokens < 0:
                raise _bad("max_tokens must be an integer >= 0")
        temperature = body.get("temperature", 1.0)
        temperature = 1.0 if temperature is None else temperature
        if not _is_num(temperature) or not 0.0 <= temperature <= 100.0:
            raise _bad("temperature must be a number between 0 and 100")
        top_p = body.get("top_p", 1.0)
        top_p = 1.0 if top_p is None else top_p
        if not _is_num(top_p) or not 0.0 < top_p <= 1.0:
            raise _bad("top_p must be a number in (0, 1]")
        top_k = body.get("top_k", 0)
        top_k = 0 if top_k is None else top_k
        if not _is_int(top_k) or top_k < -1:
            raise _bad("top_k must be an integer >= -1 (-1 or 0: no top-k filtering)")
        min_p = body.get("min_p", 0.0)
        if not _is_num(min_p) or not 0.0 <= min_p <= 1.0:
            raise _bad("min_p must be a number in [0, 1]")
        n = body.get("n", 1)
        n = 1 if n is None else n
        if not _is_int(n) or not 1 <= n <= MAX_N:
            raise _bad(f"n must be an integer between 1 and {MAX_N}")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise _bad("stop must be a non-empty string or a list of at most 16 non-empty strings")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < self.engine.cfg.vocab_size
                                                     for t in stop_ids):
            raise _bad(f"stop_token_ids must be a list of token ids in [0, {self.engine.cfg.vocab_size})")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
            raise _bad(f"seed must be an integer between 0 and {MAX_SEED} (2^63-1)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = body.get(name)
            if v is not None and (not _is_num(v) or v != 0):
                raise _bad(f"{name} is not supported by this server (only 0)", 422)
        rp = body.get("repetition_penalty")
        if rp is not None and (not _is_num(rp) or rp != 1):
            raise _bad("repetition_penalty is not supported by this server (only 1.0)", 422)
        if body.get("logit_bias"):
            raise _bad("logit_bias is not supported by this server", 422)
        bools = {}
        for name, default in (("stream", False), ("ignore_eos", False), ("echo", False),
                              ("include_stop_str_in_output", False), ("skip_special_tokens", True)):
            bools[name] = body.get(name, default)
            bools[name] = default if bools[name] is None else bools[name]
            if not isinstance(bools[name], bool):
                raise _bad(f"{name} must be a boolean")
        min_tokens = body.get("min_tokens", 0) or 0
        if not _is_int(min_tokens) or min_tokens < 0 or (not fit and min_tokens > max_tokens):
            raise _bad("min_tokens must be an integer between 0 and max_tokens")
        ids = tuple(stop_ids) + (() if bools["ignore_eos"] else tuple(self.engine.eos_ids))
        kw = dict(max_new=max_tokens, greedy=temperature == 0.0 or top_k == 1,
                  temperature=float(temperature) or 1.0, top_k=max(top_k, 0),
                  top_p=0.0 if top_p >= 1.0 else float(top_p), min_p=float(min_p), min_tokens=min_tokens,
                  stop_ids=ids, stop=tuple(stop), include_stop=bools["include_stop_str_in_output"],
                  skip_special_tokens=bools["skip_special_tokens"])
        return kw, {"n": n, "seed": seed, "fit": fit, **bools}

    def _requests(self, prompts: list[list[int]], kw: dict, opts: dict, logprobs: bool) -> list[SeqRequest]:
        base = self._seed(opts["seed"])
        reqs = []
        for p in prompts:
            k = dict(kw)
            if opts["fit"]:
                k["max_new"] = max(0, min(self.engine.max_seq, self.engine.cfg.max_position_embeddings) - len(p))
                if k["max_new"] == 0:
                    raise _bad(f"the prompt has {len(p)} tokens, which fills the context "
                               f"({self.engine.max_seq}); shorten it")
            for i in range(opts["n"]):
                reqs.append(SeqRequest(prompt_ids=p, seed=base + len(reqs), prompt_logprobs=logprobs and opts["echo"],
                                       **k))
        return reqs

    # completions
    def _parse_completions(self, body: Any) -> tuple[list[SeqRequest], dict, list[str]]:
        kw, opts = self._sampling(body, chat=False)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            texts = prompt
        else:
            raise _bad("prompt must be a string or a non-empty list of strings")
        if len(texts) > MAX_PROMPTS:
            raise _bad(f"at most {MAX_PROMPTS} prompts per request")
        if body.get("suffix"):
            raise _bad("suffix is not supported by this server", 422)
        lp = body.get("logprobs")
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= 5):
            raise _bad("logprobs must be an integer between 0 and 5")
        opts["logprobs"] = lp
        ids = [self._encode(t) for t in texts]
        if opts["echo"] and kw["max_new"] == 0 and any(len(p) == 0 for p in ids):
            raise _bad("an empty prompt cannot be scored")
        return self._requests(ids, kw, opts, lp is not None), opts, texts

    def completions(self, body: dict) -> dict:
        return self._observe("completions", self._completions, body)

    def _completions(self, body: dict) -> dict:
        reqs, opts, texts = self._parse_completions(body)
        results = self._wait(self._submit(reqs))
        choices = []
        for i, res in enumerate(results):
            prompt = texts[i // opts["n"]]
            text = (prompt + res.text) if opts["echo"] else res.text
            choices.append({"index": i, "text": text, "finish_reason": res.finish_reason,
                            "logprobs": self._completion_logprobs(res, opts, prompt)})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(results)}

    def _completion_logprobs(self, res: SeqResult, opts: dict, prompt: str) -> dict | None:
        if opts["logprobs"] is None:
            return None
        tok = self.tokenizer
        ids, lps = list(res.token_ids), list(res.logprobs)
        if opts["echo"]:
            ids = res.prompt_ids + ids
            lps = [None] + (res.prompt_logprobs or []) + lps
        tokens = [tok.decode([t], skip_special_tokens=False) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        top = ([None if lp is None else {t: lp} for t, lp in zip(tokens, lps)] if opts["logprobs"] > 0 else None)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}

    @staticmethod
    def _usage(results: list[SeqResult]) -> dict:
        prompt = sum(len(r.prompt_ids) for r in results)
        gen = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen}

    def stream_completions(self, body: dict) -> Iterator[dict]:
        reqs, opts, texts = self._observe("completions_stream", self._parse_completions, body)
        seqs = self._submit(reqs)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, text, finish=None):
            return {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}

        def gen():
            if opts["echo"]:
                for i in range(len(seqs)):
                    yield chunk(i, texts[i // opts["n"]])
            for i, item in _merge(seqs):
                if isinstance(item, Delta):
                    yield chunk(i, item.text)
                else:
                    yield chunk(i, "", item.finish_reason)
        return gen()

    # chat
    def _chat_prompt(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise _bad("messages must be a non-empty list of {role, content} objects")
        norm = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad("every message needs a string role and a content")
            content = m.get("content")
            if isinstance(content, list):
                parts = [p.get("text") for p in content if isinstance(p, dict)]
                if not all(isinstance(p, str) for p in parts) or any(p.get("type") != "text" for p in content):
                    raise _bad("only text content parts are supported")
                content = "".join(parts)
            if not isinstance(content, str):
                raise _bad("message content must be a string or a list of text parts")
            norm.append({"role": m["role"], "content": content})
        if not getattr(self.tokenizer, "chat_template", None):
            raise _bad("this model's tokenizer has no chat template; use /v1/completions", 400)
        try:
            with self._tok_lock:
                text = self.tokenizer.apply_chat_template(norm, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject roles or orderings
            raise _bad(f"the chat template rejected the messages: {e}") from None
        return self._encode(text, add_special_tokens=False)

    def _parse_chat(self, body: Any) -> tuple[list[SeqRequest], dict]:
        kw, opts = self._sampling(body, chat=True)
        lp = body.get("logprobs", False)
        lp = False if lp is None else lp
        if not isinstance(lp, bool):
            raise _bad("logprobs must be a boolean")
        opts["logprobs"] = lp
        opts["echo"] = False
        ids = self._chat_prompt(body.get("messages"))
        return self._requests([ids], kw, opts, False), opts

    def chat_completions(self, body: dict) -> dict:
        return self._observe("chat", self._chat_completions, body)

    def _chat_completions(self, body: dict) -> dict:
        reqs, opts = self._parse_chat(body)
        results = self._wait(self._submit(reqs))
        tok = self.tokenizer
        choices = []
        for i, res in enumerate(results):
            lp = None
            if opts["logprobs"]:
                lp = {"content": [{"token": tok.decode([t], skip_special_tokens=False), "logprob": v,
                                   "bytes": list(tok.decode([t], skip_special_tokens=False).encode()),
                                   "top_logprobs": []}
                                  for t, v in zip(res.token_ids, res.logprobs)]}
            choices.append({"index": i, "message": {"role": "assistant", "content": res.text},
                            "finish_reason": res.finish_reason, "logprobs": lp})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(results)}

    def stream_chat(self, body: dict) -> Iterator[dict]:
        reqs, opts = self._observe("chat_stream", self._parse_chat, body)
        seqs = self._submit(reqs)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def gen():
            for i in range(len(seqs)):
                yield chunk(i, {"role": "assistant", "content": ""})
            for i, item in _merge(seqs):
                if isinstance(item, Delta):
                    yield chunk(i, {"content": item.text})
                else:
                    yield chunk(i, {}, item.finish_reason)
        return gen()


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
