"""``open_checkpoint``: every format, the training run directory, and hostile trackers."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from shared.checkpoint import native
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.layout import Layout
from shared.checkpoint.opener import Checkpoint, open_checkpoint
from shared.config import ModelConfig
from tests.checkpoint.helpers import hf_tensors, run

LAYOUTS = [Layout(1, 1), Layout(2, 1), Layout(1, 2), Layout(2, 2)]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_rank_states_match(ckpt: Checkpoint, reference_dir, stored: Layout) -> None:
    """At every layout but the stored one, each rank equals the native loader's reshard of the same weights."""
    for layout in LAYOUTS:
        if (layout.tp, layout.pp) == (stored.tp, stored.pp):
            continue
        for t, p in layout.ranks():
            ours = ckpt.rank_state(layout, t, p, torch.float32)
            assert_same_state(ours, native.load_rank_state_dict(reference_dir, t, p, target=layout,
                                                                dtype=torch.float32))


def test_every_format_opens_with_its_declared_facts(make_hf_checkpoint, tmp_path):
    from shared.checkpoint import meta
    from shared.checkpoint.hf import read_hf_config

    src = make_hf_checkpoint("llama3", intermediate_size=192)
    cfg = ModelConfig.from_hf(read_hf_config(src))
    ref = tmp_path / "native"
    run(src, ref, target_tp=2, target_pp=2, validate=False)

    c = open_checkpoint(ref)
    assert (c.format, c.config, c.layout, c.dtype) == ("native", cfg, Layout(2, 2), torch.float32)
    assert c.tokenizer_dir is not None and c.tokenizer() is not None and c.state is None
    assert pickle.loads(pickle.dumps(c)) == c
    assert_rank_states_match(c, ref, c.layout)

    h = open_checkpoint(src)
    assert (h.format, h.config, h.layout, h.dtype) == ("hf", cfg, Layout(), torch.float32)
    assert_rank_states_match(h, ref, h.layout)

    store = tmp_path / "store-hf"  # an HF checkpoint as the object store fetched it
    shutil.copytree(src, store)
    (store / "manifest.json").write_text(json.dumps({"format": "hf", "files": {}}))
    s = open_checkpoint(store)
    assert (s.format, s.config, s.layout) == ("hf", cfg, Layout())
    assert_same_state(s.rank_state(Layout(2, 1), 1, 0), h.rank_state(Layout(2, 1), 1, 0))

    meta_dir = tmp_path / "meta"
    meta.write_meta(meta_dir, hf_tensors(src), cfg, num_shards=2, multiple_of=64)
    m = open_checkpoint(meta_dir)
    assert (m.format, m.layout, m.dtype) == ("meta", Layout(), torch.float32)
    assert (m.config.hidden_size, m.config.intermediate_size, m.config.num_kv_heads, m.config.vocab_size) == \
        (cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads, cfg.vocab_size)
    assert_rank_states_match(m, ref, m.layout)

    mlm = tmp_path / "megatron"
    run(src, mlm, ckpt_format="torch", target_tp=2, validate=False)
    g = open_checkpoint(mlm)
    assert (g.format, g.config, g.layout, g.dtype) == ("megatron-lm", cfg, Layout(2, 1), torch.float32)
    assert_rank_states_match(g, ref, g.layout)

    assert open_checkpoint(src).tensors().names() and Checkpoint.random(src / "config.json").config == cfg
    with pytest.raises(CheckpointError, match="looks like an HF checkpoint"):
        open_checkpoint(src, formats=("native", "megatron-lm"))
    with pytest.raises(CheckpointError, match="can only be chosen in a run directory"):
        open_checkpoint(ref, iteration=1)


def _convert_cli(*args):
    r = subprocess.run([sys.executable, "-m", "services.convert", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _prompt_logprobs(path, **kw):
    from shared.inference.engine import Engine

    e = Engine(path, 1, 1, "fp32", max_batch=1, max_seq_len=64, **kw)
    try:
        return e.generate_ids([[1, 17, 42, 99, 7, 250, 3, 64]], 0, prompt_logprobs=True)[0].prompt_logprobs
    finally:
        e.close()


def test_a_training_run_directory_is_a_checkpoint(make_hf_checkpoint, tmp_path, dist_pool):
    from shared.training import TrainConfig, train
    from tests.training.conftest import license_paragraphs, write_jsonl

    src = make_hf_checkpoint("llama3")
    base = tmp_path / "base"
    run(src, base, target_tp=2, validate=False)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": p} for p in license_paragraphs(20_000)[:40]])
    out = tmp_path / "OUT"
    train(TrainConfig(load=str(base), save=str(out), data_path=(str(data),), train_iters=2, micro_batch_size=2,
                      global_batch_size=2, seq_length=64, lr=1e-3, save_interval=1, tensor_model_parallel_size=2),
          pool=dist_pool)
    latest = out / "iter_0000002"
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    c = open_checkpoint(out)
    assert (c.format, c.directory, c.iteration, c.run) == ("native", str(latest), 2, str(out))
    assert c.layout == Layout(2, 1) and c.state["iteration"] == 2 and c.config == native.load_manifest(base).config
    assert_rank_states_match(c, latest, c.layout)
    first = open_checkpoint(out, iteration=1)
    assert first.state["iteration"] == 1 and first.directory == str(out / "iter_0000001")
    release = open_checkpoint(out, iteration="release")
    assert release.directory == str(out / "release") and release.state is None
    with pytest.raises(CheckpointError, match=r"no iteration 7.*saved: 1, 2, release"):
        open_checkpoint(out, iteration=7)
    with pytest.raises(CheckpointError, match="not an iteration number"):
        open_checkpoint(out, iteration="../release")

    # the run directory itself, through the converter's CLI: reshard, and export to HF
    _convert_cli("--loader", "mcore", "--load-dir", out, "--save-dir", tmp_path / "resharded",
                 "--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 2, "--no-validate")
    for t, p in Layout(1, 2).ranks():
        assert_same_state(native.load_rank_state_dict(tmp_path / "resharded", t, p),
                          native.load_rank_state_dict(latest, t, p, target=Layout(1, 2)))
    _convert_cli("--loader", "mcore", "--load-dir", out, "--save-dir", tmp_path / "hf", "--saver", "hf",
                 "--no-validate")
    exported = hf_tensors(tmp_path / "hf")
    assert_same_state(exported, dict(native.iter_hf_tensors(latest)))
    assert_same_state(exported, dict(native.iter_hf_tensors(out / "release")))  # the final iteration is the release

    # serving: the engine opens the run directory as `serve --load OUT` does
    served = _prompt_logprobs(out)
    assert served == _prompt_logprobs(latest) == _prompt_logprobs(out / "release")


def test_a_lora_run_opens_as_its_merged_release(make_hf_checkpoint, tmp_path, dist_pool):
    from shared.training import TrainConfig, train
    from tests.training.conftest import license_paragraphs, write_jsonl

    base = tmp_path / "base"
    run(make_hf_checkpoint("llama3"), base, validate=False)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": p} for p in license_paragraphs(20_000)[:40]])
    out = tmp_path / "OUT"
    train(TrainConfig(load=str(base), save=str(out), data_path=(str(data),), train_iters=2, micro_batch_size=2,
                      global_batch_size=2, seq_length=64, lr=1e-2, save_interval=1, finetune_method="lora"),
          pool=dist_pool)
    merged = open_checkpoint(out)  # the iterations hold the frozen base: the run opens as its merged model
    assert (merged.directory, merged.iteration) == (str(out / "release"), "release")
    assert_rank_states_match(merged, out / "release", merged.layout)
    assert any(not torch.equal(a, b) for a, b in zip(merged.rank_state(Layout(), 0, 0).values(),
                                                     native.load_rank_state_dict(base, 0, 0).values()))
    with pytest.raises(CheckpointError, match="frozen base weights.*'release'"):
        open_checkpoint(out, iteration=2)
    resume = open_checkpoint(out, allow_lora_base=True)  # what resuming the run opens
    assert resume.iteration == 2 and resume.lora_base

def test_hostile_trackers_are_refused(tmp_path):
    for text, match in (("../../x", "not an iteration number"), ("9" * 40, "beyond any saved iteration"),
                        ("-1", "not an iteration number"), ("", "not an iteration number")):
        d = tmp_path / f"run{abs(hash(text))}"
        (d / "iter_0000001").mkdir(parents=True)
        (d / "latest_checkpointed_iteration.txt").write_text(text)
        with pytest.raises(CheckpointError, match=match) as e:
            open_checkpoint(d)
        assert str(tmp_path) not in str(e.value).replace(str(d), "")
    d = tmp_path / "missing"
    d.mkdir()
    (d / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(CheckpointError, match="names iteration 5.*does not exist.*saved: none"):
        open_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist or is not a directory"):
        open_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        open_checkpoint(tmp_path)
