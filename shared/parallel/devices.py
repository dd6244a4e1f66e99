"""Which GPU each rank uses: an explicit device list per pool, never ``rank % device_count``.

A worker is configured with its devices: ``LLAMA_SVC_DEVICES`` (CUDA ordinals as the process
numbers them, e.g. ``0,1``), by default every device the process can see, which
``CUDA_VISIBLE_DEVICES`` or a container's GPU reservation already narrows. A pool of W ranks
takes W distinct devices of its list, one per rank: more ranks than devices is refused, since
NCCL cannot put two ranks of one communicator on one GPU ("Duplicate GPU detected"). Engines
that run in the worker's own process take a device from the worker's ``DeviceAllocator``
(the least used), so several served models spread over the worker's GPUs.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Mapping, Sequence

DEVICES_ENV = "LLAMA_SVC_DEVICES"


class DeviceError(ValueError):
    """A device list that cannot hold a layout; the message names both numbers."""


def parse_devices(text: str) -> tuple[int, ...]:
    """``"0,1, 3"`` -> (0, 1, 3); an empty string is no devices."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise DeviceError(f"device list {text!r}: {part!r} is not a CUDA device number")
        out.append(int(part))
    if len(set(out)) != len(out):
        raise DeviceError(f"device list {text!r} names a device twice")
    return tuple(out)


def visible_devices() -> tuple[int, ...]:
    """Every CUDA device this process sees (none without CUDA)."""
    import torch

    return tuple(range(torch.cuda.device_count())) if torch.cuda.is_available() else ()


def configured_devices(env: Mapping[str, str] = os.environ) -> tuple[int, ...]:
    """The worker's devices: ``LLAMA_SVC_DEVICES`` when set, else every visible device."""
    text = env.get(DEVICES_ENV)
    return parse_devices(text) if text is not None and text.strip() else visible_devices()


def assign_devices(world: int, devices: Sequence[int], who: str = "this process group") -> tuple[int, ...]:
    """One distinct device per rank, rank r on ``devices[r]``; refuses a world larger than the list."""
    devices = tuple(int(d) for d in devices)
    if len(set(devices)) != len(devices):
        raise DeviceError(f"{who} was given devices {list(devices)}, which name a GPU twice")
    if world > len(devices):
        raise DeviceError(
            f"{who} needs {world} GPUs (one per rank: NCCL cannot share a GPU between ranks) but has "
            f"{len(devices)} ({list(devices)}); use a layout of at most {len(devices)} ranks or give it more "
            f"devices ({DEVICES_ENV} / CUDA_VISIBLE_DEVICES)")
    return devices[:world]


class DeviceAllocator:
    """Hands a worker's devices to the engines it hosts: each claim takes the least used ones."""

    def __init__(self, devices: Sequence[int]):
        self.devices = tuple(devices)
        self._use: Counter[int] = Counter({d: 0 for d in self.devices})
        self._lock = threading.Lock()

    def claim(self, n: int, who: str = "this model") -> tuple[int, ...]:
        with self._lock:
            ranked = sorted(self.devices, key=lambda d: (self._use[d], self.devices.index(d)))
            chosen = assign_devices(n, ranked, who)
            self._use.update(chosen)
            return chosen

    def release(self, devices: Sequence[int]) -> None:
        with self._lock:
            for d in devices:
                if self._use[d] > 0:
                    self._use[d] -= 1


def check_disjoint(pools: Mapping[str, Sequence[int]]) -> None:
    """Workers sharing a node must not share GPUs: refuse two pools naming the same device."""
    owner: dict[int, str] = {}
    for name, devices in pools.items():
        for d in devices:
            if d in owner:
                raise DeviceError(f"GPU {d} is given to both {owner[d]} and {name}; give each worker its own GPUs")
            owner[d] = name


def dry_run(node_gpus: int, workers: Mapping[str, str], layouts: Mapping[str, Sequence[int]]) -> dict:
    """What each worker's pools would get on a node of ``node_gpus`` GPUs, without touching one.

    ``workers``: worker name -> its device list (physical GPU numbers, as a compose reservation
    names them); ``layouts``: worker name -> the world sizes to place. Inside a worker the
    devices are renumbered 0.. (as the container runtime does), so its pools use local ordinals.
    """
    physical = {name: parse_devices(text) for name, text in workers.items()}
    out: dict = {"node_gpus": node_gpus, "workers": {}}
    try:
        check_disjoint(physical)
        beyond = sorted(d for ds in physical.values() for d in ds if d >= node_gpus)
        if beyond:
            raise DeviceError(f"GPUs {beyond} do not exist on a node of {node_gpus}")
        out["disjoint"] = True
    except DeviceError as e:
        out["disjoint"], out["error"] = False, str(e)
    for name, devs in physical.items():
        local = tuple(range(len(devs)))
        placed = {}
        for world in layouts.get(name, ()):
            try:
                placed[str(world)] = {"local": list(assign_devices(world, local, f"a {world}-rank pool of {name}")),
                                      "physical": list(devs[:world])}
            except DeviceError as e:
                placed[str(world)] = {"refused": str(e)}
        out["workers"][name] = {"physical": list(devs), "pools": placed}
    return out
