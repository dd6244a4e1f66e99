"""An HF shard index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) read
safely: every shard it names is resolved inside the checkpoint directory. Torch-free, so the
gateway checks uploads with the same function the loaders use."""

from __future__ import annotations

import json
from pathlib import Path

from shared.paths import UnsafePath, contained

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class BadIndex(ValueError):
    """An index that is malformed, names a shard outside the checkpoint, or a missing shard."""


def read_index(path: Path) -> dict[str, Path]:
    """tensor name -> shard path, each shard inside ``path``'s directory and present."""
    path = Path(path)
    try:
        index = json.loads(contained(path.parent, path.name, "index file").read_text())["weight_map"]
        if not isinstance(index, dict):
            raise TypeError("weight_map is not an object")
    except UnsafePath as e:
        raise BadIndex(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
        raise BadIndex(f"{path.name}: not a valid index file (needs a 'weight_map' object of "
                       f"tensor name -> shard file): {type(e).__name__}") from None
    try:
        where = {name: contained(path.parent, f, f"{path.name} entry for {str(name)[:80]!r}")
                 for name, f in index.items()}
    except UnsafePath as e:
        raise BadIndex(str(e)) from None
    missing = sorted({index[n] for n, p in where.items() if not p.is_file()})
    if missing:
        raise BadIndex(f"{path.name} names shard file(s) {', '.join(missing[:5])} which are absent from the "
                       "checkpoint; the download is incomplete - fetch (or upload) the missing shards")
    return where
