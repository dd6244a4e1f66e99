"""The local stack: Redis (unless REDIS_URL is given), local-directory storage, the gateway and
one Celery worker per queue, as child processes.

    python -m services.stack [--port 8000] [--data-dir DIR]    # foreground, Ctrl-C to stop

``LocalStack`` is the same thing as a context manager (used by the demo, tests and bench).
With ``restart_workers=True`` (``make serve``, the demo) a monitor thread restarts a worker
that exits on its own or is killed from outside (the OOM killer, ``kill``); the stack's own
``kill``/``stop`` are deliberate and never undone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
QUEUES = ("convert", "train", "generate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalStack:
    def __init__(self, data_dir: Path | str | None = None, *, port: int = 0, redis_url: str | None = None,
                 storage_url: str | None = None, api_keys: dict[str, str] | None = None,
                 queues: tuple[str, ...] = QUEUES, env: dict[str, str] | None = None, quiet: bool = True,
                 restart_workers: bool = False, worker_heartbeat: bool = False):
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="llama-svc-")
        self.data_dir = Path(data_dir or self._tmp).resolve()
        self.port = port or free_port()
        self.redis_url = redis_url or os.environ.get("REDIS_URL")
        self.storage_url = storage_url
        self.api_keys = api_keys or {"local-dev-key": "local"}
        self.queues, self.extra_env, self.quiet = queues, env or {}, quiet
        self.procs: dict[str, subprocess.Popen] = {}
        self._redis_port: int | None = None
        self.logs = self.data_dir / "logs"
        self.restart_workers, self.restarts = restart_workers, 0
        # workers send Celery's worker-heartbeat events (what an event monitor such as Flower sees)
        self.worker_heartbeat = worker_heartbeat
        self._cmds: dict[str, list[str]] = {}
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        return next(iter(self.api_keys))

    # ---- lifecycle
    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        env = {**os.environ, "LLAMA_SVC_DATA_DIR": str(self.data_dir), "LLAMA_SVC_REDIS_URL": self.redis_url,
               "LLAMA_SVC_API_KEYS": json.dumps({hashlib.sha256(k.encode()).hexdigest(): t
                                                 for k, t in self.api_keys.items()}),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1"}
        if self.storage_url:
            env["LLAMA_SVC_STORAGE_URL"] = self.storage_url
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if not self.redis_url:
            self._redis_port = free_port()
            self.redis_url = f"redis://127.0.0.1:{self._redis_port}/0"
            self.start_redis()
        self._spawn("gateway", [sys.executable, "-m", "uvicorn", "gateway.app:app", "--host", "127.0.0.1",
                                "--port", str(self.port), "--log-level", "warning", "--no-access-log"])
        for q in self.queues:
            self.start_worker(q)
        self.wait_ready()
        if self.restart_workers:
            self._monitor = threading.Thread(target=self._watch_workers, daemon=True, name="stack-monitor")
            self._monitor.start()

    def start_redis(self) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed; install it (apt-get install redis-server) "
                               "or set REDIS_URL to a running Redis")
        rdir = self.data_dir / "redis"
        rdir.mkdir(exist_ok=True)
        self._spawn("redis", ["redis-server", "--port", str(self._redis_port), "--bind", "127.0.0.1",
                              "--dir", str(rdir), "--appendonly", "yes", "--save", "",
                              "--maxmemory-policy", "noeviction"])
        self._wait(lambda: socket.create_connection(("127.0.0.1", self._redis_port), timeout=0.5).close(),
                   "redis", 15)

    def stop_redis(self, sig: int = signal.SIGKILL) -> None:
        self._stop("redis", sig)

    def start_worker(self, queue: str, name: str | None = None) -> None:
        name = name or f"worker-{queue}"
        self._spawn(name, [sys.executable, "-m", "celery", "-A", "services.worker", "worker", "-Q", queue,
                           "--pool", "solo", "-n", f"{name}-{os.getpid()}@%h", "--without-gossip",
                           "--without-mingle", *(() if self.worker_heartbeat else ("--without-heartbeat",)),
                           "--loglevel", "INFO"])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._stop(name, sig, grace=0)

    def stop(self) -> None:
        self._closing.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        for name in [n for n in self.procs if n.startswith("worker")]:
            self._stop(name, signal.SIGTERM)
        for name in ("gateway", "redis"):
            self._stop(name, signal.SIGTERM)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _watch_workers(self, poll_s: float = 0.5) -> None:
        """Restart workers that exited without the stack stopping them (backing off if they crash-loop)."""
        backoff: dict[str, tuple[float, float]] = {}  # name -> (last restart, delay before the next)
        while not self._closing.wait(poll_s):
            with self._lock:
                for name, p in list(self.procs.items()):
                    if not name.startswith("worker") or p.poll() is None or self._closing.is_set():
                        continue
                    started, delay = backoff.get(name, (0.0, 0.5))
                    now = time.time()
                    delay = 0.5 if now - started > 60 else delay  # it ran a while: not a crash loop
                    if now - started < delay:
                        continue
                    self._note(name, f"exited with {p.returncode}; restarting it")
                    self._spawn(name, self._cmds[name])
                    self.restarts += 1
                    backoff[name] = (now, min(delay * 2, 30.0))

    def _note(self, name: str, what: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} stack: {name} {what}\n"
        with open(self.logs / f"{name}.log", "a") as f:
            f.write(line)
        if not self.quiet:
            print(line, end="", file=sys.stderr, flush=True)

    # ---- helpers
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")
        with self._lock:
            self._cmds[name] = cmd
            self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _stop(self, name: str, sig: int, grace: float = 10.0) -> None:
        with self._lock:  # once popped, the monitor no longer sees it: a deliberate stop is never undone
            p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
            p.wait(timeout=grace or 5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            pass

    def _wait(self, probe, what: str, timeout: float) -> None:
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            for n, p in list(self.procs.items()):
                if p.poll() is not None and not (self._monitor and n.startswith("worker")):
                    raise RuntimeError(f"{n} exited with {p.returncode}; see {self.logs / (n + '.log')}")
            try:
                probe()
                return
            except Exception as e:
                last = e
                time.sleep(0.1)
        raise TimeoutError(f"{what} not ready after {timeout}s ({last}); logs in {self.logs}")

    def ready(self) -> dict:
        return httpx.get(self.url + "/ready", timeout=5).json()

    def wait_ready(self, timeout: float = 90) -> None:
        def probe():
            r = httpx.get(self.url + "/ready", timeout=5)
            body = r.json()
            missing = [q for q in self.queues if body["workers"].get(q, 0) < 1]
            if r.status_code != 200 or missing:
                raise RuntimeError(f"not ready: {body['checks']}, no worker yet for {missing}")

        self._wait(probe, "the stack", timeout)

    def log_tail(self, n: int = 40) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"==> {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "stack")
    args = ap.parse_args()
    with LocalStack(args.data_dir, port=args.port, quiet=False, restart_workers=True) as stack:
        print(f"gateway  {stack.url}  (OpenAPI docs at {stack.url}/docs)")
        print(f"API key  {stack.api_key}  (team 'local')")
        print(f"redis    {stack.redis_url}\ndata     {stack.data_dir}\nlogs     {stack.logs}")
        print(f"try:     curl -H 'Authorization: Bearer {stack.api_key}' {stack.url}/v1/jobs")
        print("Ctrl-C to stop", flush=True)
        try:
            while all(p.poll() is None for n, p in list(stack.procs.items()) if not n.startswith("worker")):
                time.sleep(1)
            print("a component exited; stopping (see logs)", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
