"""Convert-queue jobs: convert (HF -> native TP/PP), reshard (native -> native), export (native -> HF),
import (an HF checkpoint from a direct upload or a granted S3 prefix, ``services.convert.imports``).

The Celery task only supervises; the work runs in a spawned child (``run_in_child``) over the
pure ``shared.checkpoint.convert.convert``, with input and output in the object store.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from services.worker import ChildContext, Job, JobContext, job_task
from shared.storage import CheckpointExists, CheckpointStore, CommitCancelled

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
            from services.worker import settings

            m = run_import(job.params, team=job.team, job_id=job.id, checkpoints=ctx.checkpoints,
                           workdir=ctx.workdir, grants=list(settings.import_grants.get(job.team, ())),
                           progress=ctx.progress)
            return _summary(job.params["output"], m)
        return run_conversion(job.kind, job.params, team=job.team, job_id=job.id, checkpoints=ctx.checkpoints,
                              workdir=ctx.workdir, progress=ctx.progress, should_cancel=ctx.should_cancel)
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


def run_conversion(kind: str, params: dict, *, team: str, job_id: str, checkpoints: CheckpointStore, workdir: Path,
                   progress: Callable[[dict], None], should_cancel: Callable[[], bool]) -> dict:
    """Fetch the source checkpoint, convert it locally, commit the output (manifest last)."""
    from shared.checkpoint.convert import Cancelled, ConvertOptions, convert

    if kind not in PLANS:
        raise ValueError(f"the convert queue does not run {kind!r} jobs")
    out_name = params["output"]
    if checkpoints.exists(team, out_name):
        m = checkpoints.manifest(team, out_name)
        if m.get("service", {}).get("job_id") == job_id:  # a previous attempt already committed it
            return _summary(out_name, m)
        raise CheckpointExists(f"checkpoint {out_name!r} already exists; choose another output name")
    t0 = time.time()
    progress({"phase": "fetch", "current": 0, "total": 1, "unit": "checkpoints"})
    src = checkpoints.fetch(team, params["source"], workdir / "source")
    if should_cancel():
        raise Cancelled("cancelled before conversion")
    loader, ckpt_type, saver = PLANS[kind]
    save_dir = workdir / "output"
    shutil.rmtree(save_dir, ignore_errors=True)
    opts = ConvertOptions(load_dir=src, save_dir=save_dir, loader=loader, saver=saver, overwrite=True,
                          validate=bool(params.get("check_parity", True)), command=f"job {job_id} ({kind})",
                          source_label=params["source"],
                          **({"checkpoint_type": ckpt_type} if ckpt_type else {}),
                          **{k: params[k] for k in OPTION_KEYS if params.get(k) is not None})
    convert(opts, progress=progress, should_cancel=should_cancel)
    if should_cancel():
        raise Cancelled("cancelled before upload")
    meta = {"service": {"job_id": job_id, "kind": kind, "source": params["source"], "team": team,
                        "params": params, "convert_seconds": round(time.time() - t0, 3)}}
    if saver == "hf":
        meta.setdefault("format", "hf")
    try:
        manifest = checkpoints.commit(
            team, out_name, save_dir, meta=meta, source_manifest=True, should_cancel=should_cancel,
            progress=lambda done, total: progress({"phase": "upload", "current": done, "total": total, "unit": "bytes"}))
    except CommitCancelled as e:
        raise Cancelled(str(e)) from None
    return _summary(out_name, manifest)


def _summary(name: str, manifest: dict) -> dict:
    lay = manifest.get("layout") or {}
    return {"checkpoint": name, "format": manifest.get("format"),
            "tp": lay.get("tp"), "pp": lay.get("pp"), "dtype": manifest.get("dtype"),
            "files": len(manifest["storage"]["files"]), "bytes": manifest["storage"]["bytes"]}
