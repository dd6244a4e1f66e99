"""Pipeline transfers in the order NCCL needs: the rendezvous check, and 1F1B deep pipelines under it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from shared.config import ModelConfig
from shared.parallel.dims import ParallelDims
from shared.parallel.launcher import ProcessGroupPool, RemoteError
from tests.model import p2p_fns
from tests.model.families import make_hf_model
from tests.model.test_parallel_parity import _as_hf, _reference_grads

ROOT = Path(__file__).resolve().parents[2]


def test_only_the_p2p_module_calls_point_to_point():
    """Every pipeline transfer goes through shared/parallel/p2p.py, which the check covers."""
    pattern = re.compile(r"\b(dist|distributed)\.(isend|irecv|send|recv|batch_isend_irecv|P2POp)\b")
    offenders = [str(p.relative_to(ROOT)) for base in ("shared", "services", "bench") for p in (ROOT / base).rglob("*.py")
                 if p.name != "p2p.py" and pattern.search(p.read_text())]
    assert not offenders, offenders


def test_the_check_fails_sends_posted_before_receives_and_passes_paired_batches():
    pool = ProcessGroupPool(2, "gloo", p2p_check_s=3.0, timeout_s=60)
    try:
        assert pool.run(ParallelDims(tp=2), p2p_fns.swap_paired) == [1.0, 0.0]
        with pytest.raises(RemoteError, match="posted no matching receive"):
            pool.run(ParallelDims(tp=2), p2p_fns.swap_send_first)
    finally:
        pool.close(force=True)


@pytest.mark.parametrize("pp,micro", [(4, 3), (4, 6), (2, 1)])
def test_1f1b_gradients_at_depth_under_the_check(dist_pool, pp, micro):
    """Warm-up, steady state and drain, with fewer and more micro-batches than stages."""
    from shared.checkpoint.layout import Layout, hf_to_shards

    hf = make_hf_model("tied")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    torch.manual_seed(3)
    mbs = [(torch.randint(0, cfg.vocab_size, (2, 12)), torch.randint(0, cfg.vocab_size, (2, 12))) for _ in range(micro)]
    ref_loss, ref_grads = _reference_grads(cfg, hf.state_dict(), mbs)
    results = dist_pool.run(ParallelDims(1, pp), p2p_fns.one_f_one_b_grads, cfg.to_dict(), hf.state_dict(), mbs)
    assert abs(results[-1]["loss"] - ref_loss) < 1e-4
    want = hf_to_shards(_as_hf(cfg, ref_grads), cfg, Layout(1, pp))
    for r in results:
        for name, g in r["grads"].items():
            if name in ("output_layer.weight", "embedding.word_embeddings.weight"):
                continue  # the tied pair: summed by the trainer (tests/training)
            assert torch.allclose(g, want[(0, r["pp"])][name], atol=1e-5), (name, r["pp"])
