"""Containment: the ONE place that turns a name found inside a checkpoint, an upload or a job
into a path on this machine.

Every name that arrives from outside (a shard index's ``weight_map`` entry, a Meta shard, a
tokenizer or data file, an uploaded file name, a metrics file) is resolved against the root it
belongs to with ``contained``: absolute names, ``..``, empty or odd components are refused
before anything is opened, and so is a symbolic link whose target lies outside the root. The
error names the entry as it was written, relative to its root - never a host path, never a
byte of any file - and says what to do.

``check_tree`` applies the same rule to a whole directory before a library that opens files
by itself (transformers, sentencepiece) is pointed at it. ``redact`` takes host paths out of a
message that is about to leave the process (a job's error).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

# one component of a name we accept: printable ASCII without separators, quotes or '%'
_COMPONENT = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
MAX_DEPTH = 8


class UnsafePath(ValueError):
    """A name that would reach outside its root, or cannot be a file name here."""


def check_relpath(name: object, what: str = "file name") -> PurePosixPath:
    """``name`` as a relative POSIX path whose parts are plain names; else ``UnsafePath``.

    Parts are 1-128 characters of letters, digits, '.', '_' and '-', not '.' or '..';
    at most ``MAX_DEPTH`` of them. No absolute paths, backslashes, NULs or control characters.
    """
    shown = _show(name)
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"{what} {shown} is empty or not a string; use a relative name such as "
                         "`model-00001-of-00002.safetensors`")
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise UnsafePath(f"{what} is an absolute path; name files relative to the checkpoint directory")
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        raise UnsafePath(f"{what} {shown} is nested {len(parts)} deep; at most {MAX_DEPTH} directories are allowed")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePath(f"{what} {shown} has an empty, '.' or '..' component; name files inside the "
                             "checkpoint directory without '..'")
        if not _COMPONENT.match(part):
            raise UnsafePath(f"{what} {shown}: each part must be 1-128 characters of letters, digits, "
                             "'.', '_' or '-'")
    return PurePosixPath(name)


def contained(root: Path | str, name: object, what: str = "file") -> Path:
    """The path of ``name`` inside ``root``; refuses names and links that leave it."""
    rel = check_relpath(name, what)
    base = Path(root)
    path = base.joinpath(*rel.parts)
    real_root = os.path.realpath(base)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise UnsafePath(f"{what} {_show(name)} is a link to something outside the checkpoint directory; "
                         "copy the real file into the directory instead of linking to it")
    return path


def check_tree(root: Path | str, what: str = "checkpoint") -> list[Path]:
    """Every file under ``root`` (sorted); refuses a link whose target lies outside ``root``.

    Used before handing a directory to code that opens files on its own (transformers)."""
    base = Path(root)
    real_root = os.path.realpath(base).rstrip(os.sep) + os.sep
    out = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink() and not os.path.realpath(p).startswith(real_root):
                raise UnsafePath(f"{what} file {_show(p.relative_to(base).as_posix())} is a link to something "
                                 "outside the checkpoint directory; copy the real file into the directory instead")
            if p.is_file() and not p.is_symlink() or p.is_symlink() and p.is_file():
                out.append(p)
    return sorted(out)


_ABS = re.compile(r"(?<![\w.])/(?:[^\s'\"():,;]+)")


def redact(message: str, roots: dict[str, Path | str] | None = None) -> str:
    """``message`` without host paths: each root's prefix becomes its label (``{"source":
    workdir/"source"}`` turns ``/data/work/x/source/config.json`` into ``source/config.json``),
    and any other absolute path is cut to its last component."""
    out = message
    for label, root in sorted((roots or {}).items(), key=lambda kv: -len(str(kv[1]))):
        for form in {str(root), os.path.realpath(root)}:
            form = form.rstrip("/")
            if form:
                out = out.replace(form + "/", f"{label}/" if label else "").replace(form, label or ".")
    return _ABS.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", out)


def _show(name: object) -> str:
    """A name for an error message: quoted, cut short, control characters escaped."""
    text = repr(name if isinstance(name, str) else type(name).__name__)
    return text if len(text) <= 80 else text[:77] + "...'"
