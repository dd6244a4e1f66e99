"""A small Python client for the service's HTTP API (httpx)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ApiError(Exception):
    def __init__(self, status: int, detail: Any):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 120.0):
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _json(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r.json() if r.content else None

    # ---- checkpoints
    def upload_checkpoint(self, name: str, directory: Path | str, direct: bool | None = None,
                          timeout: float = 3600) -> dict:
        """Upload an HF checkpoint directory. ``direct``: the files go straight to the object store
        through presigned URLs (``None``: when the service offers it, else through the gateway)."""
        d = Path(directory)
        paths = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        rels = [p.relative_to(d).as_posix() for p in paths]
        if direct is not False:
            files = [{"path": r, "size": p.stat().st_size, "sha256": _sha256(p)} for p, r in zip(paths, rels)]
            r = self.http.post("/v1/checkpoints/uploads", json={"name": name, "files": files})
            if not (r.status_code == 501 and direct is None):
                return self._direct_upload(name, d, self._json(r), timeout)
        handles = [open(p, "rb") for p in paths]
        try:
            parts = [("files", (rel, h, "application/octet-stream")) for rel, h in zip(rels, handles)]
            return self._json(self.http.post("/v1/checkpoints", params={"name": name}, files=parts, timeout=None))
        finally:
            for h in handles:
                h.close()

    def _direct_upload(self, name: str, d: Path, upload: dict, timeout: float) -> dict:
        for f in upload["files"]:
            self._put_parts(d / f["path"], f)
        self._finish(f"/v1/checkpoints/uploads/{upload['upload_id']}/complete", timeout)
        return self.get_checkpoint(name)

    def _put_parts(self, path: Path, f: dict) -> None:
        """PUT one file's parts to their presigned URLs (no Authorization: the URLs are signed)."""
        with httpx.Client(timeout=self.http.timeout) as store, open(path, "rb") as fh:
            for url in f["urls"]:
                r = store.put(url, content=fh.read(f["part_size"]))
                if r.status_code >= 300:
                    raise ApiError(r.status_code, f"the object store refused {f['path']}: {r.text[:200]}")

    def _finish(self, complete_url: str, timeout: float) -> dict:
        """Complete a direct upload and wait for its import job."""
        job = self.wait(self._json(self.http.post(complete_url))["id"], timeout=timeout)
        if job["state"] != "succeeded":
            raise ApiError(422, f"the upload was not accepted: {job.get('error')}")
        return job

    def list_checkpoints(self) -> list[dict]:
        return self._json(self.http.get("/v1/checkpoints"))["checkpoints"]

    def get_checkpoint(self, name: str) -> dict:
        return self._json(self.http.get(f"/v1/checkpoints/{name}"))

    def download(self, name: str, dest: Path | str) -> Path:
        """Download every file of a checkpoint into ``dest``."""
        dest = Path(dest)
        for rel, info in self.get_checkpoint(name)["files"].items():
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            # the gateway may redirect to the object store (Authorization is not sent across origins)
            with self.http.stream("GET", f"/v1/checkpoints/{name}/files/{rel}", follow_redirects=True) as r:
                if r.status_code >= 400:
                    r.read()
                    self._json(r)
                h = hashlib.sha256()
                with open(out, "wb") as f:
                    for chunk in r.iter_bytes():
                        h.update(chunk)
                        f.write(chunk)
            if h.hexdigest() != info["sha256"]:
                out.unlink()
                raise ApiError(502, f"{rel}: the downloaded bytes do not match the checkpoint's sha256; retry")
        return dest

    # ---- datasets
    def upload_dataset(self, name: str, path: Path | str, direct: bool | None = None, timeout: float = 3600) -> dict:
        """Upload a JSONL file as the team's dataset ``name`` (name it in a finetune's ``dataset``);
        ``direct`` as in ``upload_checkpoint``."""
        path = Path(path)
        if direct is not False:
            r = self.http.post("/v1/datasets/uploads", json={"name": name, "size": path.stat().st_size,
                                                             "sha256": _sha256(path)})
            if not (r.status_code == 501 and direct is None):
                up = self._json(r)
                self._put_parts(path, up["files"][0])
                self._finish(f"/v1/datasets/uploads/{up['upload_id']}/complete", timeout)
                return self._json(self.http.get(f"/v1/datasets/{name}"))
        with open(path, "rb") as f:
            return self._json(self.http.post("/v1/datasets", params={"name": name}, content=f,
                                             headers={"Content-Type": "application/x-ndjson"}, timeout=None))

    def list_datasets(self) -> list[dict]:
        return self._json(self.http.get("/v1/datasets"))["datasets"]

    # ---- jobs
    def submit(self, kind: str, *, idempotency_key: str | None = None, **params) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/jobs", json={"kind": kind, **params}, headers=headers))

    def get(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def list_jobs(self, *, kind: str | None = None, state: str | None = None, limit: int = 50,
                  cursor: int | None = None) -> dict:
        params = {k: v for k, v in dict(kind=kind, state=state, limit=limit, cursor=cursor).items() if v is not None}
        return self._json(self.http.get("/v1/jobs", params=params))

    def cancel(self, job_id: str) -> dict:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def metrics(self, job_id: str) -> list[dict]:
        """A finished finetune's training metrics, one dict per step and evaluation."""
        return self._json(self.http.get(f"/v1/jobs/{job_id}/metrics"))["metrics"]

    def events(self, job_id: str, after: int = 0) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}/events", params={"after": after}))

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[dict]:
        """Server-sent events until the job finishes."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params={"after": after},
                              headers={"Accept": "text/event-stream"}, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                self._json(r)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    if data:
                        yield data

    def wait(self, job_id: str, timeout: float = 3600, poll: float = 0.5,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        deadline = time.time() + timeout
        while True:
            job = self.get(job_id)
            if on_progress:
                on_progress(job)
            if job["state"] in TERMINAL:
                return job
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s")
            time.sleep(poll)

    # ---- generation
    def generate(self, model: str, prompts: list[str], **body) -> dict:
        """Megatron ``PUT /api``."""
        return self._json(self.http.put("/api", json={"model": model, "prompts": prompts, **body}))

    def completions(self, model: str, prompt: str, **body) -> dict:
        return self._json(self.http.post("/v1/completions", json={"model": model, "prompt": prompt, **body}))

    def chat(self, model: str, messages: list[dict], **body) -> dict:
        return self._json(self.http.post("/v1/chat/completions", json={"model": model, "messages": messages, **body}))


def main(argv: list[str] | None = None) -> int:
    """``python -m services.client upload NAME DIR`` and friends: the client from a shell."""
    import argparse
    import os
    import sys

    p = argparse.ArgumentParser(prog="python -m services.client", description="Talk to the service's gateway.")
    p.add_argument("--url", default=os.environ.get("LLAMA_SVC_URL", "http://127.0.0.1:8000"),
                   help="the gateway (default: $LLAMA_SVC_URL or %(default)s)")
    p.add_argument("--key", default=os.environ.get("LLAMA_SVC_KEY"), help="your API key (default: $LLAMA_SVC_KEY)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upload", help="upload every file of an HF checkpoint directory")
    up.add_argument("name")
    up.add_argument("directory")
    up.add_argument("--through-gateway", action="store_true",
                    help="send the bytes through the gateway even where the store takes them directly")
    ds = sub.add_parser("upload-dataset", help="upload a JSONL file as a dataset")
    ds.add_argument("name")
    ds.add_argument("path")
    dl = sub.add_parser("download", help="download every file of a checkpoint (each checked against its sha256)")
    dl.add_argument("name")
    dl.add_argument("directory")
    a = p.parse_args(argv)
    if not a.key:
        p.error("pass --key or set LLAMA_SVC_KEY")
    with Client(a.url, a.key, timeout=600) as c:
        try:
            if a.cmd == "upload":
                out = c.upload_checkpoint(a.name, a.directory, direct=False if a.through_gateway else None)
                print(json.dumps({"name": out["name"], "files": len(out["files"]), "bytes": out["bytes"]}))
            elif a.cmd == "upload-dataset":
                print(json.dumps(c.upload_dataset(a.name, a.path)))
            else:
                print(c.download(a.name, a.directory))
        except (ApiError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
