"""Model-affine generation with two real generate workers: a deployment keeps a model loaded on
one of them and its requests go there; live workers and their models are visible per team."""

from __future__ import annotations


import httpx
import pytest

from shared.jobs.placement import SHARED_QUEUE, Presence, pick_queue
from tests.services.conftest import client, dump_logs, start_stack, wait_for


def test_pick_queue_prefers_the_least_loaded_warm_worker():
    ws = [Presence("w1", "generate.w1", ["t/m"], 5, 10, 0), Presence("w2", "generate.w2", ["t/m"], 1, 10, 0),
          Presence("w3", "generate.w3", ["t/other"], 0, 10, 0), Presence("w4", "generate.w4", ["t/m"], 10, 10, 0)]
    assert pick_queue(ws, "t", "m") == "generate.w2"
    assert pick_queue(ws, "t", "cold") == SHARED_QUEUE          # nobody has it warm: any worker
    assert pick_queue(ws[3:], "t", "m") == SHARED_QUEUE         # the only warm one is full
    assert pick_queue(ws, "u", "m") == SHARED_QUEUE             # another team's model of that name is not it


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, tiny_hf):
    s = start_stack(tmp_path_factory.mktemp("placement"), queues=("generate",))
    s.start_worker("generate", name="worker-generate-2")
    client(s).upload_checkpoint("tiny", tiny_hf)
    client(s).upload_checkpoint("tiny-2", tiny_hf)
    yield s
    if request.session.testsfailed:
        dump_logs(s)
    s.__exit__(None, None, None)


def test_a_deployment_pins_a_model_and_its_requests_follow(stack):
    a, b = client(stack, "team-a"), client(stack, "team-b")
    workers = wait_for(lambda: (w := a._json(a.http.get("/v1/workers"))) and len(w) == 2 and w, 60, "two workers")
    assert all(w["models"] == [] for w in workers)
    dep = a._json(a.http.post("/v1/deployments", json={"model": "tiny", "replicas": 1}))
    holder = wait_for(lambda: a._json(a.http.get("/v1/deployments"))[0]["workers"][0], 60, "a replica placed")
    wait_for(lambda: any(w["worker"] == holder and w["models"] == ["tiny"]
                       for w in a._json(a.http.get("/v1/workers"))), 60, "the model loaded on its replica")
    served = set()
    for _ in range(6):
        r = a.http.put("/api", json={"model": "tiny", "prompts": ["hello"], "tokens_to_generate": 2, "top_k": 1})
        assert r.status_code == 200, r.text
        served.add(r.headers["X-Served-By"])
        assert r.headers["X-Model-Cache"] == "hit"  # loaded by the deployment, before any request
    assert served == {holder}
    # another team sees the workers but none of team A's models
    assert all(w["models"] == [] for w in b._json(b.http.get("/v1/workers")))
    assert b.http.delete(f"/v1/deployments/{dep['id']}").status_code == 404
    # a model nobody deployed is still served, by either worker
    r = a.http.put("/api", json={"model": "tiny-2", "prompts": ["hello"], "tokens_to_generate": 2, "top_k": 1})
    assert r.status_code == 200 and r.headers["X-Served-By"] in {w["worker"] for w in workers}
    assert a.http.delete(f"/v1/deployments/{dep['id']}").status_code == 204
    assert a._json(a.http.get("/v1/deployments")) == []


def test_deployments_refuse_unknown_models(stack):
    r = httpx.post(stack.url + "/v1/deployments", json={"model": "nope", "replicas": 1},
                   headers={"Authorization": "Bearer key-team-a"})
    assert r.status_code == 404 and "not found" in r.text
