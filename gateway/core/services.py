"""The gateway's long-lived handles (job store, checkpoints, Celery publisher, Redis), built once."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis
from celery import Celery

from shared.jobs import JobStore
from shared.jobs.reaper import reap_once
from shared.jobs.transport import make_celery
from shared.storage import CheckpointStore, open_store

from .config import Settings

log = logging.getLogger("llama_svc.gateway")


@dataclass
class Services:
    settings: Settings
    jobs: JobStore
    checkpoints: CheckpointStore
    celery: Celery
    redis: redis.Redis
    aredis: aioredis.Redis
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, settings: Settings) -> "Services":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings=settings, jobs=JobStore(settings.jobs_db_path),
                   checkpoints=CheckpointStore(open_store(settings.storage)),
                   celery=make_celery(settings.redis_url, visibility_timeout=settings.visibility_timeout_s),
                   redis=redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2),
                   aredis=aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=None))

    def start_reaper(self) -> threading.Thread:
        def loop():
            while not self._stop.wait(self.settings.reaper_interval_s):
                try:
                    reap_once(self.jobs, self.celery, self.redis, stale_after_s=self.settings.stale_after_s,
                              redispatch_after_s=self.settings.redispatch_after_s)
                except Exception as e:  # Redis down: try again next round
                    log.warning("reaper round failed: %s", e)

        t = threading.Thread(target=loop, daemon=True, name="reaper")
        t.start()
        return t

    def close(self) -> None:
        self._stop.set()
