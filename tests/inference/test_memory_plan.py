"""Memory planned before allocation: the KV cache against free GPU memory, a training plan against its GPUs."""

from __future__ import annotations

import pytest
import torch

from shared.config import ModelConfig
from shared.inference.memory import GiB, MemoryPlanError, explain, kv_bytes_per_row, plan_cache
from shared.parallel.dims import ParallelDims
from shared.specs.train import ConfigError, TrainConfig
from shared.training.memory import check_fits, estimate, stage_parameters, worst_rank

LLAMA3_8B = ModelConfig.from_hf(dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False))
H200 = (140 * GiB, 141 * GiB)


def test_kv_cache_of_a_long_context_is_refused_or_shrunk_before_allocation():
    dims, bf16 = ParallelDims(), torch.bfloat16
    assert kv_bytes_per_row(LLAMA3_8B, dims, 131072, bf16) == 16 * GiB  # the 137 GB for 8 rows
    free = H200[0] - 16 * GiB  # after the weights
    plan = plan_cache(LLAMA3_8B, dims, 8, 131072, 512, bf16, free, H200[1])
    assert 0 < plan.rows < 8  # a smaller max batch, not an out-of-memory crash
    assert plan_cache(LLAMA3_8B, dims, 8, 8192, 512, bf16, free, H200[1]).rows == 8
    tight = plan_cache(LLAMA3_8B, dims, 8, 131072, 512, bf16, 10 * GiB, H200[1])
    assert tight.rows == 0
    msg = explain(tight, LLAMA3_8B, dims, 131072, "cuda:0")
    assert "16.00 GiB" in msg and "--max-seq-len" in msg and "tokens fit one sequence" in msg
    # TP and PP each shrink a rank's share of the cache
    assert kv_bytes_per_row(LLAMA3_8B, ParallelDims(tp=2, pp=2), 131072, bf16) == 4 * GiB
    assert issubclass(MemoryPlanError, RuntimeError)


def _plan(**kw):
    opts = dict(load="x", save="y", data_path=("d",), train_iters=1, micro_batch_size=1, global_batch_size=8,
                seq_length=2048, bf16=True)
    opts.update(kw)
    return TrainConfig(**opts)


def test_full_8b_finetune_on_one_gpu_is_refused_with_layouts_that_fit():
    need = estimate(LLAMA3_8B, _plan(), 0)
    params = stage_parameters(LLAMA3_8B, 1, 1, 0)
    assert abs(params - LLAMA3_8B.num_parameters()) / params < 1e-3
    assert need.weights == 2 * params and need.master == 4 * params and need.optimizer == 8 * params
    assert need.total > H200[0]
    with pytest.raises(ConfigError) as info:
        check_fits(LLAMA3_8B, _plan(), [H200])
    msg = str(info.value)
    assert "GiB per GPU on rank 0" in msg and "140.0 GiB free" in msg
    assert "TP=2" in msg and "--finetune-method lora" in msg
    assert check_fits(LLAMA3_8B, _plan(finetune_method="lora"), [H200]).total < H200[0]
    tp2 = _plan(tensor_model_parallel_size=2, world_size=2)
    assert worst_rank(LLAMA3_8B, tp2).total < H200[0]
    assert check_fits(LLAMA3_8B, tp2, [H200, H200]) is not None
    assert check_fits(LLAMA3_8B, _plan(), [None]) is None  # CPU ranks: nothing to check


def test_estimates_follow_pipeline_position_and_recompute():
    c = _plan(pipeline_model_parallel_size=4, world_size=4, global_batch_size=16)
    first, last = estimate(LLAMA3_8B, c, 0), estimate(LLAMA3_8B, c, 3)
    assert first.activations > last.activations - 128256 * 2048 * 10  # 1F1B keeps more micro-batches early
    assert estimate(LLAMA3_8B, _plan(recompute_activations=True), 0).activations < \
        estimate(LLAMA3_8B, _plan(), 0).activations / 4
