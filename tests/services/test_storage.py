"""Object store and checkpoint store against both backends (local directory, S3 over HTTP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.storage import (CheckpointExists, CheckpointNotFound, CheckpointStore, IntegrityError, StorageError,
                            open_store)
from shared.storage.checkpoints import LEASE
from tests.services.conftest import s3_url

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    if request.param == "local":
        return f"file://{tmp_path / 'objects'}"
    return s3_url(request.getfixturevalue("moto_url"), f"b{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(store_url):
    return open_store(store_url)


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
    (src / "manifest.json").write_text(json.dumps({"files": {"weights.bin": {"sha256": "0" * 64}}}))
    with pytest.raises(IntegrityError):
        CheckpointStore(store).commit("t", "bad", src, source_manifest=True)
    assert not CheckpointStore(store).exists("t", "bad")
    assert list(store.list("checkpoints/t/")) == []  # the files put before the mismatch are gone too


def test_failed_commit_deletes_what_it_put(store, tmp_path, monkeypatch):
    src = _ckpt_dir(tmp_path)
    real, calls = store.put_file, []

    def flaky(key, path):
        calls.append(key)
        if len(calls) == 2:
            raise StorageError("the store went away")
        real(key, path)

    monkeypatch.setattr(store, "put_file", flaky)
    with pytest.raises(StorageError):
        CheckpointStore(store).commit("t", "half", src)
    assert list(store.list("checkpoints/t/")) == []
    monkeypatch.setattr(store, "put_file", real)
    assert CheckpointStore(store).commit("t", "half", src)["storage"]["name"] == "half"
    assert not store.exists(f"checkpoints/t/half/{LEASE}")  # a finished commit drops its lease


def test_collect_garbage(store, tmp_path):
    cs = CheckpointStore(store)
    cs.commit("t", "done", _ckpt_dir(tmp_path))
    old = json.dumps({"started_at": time.time() - 7200, "renewed_at": time.time() - 7200}).encode()
    store.put_bytes(f"checkpoints/t/old/{LEASE}", old)
    store.put_bytes("checkpoints/t/old/weights.bin", b"x")
    store.put_bytes(f"checkpoints/t/fresh/{LEASE}", json.dumps({"renewed_at": time.time()}).encode())
    store.put_bytes("checkpoints/t/fresh/weights.bin", b"x")
    store.put_bytes("checkpoints/u/nolease/a/b.bin", b"x")
    assert cs.collect_garbage(3600) == ["t/old", "u/nolease"]
    assert [o.key for o in store.list("checkpoints/")] == sorted(
        [f"checkpoints/t/fresh/{LEASE}", "checkpoints/t/fresh/weights.bin"]
        + [f"checkpoints/t/done/{rel}" for rel in ("config.json", "manifest.json", "tokenizer/tokenizer.json",
                                                   "weights.bin")])
    assert cs.exists("t", "done") and cs.collect_garbage(3600) == []


_SLOW_COMMIT = """
import sys, time
from pathlib import Path
from shared.storage import CheckpointStore, open_store
store = open_store(sys.argv[1])
real = store.put_file
def slow(key, path):
    real(key, path)
    print(key, flush=True)
    time.sleep(0.3)
store.put_file = slow
CheckpointStore(store).commit("t", "killed", Path(sys.argv[2]))
"""


def test_garbage_of_a_commit_killed_midway(store_url, tmp_path):
    src = _ckpt_dir(tmp_path)
    for i in range(20):
        (src / f"shard-{i:02d}.bin").write_bytes(os.urandom(100))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_COMMIT, store_url, str(src)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(3):  # a few files are up
        assert proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = open_store(store_url)
    cs = CheckpointStore(store)
    left = [o.key for o in store.list("checkpoints/t/killed/")]
    assert f"checkpoints/t/killed/{LEASE}" in left and len(left) >= 4 and not cs.exists("t", "killed")
    assert cs.collect_garbage(3600) == []  # its lease is fresh: it might still be running
    assert cs.collect_garbage(0) == ["t/killed"]
    assert list(store.list("checkpoints/t/")) == []
