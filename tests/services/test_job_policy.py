"""The one job policy's commit of a job's output (``services.worker.commit_output``), on the real
code path: a SQLite jobs database, the local object store, the policy's ``run_job`` and its
spawned ``python -m services.worker --child`` process.

- A finetune whose first attempt committed its checkpoint and then died before recording the
  outcome (its worker was lost; the reaper re-queued it) succeeds on retry without training
  again: the retry emits no training progress and leaves the committed checkpoint as it was.
- A cancel that arrives while the output is being uploaded leaves nothing visible.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shared.samples import make_hf_checkpoint

TEAM = "t"


@pytest.fixture
def policy(tmp_path, monkeypatch):
    """``services.worker`` on this test's data directory, jobs database and object store (the
    job's child process reads the same settings from the environment)."""
    from services import worker
    from shared.jobs import JobStore
    from shared.settings import Settings

    env = {"LLAMA_SVC_DATA_DIR": str(tmp_path / "data"), "LLAMA_SVC_JOBS_DB": str(tmp_path / "jobs.sqlite3"),
           "LLAMA_SVC_TORCH_THREADS": "1", "LLAMA_SVC_HEARTBEAT_S": "0.3", "LLAMA_SVC_CANCEL_GRACE_S": "30"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(worker, "settings", Settings())
    monkeypatch.setattr(worker, "_stores", {})
    return worker, JobStore(worker.settings.jobs_db_url)


def _claim(jobs, job_id: str):
    return jobs.claim(job_id, jobs.mark_dispatched(job_id), "test-worker", pid=os.getpid())


def _train_steps(events: list[dict]) -> list[int]:
    return [e["step"] for e in events if e["type"] == "progress" and e.get("phase") == "train"]


def test_finetune_retried_after_its_commit_succeeds_without_training_again(policy, tmp_path):
    from services.train import tasks
    from shared.jobs import QUEUED, SUCCEEDED

    worker, jobs = policy
    checkpoints = worker.checkpoint_store()
    checkpoints.commit(TEAM, "base", make_hf_checkpoint(tmp_path / "hf"), meta={"format": "hf"})
    config = {"data": [{"text": "the quick brown fox jumps over the lazy dog. " * 4} for _ in range(8)],
              "train_iters": 2, "micro_batch_size": 2, "global_batch_size": 2, "seq_length": 32, "lr": 1e-3,
              "export_hf": False}
    job, _ = jobs.create(TEAM, "finetune", {"kind": "finetune", "source": "base", "output": "base-ft",
                                            "config": config}, max_attempts=2)

    # attempt 1: the child's work runs to its commit, then the worker is lost before recording it
    first = _claim(jobs, job.id)
    summary = tasks.run_in_child(first, worker.ChildContext(first, jobs, os.getppid()))
    assert summary["checkpoint"] == "base-ft" and summary["iteration"] == 2
    assert _train_steps(jobs.events(job.id)) == [1, 2]
    committed = checkpoints.manifest(TEAM, "base-ft")
    assert committed["service"]["job_id"] == job.id
    assert jobs.recover_lost(first, "worker lost") == QUEUED  # what the reaper does with its stale heartbeat
    seen = jobs.events(job.id)[-1]["seq"]

    # attempt 2 through the policy's entry point, in a spawned child like every train-queue job
    assert worker.run_job(tasks.train_job.job_fn, job.id, jobs.mark_dispatched(job.id)) == SUCCEEDED
    done = jobs.get(job.id)
    assert done.state == SUCCEEDED and done.attempts == 2
    assert done.result["checkpoint"] == "base-ft" and done.result["iteration"] == 2  # the first attempt's run
    retry = jobs.events(job.id, after=seen)
    assert _train_steps(retry) == [], retry  # nothing was trained again
    assert not [e for e in retry if e["type"] == "progress" and e.get("phase") == "upload"]
    assert checkpoints.manifest(TEAM, "base-ft")["storage"] == committed["storage"]  # not re-committed


class _CancelDuringUpload:
    """The object store, with the job's cancel requested once the commit has put its first file."""

    def __init__(self, store, jobs, job):
        self._store, self._jobs, self._job, self.puts = store, jobs, job, 0

    def put_file(self, key, path):
        self._store.put_file(key, path)
        self.puts += 1
        if self.puts == 1:
            self._jobs.request_cancel(self._job.id, self._job.team)
            time.sleep(0.3)  # the child checks its record at most every 0.25 s

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_cancel_during_commit_leaves_nothing_visible(policy, tmp_path):
    from shared.storage import CheckpointExists, CheckpointStore

    worker, jobs = policy
    job, _ = jobs.create(TEAM, "finetune", {"source": "base", "output": "out"})
    claimed = _claim(jobs, job.id)
    ctx = worker.ChildContext(claimed, jobs, os.getppid())
    out = tmp_path / "output"
    out.mkdir()
    for i in range(4):
        (out / f"part-{i}.bin").write_bytes(os.urandom(1024))
    store = _CancelDuringUpload(worker.checkpoint_store().store, jobs, claimed)
    with pytest.raises(worker.JobCancelled):
        worker.commit_output(ctx, "out", lambda: worker.Output(out), store=CheckpointStore(store),
                             source_manifest=False)
    assert store.puts >= 1  # it was cancelled midway through the upload
    plain = worker.checkpoint_store()
    assert not plain.exists(TEAM, "out")
    assert not list(plain.store.list(plain.key(TEAM, "out")))  # no object of it is left either

    # a checkpoint of that name committed by another job: refused before any work is done
    plain.commit(TEAM, "taken", out, meta={"service": {"job_id": "another-job"}})
    produced = []
    with pytest.raises(CheckpointExists):
        worker.commit_output(worker.ChildContext(claimed, jobs, os.getppid()), "taken",
                             lambda: produced.append(1) or worker.Output(Path(out)))
    assert produced == []
