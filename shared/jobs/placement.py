"""Model-affine generation: which generate worker has which model warm, and deployments that
keep a model loaded on N workers.

Every generate worker consumes the shared ``generate`` queue and one of its own,
``generate.<worker id>``, and announces itself every ``ANNOUNCE_S`` under
``llama_svc:generate-worker:<id>`` (expiring after ``PRESENCE_TTL_S``): its queue, the models it
has warm, its load. The gateway sends a request for a model to the least-loaded worker that
has it warm, and to the shared queue when none has (any worker loads it, as before).

A deployment (``POST /v1/deployments``) asks for a model on ``replicas`` workers. Deployments
are stored in the object store (they outlive Redis); each replica is a Redis slot that a worker
claims (``SET NX`` with an expiry it refreshes), so a dead worker's replica is taken over by
another within ``PRESENCE_TTL_S``. A worker keeps its deployed models loaded (never evicted).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass

from shared.storage import ObjectNotFound, ObjectStore, check_name

SHARED_QUEUE = "generate"
PRESENCE = "llama_svc:generate-worker:"
SLOT = "llama_svc:deployment-slot:"
ANNOUNCE_S = 2.0
PRESENCE_TTL_S = 10
DEPLOYMENTS = "deployments"


def worker_queue(worker_id: str) -> str:
    return f"{SHARED_QUEUE}.{worker_id}"


@dataclass(frozen=True)
class Presence:
    worker: str
    queue: str
    models: list[str]       # "team/name" warm on this worker
    load: int               # requests in flight
    capacity: int
    at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def announce(r, p: Presence) -> None:
    r.set(PRESENCE + p.worker, p.to_json(), ex=PRESENCE_TTL_S)


def live_workers(r) -> list[Presence]:
    """Every generate worker that announced itself within PRESENCE_TTL_S."""
    keys = sorted(r.scan_iter(match=PRESENCE + "*", count=500))
    out = []
    for raw in r.mget(keys) if keys else []:
        try:
            out.append(Presence(**json.loads(raw)))
        except (TypeError, ValueError):
            continue
    return out


def pick_queue(workers: list[Presence], team: str, model: str) -> str:
    """The queue of the least-loaded worker with ``team/model`` warm and room left, else the shared one."""
    key = f"{team}/{model}"
    warm = [w for w in workers if key in w.models and w.load < w.capacity]
    if not warm:
        return SHARED_QUEUE
    return min(warm, key=lambda w: (w.load / max(1, w.capacity), w.worker)).queue


# ---------------------------------------------------------------- deployments
@dataclass(frozen=True)
class Deployment:
    id: str
    team: str
    model: str
    replicas: int
    created_at: float


class Deployments:
    """Deployments in the object store, one JSON object each under ``deployments/<team>/``."""

    def __init__(self, store: ObjectStore):
        self.store = store

    def _key(self, team: str, dep_id: str) -> str:
        return f"{DEPLOYMENTS}/{check_name(team, 'team')}/{check_name(dep_id, 'deployment id')}.json"

    def create(self, team: str, model: str, replicas: int) -> Deployment:
        d = Deployment(secrets.token_hex(8), team, model, replicas, time.time())
        self.store.put_bytes(self._key(team, d.id), json.dumps(asdict(d)).encode())
        return d

    def get(self, team: str, dep_id: str) -> Deployment:
        try:
            return Deployment(**json.loads(self.store.get_bytes(self._key(team, dep_id))))
        except (ObjectNotFound, ValueError):
            raise KeyError(dep_id) from None

    def delete(self, team: str, dep_id: str) -> None:
        self.store.delete(self._key(team, dep_id))

    def list(self, team: str | None = None) -> list[Deployment]:
        prefix = f"{DEPLOYMENTS}/{check_name(team, 'team')}/" if team else f"{DEPLOYMENTS}/"
        out = []
        for o in self.store.list(prefix):
            try:
                out.append(Deployment(**json.loads(self.store.get_bytes(o.key))))
            except (ObjectNotFound, ValueError, TypeError):
                continue
        return sorted(out, key=lambda d: d.created_at)


def replica_holders(r, d: Deployment) -> list[str | None]:
    """The worker holding each replica slot of ``d`` (None: unclaimed)."""
    vals = r.mget([f"{SLOT}{d.id}:{i}" for i in range(d.replicas)])
    return [v.decode() if isinstance(v, bytes) else v for v in vals]


def claim_replicas(r, worker: str, deployments: list[Deployment]) -> list[Deployment]:
    """Refresh this worker's slots and claim free ones (at most one replica of a deployment per
    worker); returns the deployments this worker now serves."""
    mine = []
    for d in deployments:
        keys = [f"{SLOT}{d.id}:{i}" for i in range(d.replicas)]
        held = [k for k, v in zip(keys, r.mget(keys)) if v is not None and v.decode() == worker]
        if held:
            r.expire(held[0], PRESENCE_TTL_S)
            mine.append(d)
            continue
        for k in keys:
            if r.set(k, worker, nx=True, ex=PRESENCE_TTL_S):
                mine.append(d)
                break
    return mine
