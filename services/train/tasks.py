"""Train-queue jobs: finetune (``shared.training``) and eval (``services.generate.eval``).

Each runs in a supervised child (see ``services.worker``): it fetches its checkpoints from the
store, calls the pure entry point with progress and cancellation callbacks, and commits the
finetuned checkpoint (manifest last). An eval job's report is its result.
"""

from __future__ import annotations

import shutil

from services.worker import ChildContext, Job, JobContext, job_task


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
        from shared.training import run_finetune

        save_dir = ctx.workdir / "output"
        result = run_finetune(dict(job.params.get("config") or {}), src, save_dir, ctx.progress,
                              ctx.should_cancel) or {}
        manifest = ctx.checkpoints.commit(job.team, job.params["output"], save_dir, meta={"service": {
            "job_id": job.id, "kind": job.kind, "source": job.params["source"], "team": job.team,
            "params": job.params}})
        keep = ("status", "iteration", "loss", "valid_loss", "trainable_parameters", "parameters", "elapsed_s")
        return {**{k: result[k] for k in keep if k in result}, "checkpoint": job.params["output"],
                "files": len(manifest["storage"]["files"])}
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)
