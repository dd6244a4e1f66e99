"""Conversion progress: ``Progress`` records (``shared.progress``), and a terminal renderer for the CLI."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from shared.progress import Progress  # the one progress record of every job kind

__all__ = ["Progress", "ProgressTracker", "TerminalProgress"]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class ProgressTracker:
    """Turns counts into ``Progress`` records with an ETA from the byte rate so far."""

    def __init__(self, phase: str, total: int, bytes_total: int, unit: str = "tensors") -> None:
        self.phase, self.total, self.bytes_total, self.unit = phase, total, bytes_total, unit
        self.current = 0
        self.bytes_done = 0
        self._t0 = time.monotonic()

    def step(self, nbytes: int) -> Progress:
        self.current += 1
        self.bytes_done += nbytes
        elapsed = time.monotonic() - self._t0
        eta = None
        if self.bytes_done and self.bytes_total:
            eta = elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done
        return Progress(self.phase, self.current, self.total, self.unit, self.bytes_done, self.bytes_total, eta)


class TerminalProgress:
    """Renders progress on one line of a terminal (or one line per phase elsewhere)."""

    def __init__(self, stream: TextIO = sys.stderr, min_interval_s: float = 0.2) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.min_interval = min_interval_s
        self._last = 0.0
        self._phase: str | None = None

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        done = p.current >= p.total
        new_phase = p.phase != self._phase
        if not (done or new_phase or now - self._last >= self.min_interval):
            return
        self._last = now
        pct = 100.0 * p.current / p.total if p.total else 100.0
        line = f"{p.phase}: {p.current}/{p.total} {p.unit} ({pct:5.1f}%)"
        if p.bytes_total:
            line += f"  {_size(p.bytes_done)} / {_size(p.bytes_total)}"
        if p.eta_s is not None and not done:
            line += f"  ETA {p.eta_s:5.1f}s"
        if self.tty:
            if new_phase and self._phase is not None:
                self.stream.write("\n")
            self.stream.write("\r\x1b[K" + line + ("\n" if done else ""))
        elif new_phase or done:
            self.stream.write(line + "\n")
        self._phase = None if done and self.tty else p.phase
        self.stream.flush()
