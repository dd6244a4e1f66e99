"""What the gateway decides by itself: a convert/reshard layout that cannot split the source is
refused at submit (the converter's own rule), and `/metrics` behind an optional scrape token."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.services.conftest import client, start_stack

TOKEN = "scrape-secret"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_hf):
    # no workers: accepted jobs stay queued
    s = start_stack(tmp_path_factory.mktemp("checks"), queues=(), env={"LLAMA_SVC_METRICS_TOKEN": TOKEN})
    client(s).upload_checkpoint("tiny", tiny_hf)  # 4 heads, 2 kv heads, 2 layers, FFN 128
    yield s
    s.__exit__(None, None, None)


@pytest.mark.parametrize("kind", ["convert", "reshard"])
def test_layout_that_does_not_fit_is_422_with_the_valid_sizes(stack, kind):
    a = client(stack)
    r = a.http.post("/v1/jobs", json={"kind": kind, "source": "tiny", "target_tp": 4})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "2 kv heads" in detail and "valid TP sizes for this model: [1, 2]" in detail, detail
    r = a.http.post("/v1/jobs", json={"kind": kind, "source": "tiny", "target_tp": 2, "target_pp": 3})
    assert r.status_code == 422 and "valid PP sizes: [1, 2]" in r.json()["detail"], r.text
    assert "tensor-parallel" not in r.json()["detail"]


def test_layout_that_fits_is_accepted(stack):
    r = client(stack).http.post("/v1/jobs", json={"kind": "convert", "source": "tiny", "target_tp": 2,
                                                  "target_pp": 2})
    assert r.status_code == 202, r.text


def test_metrics_need_the_token_and_parse(stack):
    url = stack.url + "/metrics"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(url, headers={"Authorization": "Bearer key-team-a"}).status_code == 401  # an API key is not it
    r = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert fams["llama_svc_jobs"].type == "gauge"
    assert fams["llama_svc_job_duration_seconds"].type == "histogram"
    assert fams["llama_svc_http_requests"].type == "counter"
    assert fams["llama_svc_generation_latency_seconds"].type == "histogram"
    assert {s.labels["queue"] for s in fams["llama_svc_queue_depth"].samples} >= {"convert", "train", "generate"}
    assert {(s.labels["kind"], s.labels["state"]) for s in fams["llama_svc_jobs"].samples} >= {("convert", "queued")}
