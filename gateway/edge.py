"""The gateway's edge, before any route: a request id on every response, and a gate in front
of uploads that authenticates and takes a per-team upload slot before a byte of the body is read.

Both are pure ASGI middleware. The upload gate answers 401, 413 or 429 from the request
headers alone, with ``Connection: close``, so a client without a key (or over its quota) is
stopped while it is still sending instead of after its body was parsed and spooled to disk.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

import redis

from gateway.auth import AuthError, authenticate
from gateway.limits import reply, upload_limit
from shared.jobs.logs import request_id_var

log = logging.getLogger("llama_svc.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
UPLOAD_SLOT_TTL_S = 60      # a slot of a gateway that died is freed after this; live uploads refresh it
# INCR the team's counter (refreshing its expiry); over the limit, take it back and answer -1
_TAKE = """local n = redis.call('INCR', KEYS[1]) redis.call('EXPIRE', KEYS[1], ARGV[2])
if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) return -1 end return n"""
_GIVE = """local n = redis.call('DECR', KEYS[1]) if n <= 0 then redis.call('DEL', KEYS[1]) end return n"""


def request_id(headers: dict[bytes, bytes]) -> str:
    """The client's X-Request-ID when it is 1-128 characters of [A-Za-z0-9._-]; else a new one."""
    sent = headers.get(b"x-request-id", b"").decode("latin-1")
    return sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Sets ``X-Request-ID`` on every response, ``request.state.request_id`` and the log context."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(dict(scope.get("headers") or []))
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)

        async def send_with_id(msg):
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", []) if k.lower() != b"x-request-id"]
                msg = {**msg, "headers": headers + [(b"x-request-id", rid.encode())]}
            await send(msg)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class UploadGate:
    """For ``POST`` to an upload path prefix: key, declared size and the team's concurrent-upload
    slot are checked before ``receive()``; the slot is held until the response is done."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        svc = getattr(scope.get("app").state, "services", None) if scope.get("app") else None
        upload = upload_limit(svc.settings, scope) if svc is not None else None
        if upload is None:
            return await self.app(scope, receive, send)
        s, (limit, setting) = svc.settings, upload
        headers = dict(scope.get("headers") or [])
        try:
            team = authenticate(headers.get(b"authorization", b"").decode("latin-1"), s.team_of_hash)
        except AuthError as e:
            return await reply(send, 401, e.detail, [(b"www-authenticate", b"Bearer")])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await reply(send, 413, f"upload over the {limit}-byte limit ({setting})")
        scope.setdefault("state", {})["team"] = team
        key = f"llama_svc:uploads:{team}"
        try:
            taken = await svc.aredis.eval(_TAKE, 1, key, s.max_concurrent_uploads_per_team, UPLOAD_SLOT_TTL_S)
        except (redis.RedisError, OSError) as e:
            log.warning("upload slot unavailable: %s", e)
            return await reply(send, 503, "uploads are unavailable (quota store unreachable); retry later",
                                [(b"retry-after", str(s.retry_after_s).encode())])
        if taken < 0:
            return await reply(send, 429, f"your team has {s.max_concurrent_uploads_per_team} uploads in "
                                           "progress; wait for one to finish",
                                [(b"retry-after", str(s.retry_after_s).encode())])
        keeper = asyncio.create_task(_keep_slot(svc.aredis, key))
        try:
            await self.app(scope, receive, send)
        finally:
            keeper.cancel()
            await _give_slot(svc.aredis, key)


async def _keep_slot(r, key: str) -> None:
    """Refresh the slot's expiry while the upload runs (a long upload keeps its slot)."""
    while True:
        await asyncio.sleep(UPLOAD_SLOT_TTL_S / 3)
        try:
            await r.expire(key, UPLOAD_SLOT_TTL_S)
        except (redis.RedisError, OSError):
            pass


async def _give_slot(r, key: str) -> None:
    try:
        await asyncio.shield(r.eval(_GIVE, 1, key))
    except (redis.RedisError, OSError) as e:  # the slot expires by itself
        log.warning("could not free an upload slot: %s", e)
