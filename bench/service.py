"""Service overhead, on the local stack with a tiny model so the numbers are the service's, not the model's.

For each jobs-database backend (SQLite, PostgreSQL):
- a 1-token `PUT /api` round trip through gateway -> Celery -> worker, against the worker's own
  time for the same request;
- concurrent 32-token requests (batched together by the worker's runtime) against the same
  requests one after another;
- sequential job submissions per second;
- a second gateway process on the same Redis, jobs database and storage: submissions alternating
  between the two gateways, round trips through the second one, and the job count each lists.
PostgreSQL is reported as a ratio to SQLite, the second gateway to the first, from the same run.

Then, on a stack whose storage is an S3-compatible server (moto), an HF checkpoint of
`--upload-gb` GiB uploaded through the gateway (multipart) and directly (presigned URLs to the
store, then an import job on a convert worker): wall time, the gateway's peak RSS, the request
bytes it received and the bytes it wrote to disk.

    python -m bench.service [--n 200] [--jobs 200] [--concurrent 8] [--backends sqlite,postgresql]
                            [--upload-gb 2] [--skip-upload]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from services.stack import LocalStack, free_port

GIB = 1 << 30
BODY = {"model": "tiny", "prompts": ["hello"], "tokens_to_generate": 1, "top_k": 1}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def wait_for(probe, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if probe():
                return
        except (OSError, httpx.HTTPError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


def round_trips(http: httpx.Client, n: int) -> dict[str, list[float]]:
    total, worker = [], []
    for _ in range(n):
        t = time.perf_counter()
        r = http.put("/api", json=BODY)
        total.append((time.perf_counter() - t) * 1e3)
        r.raise_for_status()
        worker.append(float(r.headers["X-Worker-Time-Ms"]))
    return {"round trip": total, "worker": worker, "overhead": [a - b for a, b in zip(total, worker)]}


def print_round_trips(label: str, rt: dict[str, list[float]]) -> None:
    print(f"  {label} (ms):")
    for name, xs in rt.items():
        print(f"    {name:<11} median {statistics.median(xs):7.2f}   p99 {pct(xs, 0.99):7.2f}")


def submit_jobs(https: list[httpx.Client], n: int) -> float:
    """Jobs/s of ``n`` sequential submissions, alternating between the clients (no convert worker
    runs on these stacks: the jobs stay queued)."""
    t = time.perf_counter()
    for i in range(n):
        https[i % len(https)].post("/v1/jobs", json={"kind": "export", "source": "tiny"}).raise_for_status()
    return n / (time.perf_counter() - t)


def count_jobs(http: httpx.Client) -> int:
    n, cursor = 0, None
    while True:
        page = http.get("/v1/jobs", params={"limit": 200, **({"cursor": cursor} if cursor else {})})
        page.raise_for_status()
        body = page.json()
        n += len(body["jobs"])
        if not (cursor := body["next_cursor"]):
            return n


def concurrent_vs_sequential(http: httpx.Client, k: int) -> None:
    long = {**BODY, "tokens_to_generate": 32}
    t = time.perf_counter()
    for _ in range(k):
        http.put("/api", json=long).raise_for_status()
    seq = time.perf_counter() - t
    with ThreadPoolExecutor(k) as pool:
        t = time.perf_counter()
        for r in pool.map(lambda _: http.put("/api", json=long), range(k)):
            r.raise_for_status()
        par = time.perf_counter() - t
    print(f"  {k} x 32-token PUT /api: one after another {seq * 1e3:.0f} ms, "
          f"concurrent {par * 1e3:.0f} ms ({seq / par:.1f}x)")


def second_gateway(stack: LocalStack) -> tuple[subprocess.Popen, str]:
    """Another gateway process with the stack's environment: same Redis, jobs database and storage."""
    port = free_port()
    log = open(stack.logs / "gateway-2.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "gateway.app:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", "--no-access-log"],
                            env=stack.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url + "/health", timeout=1).status_code == 200, "a second gateway")
    return proc, url


def two_gateways(stack: LocalStack, http: httpx.Client, args, one: dict) -> dict:
    proc, url2 = second_gateway(stack)
    try:
        with httpx.Client(base_url=url2, headers=http.headers, timeout=120) as http2:
            for _ in range(10):
                http2.put("/api", json=BODY).raise_for_status()
            rate = submit_jobs([http, http2], args.jobs)
            rt = round_trips(http2, args.n)
            counts = count_jobs(http), count_jobs(http2)
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"  two gateways, submissions alternating: {rate:.0f} jobs/s ({rate / one['jobs_s']:.2f}x one gateway)")
    print_round_trips(f"1-token PUT /api through the second gateway, {args.n} requests", rt)
    med, med1 = statistics.median(rt["round trip"]), statistics.median(one["rt"]["round trip"])
    print(f"    round trip median {med / med1:.2f}x the first gateway's")
    same = "both list every job" if counts[0] == counts[1] == 2 * args.jobs else "the lists DIFFER"
    print(f"  jobs listed (GET /v1/jobs): gateway 1 {counts[0]}, gateway 2 {counts[1]}, "
          f"submitted {2 * args.jobs}: {same}")
    return {"jobs_s": rate, "rt": rt, "counts": counts}


def bench_backend(backend: str, jobs_db: str | None, ckpt: Path, tmp: Path, args) -> dict:
    env = {"LLAMA_SVC_MAX_ACTIVE_JOBS_PER_TEAM": str(2 * args.jobs + 10), "LLAMA_SVC_TORCH_THREADS": "1",
           "LLAMA_SVC_LOG_LEVEL": "WARNING", **({"LLAMA_SVC_JOBS_DB": jobs_db} if jobs_db else {})}
    print(f"jobs database: {backend}")
    with LocalStack(tmp / f"stack-{backend}", queues=("generate",), env=env) as stack:
        from services.client import Client

        with Client(stack.url, stack.api_key) as c:
            c.upload_checkpoint("tiny", ckpt)
        h = {"Authorization": f"Bearer {stack.api_key}"}
        with httpx.Client(base_url=stack.url, headers=h, timeout=120) as http:
            for _ in range(10):  # load the model, warm the paths
                http.put("/api", json=BODY).raise_for_status()
            rt = round_trips(http, args.n)
            print_round_trips(f"1-token PUT /api, {args.n} requests", rt)
            concurrent_vs_sequential(http, args.concurrent)
            rate = submit_jobs([http], args.jobs)
            print(f"  job submission: {rate:.0f} jobs/s ({1e3 / rate:.2f} ms each, sequential)")
            ok = statistics.median(rt["overhead"]) <= 15
            print(f"  median overhead target <= 15 ms: {'met' if ok else 'NOT met'}")
            res = {"rt": rt, "jobs_s": rate}
            res["two"] = two_gateways(stack, http, args, res)
    return res


def compare_backends(results: dict[str, dict]) -> None:
    if not {"sqlite", "postgresql"} <= results.keys():
        return
    s, p = results["sqlite"], results["postgresql"]
    print("postgresql vs sqlite:")
    print(f"  job submission {p['jobs_s']:.0f} vs {s['jobs_s']:.0f} jobs/s ({p['jobs_s'] / s['jobs_s']:.2f}x); "
          f"two gateways {p['two']['jobs_s']:.0f} vs {s['two']['jobs_s']:.0f} jobs/s "
          f"({p['two']['jobs_s'] / s['two']['jobs_s']:.2f}x)")
    for name in ("round trip", "overhead"):
        a, b = statistics.median(p["rt"][name]), statistics.median(s["rt"][name])
        print(f"  1-token {name} median {a:.2f} vs {b:.2f} ms ({a / b:.2f}x)")


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.5).close() is None, "moto")
    except RuntimeError:
        proc.kill()
        raise
    return proc, f"127.0.0.1:{port}"


def make_big_checkpoint(out: Path, gib: float) -> None:
    """The tiny HF checkpoint plus ``gib`` GiB of random bytes in extra/blob-N.bin (at most 512 MiB each)."""
    from shared.samples import make_hf_checkpoint

    make_hf_checkpoint(out)
    (out / "extra").mkdir()
    left, i, chunk = int(gib * GIB), 0, 64 << 20
    while left > 0:
        n = min(left, 512 << 20)
        with open(out / "extra" / f"blob-{i}.bin", "wb") as f:
            for off in range(0, n, chunk):
                f.write(os.urandom(min(chunk, n - off)))
        left, i = left - n, i + 1


class Sampler:
    """Every 50 ms: the gateway's RSS, the convert worker's (with its job children) and the size of
    the gateway's spool directories (data_dir/upload-*); keeps the peaks."""

    def __init__(self, stack: LocalStack):
        self.gw = psutil.Process(stack.procs["gateway"].pid)
        self.worker = psutil.Process(stack.procs["worker-convert"].pid)
        self.data_dir = stack.data_dir
        self.peak = {"gateway": 0, "worker": 0, "spool": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self, p: psutil.Process) -> int:
        rss = p.memory_info().rss
        for child in p.children(recursive=True):
            try:
                rss += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return rss

    def _spool(self) -> int:
        total = 0
        for d in self.data_dir.glob("upload-*"):
            for dirpath, _, names in os.walk(d):
                for n in names:
                    try:
                        total += os.stat(os.path.join(dirpath, n)).st_size
                    except OSError:
                        pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            now = {"gateway": self.gw.memory_info().rss, "worker": self._tree_rss(self.worker), "spool": self._spool()}
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def __enter__(self) -> "Sampler":
        self.start_rss, self.start_wchar = self.gw.memory_info().rss, self.gw.io_counters().write_chars
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.written = self.gw.io_counters().write_chars - self.start_wchar


def timed_upload(stack: LocalStack, name: str, ckpt: Path, direct: bool) -> dict:
    from services.client import Client

    received = [0]

    def count(request: httpx.Request) -> None:
        received[0] += int(request.headers.get("content-length", 0))

    with Client(stack.url, stack.api_key, timeout=600) as c:
        c.http.event_hooks["request"] = [count]
        with Sampler(stack) as s:
            t = time.perf_counter()
            c.upload_checkpoint(name, ckpt, direct=direct)
            wall = time.perf_counter() - t
    return {"wall": wall, "peak": s.peak, "start_rss": s.start_rss, "written": s.written, "received": received[0]}


def bench_upload(tmp: Path, args) -> None:
    make_big_checkpoint(tmp / "big", args.upload_gb)
    moto, addr = start_moto()
    try:
        url = f"s3://testing:testing@{addr}/bench?secure=false&region=us-east-1&part_size={64 << 20}"
        env = {"LLAMA_SVC_TORCH_THREADS": "1", "LLAMA_SVC_LOG_LEVEL": "WARNING"}
        with LocalStack(tmp / "stack-s3", queues=("convert",), storage_url=url, env=env) as stack:
            res = {"gateway": timed_upload(stack, "big-gw", tmp / "big", direct=False),
                   "direct": timed_upload(stack, "big-direct", tmp / "big", direct=True)}
    finally:
        moto.terminate()
        moto.wait(30)
    total = sum(p.stat().st_size for p in (tmp / "big").rglob("*") if p.is_file())
    print(f"checkpoint upload, {size(total)} (tiny HF checkpoint + random extra files), S3 store (moto):")
    for how, r in res.items():
        gw = r["peak"]["gateway"]
        print(f"  {how:<8} {r['wall']:6.1f} s ({total / (1 << 20) / r['wall']:.0f} MiB/s); gateway peak RSS "
              f"{size(gw)} (+{size(gw - r['start_rss'])}), received {size(r['received'])} of request bodies, "
              f"wrote {size(r['written'])} to disk (upload-* dirs peak {size(r['peak']['spool'])}); "
              f"convert worker peak RSS {size(r['peak']['worker'])}")
    g, d = res["gateway"], res["direct"]
    print(f"  direct vs gateway: wall time {d['wall'] / g['wall']:.2f}x, gateway peak RSS "
          f"{d['peak']['gateway'] / g['peak']['gateway']:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="generation round trips")
    ap.add_argument("--jobs", type=int, default=200, help="job submissions")
    ap.add_argument("--concurrent", type=int, default=8, help="requests sent at once")
    ap.add_argument("--backends", default="sqlite,postgresql", help="jobs databases, comma-separated")
    ap.add_argument("--upload-gb", type=float, default=2.0, help="GiB of extra files in the uploaded checkpoint")
    ap.add_argument("--skip-upload", action="store_true", help="skip the checkpoint-upload comparison")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - {"sqlite", "postgresql"}:
        ap.error(f"unknown backends {sorted(unknown)}; choose from sqlite, postgresql")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from shared.samples import make_hf_checkpoint

    pg = None
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        try:
            ckpt = make_hf_checkpoint(Path(tmp) / "tiny")
            results = {}
            for backend in backends:
                db = None
                if backend == "postgresql":
                    from services.postgres import PostgresServer

                    pg = pg or PostgresServer().start()
                    db = pg.new_database()
                results[backend] = bench_backend(backend, db, ckpt, Path(tmp), args)
            compare_backends(results)
            if not args.skip_upload:
                bench_upload(Path(tmp), args)
        finally:
            if pg is not None:
                pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
