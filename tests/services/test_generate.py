"""The generate worker through the gateway: concurrent requests batch together, models stay
warm and follow re-commits, batch jobs use the same runtime, errors keep their status."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import httpx
import pytest

from tests.inference.helpers import megatron_cli
from tests.services.conftest import client, stack_serving, wait_state
from shared.samples import make_hf_checkpoint

PROMPTS = ["the quick brown fox", "hello world", "a checkpoint is", "tensor and pipeline", "the lazy dog",
           "layers and heads"]


@lru_cache(maxsize=None)
def _hf(ckpt: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt), AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_greedy(ckpt: Path, prompt: str, n: int) -> str:
    """Megatron's answer from HF: the prompt, then the greedy new tokens detokenized with
    special tokens kept (as Megatron's server does)."""
    import torch

    tok, model = _hf(ckpt)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, tiny_hf):
    with stack_serving(request, tmp_path_factory.mktemp("gen"), tiny_hf) as s:
        yield s


def test_concurrent_requests_batch_together(stack, tiny_hf):
    a = client(stack)
    a.generate("tiny", ["warm"], tokens_to_generate=1, top_k=1)
    n_new = 24

    def one(prompt):
        r = a.http.put("/api", json={"model": "tiny", "prompts": [prompt], "tokens_to_generate": n_new, "top_k": 1})
        return r, float(r.headers.get("X-Worker-Time-Ms", "nan"))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, PROMPTS))
    wall_ms = (time.perf_counter() - t0) * 1e3
    for prompt, (r, _) in zip(PROMPTS, results):
        assert r.status_code == 200, r.text
        assert r.json()["text"][0] == hf_greedy(tiny_hf, prompt, n_new)
    # each worker time lies inside the wall window; served one after another they could not
    # add up to more than it, so a larger sum means the requests ran at the same time
    worker_sum = sum(ms for _, ms in results)
    assert worker_sum > 1.5 * wall_ms, (worker_sum, wall_ms)


def test_model_stays_warm_and_follows_recommits(stack, tmp_path, tiny_hf):
    a = client(stack)
    first = make_hf_checkpoint(tmp_path / "v1", seed=3)
    a.upload_checkpoint("warm", first)
    body = {"model": "warm", "prompts": ["hello world"], "tokens_to_generate": 6, "top_k": 1}
    r1, r2 = a.http.put("/api", json=body), a.http.put("/api", json=body)
    assert r1.status_code == r2.status_code == 200
    assert (r1.headers["X-Model-Cache"], r2.headers["X-Model-Cache"]) == ("miss", "hit")
    assert r2.json() == r1.json() and r1.json()["text"][0] == hf_greedy(first, "hello world", 6)
    # the model loaded before is still warm and still itself
    r = a.http.put("/api", json={**body, "model": "tiny"})
    assert r.headers["X-Model-Cache"] == "hit" and r.json()["text"][0] == hf_greedy(tiny_hf, "hello world", 6)

    # deleted and committed again under the same name: the worker notices and loads the new one
    second = make_hf_checkpoint(tmp_path / "v2", seed=4)
    assert a.http.delete("/v1/checkpoints/warm").status_code in (200, 204)
    a.upload_checkpoint("warm", second)
    time.sleep(2.5)  # past the gateway's and the worker's recheck interval
    r3 = a.http.put("/api", json=body)
    assert r3.status_code == 200 and r3.headers["X-Model-Cache"] == "miss"
    assert r3.json()["text"][0] == hf_greedy(second, "hello world", 6) != r1.json()["text"][0]


def test_openai_and_errors(stack):
    a = client(stack)
    r = a.http.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.headers["X-Model-Cache"] == "hit" and r.json()["model"] == "tiny"
    assert r.json()["usage"]["completion_tokens"] == 3
    r = a.http.put("/api", json={"model": "missing", "prompts": ["x"]})
    assert r.status_code == 404
    r = a.http.put("/api", json={"model": "tiny", "prompts": ["x"], "beam_width": 2})
    assert r.status_code == 422 and "beam" in r.json()["detail"]
    r = a.http.put("/api", json={"model": "tiny", "prompts": ["x " * 300], "tokens_to_generate": 8})
    assert r.status_code == 400 and "shorten" in r.json()["detail"]


def test_megatron_client_through_the_gateway(stack, tiny_hf):
    """Megatron's client with a Bearer key and the model's name: the same answers and error bodies."""
    url, auth = stack.url + "/api", {"Authorization": "Bearer key-team-a"}
    status, text = megatron_cli(url, "hello world", 6, auth, model="tiny", top_k=1)
    assert status == 200 and text == hf_greedy(tiny_hf, "hello world", 6)
    status, message = megatron_cli(url, "hello world", 4, auth, model="tiny", top_k=5, top_p=0.5)
    assert status == 422 and "top-k and top-p" in message
    status, message = megatron_cli(url, "hello world", 4, auth, model="missing")
    assert status == 404 and "missing" in message
    status, message = megatron_cli(url, "hello world", 4, {"Authorization": "Bearer wrong"}, model="tiny")
    assert status == 401 and message

def test_batch_generate_job(stack, tiny_hf):
    a = client(stack)
    prompts = PROMPTS + ["hello"]
    job = a.submit("generate", model="tiny", prompts=prompts, tokens_to_generate=5, top_k=1)
    done = wait_state(a, job["id"], lambda j: j["state"] in ("succeeded", "failed", "cancelled"), what="an end")
    assert done["state"] == "succeeded", (done, stack.log_tail())
    assert done["result"]["text"] == [hf_greedy(tiny_hf, p, 5) for p in prompts], done
    assert done["progress"]["current"] == len(prompts)
    # a job the runtime refuses fails with the runtime's message
    bad = a.submit("generate", model="tiny", prompts=["x " * 300], tokens_to_generate=8)
    final = wait_state(a, bad["id"], lambda j: j["state"] in ("succeeded", "failed"), what="an end")
    assert final["state"] == "failed" and "shorten" in final["error"], final
    assert httpx.get(stack.url + "/ready").status_code == 200
