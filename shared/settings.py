"""All settings of the gateway and the workers: one pydantic-settings class (env prefix LLAMA_SVC_).

Both sides read it: ``gateway.app`` at start-up and ``services.worker`` (and the job children it spawns).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlparse

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.db_url import database_url
from shared.protocol.limits import MAX_PROMPTS

LOCAL_DEV_KEY = "local-dev-key"
# documented default object-store credentials (MinIO's root user, its older docs, AWS's doc example)
DEFAULT_S3_CREDENTIALS = {("minioadmin", "minioadmin"), ("minio", "minio123"),
                          ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")}
_ROOT = Path(__file__).resolve().parents[1]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    # errors never echo a value: URLs carry passwords
    model_config = SettingsConfigDict(env_prefix="LLAMA_SVC_", extra="ignore", hide_input_in_errors=True)

    environment: Literal["local", "production"] = "local"
    data_dir: Path = _ROOT / ".data" / "service"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # file:///dir (default: <data_dir>/objects) or s3://KEY:SECRET@host:port/bucket?secure=false
    storage_url: str = ""
    allow_insecure_s3: bool = False      # plain-HTTP S3 to a host that is not loopback (a private network)
    # the jobs database: a file path / sqlite:///PATH (default: <data_dir>/jobs.sqlite3) or
    # postgresql://USER:PASSWORD@HOST:PORT/DATABASE (required once processes run on several hosts)
    jobs_db: str = ""
    jobs_db_pool_size: int = Field(8, ge=1)          # connections a gateway process keeps (as many again on demand)
    jobs_db_worker_pool_size: int = Field(2, ge=1)   # the same for a worker and for each job's child process
    # sha256(api key) -> team. Generate with: python -c "import hashlib;print(hashlib.sha256(b'KEY').hexdigest())"
    api_keys: dict[str, str] = Field(default_factory=dict)
    # when set, GET /metrics needs `Authorization: Bearer <metrics_token>` (a scraper's own secret)
    metrics_token: str = ""

    # limits
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 16 << 30
    max_concurrent_uploads_per_team: int = Field(2, ge=1)
    max_concurrent_generations: int = Field(256, ge=1)   # per gateway process; over it: 429
    max_dataset_bytes: int = 1 << 30     # one JSONL dataset (POST /v1/datasets)
    direct_upload_ttl_s: int = Field(24 * 3600, ge=60, le=7 * 24 * 3600)  # presigned URLs; abandoned after
    download_url_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600)        # presigned download redirects
    # team -> S3 prefixes its import jobs may copy from, e.g. {"team-a": ["s3://models/llama/"]}
    import_grants: dict[str, list[str]] = Field(default_factory=dict)
    max_train_world_size: int = Field(8, ge=1)   # the most ranks a train worker offers one finetune
    max_prompts: int = Field(MAX_PROMPTS, ge=1, le=MAX_PROMPTS)  # per request or job; the workers refuse more
    max_prompt_chars: int = 32_768
    max_new_tokens: int = 2048
    max_active_jobs_per_team: int = 16
    retry_after_s: int = 10

    # job lifecycle
    max_attempts: int = 2
    heartbeat_s: float = 5.0
    stale_after_s: float = 60.0          # a running job without a heartbeat this long lost its worker
    redispatch_after_s: float = 30.0     # a queued job whose message left Redis this long ago is re-published
    reaper_interval_s: float = 5.0
    reaper_lease_s: float = 30.0         # one gateway's reaper acts at a time; another takes over this long after it stops
    cancel_grace_s: float = 10.0         # after a cancel request, the job's process group is killed after this
    generate_timeout_s: float = 300.0
    visibility_timeout_s: int = 3600
    commit_gc_after_s: float = 6 * 3600.0   # objects of a commit that died midway are deleted after this
    commit_gc_interval_s: float = 300.0    # how often the gateway's reaper looks for them

    # generation worker
    model_cache_bytes: int = 8 << 30

    log_level: str = "INFO"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, v):
        if isinstance(v, str):
            v = json.loads(v) if v.strip() else {}
        for h in v:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError("api_keys maps sha256 hex digests (64 lowercase hex chars) of keys to teams, not raw keys")
        return v

    @field_validator("import_grants")
    @classmethod
    def _check_grants(cls, v: dict[str, list[str]]):
        for team, prefixes in v.items():
            for p in prefixes:
                bucket, _, rest = p.removeprefix("s3://").partition("/")
                if not p.startswith("s3://") or not bucket or ".." in p.split("/"):
                    raise ValueError(f"import_grants[{team!r}]: {p!r} is not an s3://bucket/prefix/ URI")
        return v

    @field_validator("jobs_db")
    @classmethod
    def _check_jobs_db(cls, v: str) -> str:
        if v.strip():
            database_url(v)  # refuses what it cannot honour, naming LLAMA_SVC_JOBS_DB
        return v

    @model_validator(mode="after")
    def _refuse_unsafe(self):
        if self.environment == "production":
            if hash_key(LOCAL_DEV_KEY) in self.api_keys:
                raise ValueError(f"LLAMA_SVC_API_KEYS holds the documented local key {LOCAL_DEV_KEY!r}, which is "
                                 "public; remove it and issue random keys (e.g. `openssl rand -hex 32`)")
            if not self.storage_url.startswith("s3://"):
                raise ValueError("production needs LLAMA_SVC_STORAGE_URL=s3://... (the local directory store is for local use)")
            _refuse_unsafe_s3(self.storage_url, self.allow_insecure_s3)
        return self

    def require_api_keys(self) -> None:
        """The gateway's start-up check (workers take no keys): production serves only the keys it is given."""
        if self.environment == "production" and not self.api_keys:
            raise ValueError("LLAMA_SVC_API_KEYS must be set in production (no built-in development key)")

    @property
    def team_of_hash(self) -> dict[str, str]:
        if self.api_keys:
            return dict(self.api_keys)
        return {hash_key(LOCAL_DEV_KEY): "local"}  # local use only (refused in production)

    @property
    def storage(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'objects').resolve()}"

    @property
    def jobs_db_url(self) -> str:
        return database_url(self.jobs_db, self.data_dir / "jobs.sqlite3")


def _refuse_unsafe_s3(url: str, allow_insecure: bool) -> None:
    """Production S3: no documented default credentials; TLS unless the host is loopback or
    LLAMA_SVC_ALLOW_INSECURE_S3 says the network is private."""
    u = urlparse(url)
    access, secret = unquote(u.username or ""), unquote(u.password or "")
    if (access, secret) in DEFAULT_S3_CREDENTIALS or secret in {s for _, s in DEFAULT_S3_CREDENTIALS}:
        raise ValueError("LLAMA_SVC_STORAGE_URL uses a documented default object-store credential "
                         f"({access!r}); set MINIO_ROOT_USER and MINIO_ROOT_PASSWORD (or the S3 keys) to "
                         "random values and put them in the URL")
    secure = {k: v[-1] for k, v in parse_qs(u.query).items()}.get("secure", "false").lower() in ("1", "true", "yes")
    if not secure and not allow_insecure and not _loopback(u.hostname or ""):
        raise ValueError(f"LLAMA_SVC_STORAGE_URL sends checkpoints and keys over plain HTTP to {u.hostname!r}; "
                         "use TLS (`?secure=true`), or set LLAMA_SVC_ALLOW_INSECURE_S3=true if that host is only "
                         "reachable on a private network")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()
