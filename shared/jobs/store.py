"""Job records in SQLite: the system of record for jobs (Redis is only transport).

Every write that depends on the current state is one conditional UPDATE, so the gateway,
workers, job subprocesses and the reaper can race safely. Writes from a worker carry the
attempt number they belong to (a fencing token): once the reaper has re-queued or failed a
job, a late write from the lost attempt changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .state import ACTIVE, CANCELLED, FAILED, KINDS, QUEUED, RUNNING, STATES, SUCCEEDED, TERMINAL, check_transition

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, team TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
  params TEXT NOT NULL, created_at REAL NOT NULL, dispatched_at REAL, started_at REAL,
  finished_at REAL, heartbeat_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
  max_attempts INTEGER NOT NULL, dispatch INTEGER NOT NULL DEFAULT 0,
  cancel_requested INTEGER NOT NULL DEFAULT 0, error TEXT, result TEXT, progress TEXT,
  worker TEXT, pid INTEGER, idempotency_key TEXT, request_hash TEXT, seq INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(team, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_team ON jobs(team, seq);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, ts REAL NOT NULL,
  type TEXT NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""


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


def _row_to_job(row: sqlite3.Row) -> Job:
    d = dict(row)
    for k in ("params", "result", "progress"):
        d[k] = json.loads(d[k]) if d[k] is not None else None
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)


class JobStore:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: explicit BEGIN IMMEDIATE where a read-modify-write needs it.
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def _one(self, sql: str, args=()) -> Job | None:
        row = self._conn().execute(sql, args).fetchone()
        return _row_to_job(row) if row else None

    # ---- creation and reads ----
    def create(self, team: str, kind: str, params: dict, *, max_attempts: int = 2,
               idempotency_key: str | None = None, request_hash: str | None = None,
               request_id: str | None = None) -> tuple[Job, bool]:
        """Insert a queued job; with an idempotency key already used, return that job instead.

        ``request_id`` (the HTTP request that submitted it) is recorded in the job's first event."""
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}")
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            if idempotency_key is not None:
                old = self._one("SELECT * FROM jobs WHERE team=? AND idempotency_key=?", (team, idempotency_key))
                if old is not None:
                    c.execute("COMMIT")
                    if old.request_hash != request_hash:
                        raise IdempotencyConflict(
                            "this Idempotency-Key was already used with a different request; use a new key")
                    return old, False
            seq = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            job = Job(id=uuid.uuid4().hex, team=team, kind=kind, state=QUEUED, params=params,
                      created_at=time.time(), max_attempts=max_attempts, idempotency_key=idempotency_key,
                      request_hash=request_hash, seq=seq)
            c.execute("INSERT INTO jobs (id, team, kind, state, params, created_at, max_attempts, idempotency_key,"
                      " request_hash, seq) VALUES (?,?,?,?,?,?,?,?,?,?)",
                      (job.id, team, kind, QUEUED, json.dumps(params), job.created_at, max_attempts,
                       idempotency_key, request_hash, seq))
            c.execute("INSERT INTO events (job_id, ts, type, data) VALUES (?,?,?,?)",
                      (job.id, job.created_at, "state",
                       json.dumps({"state": QUEUED, **({"request_id": request_id} if request_id else {})})))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return job, True

    def get(self, job_id: str, team: str | None = None) -> Job | None:
        if team is None:
            return self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        return self._one("SELECT * FROM jobs WHERE id=? AND team=?", (job_id, team))

    def list_by_key(self, team: str, key: str) -> Job | None:
        """The job a team created with this Idempotency-Key, if any."""
        return self._one("SELECT * FROM jobs WHERE team=? AND idempotency_key=?", (team, key))

    def list(self, team: str, *, kind: str | None = None, state: str | None = None,
             limit: int = 50, before_seq: int | None = None) -> list[Job]:
        """Newest first; page with ``before_seq`` = the last job's ``seq``."""
        sql, args = "SELECT * FROM jobs WHERE team=?", [team]
        if kind:
            sql, args = sql + " AND kind=?", args + [kind]
        if state:
            sql, args = sql + " AND state=?", args + [state]
        if before_seq is not None:
            sql, args = sql + " AND seq<?", args + [before_seq]
        rows = self._conn().execute(sql + " ORDER BY seq DESC LIMIT ?", args + [limit]).fetchall()
        return [_row_to_job(r) for r in rows]

    def count_active(self, team: str) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE team=? AND state IN (?,?)",
                                    (team, QUEUED, RUNNING)).fetchone()[0]

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self._conn().execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state").fetchall()
        return {(k, s): n for k, s, n in rows}

    def finished_timings(self, since: float = 0.0) -> list[tuple[str, str, float, float]]:
        """(kind, state, queue wait, run duration) of finished jobs that ran."""
        rows = self._conn().execute(
            "SELECT kind, state, started_at - created_at, finished_at - started_at FROM jobs"
            " WHERE finished_at IS NOT NULL AND started_at IS NOT NULL AND finished_at >= ?", (since,)).fetchall()
        return [tuple(r) for r in rows]

    # ---- events ----
    def add_event(self, job_id: str, type: str, data: dict) -> None:
        self._conn().execute("INSERT INTO events (job_id, ts, type, data) VALUES (?,?,?,?)",
                             (job_id, time.time(), type, json.dumps(data)))

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict]:
        rows = self._conn().execute("SELECT seq, ts, type, data FROM events WHERE job_id=? AND seq>?"
                                    " ORDER BY seq LIMIT ?", (job_id, after, limit)).fetchall()
        return [{"seq": s, "ts": ts, "type": t, **json.loads(d)} for s, ts, t, d in rows]

    # ---- transitions ----
    def _transition(self, job_id: str, new: str, where: str, args: tuple, sets: str = "", set_args: tuple = (),
                    event: dict | None = None) -> bool:
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute(f"SELECT state FROM jobs WHERE id=? AND ({where})", (job_id, *args)).fetchone()
            if row is None or new not in _allowed(row[0]):
                c.execute("COMMIT")
                return False
            c.execute(f"UPDATE jobs SET state=?{sets} WHERE id=?", (new, *set_args, job_id))
            c.execute("INSERT INTO events (job_id, ts, type, data) VALUES (?,?,?,?)",
                      (job_id, time.time(), "state", json.dumps({"state": new, **(event or {})})))
            c.execute("COMMIT")
            return True
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def mark_dispatched(self, job_id: str) -> int | None:
        """Bump the dispatch token of a queued job before (re)publishing it; older messages become stale."""
        c = self._conn()
        cur = c.execute("UPDATE jobs SET dispatch=dispatch+1, dispatched_at=? WHERE id=? AND state=?"
                        " RETURNING dispatch", (time.time(), job_id, QUEUED))
        row = cur.fetchone()
        cur.close()
        return row[0] if row else None

    def claim(self, job_id: str, dispatch: int, worker: str, pid: int | None = None) -> Job | None:
        """queued -> running for the holder of the current dispatch token; None if stale or done."""
        now = time.time()
        ok = self._transition(job_id, RUNNING, "state=? AND dispatch=? AND cancel_requested=0 AND attempts<max_attempts",
                              (QUEUED, dispatch), ", attempts=attempts+1, started_at=?, heartbeat_at=?, worker=?, pid=?,"
                              " error=NULL", (now, now, worker, pid), {"worker": worker})
        return self.get(job_id) if ok else None

    def heartbeat(self, job_id: str, attempt: int, pid: int | None = None) -> Job | None:
        """Refresh the heartbeat; returns the job, or None once this attempt no longer owns it."""
        c = self._conn()
        cur = c.execute("UPDATE jobs SET heartbeat_at=?, pid=COALESCE(?, pid) WHERE id=? AND state=? AND attempts=?",
                        (time.time(), pid, job_id, RUNNING, attempt))
        n = cur.rowcount
        cur.close()
        return self.get(job_id) if n else None

    def set_progress(self, job_id: str, attempt: int, progress: dict, *, event: bool = True) -> bool:
        c = self._conn()
        cur = c.execute("UPDATE jobs SET progress=?, heartbeat_at=? WHERE id=? AND state=? AND attempts=?",
                        (json.dumps(progress), time.time(), job_id, RUNNING, attempt))
        n = cur.rowcount
        cur.close()
        if n and event:
            self.add_event(job_id, "progress", progress)
        return bool(n)

    def finish(self, job_id: str, attempt: int, state: str, *, result: dict | None = None,
               error: str | None = None) -> bool:
        """running -> succeeded/failed/cancelled, only for the attempt that owns the job."""
        if state not in (SUCCEEDED, FAILED, CANCELLED):
            raise ValueError(f"{state} is not a terminal state")
        return self._transition(job_id, state, "state=? AND attempts=?", (RUNNING, attempt),
                                ", finished_at=?, result=?, error=?",
                                (time.time(), json.dumps(result) if result is not None else None, error),
                                {"error": error} if error else None)

    def request_cancel(self, job_id: str, team: str) -> Job | None:
        """Queued jobs are cancelled at once; running ones get a flag their worker acts on."""
        self._transition(job_id, CANCELLED, "team=? AND state=?", (team, QUEUED),
                         ", cancel_requested=1, finished_at=?", (time.time(),))
        self._conn().execute("UPDATE jobs SET cancel_requested=1 WHERE id=? AND team=? AND state=?",
                             (job_id, team, RUNNING))
        return self.get(job_id, team)

    def fail_queued(self, job_id: str, error: str) -> bool:
        return self._transition(job_id, FAILED, "state=?", (QUEUED,), ", finished_at=?, error=?",
                                (time.time(), error), {"error": error})

    # ---- recovery (the reaper) ----
    def stale_running(self, older_than: float) -> list[Job]:
        rows = self._conn().execute("SELECT * FROM jobs WHERE state=? AND heartbeat_at < ?",
                                    (RUNNING, time.time() - older_than)).fetchall()
        return [_row_to_job(r) for r in rows]

    def undispatched(self, older_than: float) -> list[Job]:
        """Queued jobs published more than ``older_than`` seconds ago (or never)."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE state=? AND COALESCE(dispatched_at, 0) < ? ORDER BY seq",
            (QUEUED, time.time() - older_than)).fetchall()
        return [_row_to_job(r) for r in rows]

    def recover_lost(self, job: Job, reason: str, *, error: str | None = None,
                     event: dict | None = None) -> str | None:
        """A running attempt that ended without an outcome (worker gone, job process killed):
        re-queue it if attempts remain, else fail it (with ``error``, or the reason and the count).

        ``event`` is recorded with the re-queue (see ``retries``). Returns the new state, or None
        if the job moved on meanwhile (the attempt number fences this like any other write).
        """
        if job.cancel_requested:
            ok = self._transition(job.id, CANCELLED, "state=? AND attempts=?", (RUNNING, job.attempts),
                                  ", finished_at=?", (time.time(),), {"reason": reason})
            return CANCELLED if ok else None
        if job.attempts < job.max_attempts:
            ok = self._transition(job.id, QUEUED, "state=? AND attempts=?", (RUNNING, job.attempts),
                                  ", dispatched_at=NULL, worker=NULL, pid=NULL, progress=NULL", (),
                                  {"reason": reason, **(event or {})})
            return QUEUED if ok else None
        error = error or f"{reason}; gave up after {job.attempts} attempt(s)"
        ok = self._transition(job.id, FAILED, "state=? AND attempts=?", (RUNNING, job.attempts),
                              ", finished_at=?, error=?", (time.time(), error), {"error": error})
        return FAILED if ok else None


    def retries(self, job_id: str) -> list[dict]:
        """The re-queue events of a job, oldest first: one per attempt that ended without an outcome."""
        rows = self._conn().execute("SELECT data FROM events WHERE job_id=? AND type='state' ORDER BY seq",
                                    (job_id,)).fetchall()
        return [d for d in (json.loads(r[0]) for r in rows) if d.get("state") == QUEUED and "reason" in d]


def _allowed(state: str) -> set[str]:
    from .state import TRANSITIONS

    return TRANSITIONS[state]


__all__ = ["Job", "JobStore", "IdempotencyConflict", "STATES", "TERMINAL", "ACTIVE", "QUEUED", "RUNNING",
           "SUCCEEDED", "FAILED", "CANCELLED", "check_transition"]

