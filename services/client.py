"""A small Python client for the service's HTTP API (httpx)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


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
    def upload_checkpoint(self, name: str, directory: Path | str) -> dict:
        d = Path(directory)
        paths = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        handles = [open(p, "rb") for p in paths]
        try:
            files = [("files", (p.relative_to(d).as_posix(), h, "application/octet-stream")) for p, h in zip(paths, handles)]
            return self._json(self.http.post("/v1/checkpoints", params={"name": name}, files=files, timeout=None))
        finally:
            for h in handles:
                h.close()

    def list_checkpoints(self) -> list[dict]:
        return self._json(self.http.get("/v1/checkpoints"))["checkpoints"]

    def get_checkpoint(self, name: str) -> dict:
        return self._json(self.http.get(f"/v1/checkpoints/{name}"))

    def download(self, name: str, dest: Path | str) -> Path:
        """Download every file of a checkpoint into ``dest``."""
        dest = Path(dest)
        for rel in self.get_checkpoint(name)["files"]:
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with self.http.stream("GET", f"/v1/checkpoints/{name}/files/{rel}") as r:
                if r.status_code >= 400:
                    r.read()
                    self._json(r)
                with open(out, "wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
        return dest

    # ---- datasets
    def upload_dataset(self, name: str, path: Path | str) -> dict:
        """Upload a JSONL file as the team's dataset ``name`` (name it in a finetune's ``dataset``)."""
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
