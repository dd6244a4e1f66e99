"""Train-queue jobs: finetune (``shared.training``) and eval (``shared.evaluation.run``).

Each runs in a supervised child (see ``services.worker``): it fetches its checkpoints from the
store and calls the pure entry point with progress and cancellation callbacks. A finetune
commits its checkpoint with ``services.worker.commit_output``, which looks for an earlier
attempt's commit before anything is fetched or trained. An eval job's report is its result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from services.worker import ChildContext, Job, JobContext, Output, commit_output, job_task
from shared.progress import Progress
from shared.storage import DATASET_FILE, METRICS_ARTIFACT, artifact_key, dataset_store

RESULT_KEYS = ("status", "iteration", "loss", "valid_loss", "trainable_parameters", "parameters", "elapsed_s")


@job_task("train")
def train_job(job: Job, ctx: JobContext) -> dict:
    return ctx.run_child("services.train.tasks:run_in_child")


def run_in_child(job: Job, ctx: ChildContext) -> dict:
    try:
        if job.kind == "eval":
            return _eval(job, ctx)
        return commit_output(ctx, job.params["output"], lambda: _finetune(job, ctx))
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


def _eval(job: Job, ctx: ChildContext) -> dict:
    from shared.evaluation.run import EvalParams, run_eval

    src = ctx.checkpoints.fetch(job.team, job.params["source"], ctx.workdir / "source")
    ref = ctx.checkpoints.fetch(job.team, job.params["reference"], ctx.workdir / "reference")
    return run_eval(EvalParams.from_job(job.params), src, ref, ctx.workdir / "eval", ctx.progress, ctx.should_cancel)


def _finetune(job: Job, ctx: ChildContext) -> Output:
    """Fetch the source and the data, train; the finished native checkpoint and the run's summary."""
    from shared.parallel.devices import configured_devices
    from shared.training import METRICS_FILE, run_finetune

    src = ctx.checkpoints.fetch(job.team, job.params["source"], ctx.workdir / "source")
    config = dict(job.params.get("config") or {})
    data = _place_data(job, ctx, config.pop("data", None), config.pop("dataset", None), "data")
    valid = _place_data(job, ctx, config.pop("valid_data", None), config.pop("valid_dataset", None), "valid")
    save_dir = ctx.workdir / "output"
    try:
        result = run_finetune(config, src, save_dir, data=data, valid=valid,
                              progress=lambda event: ctx.progress(Progress.from_event(event)),
                              should_cancel=ctx.should_cancel, devices=configured_devices() or None) or {}
    finally:
        metrics = save_dir.with_name(save_dir.name + "-run") / METRICS_FILE
        if metrics.is_file():  # served by GET /v1/jobs/{id}/metrics
            ctx.checkpoints.store.put_file(artifact_key(job.team, job.id, METRICS_ARTIFACT), metrics)
    meta = {"service": {"source": job.params["source"], "params": job.params}}
    return Output(save_dir, meta, {k: result[k] for k in RESULT_KEYS if k in result})


def _place_data(job: Job, ctx: ChildContext, records: list | None, dataset: str | None, label: str) -> list[Path]:
    """The job's JSONL files in its own directory: inline ``records``, or the team's ``dataset``."""
    from shared.specs.records import check_jsonl

    root = ctx.workdir / "data" / label
    if dataset is not None:
        got = dataset_store(ctx.checkpoints.store).fetch(job.team, dataset, root)
        return [got / DATASET_FILE]
    if not records:
        return []
    root.mkdir(parents=True, exist_ok=True)
    path = root / DATASET_FILE
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    check_jsonl(path, label)
    return [path]
