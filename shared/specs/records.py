"""Finetuning records, checked without a tokenizer (torch-free: the gateway validates uploads with it).

A record is ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages": [{"role", "content"}, ...]}``
with at least one assistant turn after a prompt. ``check_jsonl`` reads a whole JSONL file and
names the first bad line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Unusable training data; the message names the file and line."""


def read_jsonl(path: str | Path, label: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line; a bad line raises DataError naming it
    (as ``label``, default the path)."""
    path = Path(path)
    name = label or str(path)
    if not path.is_file():
        raise DataError(f"--data-path {name} does not exist (or is not a file)")
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                    raise DataError(f"{name}:{no}: not valid JSON ({why})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{name}:{no}: expected a JSON object, got {type(rec).__name__}")
                yield no, rec
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _need_str(rec: dict, key: str, where: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: \"{key}\" must be a string, got {type(v).__name__}")
    if not v:
        raise DataError(f"{where}: \"{key}\" is empty")
    return v


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of {ROLES}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn from")
    if turns[0] == 0:
        raise DataError(f"{where}: the conversation starts with an assistant message; it needs a prompt first")


def check_record(rec: dict[str, Any], where: str) -> str:
    """The record's kind (``messages``, ``prompt`` or ``text``); DataError if it is none of them."""
    if "messages" in rec:
        _check_messages(rec["messages"], where)
        return "messages"
    if "prompt" in rec or "completion" in rec:
        missing = [k for k in ("prompt", "completion") if k not in rec]
        if missing:
            raise DataError(f"{where}: a prompt/completion record lacks \"{missing[0]}\"")
        _need_str(rec, "prompt", where)
        _need_str(rec, "completion", where)
        return "prompt"
    if "text" in rec:
        _need_str(rec, "text", where)
        return "text"
    raise DataError(f"{where}: a record needs \"text\", \"prompt\"+\"completion\" or \"messages\"; "
                    f"found keys {sorted(rec)[:10]}")


def check_jsonl(path: str | Path, label: str) -> int:
    """The number of records in a JSONL file; DataError naming ``label:line`` at the first bad one."""
    n = 0
    for no, rec in read_jsonl(path, label):
        check_record(rec, f"{label}:{no}")
        n += 1
    if n == 0:
        raise DataError(f"{label} holds no records")
    return n
