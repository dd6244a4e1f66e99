"""The API contract: schemathesis against the OpenAPI spec (no 5xx), limits, auth, health."""

from __future__ import annotations

import json

import hypothesis
import httpx
import pytest
import schemathesis

from tests.services.conftest import client, start_stack

LIMITS = {"LLAMA_SVC_MAX_ACTIVE_JOBS_PER_TEAM": "2", "LLAMA_SVC_MAX_BODY_BYTES": "4096",
          "LLAMA_SVC_MAX_UPLOAD_BYTES": "200000", "LLAMA_SVC_MAX_NEW_TOKENS": "32", "LLAMA_SVC_RETRY_AFTER_S": "7"}


# dataset uploads are raw JSONL bodies, fuzzed as arbitrary bytes
schemathesis.serializer.alias("application/x-ndjson", "application/octet-stream")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # No workers: submitted jobs stay queued, so fuzzed requests start nothing heavy.
    s = start_stack(tmp_path_factory.mktemp("api"), queues=(), env=LIMITS)
    yield s
    s.__exit__(None, None, None)


def test_no_server_errors(stack):
    """Every operation, fuzzed from the OpenAPI spec with a valid key: never a 5xx."""
    schema = schemathesis.openapi.from_url(stack.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 15
    for op in ops:
        @hypothesis.given(case=op.as_strategy())
        @hypothesis.settings(max_examples=10, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case):
            case.headers = {**(case.headers or {}), "Authorization": "Bearer key-team-a"}
            response = case.call(timeout=30)
            # 501: direct uploads need an S3 store (this stack keeps a local directory), said as such
            unsupported = response.status_code == 501 and "local directory" in response.text
            assert response.status_code < 500 or unsupported, (op.label, response.status_code, response.text[:500])

        check()


def test_limits(stack, tiny_hf):
    a = client(stack)
    h = {"Authorization": "Bearer key-team-a"}
    # body size is counted on the bytes received, with or without Content-Length
    big = b'{"kind": "convert", "source": "' + b"x" * 10000 + b'"}'
    assert httpx.post(stack.url + "/v1/jobs", content=big, headers=h).status_code == 413

    def chunks():
        for _ in range(10):
            yield b" " * 1000
    r = httpx.post(stack.url + "/v1/jobs", content=chunks(), headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413
    # uploads have their own (larger) limit, also enforced
    r = httpx.post(stack.url + "/v1/checkpoints", params={"name": "huge"}, headers=h,
                   files=[("files", ("model.safetensors", b"\0" * 300000))])
    assert r.status_code == 413
    # an upload without a config is refused with a message, and nothing is stored
    r = httpx.post(stack.url + "/v1/checkpoints", params={"name": "bad"}, headers=h,
                   files=[("files", ("model.safetensors", b"\0" * 10))])
    assert r.status_code == 422 and "config.json" in r.json()["detail"]
    r = httpx.post(stack.url + "/v1/checkpoints", params={"name": "bad"}, headers=h,
                   files=[("files", ("../evil", b"{}"))])
    assert r.status_code == 422
    assert a.list_checkpoints() == []
    # validation errors name the problem
    r = httpx.post(stack.url + "/v1/jobs", json={"kind": "convert", "source": "s", "target_tp": 0}, headers=h)
    assert r.status_code == 422 and "target_tp" in r.text
    r = httpx.put(stack.url + "/api", json={"model": "m", "prompts": ["a"], "top_k": 5, "top_p": 0.5}, headers=h)
    assert r.status_code == 422 and "top-k and top-p" in r.json()["message"]
    r = httpx.put(stack.url + "/api", json={"model": "m", "prompts": ["a"], "tokens_to_generate": 33}, headers=h)
    assert r.status_code == 422 and "32" in r.text


def test_queue_depth_429(stack, tmp_path):
    # a stub "checkpoint" is enough to queue jobs that never run here
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                               "num_attention_heads": 4, "num_key_value_heads": 2,
                                               "vocab_size": 384, "rms_norm_eps": 1e-5}))
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    b = client(stack, "team-b")
    b.upload_checkpoint("q", d)
    ids = [b.submit("export", source="q")["id"] for _ in range(2)]
    r = b.http.post("/v1/jobs", json={"kind": "export", "source": "q"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    b.cancel(ids[0])
    assert b.get(ids[0])["state"] == "cancelled"
    assert b.submit("export", source="q")["state"] == "queued"


def test_health_ready_docs(stack):
    assert httpx.get(stack.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(stack.url + "/ready").json()
    assert ready["checks"] == {"jobs_db": "ok", "storage": "ok", "redis": "ok"}
    assert httpx.get(stack.url + "/docs").status_code == 200
    spec = httpx.get(stack.url + "/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/cancel", "/api",
            "/v1/completions", "/v1/chat/completions", "/v1/checkpoints", "/metrics"} <= set(spec["paths"])
