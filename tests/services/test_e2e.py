"""End to end over HTTP with real processes, on both storage backends:
upload -> convert (TP2/PP2) -> generate -> cancel -> team isolation -> idempotency."""

from __future__ import annotations

import hashlib
import json
import uuid

import httpx
import pytest

from services.client import ApiError
from tests.services.conftest import client, dump_logs, s3_url, start_stack, wait_state
from tests.services.helpers import hf_greedy


@pytest.fixture(scope="module", params=["local", "s3"])
def stack(request, tmp_path_factory):
    storage = None
    if request.param == "s3":
        storage = s3_url(request.getfixturevalue("moto_url"), f"e2e{uuid.uuid4().hex[:10]}")
    s = start_stack(tmp_path_factory.mktemp(f"stack-{request.param}"), storage_url=storage)
    s.backend = request.param
    yield s
    if request.session.testsfailed:
        dump_logs(s)
    s.__exit__(None, None, None)


def test_convert_then_generate(stack, tiny_hf):
    a = client(stack, "team-a")
    up = a.upload_checkpoint("tiny", tiny_hf)
    assert up["format"] == "hf" and "model.safetensors" in up["files"]
    spec = dict(source="tiny", output="tiny-tp2pp2", target_tp=2, target_pp=2, check_parity=stack.backend == "local")
    job = a.submit("convert", idempotency_key="conv-1", **spec)
    assert job["state"] in ("queued", "running")
    # idempotency: the same key and body return the same job; another body is refused
    assert a.submit("convert", idempotency_key="conv-1", **spec)["id"] == job["id"]
    with pytest.raises(ApiError) as e:
        a.submit("convert", idempotency_key="conv-1", **{**spec, "target_tp": 1})
    assert e.value.status == 409

    events = list(a.stream_events(job["id"]))  # SSE until the job ends
    done = a.get(job["id"])
    assert done["state"] == "succeeded", (done, stack.log_tail())
    phases = {e.get("phase") for e in events if e["type"] == "progress"}
    assert "fetch" in phases and "upload" in phases and len(phases) >= 3
    assert [e["state"] for e in events if e["type"] == "state"] == ["queued", "running", "succeeded"]
    assert a.events(job["id"])["state"] == "succeeded"
    with pytest.raises(ApiError) as e:
        a.cancel(job["id"])
    assert e.value.status == 409

    ck = a.get_checkpoint("tiny-tp2pp2")
    assert ck["layout"]["tp"] == 2 and ck["layout"]["pp"] == 2
    assert {f"model_tp{t}_pp{p}.safetensors" for t in (0, 1) for p in (0, 1)} <= set(ck["files"])
    assert ck["service"]["job_id"] == job["id"]
    if spec["check_parity"]:  # the conversion's report, at the checkpoint's own layout, layer by layer
        rep = ck["parity"]
        assert rep["passed"] and (rep["tp"], rep["pp"]) == (2, 2)
        assert [r["layer"] for r in rep["layers"]] == list(range(ck["model"]["num_layers"]))
    # with S3 the gateway redirects to the store (no credentials follow across origins); locally it streams
    r = a.http.get("/v1/checkpoints/tiny-tp2pp2/files/model_tp1_pp1.safetensors", follow_redirects=True)
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == ck["files"]["model_tp1_pp1.safetensors"]["sha256"]

    # generation through the gateway, from the converted checkpoint, matches HF greedy on the source
    prompt = "the quick brown fox"
    out = a.generate("tiny-tp2pp2", [prompt], tokens_to_generate=8, top_k=1)
    assert out["text"][0] == hf_greedy(tiny_hf, prompt, 8)
    assert len(out["segments"][0]) >= 8
    plain = a.completions("tiny-tp2pp2", prompt, max_tokens=6, temperature=0)
    with a.http.stream("POST", "/v1/completions", json={"model": "tiny-tp2pp2", "prompt": prompt, "max_tokens": 6,
                                                         "temperature": 0, "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    streamed = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1])
    assert streamed == plain["choices"][0]["text"] and plain["usage"]["completion_tokens"] >= 1
    chat = a.chat("tiny-tp2pp2", [{"role": "user", "content": "hello"}], max_tokens=4, temperature=0)
    assert chat["choices"][0]["message"]["role"] == "assistant"

    metrics = httpx.get(stack.url + "/metrics").text
    assert 'llama_svc_jobs{kind="convert",state="succeeded"} 1.0' in metrics
    assert "llama_svc_generation_latency_seconds_count" in metrics


def test_team_isolation(stack):
    a, b = client(stack, "team-a"), client(stack, "team-b")
    job = a.list_jobs(kind="convert", state="succeeded")["jobs"][0]
    for call in (lambda: b.get(job["id"]), lambda: b.cancel(job["id"]), lambda: b.events(job["id"]),
                 lambda: b.get_checkpoint("tiny-tp2pp2"),
                 lambda: b.generate("tiny-tp2pp2", ["x"], tokens_to_generate=1),
                 lambda: b.submit("reshard", source="tiny-tp2pp2", target_tp=1)):
        with pytest.raises(ApiError) as e:
            call()
        assert e.value.status == 404
    assert b.list_jobs()["jobs"] == [] and b.list_checkpoints() == []
    assert httpx.get(stack.url + "/v1/jobs").status_code == 401
    assert httpx.get(stack.url + "/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert a.http.get(f"/v1/jobs/{uuid.uuid4().hex}").status_code == 404


def test_cancel_running_conversion(stack, medium_hf):
    a = client(stack, "team-a")
    a.upload_checkpoint("medium", medium_hf)
    job = a.submit("convert", source="medium", output="medium-cancelled", target_tp=2, check_parity=True)  # the parity check gives a window to cancel in
    wait_state(a, job["id"], lambda j: j["state"] == "running" and (j["progress"] or {}).get("phase") not in
               (None, "fetch"), what="a running conversion")
    assert a.cancel(job["id"])["cancel_requested"]
    final = wait_state(a, job["id"], lambda j: j["state"] in ("succeeded", "failed", "cancelled"), what="an end")
    assert final["state"] == "cancelled", final
    with pytest.raises(ApiError) as e:
        a.get_checkpoint("medium-cancelled")
    assert e.value.status == 404
    assert a.cancel(job["id"])["state"] == "cancelled"  # cancelling again changes nothing
    assert [e["state"] for e in a.events(job["id"])["events"] if e["type"] == "state"] == [
        "queued", "running", "cancelled"]
