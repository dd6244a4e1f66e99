"""The standalone server over real HTTP, on a tiny random model served from a native checkpoint."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from services.generate.runtime import GenerationRuntime
from services.generate.server import create_app
from shared.parallel.launcher import free_port
from tests.inference.helpers import megatron_cli, tiny_native_dir


class Served:
    def __init__(self, factory):
        self.port = free_port()
        self.app = create_app(factory)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while self.client.get("/health").status_code != 200:
            assert time.time() < deadline, "model did not load"
            time.sleep(0.1)

    def stop(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_native_dir(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def served(ckpt):
    gate = threading.Event()

    def factory():
        gate.wait(60)
        return GenerationRuntime(ckpt, max_batch=8, max_queue=64, max_seq_len=256, steps_per_plan=4)

    s = Served(factory)
    r = s.client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"  # not before the model is loaded
    assert s.client.put("/api", json={"prompts": ["x"]}).status_code == 503
    gate.set()
    s.wait_ready()
    yield s
    s.stop()


def api(s, body):
    return s.client.put("/api", json=body)


def test_api_greedy_response_shape(served):
    r = api(served, {"prompts": ["Hello there", "A"], "tokens_to_generate": 6, "top_k": 1, "logprobs": True})
    assert r.status_code == 200
    out = r.json()
    assert set(out) == {"text", "segments", "logprobs", "tokens"}
    for prompt, text, seg, lp, ids in zip(["Hello there", "A"], out["text"], out["segments"], out["logprobs"],
                                          out["tokens"]):
        assert text.startswith(prompt) and len(text) > len(prompt) and len(ids) == len(seg)
        assert "".join(seg) == text
        assert len(lp) == len(seg) - 1
    again = api(served, {"prompts": ["Hello there"], "tokens_to_generate": 6, "top_k": 1}).json()
    assert again["text"][0] == out["text"][0] and again["logprobs"] is None


def test_api_scoring_mode(served):
    out = api(served, {"prompts": ["Hello there my friend"], "tokens_to_generate": 0, "logprobs": True}).json()
    assert out["text"] == ["Hello there my friend"]
    assert len(out["logprobs"][0]) == len(out["segments"][0]) - 1 and all(v <= 0 for v in out["logprobs"][0])


def test_api_seeded_sampling_reproducible(served):
    body = {"prompts": ["Once", "Twice"], "tokens_to_generate": 8, "top_p": 0.9, "top_p_decay": 0.9,
            "top_p_bound": 0.5, "temperature": 1.5, "random_seed": 42}
    a, b = api(served, body).json(), api(served, body).json()
    c = api(served, {**body, "random_seed": 43}).json()
    assert a == b and a["text"] != c["text"]


BAD = [
    ({}, 400, "prompts argument required"),
    ({"prompts": ["a"], "max_len": 3}, 400, "max_len is no longer used.  Replace with tokens_to_generate"),
    ({"sentences": ["a"], "prompts": ["a"]}, 400, "sentences is no longer used.  Replace with prompts"),
    ({"prompts": "a"}, 400, "prompts is not a list of strings"),
    ({"prompts": [1]}, 400, "prompts is not a list of strings"),
    ({"prompts": []}, 400, "prompts is empty"),
    ({"prompts": ["a"] * 129}, 400, "Maximum number of prompts is 128"),
    ({"prompts": ["a"], "tokens_to_generate": -1}, 400, "tokens_to_generate must be an integer greater than or equal to 0"),
    ({"prompts": ["a"], "tokens_to_generate": "5"}, 400, "tokens_to_generate must be an integer greater than or equal to 0"),
    ({"prompts": ["a"], "logprobs": "yes"}, 400, "logprobs must be a boolean value"),
    ({"prompts": ["a"], "tokens_to_generate": 0}, 400, "tokens_to_generate=0 implies logprobs should be True"),
    ({"prompts": ["a"], "temperature": 0}, 400, "temperature must be a positive number less than or equal to 100.0"),
    ({"prompts": ["a"], "temperature": 101}, 400, "temperature must be a positive number less than or equal to 100.0"),
    ({"prompts": ["a"], "top_k": 1001}, 400, "top_k must be an integer equal to or greater than 0 and less than or equal to 1000"),
    ({"prompts": ["a"], "top_k": 1.5}, 400, "top_k must be an integer equal to or greater than 0 and less than or equal to 1000"),
    ({"prompts": ["a"], "top_p": 1.5}, 400, "top_p must be a positive float less than or equal to 1.0"),
    ({"prompts": ["a"], "top_p": 0.5, "top_k": 5}, 400, "cannot set both top-k and top-p samplings."),
    ({"prompts": ["a"], "top_p_decay": 0.5}, 400, "top_p_decay cannot be set without top_p"),
    ({"prompts": ["a"], "top_p": 0.5, "top_p_decay": 2.0}, 400, "top_p_decay must be a positive float less than or equal to 1.0"),
    ({"prompts": ["a"], "top_p_bound": 0.5}, 400, "top_p_bound cannot be set without top_p"),
    ({"prompts": ["a"], "top_p": 0.5, "top_p_bound": 0.7}, 400, "top_p_bound must be greater than 0 and less than top_p"),
    ({"prompts": ["a"], "top_p": 0.5, "top_p_bound": "x"}, 400, "top_p_bound must be a positive float less than or equal to top_p"),
    ({"prompts": ["a"], "add_BOS": 1}, 400, "add_BOS must be a boolean value"),
    ({"prompts": [""]}, 400, "Empty prompts require add_BOS=true"),
    ({"prompts": ["a"], "stop_on_double_eol": "no"}, 400, "stop_on_double_eol must be a boolean value"),
    ({"prompts": ["a"], "stop_on_eol": 0}, 400, "stop_on_eol must be a boolean value"),
    ({"prompts": ["a"], "prevent_newline_after_colon": "x"}, 400, "prevent_newline_after_colon must be a boolean value"),
    ({"prompts": ["a"], "random_seed": "x"}, 400, "random_seed must be integer"),
    ({"prompts": ["a"], "random_seed": -1}, 400, "random_seed must be a positive integer"),
    ({"prompts": ["a"], "no_log": "x"}, 400, "no_log must be a boolean value"),
    ({"prompts": ["a"], "beam_width": "x"}, 400, "beam_width must be integer"),
    ({"prompts": ["a"], "beam_width": 0}, 400, "beam_width must be an integer > 1"),
    ({"prompts": ["a", "b"], "beam_width": 2}, 400, "When doing beam_search, batch size must be 1"),
    ({"prompts": ["a"], "beam_width": 2}, 422, "beam search is not supported by this server; remove beam_width"),
    ({"prompts": ["a"], "stop_token": "x"}, 400, "stop_token must be an integer"),
    ({"prompts": ["a"], "stop_token": 10 ** 9}, 400, "stop_token must be a token id in [0, 49152)"),
    ({"prompts": ["a"], "length_penalty": 1}, 400, "length_penalty must be a float"),
    ({"prompts": ["a"], "tokens_to_generate": 300}, 400, "new tokens were asked for: 301 > 256"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[b[2][:40] for b in BAD])
def test_api_validation_errors(served, body, status, message):
    r = api(served, body)
    assert r.status_code == status
    assert message in r.json()["message"]


def test_megatron_client_success_and_error_paths(served):
    status, text = megatron_cli(served.url + "/api", "Hello there", 5)
    assert status == 200 and text.startswith("Hello there") and len(text) > len("Hello there")
    status, message = megatron_cli(served.url + "/api", "Hello there", -1)
    assert status == 400 and message == "tokens_to_generate must be an integer greater than or equal to 0"
    status, message = megatron_cli(served.url + "/api", "Hello there", 4, top_k=5, top_p=0.5)
    assert status == 400 and message == "cannot set both top-k and top-p samplings."

def test_api_body_not_json(served):
    r = served.client.put("/api", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]


def sse(s, path, body):
    chunks = []
    with s.client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


@pytest.mark.parametrize("stop", [None, [" the", "ing"]])
def test_streamed_completion_equals_non_streamed(served, stop):
    body = {"prompt": "The weather today", "max_tokens": 24, "temperature": 0, "stop": stop}
    full = served.client.post("/v1/completions", json=body).json()
    chunks = sse(served, "/v1/completions", {**body, "stream": True})
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert full["usage"]["completion_tokens"] >= 1 and full["object"] == "text_completion"
    if stop:
        assert not any(s in text for s in stop)


def test_streamed_chat_equals_non_streamed(served):
    body = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 16, "temperature": 0}
    full = served.client.post("/v1/chat/completions", json=body).json()
    chunks = sse(served, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert full["usage"]["prompt_tokens"] > 10  # the chat template was applied


def test_openai_errors_and_models(served):
    c = served.client
    assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-native"
    r = c.post("/v1/completions", json={"prompt": "x", "model": "other"})
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"prompt": "x", "temperature": -1})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"prompt": "x", "presence_penalty": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"
    r = c.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400


def test_completion_logprobs_echo(served):
    out = served.client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 3, "temperature": 0,
                                                      "echo": True, "logprobs": 1}).json()
    ch = out["choices"][0]
    assert ch["text"].startswith("Hello there")
    lp = ch["logprobs"]
    assert "".join(lp["tokens"]) == ch["text"] and lp["token_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == 2 + 3


def test_32_concurrent_requests(served):
    prompts = [f"Request number {i} says" for i in range(32)]
    alone = {p: api(served, {"prompts": [p], "tokens_to_generate": 10, "top_k": 1}).json()["text"][0]
             for p in prompts[:4]}
    with ThreadPoolExecutor(32) as pool:
        rs = list(pool.map(lambda p: api(served, {"prompts": [p], "tokens_to_generate": 10, "top_k": 1}), prompts))
    assert all(r.status_code == 200 for r in rs)
    texts = [r.json()["text"][0] for r in rs]
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, prompts))
    assert all(texts[i] == alone[p] for i, p in enumerate(prompts[:4]))  # batching changes nothing
    m = served.client.get("/metrics").text
    assert 'generate_requests_total{endpoint="api",status="200"}' in m


def test_full_queue_answers_429(ckpt):
    rt = GenerationRuntime(ckpt, max_batch=1, max_queue=1, max_seq_len=512, steps_per_plan=1)
    s = Served(rt)
    try:
        # one long sequence occupies the only cache row, one waits, the next is refused
        first = threading.Thread(target=api, args=(s, {"prompts": ["a"], "tokens_to_generate": 400, "top_k": 1}))
        first.start()
        deadline = time.time() + 30
        while rt.scheduler.running == 0:
            assert time.time() < deadline
            time.sleep(0.01)
        second = threading.Thread(target=api, args=(s, {"prompts": ["b"], "tokens_to_generate": 2, "top_k": 1}))
        second.start()
        while rt.scheduler.queued == 0 and rt.scheduler.running == 1 and second.is_alive():
            time.sleep(0.005)
        r = api(s, {"prompts": ["c"], "tokens_to_generate": 2})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "capacity" in r.text
        r = s.client.post("/v1/completions", json={"prompt": "c", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == 429
        first.join(120)
        second.join(120)
        assert api(s, {"prompts": ["c"], "tokens_to_generate": 2}).status_code == 200
    finally:
        s.stop()
        rt.close()
