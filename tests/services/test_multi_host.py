"""Two "hosts" that share nothing but Redis, PostgreSQL and the S3 server: each has its own data
directory, gateway and workers. A checkpoint goes up directly to S3 through one gateway, is
converted, finetuned and served through the other; a worker SIGKILLed mid-job leaves its job to
the other host's worker; a gateway killed with a request in flight leaves the retry to the other."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import httpx
import pytest

from services.stack import LocalStack
from tests.services.conftest import FAST, KEYS, client, dump_logs, s3_url, wait_state

RECORDS = [{"text": "the quick brown fox jumps over the lazy dog. " * 3} for _ in range(8)]


@pytest.fixture
def hosts(tmp_path, postgres, moto_url):
    env = {**FAST, "LLAMA_SVC_JOBS_DB": postgres.new_database()}
    storage = s3_url(moto_url, f"multi-host-{uuid.uuid4().hex[:12]}")  # a bucket of the test's own
    a = LocalStack(tmp_path / "host-a", api_keys=KEYS, storage_url=storage, queues=("convert",), env=env)
    a.__enter__()
    b = None
    try:
        b = LocalStack(tmp_path / "host-b", api_keys=KEYS, storage_url=storage, redis_url=a.redis_url,
                       queues=("train", "generate"), env=env).__enter__()
        yield a, b
    finally:
        for s in (b, a):
            if s is not None:
                dump_logs(s)
                s.__exit__(None, None, None)


def test_jobs_and_generation_move_between_hosts(hosts, medium_hf, tiny_hf):
    a, b = hosts
    ca, cb = client(a), client(b)
    assert ca.upload_checkpoint("medium", medium_hf, direct=True)["service"]["upload"]  # bytes went to S3 directly
    job = cb.submit("convert", source="medium", output="medium-tp1", check_parity=False)
    wait_state(ca, job["id"], lambda j: j["state"] == "running", timeout=60, what="running on host A")
    a.kill("worker-convert", signal.SIGKILL)
    b.start_worker("convert")  # host B's worker takes the job over once the reaper sees A's is gone
    done = wait_state(cb, job["id"], lambda j: j["state"] in ("succeeded", "failed"), timeout=240, what="an end")
    assert done["state"] == "succeeded" and done["attempts"] == 2, (done, b.log_tail())
    assert not (a.data_dir / "jobs.sqlite3").exists() and not (b.data_dir / "jobs.sqlite3").exists()

    ca.upload_checkpoint("tiny", tiny_hf)
    conv = ca.wait(ca.submit("convert", source="tiny", output="tiny-tp1", check_parity=False)["id"], timeout=300)
    assert conv["state"] == "succeeded", conv
    ft = ca.wait(ca.submit("finetune", source="tiny-tp1", output="tiny-ft", config={
        "data": RECORDS, "train_iters": 2, "micro_batch_size": 2, "global_batch_size": 2, "seq_length": 32,
        "lr": 1e-3, "export_hf": False})["id"], timeout=600)
    assert ft["state"] == "succeeded", (ft, b.log_tail())
    body = {"model": "tiny-ft", "prompts": ["the quick brown fox"], "tokens_to_generate": 4, "top_k": 1}
    ra, rb = ca.http.put("/api", json=body), cb.http.put("/api", json=body)
    assert ra.status_code == rb.status_code == 200 and ra.json()["text"] == rb.json()["text"]


def test_a_request_cut_by_a_dead_gateway_succeeds_on_the_other(hosts, tiny_hf):
    a, b = hosts
    client(a).upload_checkpoint("tiny", tiny_hf)
    body = {"model": "tiny", "prompts": ["hello"] * 32, "tokens_to_generate": 200, "top_k": 1}  # seconds of work
    headers = {"Authorization": "Bearer key-team-a"}
    client(b).generate("tiny", ["warm"], tokens_to_generate=1)  # the model is loaded on host B's worker
    outcome = {}

    def in_flight():
        try:
            outcome["a"] = httpx.put(a.url + "/api", json=body, headers=headers, timeout=60).status_code
        except httpx.HTTPError as e:
            outcome["a"] = type(e).__name__

    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(0.3)
    a.kill("gateway", signal.SIGKILL)
    t.join(60)
    assert outcome["a"] in ("RemoteProtocolError", "ReadError", "ConnectError"), outcome  # cut, not answered
    r = httpx.put(b.url + "/api", json=body, headers=headers, timeout=120)  # what a client or balancer retries
    assert r.status_code == 200 and len(r.json()["text"]) == 32
