"""Point-to-point transfers between pipeline stages, in the form NCCL needs.

NCCL runs the operations a rank posts to a peer in order, and a send completes only once its
peer's matching receive runs: two neighbours that each post a send before their receive wait
for each other for ever. So every transfer here is one batch (``batch_isend_irecv``, one
NCCL group) holding all the sends and receives a rank has with its peers at that point of the
schedule; the peers post the mirror-image batch. Nothing else in the project calls
``torch.distributed``'s point-to-point functions (a test checks).

Gloo's sends return before they are matched, which hides a wrong order on CPU. The
rendezvous check (``set_rendezvous(timeout_s)``, set per process by the launcher) makes each
batch wait, before moving any data, until every peer it sends to has posted the matching
receive — NCCL's rule — and raise ``P2PDeadlock`` instead of waiting longer than the timeout.
Under it, a schedule whose batches do not pair up fails on CPU as it would hang on GPUs.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

_DATA, _READY = 0, 1  # tags: the payload, and the "my receive is posted" token of the check
_rendezvous_s: float | None = None


class P2PDeadlock(RuntimeError):
    """A send whose peer never posted the matching receive (a hang under NCCL)."""


def set_rendezvous(timeout_s: float | None) -> None:
    """Check every batch as NCCL would order it (gloo only); ``None`` turns the check off."""
    global _rendezvous_s
    _rendezvous_s = timeout_s


def rendezvous_timeout() -> float | None:
    return _rendezvous_s


def exchange(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """Send ``(tensor, peer)`` and receive into ``(buffer, peer)`` as one batch; returns the buffers."""
    sends = [(t.contiguous(), peer) for t, peer in sends]
    if not sends and not recvs:
        return []
    if _rendezvous_s is not None:
        _wait_for_receivers(sends, recvs, _rendezvous_s)
    ops = [dist.P2POp(dist.isend, t, peer, tag=_DATA) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer, tag=_DATA) for buf, peer in recvs]
    for work in dist.batch_isend_irecv(ops):
        _wait(work, "send or receive", [p for _, p in sends] + [p for _, p in recvs])
    return [buf for buf, _ in recvs]


def send(t: torch.Tensor, peer: int) -> None:
    exchange([(t, peer)], [])


def recv(shape, dtype: torch.dtype, peer: int, device: torch.device) -> torch.Tensor:
    return exchange([], [(torch.empty(shape, dtype=dtype, device=device), peer)])[0]


def _wait_for_receivers(sends, recvs, timeout_s: float) -> None:
    """Tell each peer we receive from that our receive is posted; wait until each peer we send to says so."""
    if dist.get_backend() != "gloo":
        raise ValueError("the point-to-point rendezvous check runs on gloo (CPU) process groups only")
    told = [dist.isend(torch.ones(1), peer, tag=_READY) for _, peer in recvs]
    tokens = [(torch.zeros(1), peer) for _, peer in sends]
    heard = [dist.irecv(tok, peer, tag=_READY) for tok, peer in tokens]
    for work, (_, peer) in zip(heard, tokens):
        _wait(work, f"send to rank {peer}: the peer posted no matching receive", [peer], timeout_s)
    for work in told:
        _wait(work, "receive-ready notice", [], timeout_s)


def _wait(work, what: str, peers: list[int], timeout_s: float | None = None) -> None:
    timeout_s = timeout_s if timeout_s is not None else _rendezvous_s
    if timeout_s is None:
        work.wait()
        return
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise P2PDeadlock(
            f"rank {dist.get_rank()}: {what} within {timeout_s:g} s (peers {peers}); under NCCL this order "
            "hangs: post each step's sends and receives with a peer in one batch") from e
