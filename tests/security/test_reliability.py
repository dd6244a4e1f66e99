"""Reliability that is also a matter of trust: manifests only the service writes, job errors
without host paths, a local stack that restarts a dead worker, and commit garbage the
gateway's reaper collects."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import uuid

import pytest

from services.stack import LocalStack
from shared.jobs import JobStore
from shared.storage import CheckpointStore, LocalStore, open_store
from shared.storage.checkpoints import LEASE
from tests.services.conftest import FAST, KEYS, client, dump_logs, s3_url, wait_state

TERMINAL = ("succeeded", "failed", "cancelled")
ABS_PATH = re.compile(r"(?<![\w.])/[\w.\-]")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = LocalStack(tmp_path_factory.mktemp("stack-reliability"), api_keys=KEYS, queues=("convert",),
                   restart_workers=True, env={**FAST, "LLAMA_SVC_COMMIT_GC_AFTER_S": "60",
                                              "LLAMA_SVC_COMMIT_GC_INTERVAL_S": "0.5"})
    s.__enter__()
    yield s
    s.__exit__(None, None, None)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    return open_store(s3_url(request.getfixturevalue("moto_url"), f"b{uuid.uuid4().hex[:12]}"))


def test_spoofed_manifest_is_refused(store, tiny_hf, tmp_path):
    src = tmp_path / "upload"
    shutil.copytree(tiny_hf, src)
    spoof = {"format": "native", "layout": {"tp": 8, "pp": 1}, "parity": {"passed": True},
             "service": {"job_id": "someone-elses-job"}}
    (src / "manifest.json").write_text(json.dumps(spoof))
    cs = CheckpointStore(store)
    with pytest.raises(ValueError, match="manifests are written by the service"):
        cs.commit("t", "spoof", src, meta={"format": "hf"})
    assert not cs.exists("t", "spoof") and list(store.list("checkpoints/")) == []
    (src / "manifest.json").unlink()
    m = cs.commit("t", "spoof", src, meta={"format": "hf"})
    assert m["format"] == "hf" and "layout" not in m and "parity" not in m


def test_lease_name_is_reserved(store, tiny_hf, tmp_path):
    src = tmp_path / "upload"
    shutil.copytree(tiny_hf, src)
    (src / LEASE).write_text("{}")
    with pytest.raises(ValueError, match="service uses that name"):
        CheckpointStore(store).commit("t", "x", src)
    assert list(store.list("checkpoints/")) == []


def _no_host_paths(error: str, *roots) -> None:
    assert not ABS_PATH.search(error), error
    for root in roots:
        assert str(root) not in error, error


def test_job_error_carries_no_host_paths(stack, tiny_hf, tmp_path):
    src = tmp_path / "broken"
    shutil.copytree(tiny_hf, src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # config says one thing, the weights file another
    a = client(stack)
    a.upload_checkpoint("broken", src)
    job = a.submit("convert", source="broken", output="broken-tp1", check_parity=False)
    final = wait_state(a, job["id"], lambda j: j["state"] in TERMINAL, what="an end")
    assert final["state"] == "failed", (final, stack.log_tail())
    _no_host_paths(final["error"], stack.data_dir, tmp_path)


def test_run_job_redacts_every_error(tmp_path, monkeypatch):
    from services import worker

    store = JobStore(tmp_path / "jobs.sqlite3")
    monkeypatch.setitem(worker._stores, "jobs", store)
    monkeypatch.setattr(worker.settings, "data_dir", tmp_path / "data")

    def fail(job, ctx):
        where = worker.work_dir(job.id, job.attempts)
        raise OSError(f"cannot read {where / 'source' / 'model.safetensors'} nor {where / 'tmp.bin'} nor "
                      f"{tmp_path / 'data' / 'objects' / 'x'} nor /etc/passwd")

    def fail_generate(job, ctx):
        raise worker.JobFailed(f"bad file {tmp_path / 'data' / 'model-cache' / 'm'}")

    errors = []
    for fn, kind in ((fail, "convert"), (fail_generate, "generate")):
        job, _ = store.create("t", kind, {})
        assert worker.run_job(fn, job.id, store.mark_dispatched(job.id)) == "failed"
        errors.append(store.get(job.id).error)
        _no_host_paths(errors[-1], tmp_path)
    assert errors[0] == ("OSError: cannot read source/model.safetensors nor work/tmp.bin nor objects/x nor passwd")
    assert errors[1] == "bad file model-cache/m"


def _worker_pid(stack: LocalStack, name: str = "worker-convert") -> int:
    return stack.procs[name].pid


def test_stack_restarts_a_worker_that_dies(stack, tiny_hf):
    a = client(stack)
    old = _worker_pid(stack)
    os.kill(old, signal.SIGKILL)  # from outside the stack: the OOM killer, an operator
    deadline = time.time() + 30
    while time.time() < deadline and _worker_pid(stack) == old:
        time.sleep(0.1)
    assert _worker_pid(stack) != old and stack.restarts >= 1
    a.upload_checkpoint("tiny", tiny_hf)
    job = a.submit("convert", source="tiny", output="tiny-pp2", target_pp=2, check_parity=False)
    final = wait_state(a, job["id"], lambda j: j["state"] in TERMINAL, timeout=180, what="an end")
    assert final["state"] == "succeeded", (final, stack.log_tail())
    stack.kill("worker-convert")  # the stack's own kill is deliberate: not undone
    time.sleep(2)
    assert "worker-convert" not in stack.procs
    stack.start_worker("convert")
    stack.wait_ready()


def test_gateway_collects_commit_garbage(stack, tiny_hf):
    objects = LocalStore(stack.data_dir / "objects")
    CheckpointStore(objects).commit("team-a", "kept", tiny_hf, meta={"format": "hf"})
    stale = json.dumps({"started_at": time.time() - 3600, "renewed_at": time.time() - 3600}).encode()
    objects.put_bytes(f"checkpoints/team-a/died/{LEASE}", stale)
    objects.put_bytes("checkpoints/team-a/died/model-00001.safetensors", b"x" * 100)
    objects.put_bytes("checkpoints/team-a/orphan/config.json", b"{}")
    objects.put_bytes("datasets/team-a/orphan/data.jsonl", b"{}")
    objects.put_bytes(f"checkpoints/team-a/running/{LEASE}", json.dumps({"renewed_at": time.time()}).encode())
    objects.put_bytes("checkpoints/team-a/running/config.json", b"{}")
    deadline = time.time() + 30
    while time.time() < deadline and any(objects.exists(k) for k in (
            "checkpoints/team-a/died/model-00001.safetensors", "checkpoints/team-a/orphan/config.json",
            "datasets/team-a/orphan/data.jsonl")):
        time.sleep(0.2)
    try:
        assert not list(objects.list("checkpoints/team-a/died/"))
        assert not list(objects.list("checkpoints/team-a/orphan/"))
        assert not list(objects.list("datasets/team-a/"))
        assert objects.exists("checkpoints/team-a/running/config.json")  # its lease is fresh
        assert CheckpointStore(objects).exists("team-a", "kept")  # committed ones are untouched
    except AssertionError:
        dump_logs(stack)
        raise
