"""Job records (SQLite or PostgreSQL) and the pure job-state logic."""

from .state import (ACTIVE, CANCELLED, FAILED, KINDS, QUEUE_OF, QUEUED, RUNNING, STATES, SUCCEEDED, TERMINAL,
                    InvalidTransition, check_transition, eta_seconds)
from .store import IdempotencyConflict, Job, JobStore

__all__ = ["Job", "JobStore", "IdempotencyConflict", "InvalidTransition", "check_transition", "eta_seconds",
           "STATES", "TERMINAL", "ACTIVE", "KINDS", "QUEUE_OF", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED",
           "CANCELLED"]
