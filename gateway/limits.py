"""Request-size limit that counts the bytes actually received (Content-Length can lie or be absent)."""

from __future__ import annotations

import json


UPLOAD_LIMITS = {"/v1/checkpoints": "max_upload_bytes", "/v1/datasets": "max_dataset_bytes"}


def upload_limit(settings, scope) -> tuple[int, str] | None:
    """(byte limit, its setting) of a POST to an upload route (large bodies, gated before any
    byte is read); ``None`` for every other request."""
    if scope.get("type") != "http" or scope.get("method") != "POST":
        return None
    path = scope.get("path", "").rstrip("/")
    for prefix, setting in UPLOAD_LIMITS.items():
        if path == prefix or path.startswith(prefix + "/"):
            return getattr(settings, setting), f"LLAMA_SVC_{setting.upper()}"
    return None


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 once a body exceeds its limit (uploads get a larger one)."""

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                return await reply(send, 400, "invalid Content-Length header")
            if too_big:
                return await reply(send, 413, f"request body over the {limit}-byte limit")
        seen, started, answered = 0, False, False

        async def counting_receive():
            # Over the limit: answer 413 now and tell the app the client left (no parsing of the rest).
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    if not started:
                        answered = True
                        await reply(send, 413, f"request body over the {limit}-byte limit")
                    return {"type": "http.disconnect"}
            return msg

        async def tracking_send(msg):
            nonlocal started
            if answered:
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        await self.app(scope, counting_receive, tracking_send)


async def reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A ``{"detail": ...}`` JSON answer that closes the connection (the body may be unread)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})
