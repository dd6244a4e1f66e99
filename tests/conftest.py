"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

from shared.parallel.launcher import ProcessGroupPool


@pytest.fixture(scope="session")
def dist_pool():
    """Four spawned gloo workers, reused by every multi-process test (spawning costs seconds).

    ``dist_pool.run(ParallelDims(tp, pp), fn, *args)`` runs ``fn(ctx, *args)`` on the layout's
    ranks. A test that breaks the pool gets it restarted for the next one.
    """
    holder = {"pool": ProcessGroupPool(4, "gloo")}

    class _Pool:
        def run(self, dims, fn, *args, **kw):
            if holder["pool"].broken:
                holder["pool"] = ProcessGroupPool(4, "gloo")
            return holder["pool"].run(dims, fn, *args, **kw)

    yield _Pool()
    holder["pool"].close()
