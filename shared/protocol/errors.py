"""Errors on the wire: one exception for a refused request, and the two body shapes (OpenAI's
``{"error": {message, type, param, code}}``, Megatron's ``{"message"}``)."""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class RequestError(Exception):
    """A request a server refuses: ``status_code``, a message, the offending ``param`` if one, and
    ``retry_after`` seconds for 429/503."""

    def __init__(self, status_code: int, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status_code, self.message, self.param, self.retry_after = status_code, message, param, retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


class FieldError(ValueError):
    """A validator's error about one field (``param``), e.g. a cross-field or unsupported one."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class OpenAIError(BaseModel):
    """OpenAI's error body (what ``openai.BadRequestError`` and friends read)."""
    error: OpenAIErrorDetail


class MegatronError(BaseModel):
    """Megatron's error body: its client reads ``response.json()['message']``."""
    message: str


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def megatron_error(message: str) -> dict:
    return {"message": message}


def _loc(err: Mapping[str, Any]) -> str | None:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return ".".join(loc) or None


def describe(errors: list[Mapping[str, Any]], messages: Mapping[Any, str] | None = None) -> tuple[str, str | None]:
    """(message, param) of the first validation error. ``messages`` may give a field's own message,
    keyed by field name or by (field, error type)."""
    err = errors[0]
    param = _loc(err)
    field = str(err["loc"][0]) if err.get("loc") else None
    if err.get("loc") and err["loc"][0] == "body":
        field = str(err["loc"][1]) if len(err["loc"]) > 1 else None
    messages = messages or {}
    mine = messages.get((field, err.get("type"))) or messages.get(field)
    if mine:
        return mine, param
    ctx_err = (err.get("ctx") or {}).get("error")
    msg = str(ctx_err) if ctx_err is not None else str(err.get("msg"))
    param = getattr(ctx_err, "param", param)
    if param and ctx_err is None:
        msg = f"{param}: {msg}"
    return msg, param


def parse(model: type[M], body: Any, messages: Mapping[Any, str] | None = None, status: int = 400) -> M:
    """``body`` validated as ``model``, or a RequestError naming the first problem."""
    if isinstance(body, model):
        return body
    if not isinstance(body, dict):
        raise RequestError(status, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        msg, param = describe(e.errors(), messages)
        raise RequestError(status, msg, param) from None
