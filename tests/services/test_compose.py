"""docker-compose.yml validates offline and carries the operational settings it promises."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CREDS = {"MINIO_ROOT_USER": "svc-user-3f9a", "MINIO_ROOT_PASSWORD": "pw-8c1d2e7b9a0f4e6d"}


def _env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
    return {**env, "LLAMA_SVC_API_KEYS": '{"' + "0" * 64 + '": "team"}', **CREDS, **overrides}


def _compose(*extra: str, files=("docker-compose.yml",), env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (apt-get install -y docker-compose)"
    cmd = [exe, *(a for f in files for a in ("-f", str(ROOT / f))), *extra, "config"]
    return subprocess.run(cmd, env=_env() if env is None else env, cwd=ROOT, capture_output=True, text=True)


def _config(*extra: str, files=("docker-compose.yml",)) -> dict:
    out = _compose(*extra, files=files)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_validates():
    cfg = _config()
    svc = cfg["services"]
    assert {"gateway", "redis", "minio", "minio-init", "convert-worker", "train-worker", "generate-worker"} <= set(svc)
    redis_cmd = " ".join(svc["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert ":" in svc["minio"]["image"] and not svc["minio"]["image"].endswith(":latest")
    for name in ("train-worker", "generate-worker"):
        devices = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    for name in ("gateway", "redis", "minio", "convert-worker", "train-worker", "generate-worker"):
        assert "healthcheck" in svc[name], name
    assert "mc mb" in " ".join(svc["minio-init"]["entrypoint"])
    for f in ("docker/Dockerfile.gateway", "docker/Dockerfile.worker"):
        assert (ROOT / f).is_file()


def test_compose_cpu_profile():
    svc = _config("--profile", "cpu")["services"]
    assert {"train-worker-cpu", "generate-worker-cpu"} <= set(svc)
    assert "deploy" not in svc["generate-worker-cpu"]


def test_minio_is_private_and_has_no_default_credentials():
    cfg = _config()
    svc = cfg["services"]
    assert not svc["minio"].get("ports"), svc["minio"].get("ports")
    for name in ("minio", "minio-init"):
        env = svc[name]["environment"]
        assert (env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"]) == tuple(CREDS.values()), name
    for name in ("gateway", "convert-worker", "generate-worker"):
        url = svc[name]["environment"]["LLAMA_SVC_STORAGE_URL"]
        assert url.startswith(f"s3://{CREDS['MINIO_ROOT_USER']}:{CREDS['MINIO_ROOT_PASSWORD']}@minio:9000/"), url
    text = (ROOT / "docker-compose.yml").read_text()
    assert "minioadmin" not in text
    # without the credentials the file does not even resolve, and the message says what to set
    for missing in CREDS:
        env = {k: v for k, v in _env().items() if k != missing}
        out = _compose(env=env)
        assert out.returncode != 0 and f"set {missing}" in out.stderr, (missing, out.stderr)


def test_local_override_publishes_minio_on_loopback_only():
    minio = _config(files=("docker-compose.yml", "docker-compose.local.yml"))["services"]["minio"]
    ports = [_port(p) for p in minio["ports"]]
    assert sorted(ports) == [("127.0.0.1", "9000", "9000"), ("127.0.0.1", "9001", "9001")], minio["ports"]


def _port(p) -> tuple[str, str, str]:
    """(host ip, published, target) of a short ("IP:PUB:TARGET") or long form port entry."""
    if isinstance(p, dict):
        return p.get("host_ip", ""), str(p.get("published", "")), str(p["target"])
    parts = str(p).split("/")[0].split(":")
    return (parts[0] if len(parts) == 3 else "", *parts[-2:])
