"""LoRA over TP/PP: same curve at every layout, only adapters change, merged exports equal the adapter model."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from shared.checkpoint.layout import Layout
from shared.checkpoint.native import load_rank_state_dict
from shared.parallel.dims import ParallelDims
from tests.training import dist_fns
from tests.training.test_train import run

LORA = dict(finetune_method="lora", lora_rank=4, lora_alpha=8.0, lr=2e-2, min_lr=2e-3, train_iters=8,
            lora_targets=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))


@pytest.fixture(scope="module")
def lora_runs(assets, dist_pool, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    single = run(assets, dist_pool, tmp, "tp1", **LORA)
    sharded = run(assets, dist_pool, tmp, "tp2pp2", tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                  export_hf=True, **LORA)
    return tmp, single, sharded


def test_lora_curve_is_the_same_at_tp2_pp2(lora_runs):
    _, (single, _), (sharded, summary) = lora_runs
    assert summary["trainable_parameters"] > 0
    assert single[-1] < single[0] - 0.05, single
    assert max(abs(a - b) for a, b in zip(single, sharded)) < 1e-4, (single, sharded)


def test_lora_changes_only_adapter_weights(assets, lora_runs):
    tmp, _, (_, summary) = lora_runs
    last = tmp / "tp2pp2" / "iter_0000008"
    layout = Layout(2, 2)
    for t, p in layout.ranks():
        before = load_rank_state_dict(assets.native, t, p, target=layout)
        after = load_rank_state_dict(last, t, p)
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), f"base weight {k} changed on tp{t} pp{p}"
        with safe_open(str(last / "training" / f"optim_tp{t}_pp{p}.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert keys and all(".lora_" in k for k in keys), keys[:5]
        with safe_open(str(last / "training" / f"adapter_tp{t}_pp{p}.safetensors"), "pt") as f:
            bs = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_B")]
        assert len(bs) == 2 * 4 and all(b.abs().max() > 0 for b in bs)  # 2 layers x 4 targets per stage


def test_merged_exports_give_the_adapter_model_outputs(assets, dist_pool, lora_runs):
    from transformers import AutoModelForCausalLM

    tmp, _, (_, summary) = lora_runs
    torch.manual_seed(0)
    ids = torch.randint(0, assets.cfg.vocab_size, (2, 24))
    lora = {"targets": LORA["lora_targets"], "rank": 4, "alpha": 8.0, "seed": 5}
    out = dist_pool.run(ParallelDims(2, 2), dist_fns.adapter_and_merged_logits, str(assets.native),
                        str(tmp / "tp2pp2"), lora, ids)
    base, adapted, merged = next(o for o in out if o is not None)
    assert (adapted - base).abs().max() > 1e-2  # the adapters do something
    assert (merged - adapted).abs().max() < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(summary["hf"]).eval()
    with torch.no_grad():
        assert (hf(ids).logits - adapted).abs().max() < 1e-4
