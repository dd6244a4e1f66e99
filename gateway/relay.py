"""Relay of generation requests to the generate workers (see services/generate/tasks.py for the protocol)."""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

import redis
from anyio import to_thread
from fastapi import HTTPException

from gateway.core.services import Services
from shared.jobs.transport import GENERATE_REQUEST


async def _publish(svc: Services, request: dict, timeout: float) -> str:
    reply_key = f"llama_svc:reply:{uuid.uuid4().hex}"
    deadline = time.time() + timeout
    try:
        await to_thread.run_sync(lambda: svc.celery.send_task(
            GENERATE_REQUEST, args=[request, reply_key, deadline], queue="generate",
            expires=timeout))
    except Exception as e:
        raise HTTPException(503, f"generation is unavailable (queue unreachable: {type(e).__name__})") from None
    return reply_key


async def _pop(svc: Services, key: str, timeout: float) -> dict:
    try:
        got = await svc.aredis.blpop([key], timeout=max(1, int(timeout + 0.999)))
    except redis.RedisError as e:
        raise HTTPException(503, f"generation is unavailable (queue unreachable: {type(e).__name__})",
                            headers={"Retry-After": str(svc.settings.retry_after_s)}) from None
    if got is None:
        raise HTTPException(503, "no generation worker answered in time; retry later",
                            headers={"Retry-After": str(svc.settings.retry_after_s)})
    msg = json.loads(got[1])
    if "error" in msg:
        raise HTTPException(msg["error"]["status"], msg["error"]["message"])
    return msg


async def call(svc: Services, request: dict) -> tuple[dict, float | None]:
    """The worker's response and its own time in ms."""
    timeout = svc.settings.generate_timeout_s
    key = await _publish(svc, request, timeout)
    msg = await _pop(svc, key, timeout)
    return msg["response"], msg.get("worker_ms")


async def stream(svc: Services, request: dict) -> AsyncIterator[dict]:  # awaited, then iterated
    """Yields chunk dicts. The first reply is awaited before returning, so errors become HTTP statuses."""
    timeout = svc.settings.generate_timeout_s
    key = await _publish(svc, request, timeout)
    first = await _pop(svc, key, timeout)

    async def gen():
        msg = first
        while True:
            if msg.get("done"):
                return
            yield msg["chunk"]
            try:
                msg = await _pop(svc, key, timeout)
            except HTTPException as e:
                yield {"error": {"message": e.detail, "code": e.status_code}}
                return

    return gen()
