"""Generation relayed to the generate workers: Megatron `PUT /api` and the OpenAI-compatible API.

Requests are validated with the wire models of ``shared.protocol`` (the workers validate the
same body again with the same models); errors take each API's shape (see ``gateway.app``).
"""

from __future__ import annotations

import json
import time

from anyio import to_thread
from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from gateway import relay
from gateway.relay import ApiError
from gateway.api.deps import Svc
from gateway.auth import Team
from shared.protocol.errors import MegatronError, OpenAIError
from shared.protocol.megatron import MegatronRequest, MegatronResponse
from shared.protocol.openai import (ChatRequest, ChatResponse, CompletionRequest, CompletionResponse, ModelCard,
                                    ModelList)
from shared.protocol.relay import RelayRequest

router = APIRouter(tags=["generation"])


def _errors(model) -> dict:
    why = {400: "invalid request, or more new tokens than the model's positions", 401: "missing or invalid API key",
           404: "unknown model", 422: "invalid request (Megatron's route)",
           429: "the gateway or the generation worker is at capacity; retry after `Retry-After` seconds",
           503: "no worker available"}
    return {code: {"description": text, "model": model} for code, text in why.items()}


MEGATRON_ERRORS, OPENAI_ERRORS = _errors(MegatronError), _errors(OpenAIError)


async def _check(svc, team: str, model: str | None, max_new: int | None, prompts: list, fields: tuple[str, str],
                 status: int) -> str:
    """The model to relay to, after the gateway's own limits; ``fields`` names the request's
    new-token and prompt fields (an error's ``param``)."""
    s, (tokens, prompt) = svc.settings, fields
    if model is None:
        raise ApiError(status, "name the checkpoint to generate from in `model`", "model")
    if len(prompts) > s.max_prompts:
        raise ApiError(status, f"at most {s.max_prompts} prompts per request", prompt)
    if any(len(p) > s.max_prompt_chars for p in prompts):
        raise ApiError(status, f"a prompt is longer than {s.max_prompt_chars} characters", prompt)
    if max_new is not None and max_new > s.max_new_tokens:
        raise ApiError(status, f"at most {s.max_new_tokens} new tokens per request", tokens)
    info = await relay.model_info(svc, team, model)
    if info is None:
        raise ApiError(404, f"model {model!r} not found", "model")
    limit = info["max_positions"]
    if limit is not None and max_new is not None and max_new > limit:
        raise ApiError(400, f"{tokens}={max_new} is more than model {model!r} can hold: its "
                            f"max_position_embeddings is {limit} (prompt included); ask for fewer tokens", tokens)
    return model


def _timing_headers(response: Response, msg: dict) -> None:
    """The worker's own time, and whether the model was warm (``hit``) or loaded (``miss``)."""
    if msg.get("worker_ms") is not None:
        response.headers["X-Worker-Time-Ms"] = f"{msg['worker_ms']:.3f}"
    if msg.get("cache"):
        response.headers["X-Model-Cache"] = msg["cache"]
    if msg.get("worker"):
        response.headers["X-Served-By"] = msg["worker"]


@router.put("/api", response_model=MegatronResponse, responses=MEGATRON_ERRORS)
async def megatron_api(req: MegatronRequest, svc: Svc, team: Team, response: Response) -> dict:
    """Megatron's text generation server contract."""
    model = await _check(svc, team, req.model, req.tokens_to_generate, req.prompts, ("tokens_to_generate", "prompts"),
                         422)
    t0 = time.perf_counter()
    # only the fields the client sent: Megatron validates a present field even at its default
    body = req.model_dump(exclude={"model"}, exclude_unset=True, exclude_none=True)
    msg = await relay.call(svc, RelayRequest(api="megatron", team=team, model=model, body=body))
    _timing_headers(response, msg)
    svc.metrics.observe("megatron", time.perf_counter() - t0, msg.get("usage"))
    return msg["response"]


async def _openai(svc, team: str, api: str, req, prompts: list, response: Response):
    model = await _check(svc, team, req.model, req.new_tokens(), prompts, (req.tokens_field, req.PROMPT_FIELD), 400)
    body = req.model_dump(exclude={"model"}, exclude_unset=True)
    if req.stream:  # the worker always reports usage; the client gets it only if it asked
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    request = RelayRequest(api=api, team=team, model=model, body=body)
    t0 = time.perf_counter()
    if not req.stream:
        msg = await relay.call(svc, request)
        resp = msg["response"]
        svc.metrics.observe(api, time.perf_counter() - t0, resp.get("usage"))
        _timing_headers(response, msg)
        return resp
    chunks = await relay.stream(svc, request)

    async def sse():
        usage, first = None, True
        async for c in chunks:
            if first:
                svc.metrics.first_token(api, time.perf_counter() - t0)
                first = False
            if c.get("usage") and not c.get("choices"):
                usage = c["usage"]
                if not req.include_usage:
                    continue
            yield f"data: {json.dumps(c)}\n\n"
        svc.metrics.observe(api, time.perf_counter() - t0, usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


STREAM_DOC = {"description": "the response, or with `stream: true` server-sent events of chunks "
                             "(`data: {chunk}` lines, each a CompletionChunk / ChatChunk, then `data: [DONE]`)"}


@router.post("/v1/completions", response_model=CompletionResponse, responses={**OPENAI_ERRORS, 200: STREAM_DOC})
async def completions(req: CompletionRequest, svc: Svc, team: Team, response: Response):
    """OpenAI-compatible completions; `stream: true` relays SSE chunks from the worker."""
    return await _openai(svc, team, "completions", req, req.prompt_list(), response)


@router.post("/v1/chat/completions", response_model=ChatResponse, responses={**OPENAI_ERRORS, 200: STREAM_DOC})
async def chat_completions(req: ChatRequest, svc: Svc, team: Team, response: Response):
    """OpenAI-compatible chat completions (the checkpoint tokenizer's chat template)."""
    return await _openai(svc, team, "chat", req, [m.text for m in req.messages], response)


def _card(m: dict, team: str) -> ModelCard:
    return ModelCard(id=m["storage"]["name"], created=int(m["storage"]["committed_at"]), owned_by=team)


@router.get("/v1/models", response_model=ModelList, responses=OPENAI_ERRORS)
async def models(svc: Svc, team: Team) -> ModelList:
    ms = await to_thread.run_sync(svc.checkpoints.list, team)
    return ModelList(data=[_card(m, team) for m in ms])


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=OPENAI_ERRORS)
async def model(model_id: str, svc: Svc, team: Team) -> ModelCard:
    ms = await to_thread.run_sync(svc.checkpoints.list, team)
    for m in ms:
        if m["storage"]["name"] == model_id:
            return _card(m, team)
    raise ApiError(404, f"model {model_id!r} not found", "model")
