"""The one progress record of every job kind, and the one throttle that decides which are stored.

The checkpoint converter, the trainer's service entry, the evaluation and the generation job
all report ``Progress``; a job record keeps ``Progress.record()`` (the gateway's ``Progress``
schema: phase, current, total, unit, eta_s, ts, step, loss, and whatever ``extra`` a kind adds,
e.g. a training step's lr, grad_norm and tokens_per_s). Torch-free and import-light.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

_DECLARED = ("phase", "current", "total", "unit", "bytes_done", "bytes_total", "eta_s", "step", "loss")


@dataclass
class Progress:
    phase: str
    current: int | float = 0
    total: int | float = 0
    unit: str = "tensors"
    bytes_done: int = 0
    bytes_total: int = 0
    eta_s: float | None = None
    step: int | None = None
    loss: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # other fields of the kind, stored as they are

    @property
    def done(self) -> bool:
        return bool(self.total) and self.current >= self.total

    def record(self) -> dict[str, Any]:
        """The job record's JSON: the declared fields (``step``/``loss`` and the byte counts only
        when set) and the extra ones beside them."""
        out: dict[str, Any] = {"phase": self.phase, "current": self.current, "total": self.total, "unit": self.unit,
                               "eta_s": self.eta_s}
        if self.bytes_total:
            out.update(bytes_done=self.bytes_done, bytes_total=self.bytes_total)
        for k in ("step", "loss"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return {**dict(self.extra), **out}

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> "Progress":
        """A progress record from a plain event dict (e.g. a training iteration's metrics line):
        the declared keys become fields, the others ``extra``."""
        known = {k: event[k] for k in _DECLARED if event.get(k) is not None}
        extra = {k: v for k, v in event.items() if k not in _DECLARED and k != "extra"}
        known.setdefault("phase", str(event.get("phase") or "run"))
        known.setdefault("unit", "")
        return cls(**known, extra=extra)


def bytes_progress(phase: str, done: int, total: int) -> Progress:
    """A transfer's progress (a fetch or an upload), counted in bytes."""
    return Progress(phase, done, total, "bytes")


class ProgressThrottle:
    """Passes a record on to ``sink`` when its phase changed, when it completes its phase
    (current == total), or when ``min_interval_s`` passed since the last one; drops the rest.
    The passed record is stamped with ``ts`` (when it was reported)."""

    def __init__(self, sink: Callable[[dict[str, Any]], None], min_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.time):
        self.sink, self.min_interval_s, self.clock = sink, min_interval_s, clock
        self._last, self._phase = float("-inf"), None

    def __call__(self, p: Progress) -> bool:
        if not isinstance(p, Progress):
            raise TypeError(f"progress takes a shared.progress.Progress, not {type(p).__name__}")
        now = self.clock()
        if not (p.phase != self._phase or p.done or now - self._last >= self.min_interval_s):
            return False
        self._last, self._phase = now, p.phase
        self.sink({**p.record(), "ts": now})
        return True
