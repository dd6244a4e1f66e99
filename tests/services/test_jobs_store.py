"""Job records on both backends (SQLite, PostgreSQL): transitions, idempotency, fencing of lost
attempts, event order, leases, migrations, and the jobs-database setting."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from shared.jobs import IdempotencyConflict, InvalidTransition, JobStore, check_transition, eta_seconds
from shared import db_url
from shared.jobs import db


@pytest.fixture
def store(jobs_db):
    s = JobStore(jobs_db)
    yield s
    s.close()


def test_lifecycle_and_fencing(store):
    job, created = store.create("t", "convert", {"source": "x"}, max_attempts=2)
    assert created and job.state == "queued"
    d1 = store.mark_dispatched(job.id)
    d2 = store.mark_dispatched(job.id)
    assert store.claim(job.id, d1, "w1") is None  # a stale message is dropped
    j = store.claim(job.id, d2, "w1")
    assert j.state == "running" and j.attempts == 1
    assert store.claim(job.id, d2, "w2") is None  # a duplicate cannot claim twice
    # the reaper takes the job from a lost attempt; that attempt's late writes change nothing
    assert store.recover_lost(j, "lost") == "queued"
    assert not store.finish(job.id, 1, "succeeded", result={})
    assert store.heartbeat(job.id, 1) is None
    j2 = store.claim(job.id, store.mark_dispatched(job.id), "w2")
    assert j2.attempts == 2
    assert store.recover_lost(j2, "lost again") == "failed"
    final = store.get(job.id)
    assert final.state == "failed" and "gave up after 2" in final.error
    states = [e["state"] for e in store.events(job.id) if e["type"] == "state"]
    assert states == ["queued", "running", "queued", "running", "failed"]


def test_cancel_and_isolation(store):
    job, _ = store.create("t", "convert", {})
    assert store.request_cancel(job.id, "other") is None  # another team's job does not exist for it
    assert store.get(job.id).state == "queued"
    assert store.request_cancel(job.id, "t").state == "cancelled"
    running, _ = store.create("t", "export", {})
    store.claim(running.id, store.mark_dispatched(running.id), "w")
    j = store.request_cancel(running.id, "t")
    assert j.state == "running" and j.cancel_requested
    assert store.finish(running.id, 1, "cancelled")
    assert store.get(running.id).state == "cancelled"


def test_idempotency_and_listing(store):
    a, c1 = store.create("t", "convert", {"a": 1}, idempotency_key="k", request_hash="h1")
    b, c2 = store.create("t", "convert", {"a": 1}, idempotency_key="k", request_hash="h1")
    assert c1 and not c2 and a.id == b.id
    with pytest.raises(IdempotencyConflict):
        store.create("t", "convert", {"a": 2}, idempotency_key="k", request_hash="h2")
    other, c3 = store.create("u", "convert", {}, idempotency_key="k", request_hash="h9")  # keys are per team
    assert c3 and other.id != a.id
    for _ in range(4):
        store.create("t", "export", {})
    page1 = store.list("t", limit=3)
    page2 = store.list("t", limit=3, before_seq=page1[-1].seq)
    assert len(page1) == 3 and len(page2) == 2 and not {j.id for j in page1} & {j.id for j in page2}
    assert [j.kind for j in store.list("t", kind="convert")] == ["convert"]
    assert store.count_active("t") == 5


def test_pure_state_logic():
    check_transition("queued", "running")
    with pytest.raises(InvalidTransition):
        check_transition("succeeded", "running")
    assert eta_seconds(1, 4, started_at=100.0, now=110.0) == pytest.approx(30.0)
    assert eta_seconds(0, 4, started_at=100.0) is None


def test_recover_with_event_and_final_error(store):
    job, _ = store.create("t", "convert", {}, max_attempts=2)
    j1 = store.claim(job.id, store.mark_dispatched(job.id), "w1")
    assert store.recover_lost(j1, "killed by signal 9", event={"signal": 9}, error="unused") == "queued"
    assert store.retries(job.id) == [{"state": "queued", "reason": "killed by signal 9", "signal": 9}]
    j2 = store.claim(job.id, store.mark_dispatched(job.id), "w2")
    assert store.recover_lost(j1, "late", error="x") is None  # the first attempt is fenced off
    assert store.recover_lost(j2, "killed by signal 9", event={"signal": 9}, error="killed on each attempt") == "failed"
    assert store.get(job.id).error == "killed on each attempt"
    assert len(store.retries(job.id)) == 1


def _together(n: int, fn) -> list:
    """Run ``fn(i)`` in ``n`` threads released at once; their results in order."""
    out, gate = [None] * n, threading.Barrier(n)

    def run(i):
        gate.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_stores_agree(jobs_db):
    """Several processes' stores (own engines) on one database: one job per key, one claim per token."""
    stores = [JobStore(jobs_db) for _ in range(4)]
    try:
        made = _together(4, lambda i: stores[i].create("t", "convert", {}, idempotency_key="same", request_hash="h"))
        assert len({job.id for job, _ in made}) == 1 and sum(created for _, created in made) == 1
        job = made[0][0]
        token = stores[0].mark_dispatched(job.id)
        claims = _together(4, lambda i: stores[i].claim(job.id, token, f"w{i}"))
        assert sum(c is not None for c in claims) == 1
        seqs = {j.seq for j in _together(4, lambda i: stores[i].create("t", "export", {})[0])}
        assert len(seqs) == 4 and min(seqs) > job.seq
    finally:
        for s in stores:
            s.close()


def test_events_are_ordered_per_job(store):
    job, _ = store.create("t", "convert", {})
    j = store.claim(job.id, store.mark_dispatched(job.id), "w")
    _together(4, lambda i: [store.set_progress(job.id, j.attempts, {"i": i, "n": n}) for n in range(10)])
    events = store.events(job.id)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) == 42
    assert store.events(job.id, after=seqs[20]) == events[21:]


def test_lease_has_one_holder(jobs_db):
    stores = [JobStore(jobs_db) for _ in range(4)]
    try:
        got = _together(4, lambda i: stores[i].acquire_lease("reaper", f"g{i}", ttl_s=30))
        assert sum(got) == 1
        winner = got.index(True)
        assert stores[winner].acquire_lease("reaper", f"g{winner}", ttl_s=30)  # the holder renews
        other = (winner + 1) % 4
        assert not stores[other].acquire_lease("reaper", f"g{other}", ttl_s=30)
        assert stores[winner].acquire_lease("reaper", f"g{winner}", ttl_s=-1)  # as if it had expired
        assert stores[other].acquire_lease("reaper", f"g{other}", ttl_s=30)  # taken over
        stores[other].release_lease("reaper", f"g{other}")
        assert stores[winner].acquire_lease("reaper", f"g{winner}", ttl_s=30)
    finally:
        for s in stores:
            s.close()


def test_migrations_are_versioned_and_idempotent(jobs_db):
    first = JobStore(jobs_db)
    job, _ = first.create("t", "convert", {})
    again = JobStore(jobs_db)  # a second process starting: nothing to do, nothing lost
    assert db.current_revision(again.engine) == "0002" and again.get(job.id).id == job.id
    first.close()
    again.close()


_PRE_MIGRATIONS = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, team TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
  params TEXT NOT NULL, created_at REAL NOT NULL, dispatched_at REAL, started_at REAL, finished_at REAL,
  heartbeat_at REAL, attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
  dispatch INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, error TEXT, result TEXT,
  progress TEXT, worker TEXT, pid INTEGER, idempotency_key TEXT, request_hash TEXT, seq INTEGER NOT NULL);
CREATE UNIQUE INDEX jobs_idem ON jobs(team, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, ts REAL NOT NULL,
  type TEXT NOT NULL, data TEXT NOT NULL);
INSERT INTO jobs (id, team, kind, state, params, created_at, max_attempts, seq)
  VALUES ('old', 't', 'convert', 'queued', '{}', 1.0, 2, 7);
INSERT INTO events (job_id, ts, type, data) VALUES ('old', 1.0, 'state', '{"state": "queued"}');
"""


def test_sqlite_file_from_before_migrations_is_adopted(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as c:
        c.executescript(_PRE_MIGRATIONS)
    store = JobStore(path)
    assert db.current_revision(store.engine) == "0002"
    assert store.get("old").seq == 7 and [e["state"] for e in store.events("old")] == ["queued"]
    new, _ = store.create("t", "convert", {})
    assert new.seq == 8 and store.acquire_lease("reaper", "g", 5)
    store.close()


def test_jobs_db_setting(tmp_path):
    assert db_url.database_url("", tmp_path / "j.db") == f"sqlite:///{tmp_path / 'j.db'}"
    assert db_url.database_url(str(tmp_path / "x.db")) == f"sqlite:///{tmp_path / 'x.db'}"
    assert db_url.database_url(f"sqlite:///{tmp_path}/y.db") == f"sqlite:///{tmp_path / 'y.db'}"
    assert db_url.database_url("postgresql://u:p@h:5432/jobs") == "postgresql+psycopg://u:p@h:5432/jobs"
    for bad in ("mysql://u@h/jobs", "postgresql:/user@host:5432/jobs", "redis://h/0", "postgresql://u@h:5432",
                "sqlite://relative.db", "postgresql+psycopg2://u@h/j"):
        with pytest.raises(ValueError, match="LLAMA_SVC_JOBS_DB"):
            db_url.database_url(bad)
    with pytest.raises(ValueError) as e:
        db_url.database_url("mysql://u:secret@h/jobs")
    assert "secret" not in str(e.value)
    assert db_url.redact("postgresql+psycopg://u:secret@h/j") == "postgresql+psycopg://u:***@h/j"


class _Publisher:
    """Stands in for the Celery app (``send_task``) and Redis (an empty queue) of a reaper."""

    def __init__(self):
        self.sent, self._lock = [], threading.Lock()

    def send_task(self, name, args, queue, task_id):
        with self._lock:
            self.sent.append(task_id)

    def lrange(self, queue, start, end):
        return []


def test_one_reaper_acts_per_round(jobs_db):
    from shared.jobs.reaper import reap_round

    gateways = [JobStore(jobs_db) for _ in range(3)]
    try:
        job, _ = gateways[0].create("t", "convert", {})  # queued, its message never published
        bus = _Publisher()
        kw = dict(lease_s=30, stale_after_s=60, redispatch_after_s=0)
        rounds = _together(3, lambda i: reap_round(gateways[i], bus, bus, holder=f"g{i}", **kw))
        acted = [r for r in rounds if r is not None]
        assert len(acted) == 1 and acted[0]["redispatched"] == 1 and bus.sent == [f"{job.id}.1"]
        leader = rounds.index(acted[0])
        assert reap_round(gateways[(leader + 1) % 3], bus, bus, holder="late", **kw) is None
        assert reap_round(gateways[leader], bus, bus, holder=f"g{leader}", **kw) is not None  # renewed
    finally:
        for s in gateways:
            s.close()
