"""Generation relayed to the generate workers: Megatron `PUT /api` and the OpenAI-compatible API."""

from __future__ import annotations

import json
import time

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import StreamingResponse

from gateway import relay
from gateway.api.deps import Svc
from gateway.api.schemas import ChatRequest, CompletionRequest, MegatronRequest, MegatronResponse, ModelList
from gateway.auth import Team

router = APIRouter(tags=["generation"])
ERRORS = {404: {"description": "unknown model"}, 422: {"description": "invalid request"},
          400: {"description": "more new tokens than the model's positions, or a prompt too long for them"},
          429: {"description": "the gateway or the generation worker is at capacity; retry after `Retry-After` "
                               "seconds"},
          503: {"description": "no worker available"}}


async def _check(svc, team: str, model: str | None, max_new: int, prompts: list[str],
                 field: str = "tokens_to_generate") -> str:
    s = svc.settings
    if model is None:
        raise HTTPException(422, "name the checkpoint to generate from in `model`")
    if len(prompts) > s.max_prompts:
        raise HTTPException(422, f"at most {s.max_prompts} prompts per request")
    if any(len(p) > s.max_prompt_chars for p in prompts):
        raise HTTPException(422, f"a prompt is longer than {s.max_prompt_chars} characters")
    if max_new > s.max_new_tokens:
        raise HTTPException(422, f"at most {s.max_new_tokens} new tokens per request")
    info = await relay.model_info(svc, team, model)
    if info is None:
        raise HTTPException(404, f"model {model!r} not found")
    limit = info["max_positions"]
    if limit is not None and max_new > limit:
        raise HTTPException(400, f"{field}={max_new} is more than model {model!r} can hold: its "
                                 f"max_position_embeddings is {limit} (prompt included); ask for fewer tokens")
    return model


@router.put("/api", response_model=MegatronResponse, responses=ERRORS)
async def megatron_api(req: MegatronRequest, svc: Svc, team: Team, response: Response) -> dict:
    """Megatron's text generation server contract."""
    model = await _check(svc, team, req.model, req.tokens_to_generate, req.prompts)
    t0 = time.perf_counter()
    # only the fields the client sent: Megatron validates a present field even at its default
    body = req.model_dump(exclude={"model"}, exclude_unset=True, exclude_none=True)
    msg = await relay.call(svc, {"api": "megatron", "team": team, "model": model, "body": body})
    _timing_headers(response, msg)
    svc.metrics.gen_latency.labels("megatron").observe(time.perf_counter() - t0)
    svc.metrics.gen_tokens.labels("megatron").inc(req.tokens_to_generate * len(req.prompts))
    return msg["response"]


def _timing_headers(response: Response, msg: dict) -> None:
    """The worker's own time, and whether the model was warm (``hit``) or loaded (``miss``)."""
    if msg.get("worker_ms") is not None:
        response.headers["X-Worker-Time-Ms"] = f"{msg['worker_ms']:.3f}"
    if msg.get("cache"):
        response.headers["X-Model-Cache"] = msg["cache"]


async def _openai(svc, team: str, api: str, req, prompts: list[str], response: Response):
    model = await _check(svc, team, req.model, req.max_tokens, prompts, "max_tokens")
    request = {"api": api, "team": team, "model": model, "body": req.model_dump(exclude={"model"})}
    t0 = time.perf_counter()
    if not req.stream:
        msg = await relay.call(svc, request)
        resp = msg["response"]
        svc.metrics.gen_latency.labels(api).observe(time.perf_counter() - t0)
        svc.metrics.gen_tokens.labels(api).inc((resp.get("usage") or {}).get("completion_tokens", 0))
        _timing_headers(response, msg)
        return resp
    chunks = await relay.stream(svc, request)

    async def sse():
        async for c in chunks:
            if c.get("usage"):
                svc.metrics.gen_tokens.labels(api).inc(c["usage"].get("completion_tokens", 0))
            yield f"data: {json.dumps(c)}\n\n"
        svc.metrics.gen_latency.labels(api).observe(time.perf_counter() - t0)
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/v1/completions", responses=ERRORS)
async def completions(req: CompletionRequest, svc: Svc, team: Team, response: Response):
    """OpenAI-compatible completions; `stream: true` relays SSE chunks from the worker."""
    return await _openai(svc, team, "completions", req, [req.prompt], response)


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(req: ChatRequest, svc: Svc, team: Team, response: Response):
    """OpenAI-compatible chat completions (the checkpoint tokenizer's chat template)."""
    return await _openai(svc, team, "chat", req, [m.content for m in req.messages], response)


@router.get("/v1/models", response_model=ModelList)
async def models(svc: Svc, team: Team) -> ModelList:
    ms = await to_thread.run_sync(svc.checkpoints.list, team)
    return ModelList(data=[{"id": m["storage"]["name"], "object": "model", "created": int(m["storage"]["committed_at"]),
                            "owned_by": team} for m in ms])
