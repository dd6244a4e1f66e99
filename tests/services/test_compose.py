"""docker-compose.yml validates offline and carries the operational settings it promises."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _config(*extra: str) -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (apt-get install -y docker-compose)"
    env = {**os.environ, "LLAMA_SVC_API_KEYS": '{"' + "0" * 64 + '": "team"}'}
    cmd = [exe, "-f", str(ROOT / "docker-compose.yml"), *extra]
    subprocess.run(cmd + ["config", "-q"], check=True, env=env, cwd=ROOT)
    out = subprocess.run(cmd + ["config"], check=True, env=env, cwd=ROOT, capture_output=True, text=True).stdout
    return yaml.safe_load(out)


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
