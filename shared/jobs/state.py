"""Pure job-state logic: states, allowed transitions, ETA."""

from __future__ import annotations

import time

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({QUEUED, RUNNING})

# running -> queued is the reaper's retry after a lost worker.
TRANSITIONS = {
    QUEUED: {RUNNING, CANCELLED, FAILED},
    RUNNING: {SUCCEEDED, FAILED, CANCELLED, QUEUED},
    SUCCEEDED: set(),
    FAILED: set(),
    CANCELLED: set(),
}

KINDS = ("convert", "reshard", "export", "import", "finetune", "generate", "eval")
QUEUE_OF = {"convert": "convert", "reshard": "convert", "export": "convert", "import": "convert",
            "finetune": "train", "eval": "train", "generate": "generate"}


class InvalidTransition(ValueError):
    pass


def check_transition(old: str, new: str) -> None:
    if new not in TRANSITIONS.get(old, ()):
        raise InvalidTransition(f"a job cannot go from {old} to {new}")


def eta_seconds(current: int, total: int, started_at: float, now: float | None = None) -> float | None:
    """Linear extrapolation of the time left in a phase; None until there is progress."""
    if total <= 0 or current <= 0 or current > total:
        return None
    elapsed = (now or time.time()) - started_at
    return max(0.0, elapsed * (total - current) / current)
