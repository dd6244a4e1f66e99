"""Docs and the API description: `/docs` and `/redoc` load only each server's own assets (no
network), on the gateway and on the standalone generation server, and both servers' OpenAPI
documents are valid OpenAPI with the job union discriminated."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from gateway.app import create_app
from shared.settings import Settings, hash_key
from services.generate.server import create_app as create_server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("docs"), api_keys={hash_key("key-team-a"): "team-a"},
                        redis_url="redis://127.0.0.1:9/0")  # nothing here needs Redis
    with TestClient(create_app(settings, reaper=False)) as c:
        yield c


@pytest.fixture(scope="module")
def standalone():
    with TestClient(create_server(lambda: None)) as c:
        yield c


def _urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)


@pytest.mark.parametrize("server", ["gateway", "standalone"])
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_use_only_local_assets(request, server, page):
    c = request.getfixturevalue(server)
    r = c.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    urls = _urls(r.text)
    assert urls and "/openapi.json" in urls
    assert not re.search(r"https?://", r.text.replace("http://www.w3.org", "")), r.text
    for url in urls:
        assert url.startswith("/"), url
        got = c.get(url)
        assert got.status_code == 200 and got.content, url


def test_gateway_openapi_is_valid_and_discriminates_jobs(gateway):
    spec = gateway.get("/openapi.json").json()
    validate(spec)
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    union = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body
    assert union["discriminator"]["propertyName"] == "kind"
    kinds = set(union["discriminator"]["mapping"])
    assert {"convert", "reshard", "export", "import", "finetune", "eval", "generate"} <= kinds


def test_standalone_server_openapi_is_valid(standalone):
    spec = standalone.get("/openapi.json").json()
    validate(spec)
    assert {"/api", "/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    for path, method, req, resp in (("/api", "put", "MegatronRequest", "MegatronResponse"),
                                    ("/v1/completions", "post", "CompletionRequest", "CompletionResponse"),
                                    ("/v1/chat/completions", "post", "ChatRequest", "ChatResponse")):
        op = spec["paths"][path][method]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + req)
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + resp)
        assert "4XX" in op["responses"]
    assert "prompt" in spec["components"]["schemas"]["CompletionRequest"]["properties"]

