"""Checkpoints that never stream through the gateway: presigned direct uploads (multipart for
large files), presigned downloads and imports from granted S3 prefixes, against a real gateway,
worker and S3-compatible HTTP server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import httpx
import pytest

from services.client import ApiError
from shared.storage import open_store
from shared.storage.uploads import UploadSessions
from tests.services.conftest import client, dump_logs, s3_url, start_stack

BUCKET = "direct"
GRANTS = {"team-a": ["s3://imports/granted/"]}


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, moto_url):
    s = start_stack(tmp_path_factory.mktemp("stack-direct"), storage_url=s3_url(moto_url, BUCKET),
                    queues=("convert",), env={"LLAMA_SVC_IMPORT_GRANTS": json.dumps(GRANTS)})
    yield s
    if request.session.testsfailed:
        dump_logs(s)
    s.__exit__(None, None, None)


@pytest.fixture(scope="module")
def big_hf(tiny_hf, tmp_path_factory):
    """tiny_hf plus a 12 MB file: three 5 MB parts, so the multipart path runs."""
    d = tmp_path_factory.mktemp("big") / "hf"
    shutil.copytree(tiny_hf, d)
    (d / "extra").mkdir()
    (d / "extra" / "blob.bin").write_bytes(os.urandom(12 << 20))
    return d


def _store(moto_url, bucket=BUCKET):
    return open_store(s3_url(moto_url, bucket))


def test_direct_upload_then_presigned_download(stack, big_hf, tmp_path, moto_url):
    a = client(stack, "team-a")
    ck = a.upload_checkpoint("direct-1", big_hf, direct=True)
    assert ck["service"]["upload"] and ck["format"] == "hf"
    blob = ck["files"]["extra/blob.bin"]
    assert blob["sha256"] == hashlib.sha256((big_hf / "extra" / "blob.bin").read_bytes()).hexdigest()
    # the gateway answers a download with a redirect to the object store, not the bytes
    r = httpx.get(f"{stack.url}/v1/checkpoints/direct-1/files/extra/blob.bin",
                  headers={"Authorization": "Bearer key-team-a"})
    assert r.status_code == 307 and r.headers["location"].startswith(f"http://{moto_url}/{BUCKET}/")
    assert r.headers["x-checksum-sha256"] == blob["sha256"]
    got = a.download("direct-1", tmp_path / "dl")
    assert (got / "extra" / "blob.bin").read_bytes() == (big_hf / "extra" / "blob.bin").read_bytes()
    assert (got / "config.json").read_bytes() == (big_hf / "config.json").read_bytes()
    # nothing of the upload is left in its staging area
    assert [o.key for o in _store(moto_url).list("uploads/")] == []
    # and the converter reads it like any upload
    job = a.wait(a.submit("convert", source="direct-1", output="direct-1-tp1", check_parity=False)["id"], timeout=300)
    assert job["state"] == "succeeded", (job, stack.log_tail())


def _declare(h: httpx.Client, name: str, d, wrong: str | None = None) -> dict:
    files = []
    for p in sorted(x for x in d.rglob("*") if x.is_file()):
        rel = p.relative_to(d).as_posix()
        sha = "0" * 64 if rel == wrong else hashlib.sha256(p.read_bytes()).hexdigest()
        files.append({"path": rel, "size": p.stat().st_size, "sha256": sha})
    r = h.post("/v1/checkpoints/uploads", json={"name": name, "files": files})
    assert r.status_code == 201, r.text
    return r.json()


def _put_all(up: dict, d, skip: str | None = None) -> None:
    for f in up["files"]:
        if f["path"] == skip:
            continue
        with open(d / f["path"], "rb") as fh:
            for url in f["urls"]:
                assert httpx.put(url, content=fh.read(f["part_size"])).status_code == 200


@pytest.fixture
def h(stack):
    with httpx.Client(base_url=stack.url, headers={"Authorization": "Bearer key-team-a"}, timeout=60) as c:
        yield c


def test_a_hash_mismatch_fails_the_import_and_keeps_nothing(stack, h, tiny_hf, moto_url):
    up = _declare(h, "lying", tiny_hf, wrong="config.json")
    _put_all(up, tiny_hf)
    job = h.post(f"/v1/checkpoints/uploads/{up['upload_id']}/complete").json()
    done = client(stack, "team-a").wait(job["id"], timeout=120)
    assert done["state"] == "failed" and "config.json: its sha256 is" in done["error"] and "declared" in done["error"]
    assert h.get("/v1/checkpoints/lying").status_code == 404
    assert [o.key for o in _store(moto_url).list(f"uploads/team-a/{up['upload_id']}/")] == []


def test_an_incomplete_upload_is_refused_by_name(stack, h, big_hf):
    up = _declare(h, "partial", big_hf)
    _put_all(up, big_hf, skip="extra/blob.bin")
    r = h.post(f"/v1/checkpoints/uploads/{up['upload_id']}/complete")
    assert r.status_code == 409 and "extra/blob.bin" in r.json()["detail"]
    # another team cannot see or complete it
    with httpx.Client(base_url=stack.url, headers={"Authorization": "Bearer key-team-b"}) as b:
        assert b.post(f"/v1/checkpoints/uploads/{up['upload_id']}/complete").status_code == 404
    assert h.delete(f"/v1/checkpoints/uploads/{up['upload_id']}").status_code == 204


def test_abandoned_uploads_expire_and_are_aborted(stack, h, big_hf, moto_url):
    import boto3

    up = _declare(h, "abandoned", big_hf)
    blob = next(f for f in up["files"] if f["path"] == "extra/blob.bin")
    with open(big_hf / "extra" / "blob.bin", "rb") as fh:  # one part of three, then nothing
        assert httpx.put(blob["urls"][0], content=fh.read(blob["part_size"])).status_code == 200
    s3 = boto3.client("s3", endpoint_url=f"http://{moto_url}", aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    pending = lambda: [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]  # noqa: E731
    assert pending()
    gone = UploadSessions(_store(moto_url)).expire(now=time.time() + 10 ** 6)  # what the reaper runs
    assert up["upload_id"] in gone
    assert pending() == [] and [o.key for o in _store(moto_url).list(f"uploads/team-a/{up['upload_id']}/")] == []
    assert h.post(f"/v1/checkpoints/uploads/{up['upload_id']}/complete").status_code == 404


def test_direct_uploads_are_checked_before_any_byte(h):
    base = {"size": 1, "sha256": "0" * 64}
    for files, status, needle in (
            ([{"path": "manifest.json", **base}, {"path": "config.json", **base}], 422, "written by the service"),
            ([{"path": "../x.safetensors", **base}, {"path": "config.json", **base}], 422, "'..'"),
            ([{"path": "config.json", **base}], 422, "needs config.json and weight files"),
            ([{"path": "config.json", **base}, {"path": "model.safetensors", "size": 1 << 40,
                                                 "sha256": "0" * 64}], 413, "over the")):
        r = h.post("/v1/checkpoints/uploads", json={"name": "bad", "files": files})
        assert r.status_code == status and needle in r.text, (files, r.text)


def test_import_from_granted_prefixes_only(stack, tiny_hf, moto_url):
    src = _store(moto_url, "imports")
    for prefix in ("granted/m1/", "secret/m2/"):
        for p in tiny_hf.rglob("*"):
            if p.is_file():
                src.put_file(prefix + p.relative_to(tiny_hf).as_posix(), p)
    a, b = client(stack, "team-a"), client(stack, "team-b")
    job = a.wait(a.submit("import", uri="s3://imports/granted/m1/", output="imported")["id"], timeout=120)
    assert job["state"] == "succeeded", (job, stack.log_tail())
    ck = a.get_checkpoint("imported")
    assert ck["service"]["imported_from"] == "s3://imports/granted/m1/"
    assert ck["files"]["config.json"]["sha256"] == hashlib.sha256((tiny_hf / "config.json").read_bytes()).hexdigest()
    for who, uri in ((a, "s3://imports/secret/m2/"), (a, "s3://imports/granted/../secret/m2/"),
                     (b, "s3://imports/granted/m1/")):
        with pytest.raises(ApiError) as e:
            who.submit("import", uri=uri, output="nope")
        assert e.value.status == 403 and "may not import" in e.value.detail


def test_a_local_store_offers_no_direct_upload(tmp_path):
    from shared.storage.base import DirectTransferUnsupported

    with pytest.raises(DirectTransferUnsupported):
        open_store(f"file://{tmp_path}").start_direct_upload("a/b", 1, 60)


def test_datasets_go_direct_and_are_checked_by_the_import(stack, tmp_path, moto_url):
    a = client(stack, "team-a")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(50)))
    ds = a.upload_dataset("direct-data", good, direct=True)
    assert ds["records"] == 50 and ds["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"prompt": "no completion"}) + "\n")
    with pytest.raises(ApiError) as e:
        a.upload_dataset("direct-bad", bad, direct=True)
    assert 'direct-bad:2: a prompt/completion record lacks "completion"' in e.value.detail
    assert [d["name"] for d in a.list_datasets()] == ["direct-data"]
    assert [o.key for o in _store(moto_url).list("uploads/")] == []
    # a granted object as a dataset
    _store(moto_url, "imports").put_file("granted/train.jsonl", good)
    job = a.wait(a.submit("import", uri="s3://imports/granted/train.jsonl", output="imported-data",
                          target="dataset")["id"], timeout=120)
    assert job["state"] == "succeeded", (job, stack.log_tail())
    assert a._json(a.http.get("/v1/datasets/imported-data"))["records"] == 50


def test_the_cli_uploads_a_directory_directly_and_downloads_it(stack, tiny_hf, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "LLAMA_SVC_URL": stack.url, "LLAMA_SVC_KEY": "key-team-a"}
    up = subprocess.run([sys.executable, "-m", "services.client", "upload", "from-cli", str(tiny_hf)], env=env,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["files"] == len([p for p in tiny_hf.rglob("*") if p.is_file()])
    assert client(stack, "team-a").get_checkpoint("from-cli")["service"]["upload"]  # the direct path by default
    dl = subprocess.run([sys.executable, "-m", "services.client", "download", "from-cli", str(tmp_path / "dl")],
                        env=env, capture_output=True, text=True, timeout=120)
    assert dl.returncode == 0, dl.stderr
    assert (tmp_path / "dl" / "config.json").read_bytes() == (tiny_hf / "config.json").read_bytes()
    bad = subprocess.run([sys.executable, "-m", "services.client", "upload", "from-cli", str(tiny_hf)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "already exists" in bad.stderr
