"""Job records: transitions, idempotency, fencing of lost attempts."""

from __future__ import annotations

import pytest

from shared.jobs import IdempotencyConflict, InvalidTransition, JobStore, check_transition, eta_seconds


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "jobs.sqlite3")


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
