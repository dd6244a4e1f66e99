"""Object store and checkpoint store against both backends (local directory, S3 over HTTP)."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from shared.storage import (CheckpointExists, CheckpointNotFound, CheckpointStore, IntegrityError, LocalStore,
                            open_store)
from tests.services.conftest import s3_url


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    return open_store(s3_url(request.getfixturevalue("moto_url"), f"b{uuid.uuid4().hex[:12]}"))


def _ckpt_dir(tmp_path, big: int = 0):
    d = tmp_path / "src"
    (d / "tokenizer").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"a": 1}))
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    (d / "weights.bin").write_bytes(os.urandom(big or 1000))
    return d


def test_objects_roundtrip(store, tmp_path):
    store.put_bytes("a/b/c.txt", b"hello")
    (tmp_path / "f").write_bytes(b"x" * 10)
    store.put_file("a/d.bin", tmp_path / "f")
    assert store.get_bytes("a/b/c.txt") == b"hello"
    assert [o.key for o in store.list("a/")] == ["a/b/c.txt", "a/d.bin"]
    assert store.list_dirs("a/") == ["b"]
    assert b"".join(store.iter_chunks("a/d.bin", 3)) == b"x" * 10
    store.delete("a/d.bin")
    assert not store.exists("a/d.bin")
    with pytest.raises(KeyError):
        store.get_bytes("a/missing")
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"")


def test_checkpoint_commit_is_atomic_and_verified(store, tmp_path):
    cs = CheckpointStore(store)
    src = _ckpt_dir(tmp_path, big=11 * 1024 * 1024)  # > 2 parts of 5 MiB on S3: a multipart upload
    # an interrupted commit: files present, no manifest -> invisible
    store.put_bytes("checkpoints/t1/half/config.json", b"{}")
    assert cs.list("t1") == [] and not cs.exists("t1", "half")
    with pytest.raises(CheckpointNotFound):
        cs.manifest("t1", "half")
    m = cs.commit("t1", "half", src, meta={"format": "hf"})
    assert set(m["storage"]["files"]) == {"config.json", "tokenizer/tokenizer.json", "weights.bin"}
    assert [x["storage"]["name"] for x in cs.list("t1")] == ["half"] and cs.list("t2") == []
    with pytest.raises(CheckpointExists):
        cs.commit("t1", "half", src)
    out = cs.fetch("t1", "half", tmp_path / "fetched")
    assert (out / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["format"] == "hf"
    # corruption in the store is caught on fetch and on streaming download
    store.put_bytes("checkpoints/t1/half/config.json", b'{"a": 2}')
    with pytest.raises(IntegrityError):
        cs.fetch("t1", "half", tmp_path / "again")
    assert not (tmp_path / "again").exists()
    with pytest.raises(IntegrityError):
        b"".join(cs.iter_file("t1", "half", "config.json"))
    cs.delete("t1", "half")
    assert not cs.exists("t1", "half") and list(store.list("checkpoints/t1/")) == []


def test_commit_checks_source_manifest_hashes(store, tmp_path):
    src = _ckpt_dir(tmp_path)
    (src / "manifest.json").write_text(json.dumps({"files": {"config.json": {"sha256": "0" * 64}}}))
    with pytest.raises(IntegrityError):
        CheckpointStore(store).commit("t", "bad", src)
    assert not CheckpointStore(store).exists("t", "bad")
