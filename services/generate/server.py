"""The standalone generation server: Megatron's PUT /api and OpenAI-compatible endpoints.

Routes are thin: parse JSON, call the ``GenerationRuntime``, map its errors to status codes and
to each API's error body (``shared.protocol.errors``): OpenAI's ``{"error": {...}}`` on ``/v1``,
Megatron's ``{"message"}`` on ``/api``. The model loads in the background; /health answers 503
until it is ready.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable, Iterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.generate.runtime import GenerationRuntime, Overloaded, RequestError
from shared.protocol import megatron_error, openai_error
from shared.protocol.errors import MegatronError, OpenAIError
from shared.protocol.megatron import MegatronRequest, MegatronResponse
from shared.protocol.openai import (ChatRequest, ChatResponse, CompletionRequest, CompletionResponse, ModelCard,
                                    ModelList)
from shared.protocol.docs import serve_docs

MAX_BODY_BYTES = 8 << 20


class _Holder:
    def __init__(self):
        self.runtime: GenerationRuntime | None = None
        self.error: str | None = None


def _as_request_error(e: RequestError | Overloaded) -> RequestError:
    if isinstance(e, Overloaded):
        return RequestError(429, str(e), retry_after=e.retry_after)
    return e


def openai_response(e: RequestError | Overloaded) -> JSONResponse:
    e = _as_request_error(e)
    return JSONResponse(openai_error(e.status_code, e.message, e.param), e.status_code, headers=e.headers())


def megatron_response(e: RequestError | Overloaded) -> JSONResponse:
    e = _as_request_error(e)
    return JSONResponse(megatron_error(e.message), e.status_code, headers=e.headers())


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


def sse(chunks: Iterator[dict]) -> Iterator[str]:
    try:
        for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
    except RequestError as e:
        yield f"data: {json.dumps(openai_error(e.status_code, e.message, e.param))}\n\n"
    yield "data: [DONE]\n\n"


def _holder(request: Request) -> _Holder:
    return request.app.state.holder


def _runtime(request: Request) -> GenerationRuntime:
    """The loaded runtime, or 503 (with Retry-After) while it loads or after it failed to."""
    holder = _holder(request)
    rt = holder.runtime
    if rt is None or not rt.ready:
        raise RequestError(503, holder.error or "the model is still loading", retry_after=1)
    return rt


# ---- Megatron ------------------------------------------------------------------------------
megatron_router = APIRouter()


@megatron_router.put("/api")
async def api(request: Request):
    try:
        body = await body_of(request)
        return JSONResponse(await run_in_threadpool(_runtime(request).api, body))
    except (RequestError, Overloaded) as e:
        return megatron_response(e)


# ---- OpenAI --------------------------------------------------------------------------------
openai_router = APIRouter()


async def openai(request: Request, plain, streaming):
    """``plain(runtime)(body)``, or with ``stream: true`` the SSE of ``streaming(runtime)(body)``."""
    try:
        body = await body_of(request)
        rt = _runtime(request)
        if isinstance(body, dict) and body.get("stream") is True:
            chunks = await run_in_threadpool(streaming(rt), body)  # validated before the stream starts
            return StreamingResponse(sse(chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await run_in_threadpool(plain(rt), body))
    except (RequestError, Overloaded) as e:
        return openai_response(e)


@openai_router.post("/v1/completions")
async def completions(request: Request):
    return await openai(request, lambda rt: rt.completions, lambda rt: rt.stream_completions)


@openai_router.post("/v1/chat/completions")
async def chat(request: Request):
    return await openai(request, lambda rt: rt.chat_completions, lambda rt: rt.stream_chat)


@openai_router.get("/v1/models")
def models(request: Request):
    try:
        return _runtime(request).models()
    except RequestError as e:
        return openai_response(e)


@openai_router.get("/v1/models/{model_id:path}")
def model(model_id: str, request: Request):
    try:
        rt = _runtime(request)
        if model_id != rt.model_name:
            raise RequestError(404, f"model {model_id!r} not found; this server serves {rt.model_name!r}", "model")
        return rt.model_card()
    except RequestError as e:
        return openai_response(e)


# ---- operations ----------------------------------------------------------------------------
ops_router = APIRouter()


@ops_router.get("/health")
def health(request: Request):
    holder = _holder(request)
    rt = holder.runtime
    if rt is None or not rt.ready:
        return JSONResponse({"status": "error" if holder.error else "loading", "detail": holder.error}, 503)
    return {"status": "ok", "model": rt.model_name, **rt.metrics}


@ops_router.get("/metrics")
def metrics(request: Request):
    rt = _holder(request).runtime
    if rt is None:
        return Response(b"", media_type="text/plain; version=0.0.4")
    return Response(rt.metrics_text(), media_type="text/plain; version=0.0.4")


router = APIRouter()
for _group in (megatron_router, openai_router, ops_router):
    router.include_router(_group)


# ---- the app -------------------------------------------------------------------------------
def _lifespan(holder: _Holder, runtime_factory: Callable[[], GenerationRuntime] | GenerationRuntime):
    """Holds a given runtime, or builds one in a background thread (the server answers /health
    meanwhile, and says why if loading fails); closes what it built."""
    built = not isinstance(runtime_factory, GenerationRuntime)

    def load():
        try:
            holder.runtime = runtime_factory()
        except Exception as e:  # reported by /health; the server stays up to say why
            holder.error = f"{type(e).__name__}: {e}"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if built:
            threading.Thread(target=load, name="model-load", daemon=True).start()
        else:
            holder.runtime = runtime_factory
        yield
        if built and holder.runtime is not None:
            holder.runtime.close()

    return lifespan


def create_app(runtime_factory: Callable[[], GenerationRuntime] | GenerationRuntime) -> FastAPI:
    """An app around a runtime, or around a factory that builds one in a background thread."""
    holder = _Holder()
    app = FastAPI(title="llama-svc generate", lifespan=_lifespan(holder, runtime_factory), docs_url=None,
                  redoc_url=None)
    app.state.holder = holder
    serve_docs(app)
    app.include_router(router)
    typed_openapi(app)
    return app


# (path, method) -> (request model, response model, error model): the routes read their bodies
# themselves (to answer each API's own error shape), so the spec names the protocol's models
ROUTE_MODELS = {
    ("/api", "put"): (MegatronRequest, MegatronResponse, MegatronError),
    ("/v1/completions", "post"): (CompletionRequest, CompletionResponse, OpenAIError),
    ("/v1/chat/completions", "post"): (ChatRequest, ChatResponse, OpenAIError),
    ("/v1/models", "get"): (None, ModelList, OpenAIError),
    ("/v1/models/{model_id}", "get"): (None, ModelCard, OpenAIError),
}


def typed_openapi(app: FastAPI) -> None:
    """The OpenAPI document with the protocol package's request, response and error models."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})

        def ref(model) -> dict:
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(s.pop("$defs", {}))
            schemas[model.__name__] = s
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        for (path, method), (req, resp, err) in ROUTE_MODELS.items():
            op = spec["paths"][path][method]
            if req is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(req)}}}
            op["responses"] = {
                "200": {"description": "the answer", "content": {"application/json": {"schema": ref(resp)}}},
                "4XX": {"description": "a refused request (429 carries Retry-After)",
                        "content": {"application/json": {"schema": ref(err)}}}}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
