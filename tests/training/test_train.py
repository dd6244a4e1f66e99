"""Training runs over real gloo process groups: loss curves across layouts, resume, NaN, exports."""

from __future__ import annotations

import json

import pytest
import torch

from shared.training import Cancelled, TrainConfig, TrainingError, train


def run(assets, pool, tmp_path, name, losses=None, should_cancel=None, **kw):
    """Train; returns (per-iteration losses, summary). ``losses`` collects them even if the run raises."""
    opts = dict(load=str(assets.native), save=str(tmp_path / name), data_path=(str(assets.text),), train_iters=10,
                micro_batch_size=2, global_batch_size=4, seq_length=128, lr=2e-3, min_lr=2e-4, lr_warmup_iters=2,
                weight_decay=0.01, clip_grad=1.0, seed=5, export_hf=False)
    opts.update(kw)
    losses = [] if losses is None else losses
    summary = train(TrainConfig(**opts), progress=lambda e: e.get("phase") == "train" and losses.append(e["loss"]),
                    should_cancel=should_cancel, pool=pool)
    return losses, summary


@pytest.fixture(scope="module")
def reference(assets, dist_pool, tmp_path_factory):
    """TP1 PP1 DP1, fp32: the curve every other layout must reproduce."""
    return run(assets, dist_pool, tmp_path_factory.mktemp("ref"), "ref")


def test_loss_decreases_on_real_text(reference):
    losses, summary = reference
    assert len(losses) == 10 and summary["status"] == "completed"
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


@pytest.mark.parametrize("tp,pp,recompute", [(2, 1, False), (1, 2, False), (2, 2, True)])
def test_tp_and_pp_give_the_tp1_loss_curve(assets, dist_pool, tmp_path, reference, tp, pp, recompute):
    losses, _ = run(assets, dist_pool, tmp_path, f"tp{tp}pp{pp}", tensor_model_parallel_size=tp,
                    pipeline_model_parallel_size=pp, recompute_activations=recompute)
    diffs = [abs(a - b) for a, b in zip(losses, reference[0])]
    assert len(losses) == 10 and max(diffs) < 1e-4, diffs


def test_data_parallel_equals_single_replica_with_the_same_global_batch(assets, dist_pool, tmp_path, reference):
    losses, _ = run(assets, dist_pool, tmp_path, "dp2", world_size=2)
    assert max(abs(a - b) for a, b in zip(losses, reference[0])) < 1e-4
    # DP2 x PP2: four processes, 1F1B over one micro-batch per replica
    losses, _ = run(assets, dist_pool, tmp_path, "dp2pp2", world_size=4, pipeline_model_parallel_size=2)
    assert max(abs(a - b) for a, b in zip(losses, reference[0])) < 1e-4


def test_interrupted_and_resumed_run_gives_the_same_losses(assets, dist_pool, tmp_path):
    kw = dict(train_iters=6, tensor_model_parallel_size=2)
    full, _ = run(assets, dist_pool, tmp_path, "full", **kw)
    seen = []
    with pytest.raises(Cancelled) as info:
        run(assets, dist_pool, tmp_path, "part", losses=seen, should_cancel=lambda: len(seen) >= 3,
            metrics_file=str(tmp_path / "m.jsonl"), **kw)
    assert info.value.iteration == 3 and info.value.checkpoint.endswith("iter_0000003")
    resumed, summary = run(assets, dist_pool, tmp_path, "part", load=str(tmp_path / "part"),
                           metrics_file=str(tmp_path / "m.jsonl"), **kw)
    assert len(seen) == 3 and len(resumed) == 3
    assert seen + resumed == pytest.approx(full, abs=1e-6), (seen + resumed, full)
    logged = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in logged)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(assets, dist_pool, tmp_path):
    expect = r"non-finite loss or gradients at iteration \d+.*Last good checkpoint: .*iter_0000002"
    with pytest.raises(TrainingError, match=expect):
        run(assets, dist_pool, tmp_path, "nan", lr=1e6, min_lr=1e6, lr_warmup_iters=0, clip_grad=0.0,
            lr_decay_style="constant", save_interval=2, train_iters=40)
    latest = (tmp_path / "nan" / "latest_checkpointed_iteration.txt").read_text().strip()
    assert latest == "2" and not (tmp_path / "nan" / "release").exists()
