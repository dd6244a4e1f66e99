"""Megatron-LM's torch layout: loads strictly into megatron-core's GPTModel and gives HF's logits."""

from __future__ import annotations

import argparse
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from shared.checkpoint import megatron_lm
from shared.checkpoint.errors import CheckpointError
from tests.checkpoint.helpers import PROMPT_IDS, assert_bit_identical, hf_logits, hf_tensors, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mcore_logits(ckpt, tp: int, tmp_path) -> dict:
    from tests.checkpoint.mcore_oracle import run_rank

    out = tmp_path / f"mcore-tp{tp}.pt"
    mp.start_processes(run_rank, args=(tp, _free_port(), str(ckpt), PROMPT_IDS.tolist(), str(out)), nprocs=tp,
                       join=True, start_method="spawn")
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("family,tp", [("llama3", 1), ("tied", 2), ("qkv_bias", 2)])
def test_megatron_core_loads_torch_layout(make_hf_checkpoint, tmp_path, family, tp):
    src = make_hf_checkpoint(family)
    ckpt = tmp_path / "megatron"
    summary = run(src, ckpt, saver="megatron", ckpt_format="torch", target_tp=tp)
    assert summary["parity"]["passed"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "1"
    rank0 = ckpt / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = megatron_lm.load_rank(ckpt, 0, 0)
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 1 and rank0.exists()
    args = state["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.tensor_model_parallel_size, args.normalization, args.swiglu, args.position_embedding_type) == (
        tp, "RMSNorm", True, "rope")
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in state["model"]

    result = mcore_logits(ckpt, tp, tmp_path)  # strict load happens inside
    V = args.vocab_size
    torch.testing.assert_close(result["logits"][..., :V], hf_logits(src), atol=1e-4, rtol=1e-4)


def test_torch_layout_pp_and_te_names_round_trip(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama3")
    ckpt = tmp_path / "te"
    run(src, ckpt, saver="mcore", ckpt_format="torch", target_tp=2, target_pp=2, transformer_impl="transformer_engine",
        validate=False)
    assert (ckpt / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt").exists()
    model = megatron_lm.load_rank(ckpt, 1, 1)["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in model
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in model
    assert not any(k.endswith("input_layernorm.weight") for k in model)
    # read back (the mcore loader understands this layout) and export to HF: bit-identical
    run(ckpt, tmp_path / "native", loader="mcore", validate=False)
    run(tmp_path / "native", tmp_path / "hf", loader="mcore", saver="hf", validate=False)
    assert_bit_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))


def test_reading_refuses_foreign_objects(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama3")
    ckpt = tmp_path / "m"
    run(src, ckpt, ckpt_format="torch", validate=False)
    path = ckpt / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, weights_only=True)
    state["optimizer"] = Evil()
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        megatron_lm.load_rank(ckpt, 0, 0)
    assert not marker.exists()
