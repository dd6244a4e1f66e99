"""docker-compose.yml and docker-compose.workers.yml validate offline (``docker-compose config -q``)
and carry the operational settings they promise: no default credentials, no volume shared between
services, workers that need only the Redis, jobs-database and object-store URLs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CREDS = {"MINIO_ROOT_USER": "svc-user-3f9a", "MINIO_ROOT_PASSWORD": "pw-8c1d2e7b9a0f4e6d"}
PG_CREDS = {"POSTGRES_USER": "jobs-7e21", "POSTGRES_PASSWORD": "pg-4b9c0d1e2f3a5b6c"}
REMOTE = {"LLAMA_SVC_REDIS_URL": "redis://10.0.0.1:6379/0",
          "LLAMA_SVC_JOBS_DB": "postgresql://jobs-7e21:pg-4b9c@10.0.0.1:5432/jobs",
          "LLAMA_SVC_STORAGE_URL": "s3://svc-user-3f9a:pw-8c1d@10.0.0.1:9000/checkpoints?secure=true"}
WORKERS = ("convert-worker", "train-worker", "generate-worker")
# what a worker is given: the three URLs and settings that are no secret
WORKER_ENV = {"LLAMA_SVC_ENVIRONMENT", "LLAMA_SVC_REDIS_URL", "LLAMA_SVC_JOBS_DB", "LLAMA_SVC_STORAGE_URL",
              "LLAMA_SVC_ALLOW_INSECURE_S3", "LLAMA_SVC_DATA_DIR", "QUEUE"}


def _env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "POSTGRES_", "LLAMA_SVC_"))}
    return {**env, "LLAMA_SVC_API_KEYS": '{"' + "0" * 64 + '": "team"}', **CREDS, **PG_CREDS, **overrides}


def _compose(*extra: str, files=("docker-compose.yml",), env: dict | None = None,
             quiet: bool = False) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (apt-get install -y docker-compose)"
    cmd = [exe, *(a for f in files for a in ("-f", str(ROOT / f))), *extra, "config", *(["-q"] if quiet else [])]
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


def _named_volumes(service: dict) -> set[str]:
    """The named volumes a service mounts (not anonymous ones nor host paths)."""
    out = set()
    for v in service.get("volumes", []):
        source = v.get("source") if isinstance(v, dict) else (str(v).split(":")[0] if ":" in str(v) else None)
        if source and not source.startswith(("/", ".")):
            out.add(source)
    return out


def test_both_files_validate_quietly():
    for files, env in ((("docker-compose.yml",), _env()), (("docker-compose.workers.yml",), _env(**REMOTE))):
        out = _compose(files=files, env=env, quiet=True)
        assert out.returncode == 0 and not out.stdout.strip(), (files, out.stderr)


def test_postgres_is_the_jobs_database_and_no_volume_is_shared():
    cfg = _config()
    svc = cfg["services"]
    pg = svc["postgres"]
    assert ":" in pg["image"] and not pg["image"].endswith(":latest") and "healthcheck" in pg
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"]) and _named_volumes(pg) == {"pgdata"}
    assert (pg["environment"]["POSTGRES_USER"], pg["environment"]["POSTGRES_PASSWORD"]) == tuple(PG_CREDS.values())
    assert not pg.get("ports")
    user, password = PG_CREDS.values()
    for name in ("gateway", *WORKERS):
        assert svc[name]["environment"]["LLAMA_SVC_JOBS_DB"] == f"postgresql://{user}:{password}@postgres:5432/jobs"
        assert svc[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
    assert "jobdata" not in cfg.get("volumes", {})
    owners: dict[str, list[str]] = {}
    for name, s in svc.items():
        for vol in _named_volumes(s):
            owners.setdefault(vol, []).append(name)
    assert all(len(names) == 1 for names in owners.values()), owners
    for name in WORKERS:
        assert set(svc[name]["environment"]) <= WORKER_ENV, name  # no API keys on a worker
    for missing in PG_CREDS:
        out = _compose(env={k: v for k, v in _env().items() if k != missing})
        assert out.returncode != 0 and f"set {missing}" in out.stderr, (missing, out.stderr)


def test_workers_file_starts_only_workers_from_urls():
    out = _compose(files=("docker-compose.workers.yml",), env=_env(**REMOTE))
    assert out.returncode == 0, out.stderr
    svc = yaml.safe_load(out.stdout)["services"]
    assert set(svc) == set(WORKERS)
    for name, s in svc.items():
        env = s["environment"]
        assert set(env) <= WORKER_ENV and {k: env[k] for k in REMOTE} == REMOTE, name
        assert not _named_volumes(s) and not s.get("depends_on") and "healthcheck" in s, name
    assert svc["train-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for missing in REMOTE:
        env = {k: v for k, v in _env(**REMOTE).items() if k != missing}
        out = _compose(files=("docker-compose.workers.yml",), env=env)
        assert out.returncode != 0 and f"set {missing}" in out.stderr, (missing, out.stderr)


def test_expose_override_publishes_on_the_private_address_only():
    files = ("docker-compose.yml", "docker-compose.expose.yml")
    missing = _compose(files=files, quiet=True)
    assert missing.returncode != 0 and "LLAMA_SVC_PRIVATE_ADDR" in missing.stderr
    out = _compose(files=files, env=_env(LLAMA_SVC_PRIVATE_ADDR="10.0.0.1"))
    assert out.returncode == 0, out.stderr
    svc = yaml.safe_load(out.stdout)["services"]
    for name, port in (("redis", 6379), ("postgres", 5432), ("minio", 9000)):
        published = [p if isinstance(p, str) else f"{p['host_ip']}:{p['published']}:{p['target']}"
                     for p in svc[name]["ports"]]
        assert [p.removesuffix("/tcp") for p in published] == [f"10.0.0.1:{port}:{port}"], (name, published)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _image_requirements(dockerfile: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, extras) of every ``"pkg[extra]==version"`` a Dockerfile pip-installs."""
    text = (ROOT / dockerfile).read_text()
    return {_norm(n): (v, set(filter(None, e.split(",")))) for n, e, v in
            re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[([^\]]*)\])?==([^"]+)"', text)}


def _closure(wanted: dict[str, set[str]]) -> set[str]:
    """The installed distributions that ``wanted`` (name -> extras) require, transitively."""
    import importlib.metadata as md

    seen, todo = set(), list(wanted.items())
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            extra = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", r)
            if extra and extra.group(1) not in extras:
                continue
            m = re.match(r"([A-Za-z0-9_.\-]+)(?:\[([^\]]*)\])?", r)
            todo.append((_norm(m.group(1)), set(filter(None, (m.group(2) or "").split(",")))))
    return seen


def test_the_gateway_image_has_what_the_gateway_imports():
    """Import the gateway with every store and jobs backend it can be configured with, and check
    that each third-party distribution it loads is installed by its Dockerfile, at the pinned version."""
    code = ("import sys, importlib.metadata as md; import gateway.app, gateway.edge, gateway.relay, shared.protocol.docs; "
            "import shared.storage.s3, shared.jobs.db, psycopg, alembic.command; "
            "pd = md.packages_distributions(); print('torch' in sys.modules); "
            "print(' '.join(sorted({d for m in list(sys.modules) for d in pd.get(m.split('.')[0], [])})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    torch_loaded, dists = out.splitlines()
    assert torch_loaded == "False"
    image = _image_requirements("docker/Dockerfile.gateway")
    have = _closure({n: extras for n, (_, extras) in image.items()})
    # imported only where installed (each importer tries and goes on without it)
    optional = {"sniffio", "pydantic-extra-types", "cryptography", "xxhash", "pygments"}
    needed = {_norm(d) for d in dists.split()} - {"llama-megatron-svc", "setuptools", "pip"} - optional
    assert needed <= have, f"docker/Dockerfile.gateway lacks {sorted(needed - have)}"
    pins = {_norm(n): v for n, v in re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^"]+)"',
                                              (ROOT / "pyproject.toml").read_text())}
    assert {n: v for n, (v, _) in image.items() if n in pins and pins[n] != v} == {}, "pins differ from pyproject"
