from __future__ import annotations

import pytest

from shared.parallel.dims import ParallelDims
from shared.parallel.launcher import RemoteError
from tests.model import dist_fns


def test_groups_follow_megatron_rank_order(dist_pool):
    out = dist_pool.run(ParallelDims(tp=2, pp=2), dist_fns.coords)
    assert out == [(0, 0, 0, 0, None, 2), (1, 1, 0, 0, None, 3), (2, 0, 1, 0, 0, None), (3, 1, 1, 0, 1, None)]
    # the TP group of ranks {0,1} and of {2,3}
    assert dist_pool.run(ParallelDims(tp=2, pp=2), dist_fns.all_reduce_tp) == [1.0, 1.0, 5.0, 5.0]


def test_data_parallel_groups(dist_pool):
    out = dist_pool.run(ParallelDims(tp=2, dp=2), dist_fns.coords)
    assert [o[3] for o in out] == [0, 0, 1, 1]


def test_a_failing_rank_reports_its_traceback_and_the_pool_recovers(dist_pool):
    with pytest.raises(RemoteError, match="rank 1:(.|\n)*boom on rank one"):
        dist_pool.run(ParallelDims(tp=2), dist_fns.fail_on_rank_one)
    assert dist_pool.run(ParallelDims(tp=2), dist_fns.coords)[0][0] == 0


def test_layout_larger_than_pool_is_refused(dist_pool):
    with pytest.raises(ValueError, match="needs 8 processes; this pool has 4"):
        dist_pool.run(ParallelDims(tp=2, pp=4), dist_fns.coords)


def test_a_dead_rank_is_noticed_without_waiting_for_the_timeout(dist_pool):
    import time

    t = time.monotonic()
    with pytest.raises(RemoteError, match=r"ranks \[1\] died"):
        dist_pool.run(ParallelDims(tp=2), dist_fns.die_on_rank_one)
    assert time.monotonic() - t < 60
    assert dist_pool.run(ParallelDims(tp=2), dist_fns.coords)[1][0] == 1


def test_ranks_exit_when_their_owner_is_killed(tmp_path):
    """A SIGKILLed owner (e.g. a worker) must not leave its rank processes behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    code = ("import os, sys, time\n"
            "from shared.parallel.launcher import ProcessGroupPool\n"
            "pool = ProcessGroupPool(2)\n"
            "open(sys.argv[1], 'w').write(' '.join(str(p.pid) for p in pool._procs))\n"
            "time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", code, str(pids)])
    deadline = time.monotonic() + 120
    while not (pids.exists() and pids.read_text()):
        assert time.monotonic() < deadline and owner.poll() is None
        time.sleep(0.2)
    ranks = [int(p) for p in pids.read_text().split()]
    owner.send_signal(signal.SIGKILL)
    owner.wait()

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"

    deadline = time.monotonic() + 30
    while any(alive(p) for p in ranks):
        assert time.monotonic() < deadline, "rank processes outlived their owner"
        time.sleep(0.5)
