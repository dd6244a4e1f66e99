"""Devices as configuration: explicit lists per pool, refusals that name both numbers, disjoint workers."""

from __future__ import annotations

import pytest

from shared.parallel.devices import (DeviceAllocator, DeviceError, assign_devices, check_disjoint,
                                     configured_devices, dry_run, parse_devices)
from shared.parallel.launcher import ProcessGroupPool


def test_device_lists_from_the_worker_setting():
    assert parse_devices("0, 2,3") == (0, 2, 3) and parse_devices("") == ()
    assert configured_devices({"LLAMA_SVC_DEVICES": "1,3"}) == (1, 3)
    with pytest.raises(DeviceError, match="twice"):
        parse_devices("1,1")
    with pytest.raises(DeviceError, match="not a CUDA device"):
        parse_devices("gpu0")


def test_a_world_larger_than_its_devices_is_refused_naming_both_numbers():
    assert assign_devices(2, (4, 5, 6)) == (4, 5)
    with pytest.raises(DeviceError, match=r"needs 4 GPUs .* has 2 \(\[0, 1\]\)"):
        assign_devices(4, (0, 1))
    # before any process starts, and never by wrapping ranks around onto a GPU twice
    with pytest.raises(DeviceError, match="needs 3 GPUs"):
        ProcessGroupPool(3, backend="nccl", devices=[0, 1])


def test_engines_in_one_worker_spread_over_its_devices():
    alloc = DeviceAllocator((0, 1))
    a, b = alloc.claim(1), alloc.claim(1)
    assert {a, b} == {(0,), (1,)}
    alloc.release(a)
    assert alloc.claim(1) == a
    with pytest.raises(DeviceError, match="needs 3 GPUs"):
        alloc.claim(3)


def test_workers_on_one_node_get_disjoint_devices():
    check_disjoint({"train": (0, 1), "generate": (2,)})
    with pytest.raises(DeviceError, match="GPU 1 is given to both train and generate"):
        check_disjoint({"train": (0, 1), "generate": (1,)})
    out = dry_run(4, {"train": "0,1,2", "generate": "3"}, {"train": [2, 3, 4], "generate": [1, 2]})
    assert out["disjoint"]
    assert out["workers"]["train"]["pools"]["2"] == {"local": [0, 1], "physical": [0, 1]}
    assert "needs 4 GPUs" in out["workers"]["train"]["pools"]["4"]["refused"]
    assert "needs 2 GPUs" in out["workers"]["generate"]["pools"]["2"]["refused"]
    assert not dry_run(2, {"train": "0,1", "generate": "1"}, {})["disjoint"]
