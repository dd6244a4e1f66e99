"""Convert-queue jobs: convert (HF -> native TP/PP), reshard (native -> native), export (native -> HF),
import (an HF checkpoint from a direct upload or a granted S3 prefix, ``services.convert.imports``).

The Celery task only supervises; the work runs in a spawned child (``run_in_child``) over the
pure ``shared.checkpoint.convert.convert``, with input and output in the object store. Every
kind commits its output with ``services.worker.commit_output``: a retry after the commit returns
the committed checkpoint, and a cancel during the upload leaves nothing visible.
"""

from __future__ import annotations

import shutil
import time

from services.worker import ChildContext, Job, JobCancelled, JobContext, Output, commit_output, job_task, settings
from shared.progress import Progress

# kind -> (loader, checkpoint_type, saver)
PLANS = {
    "convert": ("llama_mistral", "hf", "mcore"),
    "reshard": ("mcore", None, "mcore"),
    "export": ("mcore", None, "hf"),
}
OPTION_KEYS = ("target_tp", "target_pp", "dtype", "make_vocab_size_divisible_by", "true_vocab_size",
               "model_size", "transformer_impl")


@job_task("convert")
def convert_job(job: Job, ctx: JobContext) -> dict:
    return ctx.run_child("services.convert.tasks:run_in_child")


def run_in_child(job: Job, ctx: ChildContext) -> dict:
    try:
        if job.kind == "import":
            from services.convert.imports import run_import

            return run_import(job, ctx, grants=list(settings.import_grants.get(job.team, ())))
        if job.kind not in PLANS:
            raise ValueError(f"the convert queue does not run {job.kind!r} jobs")
        return commit_output(ctx, job.params["output"], lambda: convert_output(job, ctx))
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


def convert_output(job: Job, ctx: ChildContext) -> Output:
    """Fetch the source checkpoint and convert it into the attempt's work directory."""
    from shared.checkpoint.convert import ConvertOptions, convert

    params, kind = job.params, job.kind
    t0 = time.time()
    ctx.progress(Progress("fetch", 0, 1, "checkpoints"))
    src = ctx.checkpoints.fetch(job.team, params["source"], ctx.workdir / "source")
    if ctx.should_cancel():
        raise JobCancelled("cancelled before conversion")
    loader, ckpt_type, saver = PLANS[kind]
    save_dir = ctx.workdir / "output"
    shutil.rmtree(save_dir, ignore_errors=True)
    opts = ConvertOptions(load_dir=src, save_dir=save_dir, loader=loader, saver=saver, overwrite=True,
                          validate=bool(params.get("check_parity", True)), command=f"job {job.id} ({kind})",
                          source_label=params["source"],
                          **({"checkpoint_type": ckpt_type} if ckpt_type else {}),
                          **{k: params[k] for k in OPTION_KEYS if params.get(k) is not None})
    convert(opts, progress=ctx.progress, should_cancel=ctx.should_cancel)
    meta = {"service": {"source": params["source"], "params": params, "convert_seconds": round(time.time() - t0, 3)}}
    if saver == "hf":
        meta["format"] = "hf"
    return Output(save_dir, meta)
