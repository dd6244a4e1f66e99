"""Flower (Celery's task monitor, compose's `--profile monitoring`) against the local stack: a job's
Celery task shows in Flower's API as SUCCESS with its runtime.

Flower learns of tasks from worker events on Redis pub/sub, which are not replayed: an event sent
before Flower subscribed is lost. So the workers here send heartbeats, and the job is submitted
only once Flower's own event state lists the worker as alive (it has seen one of its events, so
it is subscribed); from then on every task event reaches it."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from services.stack import ROOT, LocalStack, free_port
from tests.services.conftest import FAST, KEYS, client, dump_logs, wait_for

AUTH = ("monitor", "flower-test-password")


@pytest.fixture
def stack(request, tmp_path):
    s = LocalStack(tmp_path / "stack", api_keys=KEYS, queues=("convert",), env=FAST, worker_heartbeat=True)
    s.__enter__()
    yield s
    if request.session.testsfailed:
        dump_logs(s)
    s.__exit__(None, None, None)


@pytest.fixture
def flower(stack, tmp_path):
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery", f"--broker={stack.redis_url}", "flower",
                             f"--port={port}", "--address=127.0.0.1", "--persistent=False",
                             f"--basic-auth={':'.join(AUTH)}"],  # as compose's FLOWER_BASIC_AUTH
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _get(url: str):
    try:
        r = httpx.get(url, auth=AUTH, timeout=5)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def test_a_job_task_is_seen_by_flower(stack, flower, tiny_hf):
    # Flower's event state has a live worker: its receiver is subscribed, later events all arrive
    alive = wait_for(lambda: {n: a for n, a in (_get(flower + "/api/workers?status=true") or {}).items() if a},
                     timeout=60, what="Flower to see a worker heartbeat", poll=0.25)
    assert any(n.startswith("worker-convert-") for n in alive), alive
    c = client(stack)
    c.upload_checkpoint("tiny", tiny_hf)
    job = c.submit("convert", source="tiny", output="tiny-tp1", target_tp=1, check_parity=False)
    assert c.wait(job["id"], timeout=300)["state"] == "succeeded"

    def done():
        tasks = _get(flower + "/api/tasks") or {}
        return [t for tid, t in tasks.items() if tid.startswith(job["id"] + ".") and t.get("state") == "SUCCESS"]

    (task,) = wait_for(done, timeout=30, what="Flower to list the job's task as SUCCESS", poll=0.25)
    assert task["runtime"] is not None and task["runtime"] > 0
    assert task["worker"].startswith("worker-convert-") and task["received"] and task["started"]
