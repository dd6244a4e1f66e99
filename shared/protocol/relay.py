"""Messages between the gateway and the generate workers (Celery task ``generate.request``).

The gateway publishes ``(RelayRequest, reply_key, deadline)``; the worker answers on the Redis
list ``reply_key`` with one ``RelayReply``: ``response`` once, or for streams ``chunk`` per chunk
then ``done``; a failure as ``error``. ``body`` is the client's request, validated again by the
worker with the same models (shared.protocol.megatron / .openai).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.protocol.limits import Name

Api = Literal["megatron", "completions", "chat"]


class RelayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api: Api
    team: str
    model: Name
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


class RelayError(BaseModel):
    status: int
    message: str
    param: str | None = None
    retry_after: int | None = None


class RelayReply(BaseModel):
    """Exactly one of ``response``, ``chunk``, ``done`` or ``error``; the last message of a request
    carries the worker's own time and whether the model was warm (``hit``) or loaded (``miss``)."""
    response: dict[str, Any] | None = None
    chunk: dict[str, Any] | None = None
    done: bool = False
    error: RelayError | None = None
    usage: dict[str, int] | None = Field(None, description="prompt/completion tokens of a Megatron response")
    worker_ms: float | None = None
    cache: Literal["hit", "miss"] | None = None
    worker: str | None = Field(None, description="the generate worker that answered")

    def dumps(self) -> str:
        return self.model_dump_json(exclude_defaults=True)
