"""Jobs API: submit, get, list, events (JSON or SSE), cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from typing import Literal

from anyio import to_thread
from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from gateway.api.deps import Svc
from gateway.core.manifests import model_config, model_positions
from gateway.api.schemas import EventList, JobList, JobMetrics, JobOut, JobRequest
from gateway.auth import Team
from shared.jobs import KINDS, STATES, TERMINAL, IdempotencyConflict, Job, eta_seconds
from shared.jobs.logs import request_id_var
from shared.jobs.reaper import dispatch
from shared.parallel.dims import LayoutError, ParallelDims
from shared.storage import METRICS_ARTIFACT, ObjectNotFound, artifact_key
from shared.storage.uploads import UploadNotFound, granted
from shared.specs.train import ConfigError, TrainConfig

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("llama_svc.gateway")
NOT_FOUND = {404: {"description": "no such job for this team"}}


def job_out(job: Job) -> JobOut:
    progress = dict(job.progress) if job.progress else None
    if progress and progress.get("eta_s") is None and job.started_at:
        progress["eta_s"] = eta_seconds(int(progress.get("current") or 0), int(progress.get("total") or 0),
                                        job.started_at, progress.get("ts"))
    return JobOut(**{**job.to_dict(), "progress": progress})


def _get(svc, job_id: str, team: str) -> Job:
    job = svc.jobs.get(job_id, team)
    if job is None:  # another team's job is indistinguishable from none
        raise HTTPException(404, f"job {job_id!r} not found")
    return job


def _validate(svc, team: str, req) -> dict:
    s = svc.settings
    params = req.model_dump(exclude_none=True)
    if req.kind == "generate":
        if len(req.prompts) > s.max_prompts:
            raise HTTPException(422, f"at most {s.max_prompts} prompts per job")
        if any(len(p) > s.max_prompt_chars for p in req.prompts):
            raise HTTPException(422, f"a prompt is longer than {s.max_prompt_chars} characters")
        if req.tokens_to_generate > s.max_new_tokens:
            raise HTTPException(422, f"tokens_to_generate is limited to {s.max_new_tokens}")
        if not svc.checkpoints.exists(team, req.model):
            raise HTTPException(404, f"model {req.model!r} not found: upload or convert a checkpoint first")
        return params
    if req.kind == "import":
        check_import(svc, team, req.upload, req.uri, req.target)
        store = svc.datasets if req.target == "dataset" else svc.checkpoints
        if store.exists(team, req.output):
            raise HTTPException(409, f"{req.target} {req.output!r} already exists; choose another output name")
        return params
    if not svc.checkpoints.exists(team, req.source):
        raise HTTPException(404, f"source checkpoint {req.source!r} not found: upload it with POST /v1/checkpoints")
    if req.kind in ("convert", "reshard"):
        _check_layout(svc, team, req)
    if req.kind == "finetune":
        _check_finetune(svc, team, req)
        params["config"] = {**req.config.trainer_options(),
                            **req.config.model_dump(exclude_none=True, include={"data", "dataset", "valid_data",
                                                                                "valid_dataset"})}
    if req.kind == "eval":
        if not svc.checkpoints.exists(team, req.reference):
            raise HTTPException(404, f"reference checkpoint {req.reference!r} not found: upload the HF model with "
                                     "POST /v1/checkpoints")
        return params
    if not params.get("output"):
        suffix = {"convert": f"tp{req.target_tp}pp{req.target_pp}" if hasattr(req, "target_tp") else "",
                  "reshard": f"tp{req.target_tp}pp{req.target_pp}" if hasattr(req, "target_tp") else "",
                  "export": "hf", "finetune": "ft"}.get(req.kind, req.kind)
        params["output"] = f"{req.source[:100]}-{suffix}-{secrets.token_hex(3)}"
    elif svc.checkpoints.exists(team, params["output"]):
        raise HTTPException(409, f"checkpoint {params['output']!r} already exists; choose another output name")
    return params


def check_import(svc, team: str, upload: str | None, uri: str | None, target: str = "checkpoint") -> None:
    """An import names a completed direct upload of this team, or a prefix this team was granted."""
    if upload is not None:
        try:
            record = svc.uploads.get(team, upload)
        except UploadNotFound:
            raise HTTPException(404, f"upload {upload!r} not found (or it expired)") from None
        if "completed_at" not in record:
            raise HTTPException(409, f"upload {upload!r} is not complete: POST …/uploads/{upload}/complete first")
        if record.get("target", "checkpoint") != target:
            raise HTTPException(422, f"upload {upload!r} holds a {record.get('target')}, not a {target}")
        return
    if not granted(svc.settings.import_grants.get(team, ()), uri):
        raise HTTPException(403, f"your team may not import from {uri!r}; an operator grants S3 prefixes per team "
                                 "(LLAMA_SVC_IMPORT_GRANTS)")


def _check_layout(svc, team: str, req) -> None:
    """The target TP/PP must split the source model (the converter's own check, run at submit)."""
    cfg = model_config(svc.checkpoints.manifest(team, req.source))
    if cfg is None:
        return
    try:
        ParallelDims(tp=req.target_tp, pp=req.target_pp).check_model(cfg)
    except LayoutError as e:
        raise HTTPException(422, f"target_tp={req.target_tp}, target_pp={req.target_pp} do not fit "
                                 f"{req.source!r}: {e}") from None


def _check_finetune(svc, team: str, req) -> None:
    """What can be known at submit: datasets exist, the plan fits a worker and the model."""
    c, s = req.config, svc.settings
    for name in (c.dataset, c.valid_dataset):
        if name is not None and not svc.datasets.exists(team, name):
            raise HTTPException(404, f"dataset {name!r} not found: upload it with POST /v1/datasets?name={name}")
    tp, pp = c.tensor_model_parallel_size or 1, c.pipeline_model_parallel_size or 1
    world = c.world_size or tp * pp
    if world > s.max_train_world_size:
        raise HTTPException(422, f"the plan needs {world} ranks but a train worker offers at most "
                                 f"{s.max_train_world_size}; lower world_size or TP x PP")
    positions = model_positions(svc.checkpoints.manifest(team, req.source))
    if c.seq_length is not None and positions is not None and c.seq_length > positions:
        raise HTTPException(422, f"seq_length {c.seq_length} exceeds the model's {positions} positions "
                                 "(max_position_embeddings); lower seq_length")
    try:  # the trainer's own cross-field checks (batch sizes, schedule, LoRA), with placeholder paths
        TrainConfig.from_dict({**c.trainer_options(), "load": req.source, "save": "output", "data_path": ["data"]})
    except ConfigError as e:
        raise HTTPException(422, f"invalid finetune config: {e}") from None


@router.post("", status_code=202, response_model=JobOut, responses={
    404: {"description": "source checkpoint not found"}, 409: {"description": "Idempotency-Key reused / output exists"},
    429: {"description": "too many active jobs for this team (see Retry-After)"}})
async def submit_job(svc: Svc, team: Team, response: Response, req: JobRequest = Body(..., discriminator="kind"),
                     idempotency_key: str | None = Header(None, description="1-200 characters")) -> JobOut:
    """Submit a job; it runs asynchronously. Poll `GET /v1/jobs/{id}` or stream its events."""
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
        raise HTTPException(422, f"the Idempotency-Key header must be 1-200 characters (got {len(idempotency_key)})")
    job, created = await enqueue(svc, team, req, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


async def enqueue(svc, team: str, req, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Validate, record and dispatch a job request; (job, False) replays an Idempotency-Key's job."""
    body_hash = hashlib.sha256(json.dumps(req.model_dump(), sort_keys=True).encode()).hexdigest()
    if idempotency_key is not None:
        old = await to_thread.run_sync(lambda: svc.jobs.list_by_key(team, idempotency_key))
        if old is not None:
            if old.request_hash != body_hash:
                raise HTTPException(409, "this Idempotency-Key was already used with a different request; use a new key")
            return old, False
    s = svc.settings
    if await to_thread.run_sync(svc.jobs.count_active, team) >= s.max_active_jobs_per_team:
        raise HTTPException(429, f"your team has {s.max_active_jobs_per_team} active jobs; wait for some to finish",
                            headers={"Retry-After": str(s.retry_after_s)})
    params = await to_thread.run_sync(_validate, svc, team, req)
    rid = request_id_var.get()
    try:
        job, created = await to_thread.run_sync(lambda: svc.jobs.create(
            team, req.kind, params, max_attempts=s.max_attempts, idempotency_key=idempotency_key,
            request_hash=body_hash, request_id=rid))
    except IdempotencyConflict as e:
        raise HTTPException(409, str(e)) from None
    if created:
        log.info("job accepted", extra={"job_id": job.id, "kind": job.kind, "team": team})
        await to_thread.run_sync(dispatch, svc.jobs, svc.celery, job.id, job.kind)
        job = svc.jobs.get(job.id) or job
    return job, created


@router.get("", response_model=JobList)
async def list_jobs(svc: Svc, team: Team, kind: Literal[KINDS] | None = None,  # type: ignore[valid-type]
                    state: Literal[STATES] | None = None,  # type: ignore[valid-type]
                    limit: int = Query(50, ge=1, le=200), cursor: int | None = Query(None, ge=1)) -> JobList:
    """Newest first. Filter by kind and state; page with `cursor`."""
    jobs = await to_thread.run_sync(lambda: svc.jobs.list(team, kind=kind, state=state, limit=limit + 1,
                                                          before_seq=cursor))
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return JobList(jobs=[job_out(j) for j in jobs], next_cursor=jobs[-1].seq if more and jobs else None)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
async def get_job(job_id: str, svc: Svc, team: Team) -> JobOut:
    return job_out(await to_thread.run_sync(_get, svc, job_id, team))


@router.post("/{job_id}/cancel", response_model=JobOut, responses={
    **NOT_FOUND, 409: {"description": "the job already finished"}})
async def cancel_job(job_id: str, svc: Svc, team: Team) -> JobOut:
    """Queued jobs are cancelled at once; running ones stop at their next step."""
    job = await to_thread.run_sync(_get, svc, job_id, team)
    if job.state in ("succeeded", "failed"):
        raise HTTPException(409, f"job {job_id} already {job.state}")
    job = await to_thread.run_sync(svc.jobs.request_cancel, job_id, team)
    log.info("cancel requested", extra={"job_id": job_id, "team": team})
    return job_out(job)


@router.get("/{job_id}/events", response_model=EventList, responses={
    **NOT_FOUND, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with Accept: text/event-stream"}})
async def job_events(job_id: str, request: Request, svc: Svc, team: Team,
                     after: int = Query(0, ge=0, description="only events with seq > after"),
                     limit: int = Query(500, ge=1, le=5000)):
    """State changes and progress (phase, current/total, ETA; step and loss for finetune)."""
    job = await to_thread.run_sync(_get, svc, job_id, team)
    if "text/event-stream" not in request.headers.get("accept", ""):
        events = await to_thread.run_sync(svc.jobs.events, job_id, after, limit)
        return EventList(events=events, state=job.state)

    async def sse():
        last = after
        while True:
            events = await to_thread.run_sync(svc.jobs.events, job_id, last, 500)
            for e in events:
                last = e["seq"]
                yield f"id: {e['seq']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n"
            if not events:
                current = await to_thread.run_sync(svc.jobs.get, job_id)
                if current is None or current.state in TERMINAL:
                    tail = await to_thread.run_sync(svc.jobs.events, job_id, last, 500)
                    for e in tail:
                        yield f"id: {e['seq']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n"
                    yield "event: end\ndata: {}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.25)

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/{job_id}/metrics", response_model=JobMetrics, responses={
    **NOT_FOUND, 409: {"description": "the job has written no metrics yet"}})
async def job_metrics(job_id: str, svc: Svc, team: Team) -> JobMetrics:
    """A finetune job's training metrics (one entry per step and evaluation), once it has finished."""
    job = await to_thread.run_sync(_get, svc, job_id, team)
    try:
        raw = await to_thread.run_sync(svc.checkpoints.store.get_bytes, artifact_key(team, job.id, METRICS_ARTIFACT))
    except ObjectNotFound:
        why = "only finetune jobs write metrics" if job.kind != "finetune" else f"the job is {job.state}; metrics " \
              "are stored when its training ends"
        raise HTTPException(409, f"job {job_id} has no metrics: {why}") from None
    return JobMetrics(job_id=job.id, metrics=[json.loads(line) for line in raw.decode().splitlines() if line.strip()])
