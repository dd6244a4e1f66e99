"""Train-queue jobs (finetune, eval): supervised children over ``shared.training`` / ``shared.evaluation``.

The child fetches the source checkpoint, calls the pure training entry point with progress and
cancellation callbacks (progress dicts may carry ``step`` and ``loss``), and commits the output.
"""

from __future__ import annotations

import importlib
import shutil

from services.worker import ChildContext, Job, JobContext, job_task

# kind -> (module, function): fn(job_params: dict, source_dir, save_dir, progress, should_cancel) -> dict
ENTRY_POINTS = {"finetune": ("shared.training", "run_finetune"), "eval": ("shared.evaluation", "run_eval")}


@job_task("train")
def train_job(job: Job, ctx: JobContext) -> dict:
    return ctx.run_child("services.train.tasks:run_in_child")


def entry_point(kind: str):
    mod_name, fn_name = ENTRY_POINTS[kind]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise NotImplementedError(f"{kind} jobs need {mod_name}, which this build does not include") from None
        raise
    if not hasattr(mod, fn_name):
        raise NotImplementedError(f"{mod_name} has no {fn_name}(); {kind} jobs cannot run on this build")
    return getattr(mod, fn_name)


def run_in_child(job: Job, ctx: ChildContext) -> dict:
    fn = entry_point(job.kind)
    try:
        src = ctx.checkpoints.fetch(job.team, job.params["source"], ctx.workdir / "source")
        save_dir = ctx.workdir / "output"
        result = fn(job.params, src, save_dir, ctx.progress, ctx.should_cancel) or {}
        out = job.params.get("output")
        if out and save_dir.exists():
            manifest = ctx.checkpoints.commit(job.team, out, save_dir, meta={"service": {
                "job_id": job.id, "kind": job.kind, "source": job.params["source"], "team": job.team,
                "params": job.params}})
            result = {**result, "checkpoint": out, "files": len(manifest["storage"]["files"])}
        return result
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)
