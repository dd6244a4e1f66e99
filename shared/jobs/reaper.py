"""Recovery of jobs whose worker died or whose message Redis lost (see transport.py), and the
garbage collection of checkpoint commits that died midway.

Every gateway runs a reaper; in each round only the holder of the reaper's lease (a row in the
jobs database, renewed each round) acts, so several gateways never re-publish the same job twice.
When the holder stops, another gateway takes the lease over once it expires."""

from __future__ import annotations

import logging
import time

from .state import QUEUE_OF, QUEUED
from .store import JobStore
from .transport import message_id, publish_job, queued_message_ids

log = logging.getLogger("llama_svc.reaper")
REAPER_LEASE = "reaper"


def dispatch(store: JobStore, app, job_id: str, kind: str) -> bool:
    """Bump the dispatch token and publish; a failed publish is retried by the reaper later."""
    token = store.mark_dispatched(job_id)
    if token is None:
        return False
    try:
        publish_job(app, job_id, kind, token)
        return True
    except Exception as e:  # Redis down: the job stays queued and on record
        log.warning("publish failed, will retry: %s", e, extra={"job_id": job_id})
        return False


def reap_once(store: JobStore, app, redis_client, *, stale_after_s: float, redispatch_after_s: float) -> dict:
    stats = {"requeued": 0, "failed": 0, "redispatched": 0}
    for job in store.stale_running(stale_after_s):
        new = store.recover_lost(job, f"worker {job.worker} lost (no heartbeat for {stale_after_s:.0f}s)")
        log.warning("recovered lost job -> %s", new, extra={"job_id": job.id})
        if new == QUEUED:
            stats["requeued"] += 1
            dispatch(store, app, job.id, job.kind)
        elif new:
            stats["failed"] += 1
    waiting = store.undispatched(redispatch_after_s)
    if waiting:
        present: dict[str, set[str]] = {}
        for job in waiting:
            q = QUEUE_OF[job.kind]
            if q not in present:
                present[q] = queued_message_ids(redis_client, q)
            if job.dispatch and message_id(job.id, job.dispatch) in present[q]:
                continue
            log.info("re-publishing queued job (message missing)", extra={"job_id": job.id})
            if dispatch(store, app, job.id, job.kind):
                stats["redispatched"] += 1
    return stats


def reap_round(store: JobStore, app, redis_client, *, holder: str, lease_s: float, stale_after_s: float,
               redispatch_after_s: float) -> dict | None:
    """One round of ``holder``'s reaper: ``reap_once`` if it holds the lease (taking or renewing it
    for ``lease_s``), else None: another process's reaper acts this round."""
    if not store.acquire_lease(REAPER_LEASE, holder, lease_s):
        return None
    return reap_once(store, app, redis_client, stale_after_s=stale_after_s, redispatch_after_s=redispatch_after_s)


class CommitCollector:
    """Runs ``collect_garbage`` of each checkpoint-like store (checkpoints, datasets) and discards
    expired direct uploads (``uploads``: a ``shared.storage.uploads.UploadSessions``) at most every
    ``interval_s``; called each reaper round."""

    def __init__(self, stores, *, older_than_s: float, interval_s: float, uploads=None):
        self.stores, self.older_than_s, self.interval_s = list(stores), older_than_s, interval_s
        self.uploads = uploads
        self._next = 0.0

    def maybe_run(self, now: float | None = None) -> list[str] | None:
        now = time.time() if now is None else now
        if now < self._next:
            return None
        self._next = now + self.interval_s
        removed = []
        for store in self.stores:
            for name in store.collect_garbage(self.older_than_s):
                log.warning("removed the objects of an interrupted commit", extra={"commit": f"{store.prefix}/{name}"})
                removed.append(f"{store.prefix}/{name}")
        for upload_id in self.uploads.expire(now) if self.uploads is not None else ():
            log.warning("aborted an abandoned direct upload", extra={"upload": upload_id})
            removed.append(f"uploads/{upload_id}")
        return removed
