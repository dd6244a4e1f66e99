"""Failure paths with real processes: a worker SIGKILLed mid-conversion; Redis restarted mid-job."""

from __future__ import annotations

import signal
import time

import pytest

from services.client import ApiError
from tests.services.conftest import client, dump_logs, start_stack, wait_state

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def stack(request, tmp_path):
    s = start_stack(tmp_path / "stack", queues=("convert",))
    yield s
    if request.session.testsfailed:
        dump_logs(s)
    s.__exit__(None, None, None)


def _states(c, job_id):
    return [e["state"] for e in c.events(job_id)["events"] if e["type"] == "state"]


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
