"""The standalone generation server: Megatron's PUT /api and OpenAI-compatible endpoints.

Routes are thin: parse JSON, call the ``GenerationRuntime``, map its errors to status codes.
The model loads in the background; /health answers 503 until it is ready.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.generate.runtime import GenerationRuntime, Overloaded, RequestError

MAX_BODY_BYTES = 8 << 20


class _Holder:
    def __init__(self):
        self.runtime: GenerationRuntime | None = None
        self.error: str | None = None


def create_app(runtime_factory: Callable[[], GenerationRuntime] | GenerationRuntime) -> FastAPI:
    """An app around a runtime, or around a factory that builds one in a background thread."""
    holder = _Holder()

    def _load():
        try:
            holder.runtime = runtime_factory()
        except Exception as e:  # reported by /health; the server stays up to say why
            holder.error = f"{type(e).__name__}: {e}"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if isinstance(runtime_factory, GenerationRuntime):
            holder.runtime = runtime_factory
        else:
            threading.Thread(target=_load, name="model-load", daemon=True).start()
        yield
        if holder.runtime is not None and not isinstance(runtime_factory, GenerationRuntime):
            holder.runtime.close()

    app = FastAPI(title="llama-svc generate", lifespan=lifespan)
    app.state.holder = holder

    def runtime() -> GenerationRuntime:
        rt = holder.runtime
        if rt is None or not rt.ready:
            raise RequestError(503, holder.error or "the model is still loading")
        return rt

    async def body_of(request: Request) -> Any:
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e})") from None

    def openai_error(e: RequestError | Overloaded) -> JSONResponse:
        if isinstance(e, Overloaded):
            return JSONResponse({"error": {"message": str(e), "type": "overloaded", "code": 429}}, 429,
                                headers={"Retry-After": str(e.retry_after)})
        kind = {400: "invalid_request_error", 404: "not_found_error", 422: "invalid_request_error",
                503: "service_unavailable"}.get(e.status_code, "server_error")
        return JSONResponse({"error": {"message": e.message, "type": kind, "code": e.status_code}}, e.status_code)

    @app.put("/api")
    async def api(request: Request):
        try:
            body = await body_of(request)
            return JSONResponse(await run_in_threadpool(runtime().api, body))
        except RequestError as e:  # Megatron answers errors as a plain-text message
            return PlainTextResponse(e.message, e.status_code)
        except Overloaded as e:
            return PlainTextResponse(str(e), 429, headers={"Retry-After": str(e.retry_after)})

    def sse(chunks: Iterator[dict]) -> Iterator[str]:
        try:
            for c in chunks:
                yield f"data: {json.dumps(c)}\n\n"
        except RequestError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'code': e.status_code}})}\n\n"
        yield "data: [DONE]\n\n"

    async def openai(request: Request, plain, streaming):
        try:
            body = await body_of(request)
            rt = runtime()
            if isinstance(body, dict) and body.get("stream") is True:
                chunks = await run_in_threadpool(streaming(rt), body)  # validated before the stream starts
                return StreamingResponse(sse(chunks), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return JSONResponse(await run_in_threadpool(plain(rt), body))
        except (RequestError, Overloaded) as e:
            return openai_error(e)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await openai(request, lambda rt: rt.completions, lambda rt: rt.stream_completions)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await openai(request, lambda rt: rt.chat_completions, lambda rt: rt.stream_chat)

    @app.get("/v1/models")
    def models():
        try:
            return runtime().models()
        except RequestError as e:
            return openai_error(e)

    @app.get("/health")
    def health():
        rt = holder.runtime
        if rt is None or not rt.ready:
            return JSONResponse({"status": "error" if holder.error else "loading", "detail": holder.error}, 503)
        return {"status": "ok", "model": rt.model_name, **rt.metrics}

    @app.get("/metrics")
    def metrics():
        rt = holder.runtime
        if rt is None:
            return Response(b"", media_type="text/plain; version=0.0.4")
        return Response(rt.metrics_text(), media_type="text/plain; version=0.0.4")

    return app
