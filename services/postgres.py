"""A throw-away PostgreSQL server for the tests and benchmarks (Debian's ``postgresql`` package).

``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` system user on a
temporary data directory it owns; it listens on 127.0.0.1 at a free port, with its unix socket in
that directory, trusts local connections, and skips fsync (nothing here must survive a crash).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from services.stack import free_port

USER = "postgres"


def bin_dir() -> Path:
    """The newest installed /usr/lib/postgresql/<version>/bin, else the directory of ``initdb`` on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (make setup does)")
    return Path(initdb).parent


class PostgresServer:
    def __init__(self):
        self.bin = bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="llama-svc-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", USER, "--", *cmd] if os.geteuid() == 0 else cmd

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            shutil.chown(self.root, USER, USER)
        subprocess.run(self._as_owner([str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust",
                                       "-E", "UTF8", "--no-sync", "--no-instructions"]),
                       check=True, capture_output=True)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            self._as_owner([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                            "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                            "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                            "-c", "max_connections=300"]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30) -> None:
        import psycopg

        deadline = time.time() + timeout
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as e:
                if time.time() > deadline or self.proc.poll() is not None:
                    tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"postgres did not start: {e}\n{tail}") from None
                time.sleep(0.1)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"jobs_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown: disconnect clients, then exit
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
