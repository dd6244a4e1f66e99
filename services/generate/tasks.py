"""Generate-queue work: relayed generation requests and batch generation jobs.

Relay protocol (``shared.protocol.relay``): the gateway publishes
``generate.request(RelayRequest, reply_key, deadline)``; this worker answers on the Redis list
``reply_key`` with ``RelayReply`` messages: ``response`` once, or for streams ``chunk`` per chunk
then ``done``; failures as ``error``. ``cache`` is ``"hit"`` when the model was already warm,
``"miss"`` when this request loaded it.

Concurrency. The worker runs Celery's solo pool: messages are executed inline, one at a time,
in the worker's main thread. A relay task therefore only hands its request to a thread pool
(``RELAY_THREADS`` threads) and returns at once, so Celery takes the next message immediately
and concurrent requests meet in the runtime's scheduler, which batches them continuously.
Batch ``generate`` jobs are handed to their own thread the same way, so a long job never stops
the worker from taking relay requests (its prompts join the same batches). The solo pool (no
fork) is also what lets loaded runtimes stay warm across requests, and lets a runtime with
TP·PP > 1 start its own process group (spawned, never forked). On ``worker_shutdown`` every
runtime is closed, which ends waiting requests with an error and stops the rank processes.

Models are ``GenerationRuntime``s over checkpoints fetched once into a local cache directory
(sha256-verified by the store), in the checkpoint's own layout (TP/PP from its manifest), kept
warm in an LRU bounded by ``LLAMA_SVC_MODEL_CACHE_BYTES`` (a runtime's bytes are estimated from
its checkpoint's file sizes). Whether a warm model is still the committed version is re-checked
against the store at most every ``RECHECK_S`` seconds, not per request.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from celery import signals

from services.generate.runtime import GenerationRuntime, Overloaded, RequestError
from shared.protocol import parse
from shared.protocol.relay import RelayError, RelayReply, RelayRequest
from services.worker import (Job, JobCancelled, JobContext, JobFailed, OwnershipLost, app, checkpoint_store, job_task,
                             settings)
from shared.jobs import placement
from shared.progress import Progress
from shared.jobs.transport import GENERATE_REQUEST
from shared.storage import CheckpointNotFound, CheckpointStore

log = logging.getLogger("llama_svc.generate")

RELAY_THREADS = 64          # relay requests in flight at once (each mostly waits on the scheduler)
RELAY_BACKLOG = 4 * RELAY_THREADS  # beyond this many waiting for a thread, answer 429
RECHECK_S = 2.0             # how stale a warm model's "still the committed version" check may be
REPLY_TTL_S = 120


# ---------------------------------------------------------------- the model cache
@dataclass(eq=False)
class _Entry:
    key: tuple[str, str]
    version: float
    size: int
    checked_at: float
    runtime: GenerationRuntime | None = None
    error: BaseException | None = None
    users: int = 0
    evicted: bool = False
    ready: threading.Event = field(default_factory=threading.Event)


def checkpoint_bytes(manifest: dict) -> int:
    """Estimated memory of a served checkpoint: the size of its stored files."""
    return sum(int(f.get("size", 0)) for f in manifest["storage"]["files"].values())


class ModelCache:
    """Warm ``GenerationRuntime``s by (team, checkpoint), least recently used evicted first.

    ``lease`` loads a model on first use (concurrent first requests share one load) and keeps
    it open while leased; an evicted runtime is closed when its last lease ends.
    """

    def __init__(self, checkpoints: CheckpointStore, cache_dir: Path, max_bytes: int,
                 opener: Callable[[Path, str], GenerationRuntime],
                 closer: Callable[[GenerationRuntime], None] = GenerationRuntime.close, recheck_s: float = RECHECK_S):
        self.checkpoints, self.cache_dir, self.max_bytes = checkpoints, Path(cache_dir), max_bytes
        self.opener, self.closer, self.recheck_s = opener, closer, recheck_s
        self.loads = 0
        self.pinned: set[tuple[str, str]] = set()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def metrics(self) -> dict:
        with self._lock:
            return {"loads": self.loads, "models": [f"{t}/{n}" for t, n in self._entries],
                    "bytes": self.used_bytes, "max_bytes": self.max_bytes}

    @contextmanager
    def lease(self, team: str, name: str) -> Iterator[tuple[GenerationRuntime, bool]]:
        """(runtime, loaded_now) for the committed checkpoint ``team/name``."""
        entry, loaded = self._acquire(team, name)
        try:
            yield entry.runtime, loaded
        finally:
            self._release(entry)

    def _acquire(self, team: str, name: str) -> tuple[_Entry, bool]:
        key = (team, name)
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.ready.is_set() and e.error is None and \
                    time.monotonic() - e.checked_at < self.recheck_s:
                e.users += 1
                self._entries.move_to_end(key)
                return e, False
        manifest = self.checkpoints.manifest(team, name)  # raises CheckpointNotFound
        version = manifest["storage"]["committed_at"]
        with self._lock:
            e = self._entries.get(key)
            load = e is None or e.version != version
            if load:
                if e is not None:  # re-committed under the same name: the warm one is stale
                    self._evict(e)
                e = _Entry(key, version, checkpoint_bytes(manifest), time.monotonic())
                self._make_room(e)
                self._entries[key] = e
            else:
                e.checked_at = time.monotonic()
                self._entries.move_to_end(key)
            e.users += 1
        if load:
            self._load(e, manifest)
        else:
            e.ready.wait()
        if e.error is not None:
            self._release(e)
            raise e.error
        return e, load

    def warm(self) -> list[str]:
        """``team/name`` of every model loaded and ready."""
        with self._lock:
            return [f"{t}/{n}" for (t, n), e in self._entries.items() if e.ready.is_set() and e.error is None]

    def pin(self, keys: set[tuple[str, str]]) -> None:
        """Keep these models loaded (a deployment's); loads the ones not yet warm."""
        self.pinned = set(keys)
        for team, name in keys:
            with self.lease(team, name):
                pass

    def _make_room(self, new: _Entry) -> None:
        if new.size > self.max_bytes:
            raise RequestError(507, f"model {new.key[1]!r} needs about {new.size} bytes, more than this worker's "
                                    f"model cache holds ({self.max_bytes}); raise LLAMA_SVC_MODEL_CACHE_BYTES")
        for old in list(self._entries.values()):
            if self.used_bytes + new.size <= self.max_bytes:
                break
            if old.key in self.pinned:
                continue  # a deployed model stays loaded
            log.info("evicting model %s/%s from memory", *old.key)
            self._evict(old)

    def _evict(self, e: _Entry) -> None:
        """Drop from the cache (lock held); closed now if unused, else by its last lease."""
        self._entries.pop(e.key, None)
        e.evicted = True
        if e.users == 0:
            threading.Thread(target=self._close, args=(e,), daemon=True, name="runtime-close").start()

    def _load(self, e: _Entry, manifest: dict) -> None:
        team, name = e.key
        try:
            base = self.cache_dir / team / name
            src = self.checkpoints.fetch(team, name, base / "files")
            e.runtime = self.opener(src, name)  # the fetched manifest says native or hf
            with self._lock:
                self.loads += 1
            log.info("loaded model %s/%s (%d bytes)", team, name, e.size)
        except BaseException as err:  # noqa: BLE001 - every waiter sees it
            e.error = err
            with self._lock:
                if self._entries.get(e.key) is e:
                    del self._entries[e.key]
        finally:
            e.ready.set()

    def _release(self, e: _Entry) -> None:
        with self._lock:
            e.users -= 1
            close = e.evicted and e.users == 0
        if close:
            self._close(e)

    def _close(self, e: _Entry) -> None:
        e.ready.wait()
        if e.runtime is not None:
            self.closer(e.runtime)

    def close(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            e.evicted = True
            self._close(e)


def _torch_threads() -> int:
    return int(os.environ.get("LLAMA_SVC_TORCH_THREADS") or 0) or max(1, (os.cpu_count() or 2) // 2)


_gpus = None
_gpus_lock = threading.Lock()
_claimed: dict[int, tuple[int, ...]] = {}  # id(runtime) -> the GPUs it was given


def _gpu_allocator():
    """This worker's GPUs (``LLAMA_SVC_DEVICES``, else all it sees), shared by the models it serves."""
    global _gpus
    with _gpus_lock:
        if _gpus is None:
            from shared.parallel.devices import DeviceAllocator, configured_devices

            _gpus = DeviceAllocator(configured_devices())
        return _gpus


def open_runtime(path: Path, name: str) -> GenerationRuntime:
    """A runtime in the checkpoint's stored layout; TP·PP > 1 starts its own spawned ranks, each on
    its own GPU of this worker's devices (the least used ones; in-process models spread the same way)."""
    import torch

    from shared.checkpoint.opener import open_checkpoint

    threads = _torch_threads()
    torch.set_num_threads(threads)  # an in-process engine computes in this process
    gpus = _gpu_allocator()
    devices = None
    if gpus.devices:
        stored = open_checkpoint(path).layout
        devices = gpus.claim(stored.tp * stored.pp, f"model {name!r} (TP{stored.tp} x PP{stored.pp})")
    try:
        rt = GenerationRuntime(path, model_name=name, threads=threads, devices=devices)
    except BaseException:
        if devices:
            gpus.release(devices)
        raise
    if devices:
        _claimed[id(rt)] = devices
    return rt


def close_runtime(rt: GenerationRuntime) -> None:
    rt.close()
    devices = _claimed.pop(id(rt), None)
    if devices:
        _gpu_allocator().release(devices)


# ---------------------------------------------------------------- the backend
class RuntimeBackend:
    """Answers relay requests (Megatron ``PUT /api``, OpenAI completions and chat) from the
    model cache. ``handle`` returns the response; ``stream`` yields the OpenAI chunks."""

    def __init__(self, models: ModelCache):
        self.models = models

    def handle(self, request: dict | RelayRequest) -> dict:
        return self.handle_timed(request)[0]

    def handle_timed(self, request: dict | RelayRequest) -> tuple[dict, bool, dict | None]:
        """(response, whether this request loaded the model, a Megatron response's usage)."""
        req = parse(RelayRequest, request)
        with self.models.lease(req.team, req.model) as (rt, loaded):
            if req.api == "megatron":
                resp, usage = rt.api_usage(req.body)
                return resp, loaded, usage
            if req.api == "completions":
                return rt.completions(req.body), loaded, None
            return rt.chat_completions(req.body), loaded, None

    def stream(self, request: dict | RelayRequest) -> Iterator[dict]:
        return self.stream_timed(request)[0]

    def stream_timed(self, request: dict | RelayRequest) -> tuple[Iterator[dict], bool]:
        """(chunks, whether this request loaded the model). A bad request raises here, before
        any chunk; the model stays leased until the chunks are consumed or closed."""
        req = parse(RelayRequest, request)
        if req.api == "megatron":
            raise RequestError(400, "the Megatron API does not stream; drop `stream`", "stream")
        lease = self.models.lease(req.team, req.model)
        rt, loaded = lease.__enter__()
        try:
            chunks = rt.stream_completions(req.body) if req.api == "completions" else rt.stream_chat(req.body)
        except BaseException:
            lease.__exit__(None, None, None)
            raise

        def gen():
            try:
                yield from chunks
            finally:
                chunks.close()
                lease.__exit__(None, None, None)

        return gen(), loaded

    def close(self) -> None:
        self.models.close()


_backend: RuntimeBackend | None = None
_relay_pool: cf.ThreadPoolExecutor | None = None
_job_pool: cf.ThreadPoolExecutor | None = None
_backlog = 0
_lock = threading.Lock()
_stopping = threading.Event()


def get_backend() -> RuntimeBackend:
    global _backend
    with _lock:
        if _stopping.is_set():
            raise RequestError(503, "the generation worker is shutting down; retry")
        if _backend is None:
            cache = ModelCache(checkpoint_store(), settings.data_dir / "model-cache", settings.model_cache_bytes,
                               open_runtime, close_runtime)
            _backend = RuntimeBackend(cache)
        return _backend


def _pools() -> tuple[cf.ThreadPoolExecutor, cf.ThreadPoolExecutor]:
    global _relay_pool, _job_pool
    with _lock:
        if _relay_pool is None:
            _relay_pool = cf.ThreadPoolExecutor(RELAY_THREADS, thread_name_prefix="relay")
            _job_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="generate-job")
        return _relay_pool, _job_pool


@signals.worker_shutdown.connect
def _on_shutdown(sender=None, **_):
    """Close every runtime (ends waiting requests, stops rank processes) and the thread pools.
    A batch job cut short here is left running in its record: the reaper re-queues it."""
    global _backend
    _stopping.set()
    pools = [p for p in (_relay_pool, _job_pool) if p is not None]
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)
    with _lock:
        backend, _backend = _backend, None
    if backend is not None:
        n = len(backend.models.metrics()["models"])
        backend.close()
        log.info("closed %d warm model(s)", n)
    for pool in pools:
        pool.shutdown(wait=True)


# ---------------------------------------------------------------- placement
WORKER_ID = re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}-{os.getpid()}")[:100]


@signals.worker_ready.connect
def _serve_own_queue(sender=None, **_):
    """A generate worker also consumes ``generate.<id>`` (requests for the models it has warm)
    and announces itself and its deployments (see ``shared.jobs.placement``)."""
    try:
        if placement.SHARED_QUEUE not in app.amqp.queues.consume_from:
            return
    except Exception:
        return
    sender.add_task_queue(placement.worker_queue(WORKER_ID))
    threading.Thread(target=_announce_loop, daemon=True, name="placement").start()


def _announce_loop() -> None:
    deployments = placement.Deployments(checkpoint_store().store)
    pinning: cf.Future | None = None
    while not _stopping.wait(placement.ANNOUNCE_S):
        try:
            mine = placement.claim_replicas(_redis(), WORKER_ID, deployments.list())
            backend = get_backend()
            keys = {(d.team, d.model) for d in mine}
            if keys != backend.models.pinned and (pinning is None or pinning.done()):
                pinning = _pools()[0].submit(backend.models.pin, keys)  # loads off this thread
            with _lock:
                load = _backlog
            placement.announce(_redis(), placement.Presence(
                WORKER_ID, placement.worker_queue(WORKER_ID), backend.models.warm(), load, RELAY_BACKLOG, time.time()))
        except Exception as e:  # Redis or the store down: announce again next round
            log.warning("placement round failed: %s", e)


# ---------------------------------------------------------------- relay task
@app.task(name=GENERATE_REQUEST, acks_late=False, ignore_result=True)
def generate_request(request: dict, reply_key: str, deadline: float) -> None:
    """Hands the request to the relay threads and returns (see the module docstring)."""
    global _backlog
    relay, _ = _pools()
    with _lock:
        refuse = _stopping.is_set() or _backlog >= RELAY_BACKLOG
        if not refuse:
            _backlog += 1
    if refuse:
        status, why = (503, "is shutting down") if _stopping.is_set() else (429, "is at capacity")
        _reply(reply_key, RelayReply(error=RelayError(status=status, retry_after=1,
                                                      message=f"the generation worker {why}; retry shortly")))
        return
    relay.submit(_answer_queued, request, reply_key, deadline)


def _answer_queued(request: dict, reply_key: str, deadline: float) -> None:
    global _backlog
    with _lock:
        _backlog -= 1
    answer(request, reply_key, deadline)


def answer(request: dict, reply_key: str, deadline: float, backend: RuntimeBackend | None = None) -> None:
    """Answer one relayed request on ``reply_key``; never raises."""
    if time.time() > deadline:
        return  # the gateway already gave up on this request
    t0 = time.perf_counter()
    try:
        backend = backend or get_backend()
        if (request.get("body") or {}).get("stream"):
            it, loaded = backend.stream_timed(request)
            with closing(it):
                for i, chunk in enumerate(it):
                    if i == 0:
                        _reply(reply_key, RelayReply(chunk=chunk))
                    else:
                        _redis().rpush(reply_key, RelayReply(chunk=chunk).dumps())
            msg = RelayReply(done=True)
        else:
            resp, loaded, usage = backend.handle_timed(request)
            msg = RelayReply(response=resp, usage=usage)
        msg.worker_ms, msg.cache = (time.perf_counter() - t0) * 1e3, "miss" if loaded else "hit"
        msg.worker = WORKER_ID
    except RequestError as e:
        msg = _error(e.status_code, e.message, e.param, e.retry_after)
    except Overloaded as e:
        msg = _error(429, str(e), retry_after=e.retry_after)
    except CheckpointNotFound:
        msg = _error(404, f"model {request.get('model')!r} not found", "model")
    except Exception as e:  # noqa: BLE001 - reported to the caller
        log.exception("generation failed")
        msg = _error(500, f"{type(e).__name__}: {e}")
    _reply(reply_key, msg)


def _error(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> RelayReply:
    return RelayReply(error=RelayError(status=status, message=message, param=param, retry_after=retry_after))


def _reply(key: str, msg: RelayReply) -> None:
    import redis

    try:
        pipe = _redis().pipeline(transaction=False)
        pipe.rpush(key, msg.dumps())
        pipe.expire(key, REPLY_TTL_S)
        pipe.execute()
    except redis.RedisError as e:  # the gateway times out; nothing else to tell
        log.warning("could not reply on %s: %s", key, e)


_r = None


def _redis():
    global _r
    if _r is None:
        import redis

        _r = redis.Redis.from_url(settings.redis_url, max_connections=RELAY_THREADS + 8)
    return _r


# ---------------------------------------------------------------- batch generation job
def generate_job(job: Job, ctx: JobContext, backend: RuntimeBackend | None = None) -> dict:
    """Every prompt is its own sequence in the runtime's batches (at most ``max_batch`` of this
    job's at once, so relayed requests still get rows); a cancel stops it between sequences."""
    p = job.params
    body = {k: v for k, v in p.items() if k not in ("model", "kind", "prompts") and v is not None}
    prompts = p["prompts"]
    backend = backend or get_backend()
    try:
        with backend.models.lease(job.team, p["model"]) as (rt, _):
            texts = _generate_all(rt, body, prompts, ctx, job)
    except CheckpointNotFound:
        raise JobFailed(f"model {p['model']!r} not found") from None
    except RequestError as e:
        raise JobFailed(f"{e.message} (status {e.status_code})") from None
    return {"text": texts}


def _generate_all(rt: GenerationRuntime, body: dict, prompts: list[str], ctx: JobContext, job: Job) -> list[str]:
    width = max(1, rt.engine.max_batch)
    texts: list[str | None] = [None] * len(prompts)
    with cf.ThreadPoolExecutor(width, thread_name_prefix="generate-job-seq") as pool:
        pending: dict[cf.Future, int] = {}
        nxt = done = 0
        while done < len(prompts):
            if _stopping.is_set():
                raise OwnershipLost(job.id)
            if ctx.should_cancel():
                for f in pending:
                    f.cancel()
                raise JobCancelled("cancelled")
            while nxt < len(prompts) and len(pending) < width:
                pending[pool.submit(rt.api, {**body, "prompts": [prompts[nxt]]})] = nxt
                nxt += 1
            finished, _ = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                i = pending.pop(f)
                try:
                    texts[i] = f.result()["text"][0]
                except RequestError:
                    if _stopping.is_set():
                        raise OwnershipLost(job.id) from None
                    raise
                done += 1
            if finished:
                ctx.progress(Progress("generate", done, len(prompts), "prompts"))
    return texts


def _on_job_thread(*call) -> None:
    """Runs ``run_job(...)`` on the job thread (see the module docstring)."""
    _pools()[1].submit(*call)


generate_job_task = job_task("generate", submit=_on_job_thread)(generate_job)
