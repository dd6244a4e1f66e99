"""Real processes for the service tests: moto's S3 server, Redis, the gateway and Celery workers."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.client import Client
from services.stack import LocalStack, free_port
from shared.samples import make_hf_checkpoint
from services.postgres import PostgresServer

KEYS = {"key-team-a": "team-a", "key-team-b": "team-b"}
# Short timings so recovery paths run in seconds.
FAST = {"LLAMA_SVC_HEARTBEAT_S": "0.3", "LLAMA_SVC_STALE_AFTER_S": "3", "LLAMA_SVC_REDISPATCH_AFTER_S": "2",
        "LLAMA_SVC_REAPER_INTERVAL_S": "0.5", "LLAMA_SVC_CANCEL_GRACE_S": "5", "LLAMA_SVC_TORCH_THREADS": "1",
        "LLAMA_SVC_GENERATE_TIMEOUT_S": "120"}


@pytest.fixture(scope="session")
def moto_url():
    """An S3-compatible server over HTTP (moto's standalone server)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session (started on first use); each test takes a fresh database."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def jobs_db(request, tmp_path) -> str:
    """A fresh jobs database of each backend: a SQLite file path or a PostgreSQL URL (LLAMA_SVC_JOBS_DB)."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite3")
    return request.getfixturevalue("postgres").new_database()


def s3_url(moto: str, bucket: str) -> str:
    return f"s3://testing:testing@{moto}/{bucket}?secure=false&region=us-east-1&part_size={5 * 1024 * 1024}"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def medium_hf(tmp_path_factory) -> Path:
    """Big enough (~60 MB) that a conversion lasts a few seconds: room to kill or cancel it midway."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("medium") / "hf", hidden=384, layers=10, ffn=1024, heads=6,
                              kv_heads=2, seed=1)


def start_stack(tmp: Path, *, storage_url: str | None = None, queues=("convert", "train", "generate"),
                env: dict | None = None) -> LocalStack:
    stack = LocalStack(tmp, api_keys=KEYS, storage_url=storage_url, queues=queues, env={**FAST, **(env or {})})
    stack.__enter__()
    return stack



@contextlib.contextmanager
def stack_serving(request, root: Path, tiny_hf: Path, *, queues=("generate",), env: dict | None = None):
    """A stack holding team A's upload ``tiny``; its logs are printed when a test of the session failed."""
    s = start_stack(root, queues=queues, env=env)
    try:
        client(s).upload_checkpoint("tiny", tiny_hf)
        yield s
    finally:
        if request.session.testsfailed:
            dump_logs(s)
        s.__exit__(None, None, None)

def client(stack: LocalStack, team: str = "team-a") -> Client:
    key = next(k for k, t in KEYS.items() if t == team)
    return Client(stack.url, key, timeout=120)


def wait_state(c: Client, job_id: str, pred, timeout: float = 120, what: str = "") -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.get(job_id)
        if pred(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {what}: last {job}")


def wait_for(pred, timeout: float = 10.0, what: str = "", poll: float = 0.05):
    """``pred()``'s first truthy value within ``timeout`` seconds, else AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def dump_logs(stack: LocalStack) -> None:
    print(stack.log_tail(60))


@pytest.fixture
def http():
    with httpx.Client(timeout=30) as h:
        yield h
