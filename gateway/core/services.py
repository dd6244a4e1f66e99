"""The gateway's long-lived handles (job store, checkpoints, Celery publisher, Redis), built once."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis
from celery import Celery

from shared.jobs import JobStore
from shared.jobs.reaper import REAPER_LEASE, CommitCollector, reap_round
from shared.jobs.transport import make_celery
from shared.storage import CheckpointStore, dataset_store, open_store
from shared.storage.uploads import UploadSessions
from shared.jobs.placement import Deployments

from shared.settings import Settings

log = logging.getLogger("llama_svc.gateway")
POOL_SPARE = 16          # async Redis connections beyond one per generation in flight (uploads, publishes)
POOL_WAIT_S = 5.0        # how long a request waits for a free async Redis connection


@dataclass
class Services:
    settings: Settings
    jobs: JobStore
    checkpoints: CheckpointStore
    celery: Celery
    redis: redis.Redis
    aredis: aioredis.Redis
    generations: asyncio.Semaphore   # generation requests in flight in this process (see gateway.relay)
    _stop: threading.Event = field(default_factory=threading.Event)
    reaper_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")

    @property
    def uploads(self) -> UploadSessions:
        """Direct uploads in progress, recorded in the object store (any replica serves them)."""
        return UploadSessions(self.checkpoints.store)

    @property
    def deployments(self) -> Deployments:
        return Deployments(self.checkpoints.store)

    @property
    def datasets(self) -> CheckpointStore:
        """The team datasets, in the same object store as the checkpoints."""
        return dataset_store(self.checkpoints.store)

    @classmethod
    def build(cls, settings: Settings) -> "Services":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # every generation in flight holds one connection during BLPOP: the pool has room for all
        # of them, and a request waits for a connection rather than failing
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.max_concurrent_generations + POOL_SPARE,
            timeout=POOL_WAIT_S, socket_connect_timeout=2, socket_timeout=None)
        return cls(settings=settings, jobs=JobStore(settings.jobs_db_url, pool_size=settings.jobs_db_pool_size),
                   checkpoints=CheckpointStore(open_store(settings.storage)),
                   celery=make_celery(settings.redis_url, visibility_timeout=settings.visibility_timeout_s),
                   redis=redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2),
                   aredis=aioredis.Redis(connection_pool=pool),
                   generations=asyncio.Semaphore(settings.max_concurrent_generations))

    def start_reaper(self) -> threading.Thread:
        gc = CommitCollector((self.checkpoints, self.datasets), older_than_s=self.settings.commit_gc_after_s,
                             interval_s=self.settings.commit_gc_interval_s, uploads=self.uploads)

        def loop():
            while not self._stop.wait(self.settings.reaper_interval_s):
                try:
                    if reap_round(self.jobs, self.celery, self.redis, holder=self.reaper_id,
                                  lease_s=self.settings.reaper_lease_s, stale_after_s=self.settings.stale_after_s,
                                  redispatch_after_s=self.settings.redispatch_after_s) is None:
                        continue  # another gateway's reaper holds the lease
                except Exception as e:  # Redis or the database down: try again next round
                    log.warning("reaper round failed: %s", e)
                try:
                    gc.maybe_run()
                except Exception as e:  # the object store is down: try again next interval
                    log.warning("commit garbage collection failed: %s", e)

        t = threading.Thread(target=loop, daemon=True, name="reaper")
        t.start()
        return t

    def close(self) -> None:
        self._stop.set()
        try:
            self.jobs.release_lease(REAPER_LEASE, self.reaper_id)  # another gateway's reaper takes over at once
        except Exception as e:
            log.warning("could not release the reaper lease: %s", e)
        self.jobs.close()
