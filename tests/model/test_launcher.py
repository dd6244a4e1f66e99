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
