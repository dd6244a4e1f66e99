"""The error every checkpoint reader and writer raises for input it cannot use."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or source file that cannot be used as is; the message says why and what to do."""
