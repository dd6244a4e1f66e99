"""Parity of the real SmolLM2-135M through lm-eval: our engine against HF transformers.

Items per task are few (CPU time); the claims are exact: 0.00% error in fp32 on every
bundled task, log-likelihoods equal to lm-eval's own HF model to 1e-4, a corrupted
checkpoint fails, and bf16 gets a report with numbers.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from shared.assets import smollm2_hf_dir
from shared.evaluation.lm import HFReferenceLM, MegatronLM
from shared.evaluation.report import compare, run_model, write_report
from shared.evaluation.tasks import BUNDLED, prepare_tasks

LIMIT = 10         # items per task
GREEDY_ITEMS = 2   # greedy-probe items per task


@pytest.fixture(scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy cores: more threads make torch slower, not faster
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return prepare_tasks(["all"], tmp_path_factory.mktemp("eval_tasks"))


@pytest.fixture(scope="module")
def reference(tasks, single_thread):
    lm = HFReferenceLM(str(smollm2_hf_dir()), dtype="fp32")
    try:
        yield run_model(lm, tasks, label="reference", dtype="fp32", limit=LIMIT, greedy_items=GREEDY_ITEMS)
    finally:
        lm.close()


def _ours(path, tasks, dist_pool, dtype="fp32", limit=LIMIT, **kw):
    lm = MegatronLM(str(path), dtype=dtype, pool=dist_pool, **kw)
    try:
        return run_model(lm, tasks, label="ours", dtype=dtype, limit=limit, greedy_items=GREEDY_ITEMS)
    finally:
        lm.close()


def test_fp32_percent_error_is_zero_on_every_bundled_task(tasks, reference, dist_pool, tmp_path):
    ours = _ours(smollm2_hf_dir(), tasks, dist_pool, pipeline_parallel_size=2)
    rep = compare(ours, reference, checkpoint="smollm2", reference="smollm2")
    assert [r["task"] for r in rep["tasks"]] == list(BUNDLED)
    for row in rep["tasks"]:
        assert row["n"] == LIMIT and row["percent_error"] == 0.0, row
    assert rep["mean_percent_error"] == 0.0
    assert rep["logprob"]["n"] == 4 * LIMIT * 4
    assert rep["logprob"]["max_abs_delta"] < 1e-4
    assert rep["greedy"]["n"] == 4 * GREEDY_ITEMS and rep["greedy"]["agreement"] == 1.0
    assert rep["passed"], rep["failures"]
    js, md = write_report(rep, tmp_path)
    assert json.loads(js.read_text())["mean_percent_error"] == 0.0
    assert "| cloze_mc | acc | 10 |" in md.read_text() and "**0.00%**" in md.read_text()
    # the model is not guessing: it solves most unscrambles and cloze items
    assert reference.scores["unscramble_mc"]["acc"] >= 0.5 and reference.scores["cloze_mc"]["acc"] >= 0.5


def test_bf16_error_is_reported(tasks, reference, dist_pool):
    ours = _ours(smollm2_hf_dir(), tasks, dist_pool, dtype="bf16", limit=1)
    rep = compare(ours, reference.head(1))
    assert rep["dtype"] == "bf16" and rep["reference_dtype"] == "fp32"
    assert [r["n"] for r in rep["tasks"]] == [1] * 4
    assert all(isinstance(r["percent_error"], float) for r in rep["tasks"])
    assert isinstance(rep["mean_percent_error"], float) and not math.isnan(rep["mean_percent_error"])
    assert 1e-4 < rep["logprob"]["mean_abs_delta"] < 0.5  # bf16 rounding shows, and is small


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    """SmolLM2 with the rows of one layer's MLP down-projection permuted."""
    from safetensors.torch import load_file, save_file

    src = smollm2_hf_dir()
    out = tmp_path_factory.mktemp("smollm2_corrupt")
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    state = load_file(src / "model.safetensors")
    name = "model.layers.15.mlp.down_proj.weight"
    state[name] = state[name][torch.randperm(state[name].shape[0], generator=torch.Generator().manual_seed(0))]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_corrupted_checkpoint_fails_the_report(tasks, reference, dist_pool, corrupted):
    n = 4
    ours = _ours(corrupted, tasks, dist_pool, limit=n)
    rep = compare(ours, reference.head(n))
    assert not rep["passed"]
    assert rep["logprob"]["mean_abs_delta"] > 0.05
    assert any("log-prob" in f for f in rep["failures"])


def test_loglikelihood_equals_lm_eval_hf_model_native_checkpoint(tasks, dist_pool, tmp_path, single_thread):
    """lm-eval's own ``hf`` model against ours loaded from a native checkpoint resharded to PP=2."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from shared.checkpoint.convert import ConvertOptions, convert

    ckpt = tmp_path / "native"
    convert(ConvertOptions(load_dir=smollm2_hf_dir(), save_dir=ckpt, validate=False))
    reqs = [Instance("loglikelihood", it, (it["query"], " " + c), idx=i)
            for name in ("dates_mc", "cloze_mc") for it in tasks.items[name][:2] for i, c in enumerate(it["choices"])]
    hf = HFLM(pretrained=str(smollm2_hf_dir()), dtype="float32", device="cpu", batch_size=8)
    expected = hf.loglikelihood(reqs, disable_tqdm=True)
    del hf
    ours = MegatronLM(str(ckpt), pipeline_parallel_size=2, pool=dist_pool)
    try:
        got = ours.loglikelihood(reqs, disable_tqdm=True)
    finally:
        ours.close()
    assert len(got) == len(expected) == 16
    for (a, ga), (b, gb) in zip(got, expected):
        assert abs(a - b) < 1e-4 and ga == gb
