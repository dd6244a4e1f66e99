"""Flower over a real stack: the workers' task events reach Celery's monitor, whose HTTP API shows
the job's task (``convert.job`` with the job id in its args) succeeding with a runtime, and the
workers that answered its inspect broadcast."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from services.stack import free_port
from shared.jobs.transport import make_celery
from tests.services.conftest import client, dump_logs, start_stack

AUTH = ("ops", "flower-test")
PROBE = "flower-probe@test"


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("stack-flower"), queues=("convert",))
    yield s
    if request.session.testsfailed:
        dump_logs(s)
    s.__exit__(None, None, None)


@pytest.fixture(scope="module")
def flower(stack):
    """Flower on a free port behind basic auth (as ``FLOWER_BASIC_AUTH`` runs it in compose)."""
    port = free_port()
    log = open(stack.logs / "flower.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "services.worker", "flower", f"--port={port}",
                             "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}"],
                            env=stack.env(), stdout=log, stderr=subprocess.STDOUT)
    h = httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=AUTH, timeout=20)
    try:
        _wait_listening(h, proc, stack.redis_url, stack.logs / "flower.log")
        yield h
    finally:
        h.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _wait_listening(h: httpx.Client, proc: subprocess.Popen, redis_url: str, log, timeout: float = 90) -> None:
    """Until Flower's event receiver has seen a probe's heartbeat: events sent before it subscribed
    are not replayed (a Redis pub/sub fanout)."""
    app, deadline, last = make_celery(redis_url), time.time() + timeout, None
    with app.connection_for_write() as conn, app.events.Dispatcher(conn, hostname=PROBE) as events:
        while True:
            events.send("worker-heartbeat")
            try:
                last = h.get("/api/workers", params={"status": "true"}, timeout=5).json()
                if PROBE in last:
                    return
            except (httpx.TransportError, ValueError) as e:
                last = repr(e)
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"flower never saw the probe ({last}): {log.read_text()[-2000:]}")
            time.sleep(0.3)


def _task_of(h: httpx.Client, job_id: str, timeout: float = 30) -> dict:
    deadline, tasks = time.time() + timeout, {}
    while time.time() < deadline:
        tasks = h.get("/api/tasks", params={"taskname": "convert.job"}).json()
        done = [t for t in tasks.values() if job_id in (t.get("args") or "") and t.get("state") == "SUCCESS"]
        if done:
            return done[0]
        time.sleep(0.3)
    raise AssertionError(f"flower never showed job {job_id} succeeding: {tasks}")


def test_flower_shows_job_tasks_and_workers(stack, flower, tiny_hf):
    assert flower.get("/api/tasks").status_code == 200
    assert httpx.get(f"{flower.base_url}/api/tasks", timeout=10).status_code == 401  # the password is required
    a = client(stack)
    a.upload_checkpoint("tiny", tiny_hf)
    job = a.submit("convert", source="tiny", output="tiny-flower", target_tp=2, check_parity=False)
    assert a.wait(job["id"], timeout=120)["state"] == "succeeded", stack.log_tail()

    task = _task_of(flower, job["id"])
    assert task["name"] == "convert.job" and task["runtime"] > 0
    assert task["worker"] and task["received"] and task["succeeded"]
    assert task["uuid"].startswith(job["id"])

    assert task["worker"] in flower.get("/api/workers", params={"status": "true"}).json()  # from the events
