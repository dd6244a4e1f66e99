"""Generate-queue work: relayed generation requests and batch generation jobs.

Relay protocol: the gateway publishes ``generate.request(request, reply_key, deadline)``;
this worker answers on the Redis list ``reply_key``: ``{"response": ...}`` once, or for streams
``{"chunk": ...}`` per chunk then ``{"done": true}``; failures as ``{"error": {"status", "message"}}``.

A backend implements ``handle(request) -> response`` and ``stream(request) -> iterator of chunk
dicts``, where ``request = {"api": "megatron" | "completions" | "chat", "team", "model", "body"}``
and responses follow the Megatron ``PUT /api`` and OpenAI shapes. The worker runs with the solo
pool (no fork), so models it loads stay warm across requests, evicted least-recently-used by
memory (``LLAMA_SVC_MODEL_CACHE_BYTES``). The backend is ``shared.inference`` when that package
offers ``make_backend(checkpoints, cache_dir, max_bytes)``; otherwise the transformers backend
below (exports a native checkpoint to HF once, then decodes with HF's model and a KV cache).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Protocol

from services.worker import JobCancelled, Job, JobContext, app, checkpoint_store, job_task, settings
from shared.jobs.transport import GENERATE_REQUEST
from shared.storage import CheckpointNotFound

log = logging.getLogger("llama_svc.generate")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Backend(Protocol):
    def handle(self, request: dict) -> dict: ...

    def stream(self, request: dict) -> Iterator[dict]: ...


_backend: Backend | None = None
_lock = threading.Lock()


def get_backend() -> Backend:
    global _backend
    with _lock:
        if _backend is None:
            cache = settings.data_dir / "model-cache"
            try:
                from shared.inference import make_backend  # the engine, when present
            except ImportError:
                make_backend = None
            if make_backend is not None:
                _backend = make_backend(checkpoint_store(), cache, settings.model_cache_bytes)
            else:
                _backend = TransformersBackend(cache, settings.model_cache_bytes)
        return _backend


# ---------------------------------------------------------------- relay task
@app.task(name=GENERATE_REQUEST, acks_late=False, ignore_result=True)
def generate_request(request: dict, reply_key: str, deadline: float) -> None:
    import redis

    r = _redis()
    if time.time() > deadline:
        return  # the gateway already gave up on this request
    t0 = time.perf_counter()
    try:
        backend = get_backend()
        if request.get("body", {}).get("stream"):
            for chunk in backend.stream(request):
                r.rpush(reply_key, json.dumps({"chunk": chunk}))
            r.rpush(reply_key, json.dumps({"done": True, "worker_ms": (time.perf_counter() - t0) * 1e3}))
        else:
            resp = backend.handle(request)
            r.rpush(reply_key, json.dumps({"response": resp, "worker_ms": (time.perf_counter() - t0) * 1e3}))
    except RequestError as e:
        r.rpush(reply_key, json.dumps({"error": {"status": e.status, "message": e.message}}))
    except CheckpointNotFound:
        r.rpush(reply_key, json.dumps({"error": {"status": 404, "message": f"model {request.get('model')!r} not found"}}))
    except (ValueError, TypeError) as e:
        r.rpush(reply_key, json.dumps({"error": {"status": 400, "message": str(e)}}))
    except Exception as e:
        log.exception("generation failed")
        r.rpush(reply_key, json.dumps({"error": {"status": 500, "message": f"{type(e).__name__}: {e}"}}))
    finally:
        try:
            r.expire(reply_key, 120)
        except redis.RedisError:
            pass


_r = None


def _redis():
    global _r
    if _r is None:
        import redis

        _r = redis.Redis.from_url(settings.redis_url)
    return _r


# ---------------------------------------------------------------- batch generation job
@job_task("generate")
def generate_job(job: Job, ctx: JobContext) -> dict:
    """Prompts run one request at a time so a cancel takes effect between them."""
    p = job.params
    body = {k: v for k, v in p.items() if k not in ("model", "kind")}
    prompts, texts = body.pop("prompts"), []
    backend = get_backend()
    for i, prompt in enumerate(prompts):
        if ctx.should_cancel():
            raise JobCancelled("cancelled")
        out = backend.handle({"api": "megatron", "team": job.team, "model": p["model"],
                              "body": {**body, "prompts": [prompt]}})
        texts.append(out["text"][0])
        ctx.store.set_progress(job.id, job.attempts, {"phase": "generate", "current": i + 1, "total": len(prompts),
                                                      "unit": "prompts"})
    return {"text": texts}


# ---------------------------------------------------------------- the transformers backend
class ModelCache:
    """LRU of loaded models, bounded by the bytes of their weights."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.items = max_bytes, OrderedDict()

    def get(self, key, load):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        value, size = load()
        while self.items and sum(s for _, s in self.items.values()) + size > self.max_bytes:
            old, _ = self.items.popitem(last=False)
            log.info("evicted model %s from memory", old)
        self.items[key] = (value, size)
        return value


class TransformersBackend:
    def __init__(self, cache_dir: Path, max_bytes: int):
        self.cache_dir, self.models = Path(cache_dir), ModelCache(max_bytes)

    # -- loading
    def _load(self, team: str, name: str):
        store = checkpoint_store()
        try:
            manifest = store.manifest(team, name)
        except ValueError as e:
            raise RequestError(404, f"model {name!r} not found ({e})") from None
        key = (team, name, manifest["storage"]["committed_at"])
        return self.models.get(key, lambda: self._load_files(team, name, manifest))

    def _load_files(self, team: str, name: str, manifest: dict):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        store = checkpoint_store()
        base = self.cache_dir / team / name
        src = store.fetch(team, name, base / "files")
        if (src / "config.json").exists():
            hf_dir = src
        else:  # a native checkpoint: export it to HF once (cached beside it)
            hf_dir = base / "hf"
            if not (hf_dir / "config.json").exists():
                from shared.checkpoint.convert import ConvertOptions, convert

                convert(ConvertOptions(load_dir=src, save_dir=hf_dir, loader="mcore", saver="hf", overwrite=True,
                                      validate=False))
        tok = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        return (model, tok), size

    # -- decoding
    def _tokens(self, model, tok, ids: list[int], body: dict, max_new: int, stop_ids: set[int]) -> Iterator[int]:
        import torch

        gen = torch.Generator().manual_seed(int(body["random_seed"])) if body.get("random_seed") is not None else None
        temperature = float(body.get("temperature") or 1.0)
        top_k, top_p = int(body.get("top_k") or 0), float(body.get("top_p") or 0.0)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(max_new):
                logits = out.logits[0, -1].float()
                if top_k == 1:
                    nxt = int(logits.argmax())
                else:
                    logits = logits / temperature
                    if top_k > 1:
                        kth = torch.topk(logits, top_k).values[-1]
                        logits[logits < kth] = float("-inf")
                    probs = torch.softmax(logits, -1)
                    if 0 < top_p < 1:
                        sp, si = torch.sort(probs, descending=True)
                        drop = sp.cumsum(0) - sp > top_p
                        sp[drop] = 0
                        probs = torch.zeros_like(probs).scatter(0, si, sp)
                    nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
                yield nxt
                if nxt in stop_ids:
                    return
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)

    @staticmethod
    def _logprobs(model, ids: list[int]) -> list[float]:
        import torch

        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        return lp.tolist()

    def _stop_ids(self, tok, body: dict) -> set[int]:
        if body.get("ignore_eos"):
            return set()
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        return ids | set(body.get("stop_token_ids") or [])

    def _prompt_ids(self, tok, request: dict) -> list[int]:
        body = request["body"]
        if request["api"] == "chat":
            return list(tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
        return list(tok(body["prompt"] if request["api"] == "completions" else body["prompts"][0]).input_ids)

    def handle(self, request: dict) -> dict:
        if request["api"] == "megatron":
            return self._megatron(request)
        chunks = list(self.stream({**request, "body": {**request["body"], "stream": True}}))
        text = "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
                       for c in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"] if chunks else "length"
        usage = chunks[-1].get("usage") if chunks else None
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        if request["api"] == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            obj = "chat.completion"
        else:
            choice["text"] = text
            obj = "text_completion"
        return {"id": chunks[0]["id"] if chunks else f"cmpl-{uuid.uuid4().hex}", "object": obj,
                "created": int(time.time()), "model": request["model"], "choices": [choice], "usage": usage}

    def _megatron(self, request: dict) -> dict:
        body = request["body"]
        model, tok = self._load(request["team"], request["model"])
        texts, segments, logprobs = [], [], []
        for prompt in body["prompts"]:
            ids = list(tok(prompt).input_ids)
            new = list(self._tokens(model, tok, ids, body, int(body.get("tokens_to_generate", 64)),
                                    self._stop_ids(tok, body)))
            full = ids + new
            texts.append(tok.decode(full, skip_special_tokens=True))
            segments.append([tok.decode([t]) for t in full])
            if body.get("logprobs"):
                logprobs.append(self._logprobs(model, full))
        return {"text": texts, "segments": segments, "logprobs": logprobs if body.get("logprobs") else None}

    def stream(self, request: dict) -> Iterator[dict]:
        body, api = request["body"], request["api"]
        model, tok = self._load(request["team"], request["model"])
        ids = self._prompt_ids(tok, request)
        stops = [body["stop"]] if isinstance(body.get("stop"), str) else list(body.get("stop") or [])
        max_new = int(body.get("max_tokens") or 16)
        cid, created = f"{'chatcmpl' if api == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        greedy = body.get("temperature") == 0  # OpenAI's temperature 0 means greedy
        sampling = {**body, "top_k": 1 if greedy else body.get("top_k", 0), "random_seed": body.get("seed"),
                    "temperature": body.get("temperature") or 1.0}

        def chunk(text: str | None, finish: str | None, usage=None) -> dict:
            c = {"index": 0, "finish_reason": finish, "logprobs": None}
            if api == "chat":
                c["delta"] = {"content": text} if text is not None else {}
            else:
                c["text"] = text or ""
            out = {"id": cid, "object": "chat.completion.chunk" if api == "chat" else "text_completion",
                   "created": created, "model": request["model"], "choices": [c]}
            if usage:
                out["usage"] = usage
            return out

        if api == "chat":
            yield {**chunk(None, None), "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        new, sent, finish, cut = [], "", "length", False
        for t in self._tokens(model, tok, ids, sampling, max_new, self._stop_ids(tok, body)):
            if t in self._stop_ids(tok, body):
                finish = "stop"
                break
            new.append(t)
            text = tok.decode(new, skip_special_tokens=True)
            hit = min((text.find(s) for s in stops if s and s in text), default=-1)
            if hit >= 0:
                if hit > len(sent):
                    yield chunk(text[len(sent):hit], None)
                finish, sent, cut = "stop", text[:hit], True
                break
            # hold back a tail that could still grow into a stop string
            hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = text[:len(text) - hold]
            if len(safe) > len(sent) and not safe.endswith("\ufffd"):
                yield chunk(safe[len(sent):], None)
                sent = safe
        if not cut:
            text = tok.decode(new, skip_special_tokens=True)
            if len(text) > len(sent):
                yield chunk(text[len(sent):], None)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)}
        yield chunk(None if api == "chat" else "", finish, usage)
