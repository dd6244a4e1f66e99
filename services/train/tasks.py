"""Train-queue jobs: finetune (``shared.training``) and eval (``services.generate.eval``).

Each runs in a supervised child (see ``services.worker``): it fetches its checkpoints from the
store, calls the pure entry point with progress and cancellation callbacks, and commits the
finetuned checkpoint (manifest last). An eval job's report is its result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from services.worker import ChildContext, Job, JobContext, job_task
from shared.storage import DATASET_FILE, METRICS_ARTIFACT, artifact_key, dataset_store


@job_task("train")
def train_job(job: Job, ctx: JobContext) -> dict:
    return ctx.run_child("services.train.tasks:run_in_child")


def run_in_child(job: Job, ctx: ChildContext) -> dict:
    try:
        src = ctx.checkpoints.fetch(job.team, job.params["source"], ctx.workdir / "source")
        if job.kind == "eval":
            from services.generate.eval import run_job

            ref = ctx.checkpoints.fetch(job.team, job.params["reference"], ctx.workdir / "reference")
            return run_job(job.params, src, ref, ctx.workdir / "eval", ctx.progress, ctx.should_cancel)
        return _finetune(job, ctx, src)
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


def _finetune(job: Job, ctx: ChildContext, src: Path) -> dict:
    from shared.parallel.devices import configured_devices
    from shared.training import METRICS_FILE, run_finetune

    config = dict(job.params.get("config") or {})
    data = _place_data(job, ctx, config.pop("data", None), config.pop("dataset", None), "data")
    valid = _place_data(job, ctx, config.pop("valid_data", None), config.pop("valid_dataset", None), "valid")
    save_dir = ctx.workdir / "output"
    try:
        result = run_finetune(config, src, save_dir, data=data, valid=valid, progress=ctx.progress,
                              should_cancel=ctx.should_cancel, devices=configured_devices() or None) or {}
    finally:
        metrics = save_dir.with_name(save_dir.name + "-run") / METRICS_FILE
        if metrics.is_file():  # served by GET /v1/jobs/{id}/metrics
            ctx.checkpoints.store.put_file(artifact_key(job.team, job.id, METRICS_ARTIFACT), metrics)
    manifest = ctx.checkpoints.commit(job.team, job.params["output"], save_dir, meta={"service": {
        "job_id": job.id, "kind": job.kind, "source": job.params["source"], "team": job.team,
        "params": job.params}}, source_manifest=True)
    keep = ("status", "iteration", "loss", "valid_loss", "trainable_parameters", "parameters", "elapsed_s")
    return {**{k: result[k] for k in keep if k in result}, "checkpoint": job.params["output"],
            "files": len(manifest["storage"]["files"])}


def _place_data(job: Job, ctx: ChildContext, records: list | None, dataset: str | None, label: str) -> list[Path]:
    """The job's JSONL files in its own directory: inline ``records``, or the team's ``dataset``."""
    from shared.training.records import check_jsonl

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
