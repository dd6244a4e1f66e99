"""Dtype names: the one table between the names users and files spell and ``torch.dtype``.

Accepted names: fp32/float32/float, bf16/bfloat16, fp16/float16/half (a ``torch.dtype`` passes
through). ``dtype_name`` gives the short label manifests and reports record.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
_LABELS = {v: k for k, v in DTYPES.items()}


class DtypeError(ValueError):
    """A dtype name that is not one of ``DTYPES`` (or their long spellings)."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``torch.dtype`` for a name; ``None`` stays ``None`` (the caller's default applies)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DTYPES:
        raise DtypeError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32 (or bfloat16, float16, float32)")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The short label of ``dtype`` (``bf16``, ``fp16``, ``fp32``; others as torch spells them)."""
    return _LABELS.get(dtype, str(dtype).replace("torch.", ""))
