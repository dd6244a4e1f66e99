"""Start the TP x PP (x DP) processes ourselves, so nobody hand-writes torchrun lines.

``ProcessGroupPool`` keeps ``world_size`` spawned workers alive with one default process
group; each ``run(dims, fn, *args)`` builds (once, then cached) the TP/PP/DP groups of
``dims`` on the first ``dims.world_size`` workers and calls ``fn(ctx, *args)`` on each of them.
A model can therefore be loaded once and serve many calls (state kept in ``process_state()``).

On CUDA (NCCL) rank r runs on ``devices[r]`` of the pool's explicit device list
(``shared.parallel.devices``); a pool larger than its list is refused before anything starts.
``p2p_check_s`` turns on the point-to-point rendezvous check of ``shared.parallel.p2p`` in
every rank (gloo), for tests that must fail where NCCL would hang.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.parallel import p2p
from shared.parallel.devices import DeviceError, assign_devices, visible_devices
from shared.parallel.dims import ParallelDims
from shared.parallel.state import ParallelContext, build_groups

_STATE: dict[str, Any] = {}


class RemoteError(RuntimeError):
    """A worker raised; the message carries its rank and traceback."""


def process_state() -> dict[str, Any]:
    """A per-process dict that outlives single calls (e.g. a loaded model)."""
    return _STATE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _worker(rank: int, world: int, backend: str, port: int, inbox, outbox, threads: int, timeout_s: float,
            device_index: int | None, p2p_check_s: float | None) -> None:
    torch.set_num_threads(threads)
    p2p.set_rendezvous(p2p_check_s)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device_index)
        device = torch.device("cuda", device_index)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None)
    # one collective over every rank first: NCCL then never meets a batched p2p as a group's first call
    dist.all_reduce(torch.zeros(1, device=device))
    contexts: dict[ParallelDims, ParallelContext | None] = {}
    outbox.put((rank, True, "ready"))
    parent = os.getppid()
    while True:
        try:
            msg = inbox.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:  # the owner died (e.g. SIGKILL): do not linger as an orphan
                os._exit(1)
            continue
        if msg is None:
            break
        dims, fn, args = msg
        try:
            if dims not in contexts:
                contexts[dims] = build_groups(dims, rank, device, list(range(dims.world_size)))
            ctx = contexts[dims]
            result = fn(ctx, *args) if ctx is not None else None
            outbox.put((rank, True, result))
        except BaseException:  # noqa: BLE001 - reported to the caller with the traceback
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class ProcessGroupPool:
    def __init__(self, world_size: int, backend: str | None = None, threads: int = 1, timeout_s: float = 300.0,
                 devices=None, p2p_check_s: float | None = None):
        """``devices``: the CUDA ordinals this pool may use (default: every visible one); rank r
        runs on the r-th. Ignored by gloo (CPU)."""
        self.world_size = world_size
        self.backend = backend or default_backend()
        self.timeout_s = timeout_s
        if self.backend == "nccl":
            chosen = assign_devices(world_size, visible_devices() if devices is None else devices,
                                    f"a process group of {world_size} ranks")
            if p2p_check_s is not None:
                raise DeviceError("the point-to-point check runs on gloo; start the pool with backend='gloo'")
        else:
            chosen = (None,) * world_size
        self.devices = tuple(d for d in chosen if d is not None)
        ctx = mp.get_context("spawn")
        port = free_port()
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        self._outbox = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, world_size, self.backend, port, self._inboxes[r], self._outbox,
                                         threads, timeout_s, chosen[r], p2p_check_s))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self.broken = False
        self._collect(timeout_s)

    def _collect(self, timeout_s: float | None) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        errors = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for _ in range(self.world_size):
            while True:  # poll, so a dead worker is noticed at once rather than at the timeout
                try:
                    rank, ok, value = self._outbox.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                    late = deadline is not None and time.monotonic() > deadline
                    if dead or late:
                        self.broken = True
                        self.close(force=True)
                        why = f"ranks {dead} died" if dead else f"workers did not answer within {timeout_s} s"
                        raise RemoteError(f"the process group failed: {why}") from None
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            # a rank that failed may have left its peers blocked in a collective
            self.broken = True
            self.close(force=True)
            raise RemoteError("\n".join(errors))
        return results

    def run(self, dims: ParallelDims, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> list[Any]:
        """Call ``fn(ctx, *args)`` on the ranks of ``dims``; results indexed by rank (None beyond)."""
        if self.broken:
            raise RemoteError("this pool is closed after an earlier failure; start a new one")
        if dims.world_size > self.world_size:
            raise ValueError(f"layout needs {dims.world_size} processes; this pool has {self.world_size}")
        for box in self._inboxes:
            box.put((dims, fn, args))
        return self._collect(timeout_s or self.timeout_s)[: dims.world_size]

    def close(self, force: bool = False) -> None:
        if not force and not self.broken:
            for box in self._inboxes:
                box.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.broken = True

    def __enter__(self) -> "ProcessGroupPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def launch(dims: ParallelDims, fn: Callable[..., Any], *args: Any, backend: str | None = None,
           timeout_s: float = 600.0, devices=None) -> list[Any]:
    """One-shot: start ``dims.world_size`` processes, run ``fn(ctx, *args)`` on each, shut down."""
    with ProcessGroupPool(dims.world_size, backend, timeout_s=timeout_s, devices=devices) as pool:
        return pool.run(dims, fn, *args)


os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
