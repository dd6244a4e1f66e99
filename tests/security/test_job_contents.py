"""Team isolation through what a job reads and writes: two teams on one real stack (gateway,
Redis, convert/train/generate workers, local object store). Team B holds a converted checkpoint;
team A tries to reach it, or any other host file, through the contents of its uploads and jobs.
Every refusal is asserted, and so is that team B's stored bytes are unchanged afterwards and
that nothing was written outside the stack's own directories."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from services.client import ApiError
from tests.services.conftest import client, dump_logs, start_stack

RECORDS = [{"text": "the quick brown fox jumps over the lazy dog. " * 3} for _ in range(8)]
TRAIN = {"train_iters": 2, "micro_batch_size": 2, "global_batch_size": 2, "seq_length": 32, "lr": 1e-3,
         "export_hf": False}


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(request, tmp_path_factory, tiny_hf):
    """The stack, team B's committed checkpoints, and a canary directory outside the stack."""
    s = start_stack(tmp_path_factory.mktemp("stack-security"))
    canary = tmp_path_factory.mktemp("outside")
    b = client(s, "team-b")
    b.upload_checkpoint("secret", tiny_hf)
    job = b.wait(b.submit("convert", source="secret", output="secret-tp1", check_parity=False)["id"], timeout=300)
    assert job["state"] == "succeeded", (job, s.log_tail())
    team_b = s.data_dir / "objects" / "checkpoints" / "team-b"
    before = tree_hashes(team_b)
    assert any(k.endswith(".safetensors") for k in before)
    yield {"stack": s, "team_b": team_b, "canary": canary}
    if request.session.testsfailed:
        dump_logs(s)
    try:
        assert tree_hashes(team_b) == before, "team B's stored bytes changed"
        assert list(canary.iterdir()) == [], "a job wrote outside the stack's directories"
    finally:
        s.__exit__(None, None, None)


def _attack_upload(tiny_hf: Path, out: Path, weight_map: dict[str, str]) -> Path:
    """tiny_hf with its weights split: one real shard plus an index whose other entries point elsewhere."""
    shutil.copytree(tiny_hf, out)
    from safetensors import safe_open

    shard = out / "model-00001-of-00002.safetensors"
    (out / "model.safetensors").rename(shard)
    with safe_open(shard, "pt") as f:
        entries = {n: shard.name for n in f.keys()}
    entries.update(weight_map)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": entries}))
    return out


@pytest.mark.parametrize("how", ["absolute", "dotdot", "model-cache"])
def test_an_index_cannot_name_another_teams_weights(world, tiny_hf, tmp_path, how):
    s = world["stack"]
    target = world["team_b"] / "secret" / "model.safetensors"
    entry = {"absolute": str(target), "dotdot": "../../team-b/secret/model.safetensors",
             "model-cache": str(s.data_dir / "model-cache" / "team-b" / "secret-tp1" / "files" /
                                "model_tp0_pp0.safetensors")}[how]
    up = _attack_upload(tiny_hf, tmp_path / "up", {"lm_head.weight": entry})
    with pytest.raises(ApiError) as e:
        client(s, "team-a").upload_checkpoint(f"stolen-{how}", up)
    assert e.value.status == 422
    detail = str(e.value.detail)
    assert "model.safetensors.index.json entry for 'lm_head.weight'" in detail
    assert str(s.data_dir) not in detail and "team-b" not in detail.replace(repr(entry), "")
    assert all(c["name"] != f"stolen-{how}" for c in client(s, "team-a").list_checkpoints())


def test_the_loaders_refuse_an_escaping_index_too(tiny_hf, tmp_path):
    """Defence in depth: a directory that never went through the upload check."""
    from shared.checkpoint.hf import check_hf_dir
    from shared.checkpoint.errors import CheckpointError
    from shared.checkpoint.tensors import open_hf_weights

    outside = tmp_path / "other-team.safetensors"
    shutil.copyfile(tiny_hf / "model.safetensors", outside)
    for entry in (str(outside), "../other-team.safetensors"):
        d = _attack_upload(tiny_hf, tmp_path / f"d{len(entry)}", {"lm_head.weight": entry})
        with pytest.raises(CheckpointError, match="entry for 'lm_head.weight'"):
            open_hf_weights(d)
        with pytest.raises(CheckpointError, match="entry for 'lm_head.weight'"):
            check_hf_dir(d)  # before transformers reads the index by itself
    linked = tmp_path / "linked"
    shutil.copytree(tiny_hf, linked)
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="link to something outside"):
        open_hf_weights(linked)


def test_an_uploaded_manifest_is_refused(world, tiny_hf, tmp_path):
    s = world["stack"]
    up = tmp_path / "up"
    shutil.copytree(tiny_hf, up)
    (up / "manifest.json").write_text(json.dumps({"format": "llama-megatron-native", "parity": {"passed": True}}))
    with pytest.raises(ApiError) as e:
        client(s, "team-a").upload_checkpoint("spoofed", up)
    assert e.value.status == 422 and "manifest.json is written by the service" in str(e.value.detail)


@pytest.mark.parametrize("key,value", [
    ("metrics_file", "CANARY/metrics.jsonl"), ("data_path", ["CANARY/data.jsonl"]),
    ("valid_data_path", ["CANARY/valid.jsonl"]), ("load", "CANARY"), ("save", "CANARY/run"),
    ("no_such_option", 1)])
def test_a_finetune_config_names_no_host_path(world, key, value):
    s, canary = world["stack"], world["canary"]
    value = json.loads(json.dumps(value).replace("CANARY", str(canary)))
    with pytest.raises(ApiError) as e:
        client(s, "team-a").submit("finetune", source="secret-tp1", config={"data": RECORDS, **TRAIN, key: value})
    assert e.value.status == 422 and key in json.dumps(e.value.detail)


@pytest.mark.parametrize("change,needle", [
    ({"world_size": 64, "tensor_model_parallel_size": 1}, "train worker offers at most"),
    ({"seq_length": 100_000}, "exceeds the model's 256 positions"),
    ({"train_iters": 10**9}, "train_iters"),
    ({"global_batch_size": 3}, "global-batch-size 3 must be a multiple"),
    ({"dataset": "x"}, "either inline as `data` or as an uploaded `dataset`"),
])
def test_a_finetune_plan_is_checked_at_submit(world, change, needle):
    s = world["stack"]
    b = client(s, "team-b")
    with pytest.raises(ApiError) as e:
        b.submit("finetune", source="secret-tp1", config={"data": RECORDS, **TRAIN, **change})
    assert e.value.status == 422 and needle in json.dumps(e.value.detail), e.value.detail
    assert b.list_jobs(kind="finetune")["jobs"] == []


def test_datasets_are_validated_and_team_scoped(world, tmp_path):
    s = world["stack"]
    a, b = client(s, "team-a"), client(s, "team-b")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"prompt": "no completion"}) + "\n")
    with pytest.raises(ApiError) as e:
        a.upload_dataset("bad", bad)
    assert e.value.status == 422 and 'bad:2: a prompt/completion record lacks "completion"' in e.value.detail
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    ds = a.upload_dataset("team-a-data", good)
    assert ds["records"] == len(RECORDS) and ds["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert [d["name"] for d in a.list_datasets()] == ["team-a-data"] and b.list_datasets() == []
    with httpx.Client(base_url=s.url, headers={"Authorization": "Bearer key-team-b"}) as h:
        assert h.get("/v1/datasets/team-a-data").status_code == 404
    with pytest.raises(ApiError) as e:  # team B cannot train on team A's dataset
        b.submit("finetune", source="secret-tp1", config={**TRAIN, "dataset": "team-a-data"})
    assert e.value.status == 404 and "dataset 'team-a-data' not found" in e.value.detail


def test_finetune_from_a_dataset_serves_its_metrics(world, tiny_hf, tmp_path):
    s = world["stack"]
    a, b = client(s, "team-a"), client(s, "team-b")
    a.upload_checkpoint("mine", tiny_hf)
    conv = a.wait(a.submit("convert", source="mine", output="mine-tp1", check_parity=False)["id"], timeout=300)
    assert conv["state"] == "succeeded", conv
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    a.upload_dataset("train-set", data)
    job = a.wait(a.submit("finetune", source="mine-tp1", output="mine-ft", config={**TRAIN, "dataset": "train-set"})
                 ["id"], timeout=600)
    assert job["state"] == "succeeded", (job, s.log_tail())
    metrics = a.metrics(job["id"])
    steps = [m for m in metrics if m.get("phase") == "train"]
    assert [m["step"] for m in steps] == [1, 2] and all(m["loss"] > 0 for m in steps)
    with pytest.raises(ApiError) as e:
        b.metrics(job["id"])
    assert e.value.status == 404
    manifest = json.dumps(a.get_checkpoint("mine-ft"))
    assert str(s.data_dir) not in manifest and "/work/" not in manifest
    assert str(s.data_dir) not in json.dumps(a.get_checkpoint("mine-tp1")), "provenance names a host path"


def test_no_job_directory_is_left_behind(world):
    s = world["stack"]
    deadline = time.time() + 30
    while time.time() < deadline and any((s.data_dir / "work").glob("*")):
        time.sleep(0.5)
    assert not any((s.data_dir / "work").glob("*")), list((s.data_dir / "work").iterdir())
    assert not list(s.data_dir.glob("upload-*")) and not list(s.data_dir.glob("dataset-*"))
