"""Failure paths with real processes: a worker or a job's child SIGKILLed mid-conversion; Redis
restarted mid-job; work directories left by killed processes. Each runs on both jobs-database
backends (``jobs_db``: SQLite, PostgreSQL)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from services.client import ApiError
from tests.services.conftest import client, dump_logs, start_stack, wait_state

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def stack(request, tmp_path, jobs_db):
    s = start_stack(tmp_path / "stack", queues=("convert",), env={"LLAMA_SVC_JOBS_DB": jobs_db})
    yield s
    if request.session.testsfailed:
        dump_logs(s)
    s.__exit__(None, None, None)


def _states(c, job_id):
    return [e["state"] for e in c.events(job_id)["events"] if e["type"] == "state"]


def _child_pid(job_id: str, timeout: float = 30) -> int:
    """The job's child: ``python -m services.worker --child <job_id> ...``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "--child" in cmd and job_id in cmd:
                return p.pid
        time.sleep(0.05)
    raise AssertionError(f"no child process for job {job_id}")


def _past_fetch(j) -> bool:
    return j["state"] == "running" and (j["progress"] or {}).get("phase") not in (None, "fetch")


def test_worker_killed_mid_conversion(stack, medium_hf):
    a = client(stack)
    a.upload_checkpoint("medium", medium_hf)
    job = a.submit("convert", source="medium", output="medium-tp2", target_tp=2, check_parity=False)
    wait_state(a, job["id"], lambda j: j["state"] == "running" and (j["progress"] or {}).get("phase") not in
               (None, "fetch"), what="a running conversion")
    stack.kill("worker-convert")  # SIGKILL the worker; its conversion child dies with it
    with pytest.raises(ApiError) as e:
        a.get_checkpoint("medium-tp2")
    assert e.value.status == 404  # no partial checkpoint is visible
    # the reaper notices the stale heartbeat and re-queues; a new worker finishes the job
    wait_state(a, job["id"], lambda j: j["state"] == "queued", timeout=30, what="re-queued")
    stack.start_worker("convert", name="worker-convert-2")
    final = wait_state(a, job["id"], lambda j: j["state"] in TERMINAL, timeout=180, what="an end")
    assert final["state"] == "succeeded" and final["attempts"] == 2, (final, stack.log_tail())
    states = _states(a, job["id"])
    assert states == ["queued", "running", "queued", "running", "succeeded"]
    assert sum(s in TERMINAL for s in states) == 1
    ck = a.get_checkpoint("medium-tp2")
    assert ck["service"]["job_id"] == job["id"] and ck["layout"]["tp"] == 2
    time.sleep(1)
    assert a.get(job["id"])["state"] == "succeeded"  # nothing flips it afterwards


def test_worker_killed_out_of_attempts_fails(stack, tiny_hf):
    a = client(stack)
    a.upload_checkpoint("tiny", tiny_hf)
    stack.kill("worker-convert")
    job = a.submit("export", source="tiny", output="never")  # an HF source: fails fast if it ever ran
    for attempt in (1, 2):
        stack.start_worker("convert", name=f"w{attempt}")
        wait_state(a, job["id"], lambda j: j["attempts"] == attempt and j["state"] == "running", what="running")
        stack.kill(f"w{attempt}", signal.SIGKILL)
        wait_state(a, job["id"], lambda j: j["state"] != "running", timeout=30, what="recovered")
    final = wait_state(a, job["id"], lambda j: j["state"] in TERMINAL, timeout=30, what="an end")
    assert final["state"] == "failed" and "gave up after 2 attempt" in final["error"]
    assert sum(s in TERMINAL for s in _states(a, job["id"])) == 1


def test_redis_restarted_mid_job(stack, tiny_hf):
    a = client(stack)
    a.upload_checkpoint("tiny", tiny_hf)
    first = a.submit("convert", source="tiny", output="tiny-a", target_pp=2, check_parity=False)
    wait_state(a, first["id"], lambda j: j["state"] == "running", what="running")
    # Redis dies and comes back empty (no persistence): the queue and any messages are gone
    stack.stop_redis(signal.SIGKILL)
    for f in (stack.data_dir / "redis").glob("**/*"):
        if f.is_file():
            f.unlink()
    second = a.submit("convert", source="tiny", output="tiny-b", target_tp=2, check_parity=False)
    assert second["state"] == "queued"  # accepted and on record although Redis is down
    stack.start_redis()
    for job in (first, second):
        final = wait_state(a, job["id"], lambda j: j["state"] in TERMINAL, timeout=180, what="an end")
        assert final["state"] == "succeeded", (final, stack.log_tail())
    assert {c["name"] for c in a.list_checkpoints()} >= {"tiny-a", "tiny-b"}


def test_child_killed_by_signal_is_retried(stack, medium_hf):
    a = client(stack)
    a.upload_checkpoint("medium", medium_hf)
    job = a.submit("convert", source="medium", output="medium-tp2", target_tp=2, check_parity=False)
    wait_state(a, job["id"], _past_fetch, what="a running conversion")
    work = stack.data_dir / "work"
    assert (work / f"{job['id']}-1").is_dir()  # one work directory per attempt
    os.kill(_child_pid(job["id"]), signal.SIGKILL)  # as the OOM killer would
    final = wait_state(a, job["id"], lambda j: j["state"] in TERMINAL, timeout=180, what="an end")
    assert final["state"] == "succeeded" and final["attempts"] == 2, (final, stack.log_tail())
    assert _states(a, job["id"]) == ["queued", "running", "queued", "running", "succeeded"]
    retry = [e for e in a.events(job["id"])["events"] if e["type"] == "state" and e["state"] == "queued"][1]
    assert retry["signal"] == 9 and "killed by signal 9" in retry["reason"]
    assert a.get_checkpoint("medium-tp2")["layout"]["tp"] == 2
    assert not list(work.glob(f"{job['id']}*"))  # the killed attempt's directory went with it


def test_child_killed_out_of_attempts_and_work_dirs(tmp_path, medium_hf, jobs_db):
    work = tmp_path / "stack" / "work"
    for stale in ("0" * 32 + "-1", "f" * 32, "junk-x"):  # left by killed workers of an earlier run
        (work / stale / "source").mkdir(parents=True)
    s = start_stack(tmp_path / "stack", queues=("convert",), env={"LLAMA_SVC_MAX_ATTEMPTS": "1",
                                                                  "LLAMA_SVC_JOBS_DB": jobs_db})
    try:
        assert list(work.iterdir()) == []  # swept when the worker started
        a = client(s)
        a.upload_checkpoint("medium", medium_hf)
        bad = a.submit("export", source="medium", output="never")  # an HF source: the job fails
        assert wait_state(a, bad["id"], lambda j: j["state"] in TERMINAL, what="an end")["state"] == "failed"
        assert not list(work.glob(f"{bad['id']}*"))
        job = a.submit("convert", source="medium", output="medium-tp2", target_tp=2, check_parity=False)
        wait_state(a, job["id"], _past_fetch, what="a running conversion")
        os.kill(_child_pid(job["id"]), signal.SIGKILL)
        final = wait_state(a, job["id"], lambda j: j["state"] in TERMINAL, timeout=60, what="an end")
        assert final["state"] == "failed" and final["attempts"] == 1, (final, s.log_tail())
        assert "killed by signal 9 (SIGKILL) on its only attempt" in final["error"]
        assert "out of memory" in final["error"] and "LoRA" in final["error"]
        assert not list(work.glob(f"{job['id']}*"))
        with pytest.raises(ApiError):
            a.get_checkpoint("medium-tp2")
    except BaseException:
        dump_logs(s)
        raise
    finally:
        s.__exit__(None, None, None)


def test_sweep_keeps_only_running_attempts(tmp_path, jobs_db):
    from services import worker
    from shared.jobs import JobStore

    store = JobStore(jobs_db)
    running, _ = store.create("t", "convert", {})
    store.claim(running.id, store.mark_dispatched(running.id), "w")
    done, _ = store.create("t", "convert", {})
    store.claim(done.id, store.mark_dispatched(done.id), "w")
    store.finish(done.id, 1, "failed", error="x")
    root = tmp_path / "work"
    for name in (f"{running.id}-1", f"{running.id}-0", f"{done.id}-1", "a" * 32, "stray-file"):
        (root / name).mkdir(parents=True) if name != "stray-file" else (root / name).write_text("x")
    removed = worker.sweep_workdirs(store, root)
    assert sorted(removed) == sorted([f"{running.id}-0", f"{done.id}-1", "a" * 32, "stray-file"])
    assert [p.name for p in root.iterdir()] == [f"{running.id}-1"]


def test_killed_attempts_policy(monkeypatch, jobs_db):
    from services import worker
    from shared.jobs import JobStore

    store = JobStore(jobs_db)
    published = []
    monkeypatch.setattr(worker, "redispatch", lambda st, app, job_id, kind: published.append(job_id))
    job, _ = store.create("t", "convert", {}, max_attempts=2)
    for attempt in (1, 2):
        j = store.claim(job.id, store.mark_dispatched(job.id), "w")
        assert worker._retry_killed(store, j, 9) == ("queued" if attempt == 1 else "failed")
    assert published == [job.id]
    assert "killed by signal 9 (SIGKILL) on each of its 2 attempts" in store.get(job.id).error
    assert worker._retry_killed(store, j, 9) is None  # fenced: the job moved on
    # a cancel requested before the kill was noticed ends the job cancelled, not retried
    other, _ = store.create("t", "convert", {}, max_attempts=2)
    j = store.claim(other.id, store.mark_dispatched(other.id), "w")
    store.request_cancel(other.id, "t")
    assert worker._retry_killed(store, j, 9) == "cancelled" and published == [job.id]
    # a different way to die on an earlier attempt is not reported as the same signal each time
    mixed, _ = store.create("t", "convert", {}, max_attempts=2)
    store.recover_lost(store.claim(mixed.id, store.mark_dispatched(mixed.id), "w"), "worker lost")
    j = store.claim(mixed.id, store.mark_dispatched(mixed.id), "w")
    assert worker._retry_killed(store, j, 11) == "failed"
    assert "signal 11 (SIGSEGV) on its last attempt; gave up after 2" in store.get(mixed.id).error
