"""What an HF checkpoint must be to enter the store, whichever way it arrives: a multipart
upload through the gateway, a direct upload to the object store, or an import from a granted
prefix. Torch-free: the gateway checks uploads with it and the import job checks again.

``check_file_list`` checks the names (and declared sizes) before any byte is stored;
``check_hf_dir`` the files themselves once they are on disk: a bounded ``config.json`` of a
supported architecture, weight files, and shard indexes whose entries all lie inside.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from shared.checkpoint.index import INDEX_FILES, BadIndex, read_index
from shared.config import ModelConfig, UnsupportedModelError
from shared.paths import UnsafePath, check_relpath

MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32


class BadUpload(ValueError):
    """An upload that cannot become a checkpoint; the message names the file and the fix."""


def check_file_list(names: Iterable[str]) -> list[str]:
    """The names as relative paths; refuses odd names, repeats, a name that is both a file and a
    directory, and ``manifest.json`` (the service writes manifests)."""
    seen: dict[str, str] = {}
    out = []
    for name in names:
        try:
            rel = check_relpath(name, "upload file name").as_posix()
        except UnsafePath as e:
            raise BadUpload(f"{e}; send relative paths like `config.json` or `sub/file`") from None
        if rel == MANIFEST:
            raise BadUpload(f"{MANIFEST} is written by the service (sizes, hashes, layout, parity); "
                            "leave it out of the upload")
        _claim(rel, seen)
        out.append(rel)
    return out


def _claim(rel: str, seen: dict[str, str]) -> None:
    parts = rel.split("/")
    parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
    clash = rel if rel in seen else next((p for p in parents if seen.get(p) == "file"), None)
    if clash == rel and seen[rel] == "file":
        raise BadUpload(f"file {rel!r} sent twice")
    if clash is not None:
        raise BadUpload(f"{clash!r} is both a file and a directory in the upload; rename one of them")
    seen[rel] = "file"
    for p in parents:
        seen[p] = "dir"


def read_config(path: Path) -> dict:
    """config.json as a JSON object of bounded size and depth."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise BadUpload(f"config.json is over {MAX_CONFIG_BYTES} bytes; an HF config is a few KB")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise BadUpload("config.json is not UTF-8 text; save it as UTF-8 JSON") from None
    except RecursionError:
        raise BadUpload(f"config.json is nested too deeply (at most {MAX_CONFIG_DEPTH} levels)") from None
    except ValueError as e:
        raise BadUpload(f"config.json is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise BadUpload(f"config.json must be a JSON object ({{...}}), not a {type(raw).__name__}")
    if _depth(raw) > MAX_CONFIG_DEPTH:
        raise BadUpload(f"config.json is nested too deeply (at most {MAX_CONFIG_DEPTH} levels)")
    return raw


def _depth(obj) -> int:
    """How many levels of objects and arrays a parsed JSON value has (iteratively: no recursion)."""
    depth, level = 0, [obj]
    while level:
        depth += 1
        level = [v for o in level for v in (o.values() if isinstance(o, dict) else o) if isinstance(v, (dict, list))]
    return depth


def check_hf_dir(d: Path) -> dict:
    """The raw config of an uploaded HF checkpoint directory, or ``BadUpload`` saying what is wrong."""
    d = Path(d)
    if not (d / "config.json").is_file():
        raise BadUpload("an HF checkpoint needs config.json (plus weights and tokenizer files)")
    raw = read_config(d / "config.json")
    try:
        ModelConfig.from_hf(raw)
    except (ValueError, UnsupportedModelError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise BadUpload(f"config.json is not a supported Llama-family config: {e}") from None
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in d.iterdir()):
        raise BadUpload("no weight files (*.safetensors, *.bin, *.pth) in the upload")
    for index in INDEX_FILES:  # the loaders check again (defence in depth)
        if (d / index).is_file():
            try:
                read_index(d / index)
            except BadIndex as e:
                raise BadUpload(f"{e}. Every shard named in the index must be a file of this upload") from None
    return raw


def upload_meta(raw_config: dict, team: str, **how) -> dict:
    """The service's part of an uploaded (or imported) HF checkpoint's manifest."""
    return {"format": "hf", "hf_config": raw_config, "service": {"uploaded_at": time.time(), "team": team, **how}}
