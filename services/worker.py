"""The Celery app and the ONE decorator owning job policy.

Policy (see ``shared.jobs.transport`` for the delivery design): a job message is acknowledged
when a worker starts it; the worker claims the job record with the message's dispatch token
(stale or duplicate messages are dropped), then supervises the job: heavy work runs in a
spawned child process in its own process group (never CUDA in a forked child), the supervisor
refreshes the record's heartbeat, and a cancel request (a flag in the record, also checked by
the child between steps) ends in killing the child's process group after a grace period. The
child dies with its supervisor (PR_SET_PDEATHSIG), so a SIGKILLed worker leaves no orphan
writing output; the reaper then re-queues or fails the job. A child killed by a signal (the
OOM killer) counts as an attempt the same way: the supervisor re-queues the job while attempts
remain. The outcome is written with the attempt number as a fencing token, so each job ends in
exactly one terminal state.

Each attempt works in ``<data_dir>/work/<job_id>-<attempt>``; the supervisor removes it when
the child has exited, whatever the outcome, and a starting worker removes every work directory
that is not its job's running attempt (left by a killed worker). Error messages recorded in a
job never carry host paths (``shared.paths.redact``).

Every job kind goes through ``job_task``: convert/reshard/export/import and finetune/eval in a
supervised child, batch generation on the generate worker's own job thread (its models stay warm
in the worker). Progress of every kind is one ``shared.progress.Progress`` record, passed
through one ``ProgressThrottle``; every job that commits a checkpoint does it with
``commit_output`` (retry-safe and cancellation-aware).

Run a worker:  celery -A services.worker worker -Q convert --pool solo -n convert@%h
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from celery import signals

from shared.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobStore
from shared.jobs.logs import job_id_var, setup_json_logging
from shared.progress import ProgressThrottle, bytes_progress
from shared.jobs.reaper import dispatch as redispatch
from shared.jobs.transport import make_celery, job_task_name
from shared.paths import redact
from shared.settings import get_settings
from shared.storage import CheckpointExists, CheckpointStore, CommitCancelled, open_store

log = logging.getLogger("llama_svc.worker")
settings = get_settings()
app = make_celery(settings.redis_url, visibility_timeout=settings.visibility_timeout_s)
app.conf.include = ["services.convert.tasks", "services.train.tasks", "services.generate.tasks"]

EXIT_CANCELLED = 3
_stores: dict[str, object] = {}


def job_store() -> JobStore:
    if "jobs" not in _stores:
        _stores["jobs"] = JobStore(settings.jobs_db_url, pool_size=settings.jobs_db_worker_pool_size)
    return _stores["jobs"]


def checkpoint_store() -> CheckpointStore:
    if "ckpt" not in _stores:
        _stores["ckpt"] = CheckpointStore(open_store(settings.storage))
    return _stores["ckpt"]


class JobCancelled(Exception):
    pass


class JobFailed(Exception):
    pass


class OwnershipLost(Exception):
    """The reaper re-queued or failed this attempt (our heartbeat was judged stale)."""


class ChildKilled(Exception):
    """The job's child process was killed by a signal it did not ask for (e.g. the OOM killer)."""

    def __init__(self, signum: int):
        super().__init__(f"killed by signal {signum}")
        self.signum = signum


def work_root() -> Path:
    return settings.data_dir / "work"


def work_dir(job_id: str, attempt: int) -> Path:
    """The scratch directory of one attempt of a job."""
    return work_root() / f"{job_id}-{attempt}"


def job_roots(workdir: Path | None) -> dict[str, Path]:
    """Directory -> label for ``redact``: the names the job functions give their subdirectories."""
    roots: dict[str, Path] = {"": settings.data_dir}
    if workdir is not None:
        roots.update({"work": workdir, **{n: workdir / n for n in ("source", "reference", "output", "eval", "data")}})
    return roots


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ---------------------------------------------------------------- the supervisor side
class JobContext:
    """Given to a job function running in the worker; a thread keeps the record's heartbeat."""

    def __init__(self, job: Job, store: JobStore):
        self.job, self.store = job, store
        self.lost, self.cancel = threading.Event(), threading.Event()
        self._stop = threading.Event()
        self.progress = _throttle(job, store)
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"heartbeat-{job.id[:8]}")

    def __enter__(self) -> "JobContext":
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join(timeout=5)

    def _heartbeat(self) -> None:
        while not self._stop.wait(settings.heartbeat_s):
            try:
                current = self.store.heartbeat(self.job.id, self.job.attempts)
            except Exception as e:  # a busy database must not kill the job; the next beat retries
                log.warning("heartbeat failed: %s", e, extra={"job_id": self.job.id})
                continue
            if current is None:
                self.lost.set()
                return
            if current.cancel_requested:
                self.cancel.set()

    def should_cancel(self) -> bool:
        return self.cancel.is_set() or self.lost.is_set()

    def run_child(self, target: str, *, env: dict | None = None) -> dict:
        """Run ``module:function(job, ChildContext) -> dict`` in a spawned process group.

        Raises ``ChildKilled`` when a signal ended the child without a cancel (``run_job``
        retries it like a lost worker). The attempt's work directory is removed once the child
        and its group are gone, whatever the outcome.
        """
        job = self.job
        workdir = work_dir(job.id, job.attempts)
        for old in work_root().glob(f"{job.id}-*"):  # earlier attempts (a killed worker's)
            shutil.rmtree(old, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f"job-{job.id[:8]}-") as tmp:
            result_path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "services.worker", "--child", job.id, str(job.attempts), target,
                   str(result_path), str(os.getpid())]
            proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **(env or {})})
            try:
                rc = self._supervise(proc)
            finally:
                _kill_group(proc.pid)
                _remove_tree(workdir)
            out = json.loads(result_path.read_text()) if result_path.exists() else {}
        if rc == 0 and "result" in out:
            return out["result"]
        if rc == EXIT_CANCELLED or self.cancel.is_set():
            raise JobCancelled(out.get("error") or "cancelled")
        if rc < 0 and "error" not in out:
            raise ChildKilled(-rc)
        raise JobFailed(redact(out.get("error") or f"exited with code {rc}", job_roots(workdir)))

    def _supervise(self, proc: subprocess.Popen) -> int:
        cancel_seen = None
        while True:
            try:
                return proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass
            if self.lost.is_set():
                _kill_group(proc.pid)
                proc.wait()
                raise OwnershipLost(self.job.id)
            if self.cancel.is_set() and cancel_seen is None:
                cancel_seen = time.time()
                log.info("cancel requested; the job stops at its next step")
            if cancel_seen is not None and time.time() - cancel_seen > settings.cancel_grace_s:
                log.warning("job did not stop within %.0fs of a cancel; killing its process group",
                            settings.cancel_grace_s)
                _kill_group(proc.pid)
                proc.wait()
                return -signal.SIGKILL


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: Path) -> None:
    for _ in range(3):  # a dying process of the group may still create a file
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.2)
    log.warning("could not remove the work directory %s; the next worker start will", path.name)


# ---------------------------------------------------------------- the decorator
def job_task(queue: str, *, submit: Callable[..., Any] | None = None) -> Callable:
    """Register ``fn(job, ctx) -> result dict`` as the job task of ``queue``, under ``run_job``'s
    policy. ``submit(run_job, fn, job_id, dispatch)``: run it elsewhere than inline in the Celery
    task, e.g. on a thread of the worker (the generate queue's batch jobs)."""

    def deco(fn: Callable[[Job, JobContext], dict]):
        @app.task(name=job_task_name(queue), acks_late=False, ignore_result=True)
        def task(job_id: str, dispatch: int) -> None:
            if submit is None:
                run_job(fn, job_id, dispatch)
            else:
                submit(run_job, fn, job_id, dispatch)

        task.job_fn = fn
        return task

    return deco


def run_job(fn: Callable[[Job, JobContext], dict], job_id: str, dispatch: int) -> str | None:
    store = job_store()
    token = job_id_var.set(job_id)
    try:
        job = store.claim(job_id, dispatch, worker=f"{socket.gethostname()}:{os.getpid()}", pid=os.getpid())
        if job is None:
            log.info("dropping stale or duplicate message (dispatch %s)", dispatch)
            return None
        log.info("job started (attempt %d/%d)", job.attempts, job.max_attempts, extra={"kind": job.kind})
        try:
            with JobContext(job, store) as ctx:
                result = fn(job, ctx)
                if ctx.lost.is_set():
                    raise OwnershipLost(job.id)
            state, kw = SUCCEEDED, {"result": result}
        except JobCancelled:
            state, kw = CANCELLED, {}
        except OwnershipLost:
            log.warning("this attempt no longer owns the job; leaving it to its new owner")
            return None
        except ChildKilled as e:
            return _retry_killed(store, job, e.signum)
        except Exception as e:
            msg = str(e) if isinstance(e, JobFailed) else f"{type(e).__name__}: {e}"
            state, kw = FAILED, {"error": redact(msg, job_roots(work_dir(job.id, job.attempts)))}
        if not store.finish(job.id, job.attempts, state, **kw):
            log.warning("could not record %s: the job moved on", state)
            return None
        log.info("job %s", state, extra={"kind": job.kind, **({"error": kw["error"]} if "error" in kw else {})})
        return state
    finally:
        job_id_var.reset(token)


def _retry_killed(store: JobStore, job: Job, signum: int) -> str | None:
    """Re-queue and re-publish a job whose child a signal killed; out of attempts, fail it.

    Fenced by the attempt like the reaper's ``recover_lost``; a cancel requested meanwhile wins."""
    reason = f"the job's process was killed by signal {signum} ({_signal_name(signum)})"
    current = store.get(job.id)
    mine = dataclasses.replace(job, cancel_requested=bool(current and current.cancel_requested))
    new = store.recover_lost(mine, reason, error=_killed_error(store, job, signum), event={"signal": signum})
    if new == QUEUED:
        log.warning("%s; re-queued (attempt %d of %d used)", reason, job.attempts, job.max_attempts)
        redispatch(store, app, job.id, job.kind)
    elif new is None:
        log.warning("could not record the killed attempt: the job moved on")
    else:
        log.info("job %s", new, extra={"kind": job.kind, "error": reason})
    return new


def _killed_error(store: JobStore, job: Job, signum: int) -> str:
    """The failure reason once no attempt is left; says whether every attempt died the same way."""
    signals = [e.get("signal") for e in store.retries(job.id)] + [signum]
    what = f"the job's process was killed by signal {signum} ({_signal_name(signum)})"
    if len(signals) == job.attempts and all(s == signum for s in signals):
        what += " on its only attempt" if job.attempts == 1 else f" on each of its {job.attempts} attempts"
    else:
        what += f" on its last attempt; gave up after {job.attempts} attempt(s)"
    if signum == signal.SIGKILL:
        what += ("; SIGKILL usually means the machine ran out of memory: make the job use less, e.g. a "
                 "smaller model or target layout, a lower-precision dtype, or LoRA for a finetune")
    return what


# ---------------------------------------------------------------- the child side
class ChildContext:
    """Given to the heavy function in the child: progress reporting and cancellation checks."""

    def __init__(self, job: Job, store: JobStore, parent_pid: int):
        self.job, self.store, self.parent_pid = job, store, parent_pid
        self._last_check, self._cancel = 0.0, False
        self.workdir = work_dir(job.id, job.attempts)
        self.checkpoints = checkpoint_store()
        self.progress = _throttle(job, store)

    def should_cancel(self) -> bool:
        if self._cancel:
            return True
        if os.getppid() != self.parent_pid:  # our supervisor is gone
            self._cancel = True
            return True
        now = time.time()
        if now - self._last_check >= 0.25:
            self._last_check = now
            j = self.store.get(self.job.id)
            self._cancel = j is None or j.cancel_requested or j.state != "running" or j.attempts != self.job.attempts
        return self._cancel


def _throttle(job: Job, store: JobStore) -> ProgressThrottle:
    """``progress(Progress)`` of one attempt: throttled, then stored in the job record."""
    return ProgressThrottle(lambda record: store.set_progress(job.id, job.attempts, record))


# ---------------------------------------------------------------- committing a job's output
@dataclass
class Output:
    """What a job produced for ``commit_output``: the directory to commit, the manifest fields to
    add (``service`` merged with the job's own), and the job's result fields (kept in the
    manifest, so that a retry after the commit returns them without redoing the work)."""
    directory: Path
    meta: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


def commit_output(ctx: ChildContext | JobContext, name: str, produce: Callable[[], Output], *,
                  store: CheckpointStore | None = None, source_manifest: bool = True) -> dict:
    """Produce the job's output checkpoint ``name`` and commit it (manifest last); the job's result.

    Retry-safe: when ``name`` exists and its manifest's ``service.job_id`` is this job's id, an
    earlier attempt committed it and died before recording the outcome: its summary is returned
    and ``produce`` is never called (no fetch, no conversion, no training). A checkpoint of that
    name from anything else raises ``CheckpointExists`` before any work. Cancellation-aware: a
    cancel before the commit or during its upload raises ``JobCancelled`` and leaves nothing
    visible (the commit deletes what it put; it never reached its manifest).
    """
    job, store = ctx.job, store or checkpoint_store()
    earlier = committed_by(store, job, name)
    if earlier is not None:
        log.info("output %r was committed by an earlier attempt of this job; not redoing it", name)
        return output_summary(name, earlier)
    out = produce()
    if ctx.should_cancel():
        raise JobCancelled("cancelled before the commit; nothing is visible")
    service = {"job_id": job.id, "kind": job.kind, "team": job.team, **out.meta.get("service", {}),
               "result": out.result}
    try:
        manifest = store.commit(job.team, name, out.directory, meta={**out.meta, "service": service},
                                source_manifest=source_manifest, should_cancel=ctx.should_cancel,
                                progress=lambda done, total: ctx.progress(bytes_progress("upload", done, total)))
    except CommitCancelled as e:
        raise JobCancelled(str(e)) from None
    return output_summary(name, manifest)


def committed_by(store: CheckpointStore, job: Job, name: str) -> dict | None:
    """The manifest of ``name`` when this job committed it; None when it does not exist yet."""
    if not store.exists(job.team, name):
        return None
    manifest = store.manifest(job.team, name)
    if (manifest.get("service") or {}).get("job_id") != job.id:
        raise CheckpointExists(f"checkpoint {name!r} already exists; choose another output name")
    return manifest


def output_summary(name: str, manifest: dict) -> dict:
    """A committing job's result: its own result fields, and what was committed."""
    lay = manifest.get("layout") or {}
    return {**((manifest.get("service") or {}).get("result") or {}),
            "checkpoint": name, "format": manifest.get("format"), "tp": lay.get("tp"), "pp": lay.get("pp"),
            "dtype": manifest.get("dtype"), "files": len(manifest["storage"]["files"]),
            "bytes": manifest["storage"]["bytes"]}


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def child_main(job_id: str, attempt: int, target: str, result_path: str, parent_pid: int) -> int:
    _die_with_parent(parent_pid)
    setup_json_logging(settings.log_level)
    job_id_var.set(job_id)
    threads = os.environ.get("LLAMA_SVC_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    store = JobStore(settings.jobs_db_url, pool_size=settings.jobs_db_worker_pool_size, migrate=False)
    job = store.get(job_id)
    if job is None or job.attempts != attempt:
        return 1
    ctx = ChildContext(job, store, parent_pid)
    mod, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod), fn_name)
    out = Path(result_path)
    try:
        result = fn(job, ctx)
        out.write_text(json.dumps({"result": result}))
        return 0
    except Exception as e:
        cancelled = type(e).__name__ in ("Cancelled", "JobCancelled")
        msg = "cancelled" if cancelled else redact(f"{type(e).__name__}: {e}", job_roots(ctx.workdir))
        if not cancelled:
            log.exception("job failed")
        out.write_text(json.dumps({"error": msg}))
        return EXIT_CANCELLED if cancelled else 1


# ---------------------------------------------------------------- worker liveness
ALIVE_FILE = Path(tempfile.gettempdir()) / "llama-svc-worker-alive"


def sweep_workdirs(store: JobStore, root: Path | None = None) -> list[str]:
    """Remove every work directory that is not its job's running attempt; returns their names.

    What is left there was written by a killed worker or child (workers may share the data
    directory: a running attempt's directory is never touched)."""
    root = root or work_root()
    removed = []
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        job_id, _, attempt = d.name.rpartition("-")
        job = store.get(job_id) if job_id and attempt.isdigit() else None
        if job is not None and job.state == RUNNING and job.attempts == int(attempt):
            continue
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.unlink(missing_ok=True)
        removed.append(d.name)
    return removed


@signals.worker_ready.connect
def _on_ready(sender=None, **_):
    setup_json_logging(settings.log_level)
    try:
        removed = sweep_workdirs(job_store())
        if removed:
            log.info("removed %d stale work directories", len(removed))
    except Exception as e:  # a full or odd data directory must not stop the worker
        log.warning("could not sweep work directories: %s", e)
    try:
        queues = sorted(app.amqp.queues.consume_from)
    except Exception:
        queues = []

    def beat():
        import redis

        r = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        while True:
            try:
                ALIVE_FILE.touch()
                for q in queues:
                    r.set(f"llama_svc:worker:{q}:{socket.gethostname()}:{os.getpid()}", time.time(), ex=15)
            except Exception:
                pass
            time.sleep(5)

    threading.Thread(target=beat, daemon=True, name="liveness").start()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        job_id, attempt, target, result_path, parent = argv[1:6]
        return child_main(job_id, int(attempt), target, result_path, int(parent))
    if argv[:1] == ["--health"]:
        fresh = ALIVE_FILE.exists() and time.time() - ALIVE_FILE.stat().st_mtime < 30
        return 0 if fresh else 1
    print("usage: python -m services.worker --health | celery -A services.worker worker -Q QUEUE --pool solo",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
