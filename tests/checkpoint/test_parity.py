"""The streaming parity report: the full-model numbers layer by layer at the checkpoint's TP/PP, in
bounded memory, and a divergence names its layer and sublayer."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.checkpoint import layout as param_layout
from shared.checkpoint import native, parity
from shared.checkpoint.layout import Layout
from shared.checkpoint.parity.plan import layer_params, make_plan
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.tensors import open_hf_weights
from shared.config import ModelConfig
from shared.parallel.dims import ParallelDims
from shared.tokenizer import load_source_tokenizer
from tests.checkpoint import parity_fns
from tests.checkpoint.helpers import hf_logits, hf_tensors, run

ROOT = Path(__file__).resolve().parents[2]


def _written(ckpt: Path) -> tuple[parity.Written, native.Manifest]:
    m = native.load_manifest(ckpt)
    return parity.Written("native", str(ckpt), m.layout), m


def _check(src: Path, ckpt: Path, pool=None, **kw) -> parity.ParityReport:
    written, m = _written(ckpt)
    return parity.check(m.config, open_hf_weights(src, zero_copy=True), written, load_source_tokenizer(src), m.dtype,
                        pool=pool, **kw)


def _rewrite(ckpt: Path, tp_rank: int, pp_rank: int, name: str, change) -> None:
    """Replace one tensor of one rank file (the manifest's hashes go stale; the check does not read them)."""
    path = ckpt / native.rank_file(tp_rank, pp_rank)
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    tensors[name] = change(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_streaming_equals_the_full_models(make_hf_checkpoint, tmp_path, dist_pool, tp, pp):
    """The streamed reference is HF's whole model, the streamed candidate our whole model at TP/PP, and the
    report's numbers are the ones the two whole models give."""
    src = make_hf_checkpoint("llama3")
    ckpt = tmp_path / "ckpt"
    run(src, ckpt, target_tp=tp, target_pp=pp, validate=False)
    written, m = _written(ckpt)
    ids = parity.prompt_ids(load_source_tokenizer(src), m.config)
    assert ids.shape == (4, parity.PROMPT_TOKENS)
    streamed = parity.stream(m.config, open_hf_weights(src, zero_copy=True), written, ids, m.dtype,
                             pool=dist_pool if tp > 1 else None, block_bytes=8 << 10)  # several vocab blocks
    ref = hf_logits(src, ids)
    cand = next(x for x in dist_pool.run(ParallelDims(tp, pp), parity_fns.full_logits, str(ckpt), ids) if x is not None)
    assert (streamed.ref_logits - ref).abs().max() <= 1e-6
    assert (streamed.cand_logits - cand).abs().max() <= 1e-6

    rep = _check(src, ckpt, pool=dist_pool if tp > 1 else None)
    assert rep.passed and (rep.tp, rep.pp) == (tp, pp) and rep.positions == ids.numel()
    assert abs(rep.max_abs_logit_diff - float((ref - cand).abs().max())) <= 1e-6
    full_dlogprob = float((torch.log_softmax(ref, -1) - torch.log_softmax(cand, -1)).abs().max())
    assert abs(rep.max_abs_logprob_diff - full_dlogprob) <= 1e-6
    assert rep.top1_agreement == float((ref.argmax(-1) == cand.argmax(-1)).float().mean()) == 1.0
    assert rep.greedy_tokens == 4 and rep.greedy_agreement == 1.0
    assert [r["layer"] for r in rep.layers] == list(range(4)) and rep.divergence is None


def test_swapped_fc1_halves_on_one_rank_name_their_layer(make_hf_checkpoint, tmp_path, dist_pool):
    src = make_hf_checkpoint("llama3")
    ckpt = tmp_path / "ckpt"
    run(src, ckpt, target_tp=2, target_pp=2, validate=False)
    # global layer 3 = stage 1's local layer 1; [gate_1; up_1] -> [up_1; gate_1] on TP rank 1 only
    _rewrite(ckpt, 1, 1, "decoder.layers.1.mlp.linear_fc1.weight", lambda t: torch.cat(t.chunk(2)[::-1]))
    rep = _check(src, ckpt, pool=dist_pool)
    assert not rep.passed
    assert (rep.divergence["layer"], rep.divergence["sublayer"]) == (3, "mlp")
    assert all(r["mlp"] / r["mlp_scale"] <= rep.hidden_tolerance for r in rep.layers[:3])
    assert rep.layers[3]["attention"] / rep.layers[3]["attention_scale"] <= rep.hidden_tolerance
    assert "diverges at layer 3 mlp" in rep.summary()


def test_permuted_kv_group_names_its_attention(make_hf_checkpoint, tmp_path, dist_pool):
    src = make_hf_checkpoint("llama3")  # 8 query heads in 2 kv groups: one group per TP rank
    ckpt = tmp_path / "ckpt"
    run(src, ckpt, target_tp=2, validate=False)
    d = native.load_manifest(ckpt).config.head_dim

    def swap_key_and_value(t):  # rows of the group: 4 query heads, its key head, its value head
        return torch.cat([t[: 4 * d], t[5 * d: 6 * d], t[4 * d: 5 * d]])

    _rewrite(ckpt, 0, 0, "decoder.layers.1.self_attention.linear_qkv.weight", swap_key_and_value)
    rep = _check(src, ckpt, pool=dist_pool)
    assert not rep.passed and (rep.divergence["layer"], rep.divergence["sublayer"]) == (1, "attention")
    assert "diverges at layer 1 attention" in rep.summary()


def test_a_fault_on_one_rank_fails_tp2_and_is_invisible_at_tp1(make_hf_checkpoint, tmp_path, dist_pool):
    """A bug in the sharded code path of TP rank 1 only: the TP2 report fails at the first row-parallel
    layer (layer 0's attention output projection); a TP1 report on the same (faulty) ranks passes."""
    src = make_hf_checkpoint("llama3")
    run(src, tmp_path / "tp1", validate=False)
    run(src, tmp_path / "tp2", target_tp=2, validate=False)
    dist_pool.run(ParallelDims(tp=2), parity_fns.break_row_parallel, 1)
    try:
        tp2 = _check(src, tmp_path / "tp2", pool=dist_pool, greedy_tokens=0)
        tp1 = _check(src, tmp_path / "tp1", pool=dist_pool, greedy_tokens=0)
    finally:
        dist_pool.run(ParallelDims(tp=2), parity_fns.mend_row_parallel)
    assert not tp2.passed and (tp2.divergence["layer"], tp2.divergence["sublayer"]) == (0, "attention")
    assert tp1.passed and tp1.tp == 1
    assert _check(src, tmp_path / "tp2", pool=dist_pool, greedy_tokens=0).passed  # mended


def test_conversion_fails_on_a_corrupted_shard_and_leaves_nothing(make_hf_checkpoint, tmp_path, monkeypatch):
    """The default conversion at TP2 (its own ranks) catches a shard written wrong on one rank."""
    src = make_hf_checkpoint("llama3")
    real = param_layout.shard_pieces

    def swapped_on_rank_1(spec, tensors, cfg, layout):
        ranks = real(spec, tensors, cfg, layout)
        if spec.name == "decoder.layers.2.mlp.linear_fc1.weight":
            ranks[1] = ranks[1][::-1]  # [up_1, gate_1]
        return ranks

    monkeypatch.setattr(param_layout, "shard_pieces", swapped_on_rank_1)
    out = tmp_path / "out"
    with pytest.raises(parity.ParityError, match="parity FAIL: diverges at layer 2 mlp"):
        run(src, out, target_tp=2)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_conversion_stores_the_report(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("qkv_bias")
    steps = []
    from shared.checkpoint.convert import ConvertOptions, convert

    m = convert(ConvertOptions(load_dir=src, save_dir=tmp_path / "out", target_pp=2),
                progress=lambda p: steps.append((p.current, p.total)) if p.phase == "validate" else None)
    rep = m["parity"]
    assert rep["passed"] and (rep["tp"], rep["pp"]) == (1, 2) and len(rep["layers"]) == 4
    assert rep["compute_dtype"] == "fp32" and rep["greedy_agreement"] == 1.0 and rep["peak_rss_bytes"] > 0
    assert json.loads((tmp_path / "out" / "parity.json").read_text()) == rep
    assert (tmp_path / "out" / "parity.txt").read_text().startswith("parity PASS")
    assert steps[-1] == (5 * 4, 5 * 4)  # (4 layers + head) x (the teacher-forced pass, 3 decoding steps)


def test_bf16_compute_on_request(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama3.1")
    run(src, tmp_path / "ckpt", target_pp=2, dtype="bf16", validate=False)
    rep = _check(src, tmp_path / "ckpt", compute_dtype=torch.bfloat16)
    assert rep.passed and rep.compute_dtype == "bf16" and rep.dtype == "bf16"
    assert rep.tolerance == pytest.approx(0.1 * rep.logit_scale) and rep.hidden_tolerance == 0.05


def test_meta_source_and_the_cli(make_hf_checkpoint, tmp_path, spm_file, dist_pool):
    """A Meta source (merged and permuted in memory, nothing written beside it) gives the HF source's numbers;
    ``services.generate parity`` reports on a stored checkpoint."""
    import shutil

    from services.generate.__main__ import main
    from shared.checkpoint import meta

    src = make_hf_checkpoint("llama3", tokenizer="spm-v1", num_key_value_heads=4, intermediate_size=192)
    cfg = ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    meta_dir = tmp_path / "meta"
    meta.write_meta(meta_dir, hf_tensors(src), cfg, num_shards=2, multiple_of=64)
    shutil.copyfile(spm_file("spm-v1"), meta_dir / "tokenizer.model")
    ckpt = tmp_path / "ckpt"
    run(meta_dir, ckpt, checkpoint_type="meta", target_tp=2, validate=False)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    from_meta = parity.check_directories(ckpt, meta_dir, pool=dist_pool)
    from_hf = parity.check_directories(ckpt, src, pool=dist_pool)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert from_meta.passed and from_hf.passed
    assert abs(from_meta.max_abs_logit_diff - from_hf.max_abs_logit_diff) <= 1e-6
    for a, b in zip(from_meta.layers, from_hf.layers):
        assert abs(a["mlp"] - b["mlp"]) <= 1e-6

    tp1 = tmp_path / "tp1"
    run(src, tp1, validate=False)
    threads = torch.get_num_threads()
    try:
        assert main(["parity", "--load", str(tp1), "--model-path", str(meta_dir), "--output", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "parity.json").read_text())["passed"]
    with pytest.raises(CheckpointError, match="neither an HF"):
        parity.check_directories(tp1, tmp_path / "tp1" / "tokenizer")


def test_memory_stays_at_a_layer_on_a_mid_sized_model(tmp_path, bpe_tokenizer_dir):
    """A fresh process's RSS high-water mark during the check stays within the planner's figure, about one
    layer per side, a tenth of the two fp32 models the check once loaded."""
    import shutil

    from bench.parity import write_random_hf

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8192, "hidden_size": 1024,
              "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 8, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 5e5, "tie_word_embeddings": False,
              "hidden_act": "silu", "torch_dtype": "bfloat16"}
    src = tmp_path / "src"
    write_random_hf(src, config, shard_bytes=200 << 20)
    for f in bpe_tokenizer_dir.iterdir():
        shutil.copyfile(f, src / f.name)
    run(src, tmp_path / "ckpt", target_pp=2, validate=False)
    out = subprocess.run([sys.executable, "-m", "tests.checkpoint.parity_fns", str(src), str(tmp_path / "ckpt"),
                          str(8 << 20)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = ModelConfig.from_hf(config)
    one_layer_fp32 = 4 * layer_params(cfg)
    assert got["passed"]
    assert got["peak"] - got["before"] <= got["planned"] + (48 << 20), got
    assert got["planned"] <= 4 * one_layer_fp32 < 0.15 * 2 * 4 * cfg.num_parameters()


def test_planner_dry_run_of_a_70b_shape():
    """The plan grows with one layer: more layers or stages change nothing; the 70B figure is the formula's."""
    from bench.parity import LLAMA3_70B, LLAMA3_8B

    cfg = ModelConfig.from_hf(LLAMA3_70B)
    plan = make_plan(cfg, Layout(2, 2), torch.bfloat16, torch.float32, 4, 32)
    deeper = make_plan(dataclasses.replace(cfg, num_layers=160), Layout(2, 8), torch.bfloat16, torch.float32, 4, 32)
    assert plan.peak_bytes == deeper.peak_bytes == plan.layers_bytes
    assert plan.reference_layer_bytes == 4 * layer_params(cfg) and plan.greedy_tokens == 0
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shard = (cfg.qkv_rows * h + h * cfg.num_heads * cfg.head_dim + 3 * inter * h) // 2 + 2 * h
    assert plan.candidate_shard_bytes == 4 * shard
    block = 64 << 20  # 2048 rows of 8192 fp32 values, per process
    assert plan.peak_bytes == 4 * layer_params(cfg) + 2 * 4 * shard + 3 * (block + inter * h * 2) \
        + plan.activation_bytes
    assert plan.peak_bytes < 9.5e9 < 2 * 4 * cfg.num_parameters() / 50
    small = make_plan(ModelConfig.from_hf(LLAMA3_8B), Layout(2, 2), torch.bfloat16, torch.float32, 4, 32)
    assert small.peak_bytes < 2.5e9
