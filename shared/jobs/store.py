"""Job records: the system of record for jobs (Redis is only transport), in SQLite or PostgreSQL.

Every write that depends on the current state is one transaction that reads and updates the job
under a lock (SQLite: the database write lock taken at BEGIN; PostgreSQL: the job's row, FOR
UPDATE), so gateways, workers, job subprocesses and reapers on any host can race safely. Writes
from a worker carry the attempt number they belong to (a fencing token): once the reaper has
re-queued or failed a job, a late write from the lost attempt changes nothing. A job's events are
written under the same lock, so their sequence numbers grow in the order they commit and a reader
that resumes after the last one it saw misses none. ``shared.jobs.db`` names the backends.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa

from shared.db_url import database_url, redact

from . import db
from .state import ACTIVE, CANCELLED, FAILED, KINDS, QUEUED, RUNNING, STATES, SUCCEEDED, TERMINAL, check_transition


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was used before with a different request body."""


@dataclass
class Job:
    id: str
    team: str
    kind: str
    state: str
    params: dict
    created_at: float
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    attempts: int = 0
    max_attempts: int = 2
    dispatch: int = 0
    cancel_requested: bool = False
    error: str | None = None
    result: dict | None = None
    progress: dict | None = None
    worker: str | None = None
    pid: int | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    seq: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("request_hash")
        return d


def _row_to_job(row: sa.Row) -> Job:
    d = dict(row._mapping)
    for k in ("params", "result", "progress"):
        d[k] = json.loads(d[k]) if d[k] is not None else None
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)


class JobStore:
    """One store, two backends: ``url`` is a SQLite file path / ``sqlite:///PATH`` or a
    ``postgresql://`` URL (see ``shared.db_url.database_url``). ``pool_size`` connections are
    kept per process; ``migrate`` brings the schema up to date first (a job's child process,
    whose worker already did, skips it)."""

    def __init__(self, url: Path | str, *, pool_size: int = 4, migrate: bool = True):
        self.url = database_url(url)
        self.engine = db.make_engine(self.url, pool_size=pool_size)
        self._for_update = " FOR UPDATE" if db.is_postgres(self.engine) else ""
        if migrate:
            db.migrate(self.engine)

    def __repr__(self) -> str:
        return f"JobStore({redact(self.url)})"

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A read-modify-write transaction (SQLite takes its write lock at BEGIN)."""
        with self.engine.connect() as c:
            c.execution_options(immediate=True)
            with c.begin():
                yield c

    def _rows(self, sql: str, args: dict | None = None) -> list[sa.Row]:
        with self.engine.connect() as c:
            return c.execute(sa.text(sql), args or {}).fetchall()

    def _one(self, sql: str, args: dict) -> Job | None:
        rows = self._rows(sql, args)
        return _row_to_job(rows[0]) if rows else None

    @staticmethod
    def _event(c: sa.Connection, job_id: str, type: str, data: dict, ts: float | None = None) -> None:
        c.execute(sa.text("INSERT INTO events (job_id, ts, type, data) VALUES (:j, :ts, :t, :d)"),
                  {"j": job_id, "ts": time.time() if ts is None else ts, "t": type, "d": json.dumps(data)})

    def _next_seq(self, c: sa.Connection) -> int:
        sql = "SELECT nextval('jobs_seq')" if self._for_update else "SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs"
        return c.execute(sa.text(sql)).scalar_one()

    # ---- creation and reads ----
    def create(self, team: str, kind: str, params: dict, *, max_attempts: int = 2,
               idempotency_key: str | None = None, request_hash: str | None = None,
               request_id: str | None = None) -> tuple[Job, bool]:
        """Insert a queued job; with an idempotency key already used, return that job instead.

        ``request_id`` (the HTTP request that submitted it) is recorded in the job's first event."""
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}")
        try:
            with self._write() as c:
                old = self._by_key(c, team, idempotency_key)
                if old is not None:
                    return _replay(old, request_hash), False
                job = Job(id=uuid.uuid4().hex, team=team, kind=kind, state=QUEUED, params=params,
                          created_at=time.time(), max_attempts=max_attempts, idempotency_key=idempotency_key,
                          request_hash=request_hash, seq=self._next_seq(c))
                c.execute(sa.text(
                    "INSERT INTO jobs (id, team, kind, state, params, created_at, max_attempts, idempotency_key,"
                    " request_hash, seq) VALUES (:id, :team, :kind, :state, :params, :created_at, :max_attempts,"
                    " :idempotency_key, :request_hash, :seq)"), {**asdict(job), "params": json.dumps(params)})
                self._event(c, job.id, "state", {"state": QUEUED, **({"request_id": request_id} if request_id else {})},
                            job.created_at)
        except sa.exc.IntegrityError:  # a concurrent create with the same key committed first
            old = self.list_by_key(team, idempotency_key) if idempotency_key is not None else None
            if old is None:
                raise
            return _replay(old, request_hash), False
        return job, True

    def _by_key(self, c: sa.Connection, team: str, key: str | None) -> Job | None:
        if key is None:
            return None
        row = c.execute(sa.text("SELECT * FROM jobs WHERE team=:team AND idempotency_key=:key"),
                        {"team": team, "key": key}).first()
        return _row_to_job(row) if row else None

    def get(self, job_id: str, team: str | None = None) -> Job | None:
        if team is None:
            return self._one("SELECT * FROM jobs WHERE id=:id", {"id": job_id})
        return self._one("SELECT * FROM jobs WHERE id=:id AND team=:team", {"id": job_id, "team": team})

    def list_by_key(self, team: str, key: str) -> Job | None:
        """The job a team created with this Idempotency-Key, if any."""
        return self._one("SELECT * FROM jobs WHERE team=:team AND idempotency_key=:key", {"team": team, "key": key})

    def list(self, team: str, *, kind: str | None = None, state: str | None = None,
             limit: int = 50, before_seq: int | None = None) -> list[Job]:
        """Newest first; page with ``before_seq`` = the last job's ``seq``."""
        sql, args = "SELECT * FROM jobs WHERE team=:team", {"team": team, "limit": limit}
        for col, op, value in (("kind", "=", kind), ("state", "=", state), ("seq", "<", before_seq)):
            if value is not None and value != "":
                sql, args[col] = sql + f" AND {col}{op}:{col}", value
        return [_row_to_job(r) for r in self._rows(sql + " ORDER BY seq DESC LIMIT :limit", args)]

    def count_active(self, team: str) -> int:
        return self._rows("SELECT COUNT(*) FROM jobs WHERE team=:team AND state IN (:q, :r)",
                          {"team": team, "q": QUEUED, "r": RUNNING})[0][0]

    def counts(self) -> dict[tuple[str, str], int]:
        return {(k, s): n for k, s, n in self._rows("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")}

    def finished_timings(self, since: float = 0.0) -> list[tuple[str, str, float, float]]:
        """(kind, state, queue wait, run duration) of finished jobs that ran."""
        rows = self._rows(
            "SELECT kind, state, started_at - created_at, finished_at - started_at FROM jobs"
            " WHERE finished_at IS NOT NULL AND started_at IS NOT NULL AND finished_at >= :since", {"since": since})
        return [tuple(r) for r in rows]

    # ---- events ----
    def add_event(self, job_id: str, type: str, data: dict) -> None:
        with self._write() as c:
            c.execute(sa.text(f"SELECT id FROM jobs WHERE id=:id{self._for_update}"), {"id": job_id})
            self._event(c, job_id, type, data)

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict]:
        rows = self._rows("SELECT seq, ts, type, data FROM events WHERE job_id=:j AND seq>:after"
                          " ORDER BY seq LIMIT :limit", {"j": job_id, "after": after, "limit": limit})
        return [{"seq": s, "ts": ts, "type": t, **json.loads(d)} for s, ts, t, d in rows]

    # ---- transitions ----
    def _transition(self, job_id: str, new: str, where: str, args: dict, sets: str = "",
                    event: dict | None = None) -> bool:
        with self._write() as c:
            row = c.execute(sa.text(f"SELECT state FROM jobs WHERE id=:id AND ({where}){self._for_update}"),
                            {"id": job_id, **args}).first()
            if row is None or new not in _allowed(row[0]):
                return False
            c.execute(sa.text(f"UPDATE jobs SET state=:new{sets} WHERE id=:id"), {"id": job_id, "new": new, **args})
            self._event(c, job_id, "state", {"state": new, **(event or {})})
        return True

    def mark_dispatched(self, job_id: str) -> int | None:
        """Bump the dispatch token of a queued job before (re)publishing it; older messages become stale."""
        with self._write() as c:
            row = c.execute(sa.text("UPDATE jobs SET dispatch=dispatch+1, dispatched_at=:now WHERE id=:id"
                                    " AND state=:q RETURNING dispatch"),
                            {"now": time.time(), "id": job_id, "q": QUEUED}).first()
        return row[0] if row else None

    def claim(self, job_id: str, dispatch: int, worker: str, pid: int | None = None) -> Job | None:
        """queued -> running for the holder of the current dispatch token; None if stale or done."""
        ok = self._transition(job_id, RUNNING, "state=:old AND dispatch=:dispatch AND cancel_requested=0"
                              " AND attempts<max_attempts",
                              {"old": QUEUED, "dispatch": dispatch, "now": time.time(), "worker": worker, "pid": pid},
                              ", attempts=attempts+1, started_at=:now, heartbeat_at=:now, worker=:worker, pid=:pid,"
                              " error=NULL", {"worker": worker})
        return self.get(job_id) if ok else None

    def _update_running(self, job_id: str, attempt: int, sets: str, args: dict, event: dict | None = None) -> bool:
        """An UPDATE of a running job that only the owning attempt may make, with an optional progress event."""
        with self._write() as c:
            n = c.execute(sa.text(f"UPDATE jobs SET {sets} WHERE id=:id AND state=:r AND attempts=:attempt"),
                          {"id": job_id, "r": RUNNING, "attempt": attempt, **args}).rowcount
            if n and event is not None:
                self._event(c, job_id, "progress", event)
        return bool(n)

    def heartbeat(self, job_id: str, attempt: int, pid: int | None = None) -> Job | None:
        """Refresh the heartbeat; returns the job, or None once this attempt no longer owns it."""
        ok = self._update_running(job_id, attempt, "heartbeat_at=:now, pid=COALESCE(:pid, pid)",
                                  {"now": time.time(), "pid": pid})
        return self.get(job_id) if ok else None

    def set_progress(self, job_id: str, attempt: int, progress: dict, *, event: bool = True) -> bool:
        return self._update_running(job_id, attempt, "progress=:p, heartbeat_at=:now",
                                    {"p": json.dumps(progress), "now": time.time()}, progress if event else None)

    def finish(self, job_id: str, attempt: int, state: str, *, result: dict | None = None,
               error: str | None = None) -> bool:
        """running -> succeeded/failed/cancelled, only for the attempt that owns the job."""
        if state not in (SUCCEEDED, FAILED, CANCELLED):
            raise ValueError(f"{state} is not a terminal state")
        return self._transition(job_id, state, "state=:old AND attempts=:attempt",
                                {"old": RUNNING, "attempt": attempt, "now": time.time(), "error": error,
                                 "result": json.dumps(result) if result is not None else None},
                                ", finished_at=:now, result=:result, error=:error", {"error": error} if error else None)

    def request_cancel(self, job_id: str, team: str) -> Job | None:
        """Queued jobs are cancelled at once; running ones get a flag their worker acts on."""
        self._transition(job_id, CANCELLED, "team=:team AND state=:old", {"team": team, "old": QUEUED, "now": time.time()},
                         ", cancel_requested=1, finished_at=:now")
        with self._write() as c:
            c.execute(sa.text("UPDATE jobs SET cancel_requested=1 WHERE id=:id AND team=:team AND state=:r"),
                      {"id": job_id, "team": team, "r": RUNNING})
        return self.get(job_id, team)

    def fail_queued(self, job_id: str, error: str) -> bool:
        return self._transition(job_id, FAILED, "state=:old", {"old": QUEUED, "now": time.time(), "error": error},
                                ", finished_at=:now, error=:error", {"error": error})

    # ---- recovery (the reaper) ----
    def stale_running(self, older_than: float) -> list[Job]:
        rows = self._rows("SELECT * FROM jobs WHERE state=:r AND heartbeat_at < :t",
                          {"r": RUNNING, "t": time.time() - older_than})
        return [_row_to_job(r) for r in rows]

    def undispatched(self, older_than: float) -> list[Job]:
        """Queued jobs published more than ``older_than`` seconds ago (or never)."""
        rows = self._rows("SELECT * FROM jobs WHERE state=:q AND COALESCE(dispatched_at, 0) < :t ORDER BY seq",
                          {"q": QUEUED, "t": time.time() - older_than})
        return [_row_to_job(r) for r in rows]

    def recover_lost(self, job: Job, reason: str, *, error: str | None = None,
                     event: dict | None = None) -> str | None:
        """A running attempt that ended without an outcome (worker gone, job process killed):
        re-queue it if attempts remain, else fail it (with ``error``, or the reason and the count).

        ``event`` is recorded with the re-queue (see ``retries``). Returns the new state, or None
        if the job moved on meanwhile (the attempt number fences this like any other write).
        """
        fence = "state=:old AND attempts=:attempt"
        args = {"old": RUNNING, "attempt": job.attempts, "now": time.time()}
        if job.cancel_requested:
            ok = self._transition(job.id, CANCELLED, fence, args, ", finished_at=:now", {"reason": reason})
            return CANCELLED if ok else None
        if job.attempts < job.max_attempts:
            ok = self._transition(job.id, QUEUED, fence, args,
                                  ", dispatched_at=NULL, worker=NULL, pid=NULL, progress=NULL",
                                  {"reason": reason, **(event or {})})
            return QUEUED if ok else None
        error = error or f"{reason}; gave up after {job.attempts} attempt(s)"
        ok = self._transition(job.id, FAILED, fence, {**args, "error": error}, ", finished_at=:now, error=:error",
                              {"error": error})
        return FAILED if ok else None

    def retries(self, job_id: str) -> list[dict]:
        """The re-queue events of a job, oldest first: one per attempt that ended without an outcome."""
        rows = self._rows("SELECT data FROM events WHERE job_id=:j AND type='state' ORDER BY seq", {"j": job_id})
        return [d for d in (json.loads(r[0]) for r in rows) if d.get("state") == QUEUED and "reason" in d]

    # ---- leases: one holder at a time of a duty shared by several processes (the reaper) ----
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``ttl_s`` seconds; False while another holder's is unexpired."""
        now = time.time()
        args = {"name": name, "holder": holder, "until": now + ttl_s}
        try:
            with self._write() as c:
                row = c.execute(sa.text(f"SELECT holder, expires_at FROM leases WHERE name=:name{self._for_update}"),
                                args).first()
                if row is None:
                    c.execute(sa.text("INSERT INTO leases (name, holder, expires_at) VALUES (:name, :holder, :until)"),
                              args)
                elif row.holder == holder or row.expires_at < now:
                    c.execute(sa.text("UPDATE leases SET holder=:holder, expires_at=:until WHERE name=:name"), args)
                else:
                    return False
        except sa.exc.IntegrityError:  # another process inserted it first
            return False
        return True

    def release_lease(self, name: str, holder: str) -> None:
        with self._write() as c:
            c.execute(sa.text("DELETE FROM leases WHERE name=:name AND holder=:holder"), {"name": name, "holder": holder})


def _replay(old: Job, request_hash: str | None) -> Job:
    """The job an Idempotency-Key already names, if the request is the same one."""
    if old.request_hash != request_hash:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different request; use a new key")
    return old


def _allowed(state: str) -> set[str]:
    from .state import TRANSITIONS

    return TRANSITIONS[state]


__all__ = ["Job", "JobStore", "IdempotencyConflict", "STATES", "TERMINAL", "ACTIVE", "QUEUED", "RUNNING",
           "SUCCEEDED", "FAILED", "CANCELLED", "check_transition"]
