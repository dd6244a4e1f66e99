"""Relay of generation requests to the generate workers (the messages: shared/protocol/relay.py).

The request path stays on the event loop: the task message is pushed onto the queue of a
worker that has the model warm, else the shared ``generate`` queue (``shared.jobs.placement``) with the async Redis client (no thread hop, no per-publish binding lookup), the reply is
awaited with BLPOP on the same client's connection pool, and a checkpoint's manifest (whether it
exists, its position limit) is read from the store at most once per ``EXISTS_TTL_S`` per (team, model).

Each request in flight holds one connection of the pool (during BLPOP) and one of
``max_concurrent_generations`` slots; without a free slot it is refused at once with 429 (the
pool is sized above the slots, so capacity is never a 503).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import AsyncIterator

import redis
from anyio import to_thread
from fastapi import HTTPException

from gateway.core.manifests import model_positions
from gateway.core.services import Services
from shared.jobs import placement
from shared.jobs.transport import GENERATE_REQUEST
from shared.protocol.errors import openai_error
from shared.protocol.relay import RelayReply, RelayRequest
from shared.storage import CheckpointNotFound

QUEUE = placement.SHARED_QUEUE
EXISTS_TTL_S = 2.0
WORKERS_TTL_S = 1.0
_workers_until: dict[int, tuple[float, list]] = {}
_ORIGIN = f"gateway{os.getpid()}@{socket.gethostname()}"
_info_until: dict[tuple[int, str, str], tuple[float, dict]] = {}


class ApiError(HTTPException):
    """An HTTPException naming the offending request field: OpenAI's error body carries it as
    ``param`` (the gateway's handler reads it), as the standalone server's does."""

    def __init__(self, status_code: int, detail: str, param: str | None = None, headers: dict | None = None):
        super().__init__(status_code, detail, headers=headers)
        self.param = param


async def model_info(svc: Services, team: str, model: str) -> dict | None:
    """``{"max_positions": int | None}`` when ``team/model`` is committed, else None. Positive
    answers are trusted for EXISTS_TTL_S (a just-uploaded checkpoint is seen at once; a deleted
    one is refused by the worker)."""
    key, now = (id(svc), team, model), time.monotonic()
    hit = _info_until.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    try:
        manifest = await to_thread.run_sync(svc.checkpoints.manifest, team, model)
    except CheckpointNotFound:
        return None
    info = {"max_positions": model_positions(manifest)}
    if len(_info_until) > 10_000:
        _info_until.clear()
    _info_until[key] = (now + EXISTS_TTL_S, info)
    return info


async def model_exists(svc: Services, team: str, model: str) -> bool:
    """Whether ``team/model`` is committed (see ``model_info``)."""
    return await model_info(svc, team, model) is not None


def task_message(args: list, expires_s: float, queue: str = QUEUE) -> tuple[str, bytes]:
    """A Celery task message (protocol 2, JSON body) for the Redis transport, as
    ``send_task(GENERATE_REQUEST, args, queue=queue, expires=...)`` would push it."""
    tid = str(uuid.uuid4())
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
                      separators=(",", ":"))
    expires = datetime.fromtimestamp(time.time() + expires_s, tz=timezone.utc).isoformat()
    headers = {"lang": "py", "task": GENERATE_REQUEST, "id": tid, "shadow": None, "eta": None, "expires": expires,
               "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": tid,
               "parent_id": None, "argsrepr": None, "kwargsrepr": None, "origin": _ORIGIN, "ignore_result": True,
               "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}
    props = {"correlation_id": tid, "reply_to": "", "delivery_mode": 2,
             "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "body_encoding": "base64",
             "delivery_tag": str(uuid.uuid4())}
    msg = {"body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
           "content-type": "application/json", "headers": headers, "properties": props}
    return tid, json.dumps(msg, separators=(",", ":")).encode()


def _unavailable(e: Exception, svc: Services) -> HTTPException:
    return HTTPException(503, f"generation is unavailable (queue unreachable: {type(e).__name__})",
                         headers={"Retry-After": str(svc.settings.retry_after_s)})


async def _workers(svc: Services) -> list[placement.Presence]:
    """The live generate workers and their warm models, read at most every WORKERS_TTL_S."""
    key, now = id(svc), time.monotonic()
    hit = _workers_until.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    workers = await to_thread.run_sync(placement.live_workers, svc.redis)
    _workers_until[key] = (now + WORKERS_TTL_S, workers)
    return workers


async def _publish(svc: Services, request: RelayRequest, timeout: float) -> str:
    reply_key = f"llama_svc:reply:{uuid.uuid4().hex}"
    try:
        queue = placement.pick_queue(await _workers(svc), request.team, request.model)
    except (redis.RedisError, OSError):
        queue = QUEUE  # any worker can serve any model
    _, payload = task_message([request.model_dump(), reply_key, time.time() + timeout], timeout, queue)
    try:
        await svc.aredis.lpush(queue, payload)
    except (redis.RedisError, OSError) as e:
        raise _unavailable(e, svc) from None
    return reply_key


async def _pop(svc: Services, key: str, timeout: float) -> dict:
    try:
        got = await svc.aredis.blpop([key], timeout=max(1, int(timeout + 0.999)))
    except (redis.RedisError, OSError) as e:
        raise _unavailable(e, svc) from None
    if got is None:
        raise HTTPException(503, "no generation worker answered in time; retry later",
                            headers={"Retry-After": str(svc.settings.retry_after_s)})
    reply = RelayReply.model_validate_json(got[1])
    if reply.error is not None:
        err = reply.error
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
        raise ApiError(err.status, err.message, err.param, headers=headers)
    return reply.model_dump(exclude_none=True)


async def _take_slot(svc: Services) -> None:
    """One of ``max_concurrent_generations`` slots, or 429 at once (never a wait, never a 503)."""
    if svc.generations.locked():
        s = svc.settings
        raise HTTPException(429, f"the gateway is relaying {s.max_concurrent_generations} generation requests, "
                                 "its limit; retry shortly", headers={"Retry-After": str(s.retry_after_s)})
    await svc.generations.acquire()  # free: returns without waiting


async def call(svc: Services, request: RelayRequest) -> dict:
    """The worker's reply: ``response``, and its own time ``worker_ms`` and model ``cache`` state."""
    timeout = svc.settings.generate_timeout_s
    await _take_slot(svc)
    try:
        key = await _publish(svc, request, timeout)
        return await _pop(svc, key, timeout)
    finally:
        svc.generations.release()


async def stream(svc: Services, request: RelayRequest) -> AsyncIterator[dict]:  # awaited, then iterated
    """Yields chunk dicts. The first reply is awaited before returning, so errors become HTTP statuses.
    The slot is held until the chunks end or the iterator is closed."""
    timeout = svc.settings.generate_timeout_s
    await _take_slot(svc)
    try:
        key = await _publish(svc, request, timeout)
        first = await _pop(svc, key, timeout)
    except BaseException:
        svc.generations.release()
        raise

    async def gen():
        try:
            yield None  # primed below, so closing the iterator before its first chunk still frees the slot
            msg = first
            while True:
                if msg.get("done"):
                    return
                yield msg["chunk"]
                try:
                    msg = await _pop(svc, key, timeout)
                except HTTPException as e:
                    yield openai_error(e.status_code, e.detail, getattr(e, "param", None))
                    return
        finally:
            svc.generations.release()

    chunks = gen()
    await chunks.__anext__()
    return chunks
