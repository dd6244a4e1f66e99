"""Service overhead: a 1-token `PUT /api` round trip through gateway -> Celery -> worker, against
the worker's own time for the same request; concurrent requests (batched together by the
worker's runtime) against the same requests one after another; and the job-submission rate.

    python -m bench.service [--n 200]

Runs on the local stack with a tiny model so the numbers are the service's, not the model's.
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
import tempfile
import time
from pathlib import Path

import httpx

from services.stack import LocalStack


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="generation round trips")
    ap.add_argument("--jobs", type=int, default=200, help="job submissions")
    ap.add_argument("--concurrent", type=int, default=8, help="requests sent at once")
    args = ap.parse_args()
    from tests.services.helpers import make_hf_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_hf_checkpoint(Path(tmp) / "tiny")
        env = {"LLAMA_SVC_MAX_ACTIVE_JOBS_PER_TEAM": str(args.jobs + 10), "LLAMA_SVC_TORCH_THREADS": "1",
               "LLAMA_SVC_LOG_LEVEL": "WARNING"}
        with LocalStack(Path(tmp) / "stack", queues=("generate",), env=env) as stack:
            from services.client import Client

            c = Client(stack.url, stack.api_key)
            c.upload_checkpoint("tiny", ckpt)
            h = {"Authorization": f"Bearer {stack.api_key}"}
            body = {"model": "tiny", "prompts": ["hello"], "tokens_to_generate": 1, "top_k": 1}
            with httpx.Client(base_url=stack.url, headers=h, timeout=120) as http:
                for _ in range(10):  # load the model, warm the paths
                    http.put("/api", json=body).raise_for_status()
                total, worker = [], []
                for _ in range(args.n):
                    t = time.perf_counter()
                    r = http.put("/api", json=body)
                    total.append((time.perf_counter() - t) * 1e3)
                    r.raise_for_status()
                    worker.append(float(r.headers["X-Worker-Time-Ms"]))
                over = [a - b for a, b in zip(total, worker)]
                print(f"1-token PUT /api, {args.n} requests (ms):")
                for name, xs in (("round trip", total), ("worker", worker), ("overhead", over)):
                    print(f"  {name:<11} median {statistics.median(xs):7.2f}   p99 {pct(xs, 0.99):7.2f}")
                long = {**body, "tokens_to_generate": 32}
                t = time.perf_counter()
                for _ in range(args.concurrent):
                    http.put("/api", json=long).raise_for_status()
                seq = time.perf_counter() - t
                with ThreadPoolExecutor(args.concurrent) as pool:
                    t = time.perf_counter()
                    for r in pool.map(lambda _: http.put("/api", json=long), range(args.concurrent)):
                        r.raise_for_status()
                    par = time.perf_counter() - t
                print(f"{args.concurrent} x 32-token PUT /api: one after another {seq * 1e3:.0f} ms, "
                      f"concurrent {par * 1e3:.0f} ms ({seq / par:.1f}x)")
                t = time.perf_counter()
                for _ in range(args.jobs):  # no convert worker runs: the jobs stay queued
                    http.post("/v1/jobs", json={"kind": "export", "source": "tiny"}).raise_for_status()
                dt = time.perf_counter() - t
                print(f"job submission: {args.jobs / dt:.0f} jobs/s ({dt / args.jobs * 1e3:.2f} ms each, sequential)")
                ok = statistics.median(over) <= 15
                print(f"median overhead target <= 15 ms: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
