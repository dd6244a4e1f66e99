"""The gateway's edge on a real stack (gateway, Redis, a generate worker, two teams): uploads are
authenticated and counted against a per-team quota before their body is read; every response
carries a request id that also reaches the logs and the job's events; generation over capacity
is 429, never 5xx; inputs that used to crash a route get a 4xx naming the problem; the model's
position limit is known at the gateway; production settings refuse the documented defaults."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from pydantic import ValidationError

from gateway.core.manifests import model_positions
from shared.settings import LOCAL_DEV_KEY, Settings, hash_key
from services.stack import free_port
from tests.services.conftest import client, stack_serving, wait_for

A = {"Authorization": "Bearer key-team-a"}
B = {"Authorization": "Bearer key-team-b"}
UPLOAD_LIMIT = 64 << 20
LIMITS = {"LLAMA_SVC_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT), "LLAMA_SVC_MAX_DATASET_BYTES": str(UPLOAD_LIMIT // 2), "LLAMA_SVC_MAX_CONCURRENT_GENERATIONS": "64",
          "LLAMA_SVC_MAX_CONCURRENT_UPLOADS_PER_TEAM": "2", "LLAMA_SVC_RETRY_AFTER_S": "7"}
BOUNDARY = "edgeboundary"
PART = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"model.safetensors\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * 4096
HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, tiny_hf):
    with stack_serving(request, tmp_path_factory.mktemp("edge"), tiny_hf, env=LIMITS) as s:
        yield s


def _open_upload(port: int, headers: dict, declared: int, path: str = "/v1/checkpoints?name=big") -> socket.socket:
    """A POST whose headers declare ``declared`` bytes, of which only the first few KB are sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=3)
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {declared}",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + PART)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body; the socket's timeout bounds the wait."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed without an answer (got {data[:200]!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, json.loads(body)


def _answer_before_body(port: int, headers: dict, declared: int, path: str = "/v1/checkpoints?name=big"):
    sock = _open_upload(port, headers, declared, path)
    t0 = time.monotonic()
    try:
        status, hdrs, body = _read_response(sock)
    finally:
        sock.close()
    assert time.monotonic() - t0 < 2.5
    return status, hdrs, body


def _no_spool(stack) -> None:
    assert list(stack.data_dir.glob("upload-*")) == [], "an upload was spooled to the data dir"


def test_uploads_are_refused_from_their_headers(stack):
    """A large body declared, 4 KB sent: the answer comes while the client is still sending.
    Without a valid key it is 401 whatever the size (a stranger learns no limit)."""
    for path in ("/v1/checkpoints?name=big", "/v1/datasets?name=big"):
        for headers, detail in (({}, "missing API key"), ({"Authorization": "Bearer nope"}, "invalid API key"),
                                ({"Authorization": "Basic a2V5"}, "missing API key")):
            for declared in (UPLOAD_LIMIT - 1, 2_000_000_000):
                status, hdrs, body = _answer_before_body(stack.port, headers, declared, path)
                assert (status, hdrs["connection"], hdrs["www-authenticate"]) == (401, "close", "Bearer"), \
                    (path, declared, status, hdrs)
                assert detail in body["detail"] and HEX32.match(hdrs["x-request-id"])
        status, hdrs, body = _answer_before_body(stack.port, A, 2_000_000_000, path)
        limit = UPLOAD_LIMIT // 2 if "datasets" in path else UPLOAD_LIMIT  # each route's own limit
        assert (status, hdrs["connection"]) == (413, "close") and f"{limit}-byte" in body["detail"], body
    _no_spool(stack)
    # the same key lookup behind the routes: B's key is B's
    r = httpx.get(stack.url + "/v1/checkpoints", headers=B)
    assert r.status_code == 200 and r.json()["checkpoints"] == []
    assert httpx.get(stack.url + "/v1/checkpoints").status_code == 401


def _second_gateway(stack) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "gateway.app:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], env=stack.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 30, "a second gateway")
    return proc, url


def test_upload_quota_per_team_across_gateways(stack, tiny_hf):
    r = redis.Redis.from_url(stack.redis_url)
    proc, url2 = _second_gateway(stack)
    held = []
    try:
        held = [_open_upload(stack.port, A, 1_000_000, f"/v1/checkpoints?name=slow{i}") for i in range(2)]
        wait_for(lambda: r.get("llama_svc:uploads:team-a") == b"2", what="two upload slots taken")
        assert 0 < r.ttl("llama_svc:uploads:team-a") <= 60
        port2 = int(url2.rsplit(":", 1)[1])
        for port in (stack.port, port2):  # the quota is in Redis: another gateway process sees it too
            status, hdrs, body = _answer_before_body(port, A, 1_000_000)
            assert (status, hdrs["retry-after"], hdrs["connection"]) == (429, "7", "close"), (status, hdrs)
            assert "2 uploads in progress" in body["detail"]
        # another team is not affected
        assert client(stack, "team-b").upload_checkpoint("b-model", tiny_hf)["name"] == "b-model"
        for s in held:
            s.close()
        wait_for(lambda: r.get("llama_svc:uploads:team-a") is None, what="the slots to be given back")
        assert client(stack, "team-a").upload_checkpoint("after-quota", tiny_hf)["name"] == "after-quota"
        # a slot is given back once the response has gone out
        wait_for(lambda: r.get("llama_svc:uploads:team-a") is None and r.get("llama_svc:uploads:team-b") is None,
                  what="every slot to be given back")
    finally:
        for s in held:
            s.close()
        proc.terminate()
        proc.wait(10)
    _no_spool(stack)


def test_request_id_on_responses_logs_and_job_events(stack):
    r = httpx.get(stack.url + "/health")
    generated = r.headers["x-request-id"]
    assert HEX32.match(generated) and httpx.get(stack.url + "/health").headers["x-request-id"] != generated
    echoed = httpx.get(stack.url + "/health", headers={"X-Request-ID": "abc-1.2_X"}).headers["x-request-id"]
    assert echoed == "abc-1.2_X"
    for bad in ("has space", "x" * 129, "semi;colon", "caf%C3%A9", ""):
        got = httpx.get(stack.url + "/health", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert HEX32.match(got), (bad, got)
    # errors carry it too: a route's 401 and 422, and the body-size limit's 413
    assert HEX32.match(httpx.get(stack.url + "/v1/jobs").headers["x-request-id"])
    r = httpx.post(stack.url + "/v1/jobs", json={"kind": "nope"}, headers={**A, "X-Request-ID": "bad-body"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "bad-body"
    r = httpx.post(stack.url + "/v1/jobs", content=b"x" * (2 << 20), headers={**A, "X-Request-ID": "too-big"})
    assert r.status_code == 413 and r.headers["x-request-id"] == "too-big"

    r = httpx.post(stack.url + "/v1/jobs", headers={**A, "X-Request-ID": "submit-7f3a"},
                   json={"kind": "generate", "model": "tiny", "prompts": ["hello"], "tokens_to_generate": 1})
    assert r.status_code == 202 and r.headers["x-request-id"] == "submit-7f3a"
    first = client(stack).events(r.json()["id"])["events"][0]
    assert (first["type"], first["state"], first["request_id"]) == ("state", "queued", "submit-7f3a")
    lines = [json.loads(line) for line in (stack.logs / "gateway.log").read_text().splitlines()
             if line.startswith("{")]
    mine = [line["msg"] for line in lines if line.get("request_id") == "submit-7f3a"]
    assert "job accepted" in mine and "request" in mine, mine


async def _burst(url: str, n_api: int, n_completions: int, n_streams: int) -> list[tuple[str, int, str | None]]:
    limits = httpx.Limits(max_connections=n_api + n_completions + n_streams + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=A, limits=limits, timeout=90) as h:
        async def api():
            r = await h.put("/api", json={"model": "tiny", "prompts": ["hello"], "tokens_to_generate": 1, "top_k": 1})
            return "api", r.status_code, r.headers.get("retry-after")

        async def completion():
            r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 1})
            return "completions", r.status_code, r.headers.get("retry-after")

        async def stream():
            async with h.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2,
                                                                 "stream": True}) as r:
                await r.aread()
                return "stream", r.status_code, r.headers.get("retry-after")

        kinds = [api] * n_api + [completion] * n_completions + [stream] * n_streams
        random.Random(0).shuffle(kinds)
        return await asyncio.wait_for(asyncio.gather(*(k() for k in kinds)), timeout=150)


def test_generation_capacity_is_429_never_5xx(stack):
    client(stack).generate("tiny", ["warm"], tokens_to_generate=1)
    results = asyncio.run(_burst(stack.url, 400, 50, 30))
    statuses = [s for _, s, _ in results]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= 64 and statuses.count(429) > 0, (statuses.count(200), statuses.count(429))
    assert all(ra == "7" for _, s, ra in results if s == 429)
    assert {api for api, s, _ in results if s == 429} == {"api", "completions", "stream"}
    r = httpx.put(stack.url + "/api", headers=A, json={"model": "tiny", "prompts": ["x"], "tokens_to_generate": 1})
    assert r.status_code == 200
    # every slot came back (streams included): the limit's worth at once is all served
    again = asyncio.run(_burst(stack.url, 32, 16, 16))
    assert [s for _, s, _ in again] == [200] * 64, again


def _multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for filename, data in parts:
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"".encode() + filename +
                b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    return out + f"--{BOUNDARY}--\r\n".encode()


def _upload(stack, name: str, parts: list[tuple[bytes, bytes]]) -> httpx.Response:
    return httpx.post(stack.url + "/v1/checkpoints", params={"name": name}, content=_multipart(parts), timeout=60,
                      headers={**A, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def _hf_parts(tiny_hf, config: bytes | None = None) -> list[tuple[bytes, bytes]]:
    parts = [(p.name.encode(), p.read_bytes()) for p in sorted(tiny_hf.iterdir()) if p.is_file()]
    if config is not None:
        parts = [(n, config if n == b"config.json" else d) for n, d in parts]
    return parts


def test_upload_names_and_configs_are_4xx(stack, tiny_hf):
    names = [b"caf\xc3\xa9.json", b"a\x00b", "a\nb".encode(), b"100%.bin", b".", b"x" * 300, b"sub/" + b"y" * 300,
             b"a\\b", b"sub/../x"]
    for bad in names:
        r = _upload(stack, "names", _hf_parts(tiny_hf) + [(bad, b"x")])
        assert r.status_code == 422 and "upload file name" in r.json()["detail"], (bad, r.status_code, r.text)
    for parts in ([(b"a", b"1"), (b"a/b", b"2")], [(b"a/b", b"2"), (b"a", b"1")]):
        r = _upload(stack, "clash", _hf_parts(tiny_hf) + parts)
        assert r.status_code == 422 and "'a' is both a file and a directory" in r.json()["detail"], r.text
    for config, msg in ((b"[1, 2]", "must be a JSON object"), (b'"llama"', "must be a JSON object"),
                        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                        (b'{"a": ' + b"[" * 500 + b"]" * 500 + b"}", "nested too deeply"),
                        ('{"model_type": "llamä"}'.encode("latin-1"), "not UTF-8"), (b"{", "not valid JSON")):
        r = _upload(stack, "cfg", _hf_parts(tiny_hf, config))
        assert r.status_code == 422 and msg in r.json()["detail"], (config[:20], r.status_code, r.text)
    r = _upload(stack, "a..b", _hf_parts(tiny_hf))
    assert r.status_code == 422 and "'..'" in r.text
    _no_spool(stack)
    assert not {"names", "clash", "cfg"} & {c["name"] for c in client(stack).list_checkpoints()}


def test_names_seeds_fields_and_keys_are_4xx(stack):
    h = httpx.Client(base_url=stack.url, headers=A, timeout=60)
    for r in (h.get("/v1/checkpoints/a..b"), h.delete("/v1/checkpoints/a..b"),
              h.post("/v1/jobs", json={"kind": "convert", "source": "a..b"}),
              h.put("/api", json={"model": "a..b", "prompts": ["x"]})):
        assert r.status_code == 422 and "'..'" in r.text, (r.request.url, r.status_code, r.text)
    r = h.post("/v1/completions", json={"model": "x..", "prompt": "x"})  # OpenAI's routes: 400, OpenAI's body
    assert r.status_code == 400 and "'..'" in r.json()["error"]["message"], r.text
    for seed in (2**63, 2**64, 2**70):
        r = h.put("/api", json={"model": "tiny", "prompts": ["hello"], "tokens_to_generate": 1, "random_seed": seed})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "random_seed"], r.text
        r = h.post("/v1/jobs", json={"kind": "generate", "model": "tiny", "prompts": ["x"], "random_seed": seed})
        assert r.status_code == 422 and "random_seed" in r.text, r.text
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    r = h.put("/api", json={"model": "tiny", "prompts": ["hello"], "tokens_to_generate": 1, "random_seed": 2**63 - 1})
    assert r.status_code == 200, r.text
    r = h.put("/api", json={"model": "tiny", "prompts": ["hello"], "tokens_to_generate": 1, "tokens_to_genrate": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "tokens_to_genrate"], r.text
    assert "Extra inputs" in r.json()["detail"][0]["msg"]
    job = {"kind": "generate", "model": "tiny", "prompts": ["x"], "tokens_to_generate": 1}
    for key in ("", "k" * 201):
        r = h.post("/v1/jobs", json=job, headers={"Idempotency-Key": key})
        assert r.status_code == 422 and "1-200 characters" in r.json()["detail"], (len(key), r.text)
    assert h.post("/v1/jobs", json=job, headers={"Idempotency-Key": "k" * 200}).status_code == 202


def test_position_limit_at_the_gateway(stack):
    h = httpx.Client(base_url=stack.url, headers=A, timeout=60)
    for r, field in ((h.put("/api", json={"model": "tiny", "prompts": ["hi"], "tokens_to_generate": 300}),
                      "tokens_to_generate=300"),
                     (h.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 257}),
                      "max_tokens=257"),
                     (h.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1000,
                                                           "messages": [{"role": "user", "content": "hi"}]}),
                      "max_tokens=1000")):
        body = r.json()
        detail = body["detail"] if "detail" in body else body["error"]["message"]
        assert r.status_code == 400 and field in detail and "max_position_embeddings is 256" in detail, r.text
    # within the limit, but the prompt's tokens push it over: the worker's exact count says 400 too
    r = h.put("/api", json={"model": "tiny", "prompts": ["hello " * 40], "tokens_to_generate": 250})
    assert r.status_code == 400 and "shorten" in r.json()["detail"], r.text
    r = h.put("/api", json={"model": "tiny", "prompts": ["hi"], "tokens_to_generate": 2})
    assert r.status_code == 200
    native = {"format": "native", "model": {"max_position_embeddings": 128}}
    assert model_positions(native) == 128 and model_positions({"hf_config": {"max_position_embeddings": 64}}) == 64


PROD = {"environment": "production", "api_keys": {hash_key("a-random-key"): "team"},
        "storage_url": "s3://svc-user:Zq8-random-secret@minio.internal:9000/ckpt?secure=true"}


def _refusal(**overrides) -> str:
    with pytest.raises(ValidationError) as e:
        Settings(**{**PROD, **overrides})
    return str(e.value)


def test_production_refuses_insecure_defaults(monkeypatch):
    for k in [k for k in os.environ if k.startswith("LLAMA_SVC_")]:
        monkeypatch.delenv(k)
    assert Settings().max_upload_bytes == 16 << 30 and Settings().max_concurrent_uploads_per_team == 2
    assert Settings().max_concurrent_generations == 256
    assert Settings(**PROD).environment == "production"
    msg = _refusal(api_keys={hash_key("a-random-key"): "team", hash_key(LOCAL_DEV_KEY): "local"})
    assert "LLAMA_SVC_API_KEYS" in msg and LOCAL_DEV_KEY in msg and "random keys" in msg
    for creds in ("minioadmin:minioadmin", "minio:minio123", "someone:minioadmin"):
        msg = _refusal(storage_url=f"s3://{creds}@minio.internal:9000/ckpt?secure=true")
        assert "LLAMA_SVC_STORAGE_URL" in msg and "MINIO_ROOT_PASSWORD" in msg, msg
    plain = "s3://svc-user:Zq8-random-secret@minio.internal:9000/ckpt?secure=false"
    for url in (plain, plain.replace("?secure=false", "")):
        msg = _refusal(storage_url=url)
        assert "plain HTTP" in msg and "LLAMA_SVC_ALLOW_INSECURE_S3=true" in msg and "secure=true" in msg, msg
    assert Settings(**{**PROD, "storage_url": plain, "allow_insecure_s3": True}).allow_insecure_s3
    for host in ("127.0.0.1", "localhost", "[::1]"):
        assert Settings(**{**PROD, "storage_url": plain.replace("minio.internal", host)})
    # local use keeps its defaults
    assert Settings(storage_url="s3://minioadmin:minioadmin@10.0.0.5:9000/b").environment == "local"
    # the settings are read from the environment at start-up: the same refusal stops the gateway
    env = {"LLAMA_SVC_ENVIRONMENT": "production", "LLAMA_SVC_API_KEYS": json.dumps(PROD["api_keys"]),
           "LLAMA_SVC_STORAGE_URL": "s3://minioadmin:minioadmin@minio:9000/ckpt", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", "from shared.settings import Settings; Settings()"], env=env,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode != 0 and "LLAMA_SVC_STORAGE_URL" in out.stderr, out.stderr[-500:]
