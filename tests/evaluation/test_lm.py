"""The lm-eval model class on a tiny random model: rolling log-likelihood, greedy generation, batching."""

from __future__ import annotations

import shutil

import pytest
import torch
from lm_eval.api.instance import Instance

from shared.evaluation.batching import plan_batches
from shared.evaluation.lm import HFReferenceLM, MegatronLM
from tests.model.families import make_hf_model


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, bpe_tokenizer_dir):
    hf = tmp_path_factory.mktemp("tiny_lm") / "hf"
    make_hf_model("llama3", seed=5).save_pretrained(hf)
    for f in bpe_tokenizer_dir.iterdir():
        shutil.copy(f, hf / f.name)
    return hf


@pytest.fixture(scope="module")
def ours(tiny_hf, dist_pool):
    lm = MegatronLM(str(tiny_hf), tensor_parallel_size=2, pipeline_parallel_size=2, pool=dist_pool, max_length=32,
                    batch_tokens=64)
    yield lm
    lm.close()


def _direct_logprob(hf_dir, tokens: list[int]) -> float:
    """Sum of log p(token_i | tokens_<i) for i >= 1, by one plain HF forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), -1)
    return float(sum(lp[i - 1, t] for i, t in enumerate(tokens) if i > 0))


def test_rolling_loglikelihood_equals_lm_eval_hf_model_and_a_direct_forward(ours, tiny_hf):
    from lm_eval.models.huggingface import HFLM

    long = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea."
    short = "The capital of France is Paris."
    tokens = ours.tok_encode(long)
    assert tokens[0] == ours.prefix_token_id and 32 < len(tokens) < 200  # BOS added; more than one window
    reqs = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in (long, short)]
    got = ours.loglikelihood_rolling(reqs, disable_tqdm=True)
    hf = HFLM(pretrained=str(tiny_hf), dtype="float32", device="cpu", batch_size=4, max_length=32)
    expected = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert all(abs(a - b) < 1e-4 for a, b in zip(got, expected)), (got, expected)
    # as lm-eval's hf model does, the text's own encoding (its BOS included) follows a prefix token
    direct = _direct_logprob(tiny_hf, [ours.prefix_token_id] + ours.tok_encode(short))
    assert abs(got[1] - direct) < 1e-4


def test_generate_until_is_greedy_stops_and_matches_hf(ours, tiny_hf):
    ref = HFReferenceLM(str(tiny_hf))
    prompts = ["Once upon a time", "The capital of Italy is", "def fibonacci(n):"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
    got = ours.generate_until(reqs)
    assert got == ref.generate_until(reqs)
    assert all("\n" not in g for g in got)
    # with no stop string the continuation is exactly max_gen_toks greedy tokens (or ends at EOS)
    (long,) = ours.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": [], "max_gen_toks": 20}), 0)])
    (short,) = ours.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": [], "max_gen_toks": 5}), 0)])
    assert long.startswith(short) and len(ours.tok_encode(short, add_special_tokens=False)) <= 6
    with pytest.raises(ValueError, match="only greedy generation"):
        ours.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True}), 0)])


def test_plan_batches_shares_contexts_and_bounds_batches():
    pairs = [([1, 2, 3], [4]), ([1, 2, 3], [5, 6]), ([1, 2, 3], [4]), ([7, 8], [9, 10, 11]), ([1] * 30, [2])]
    plan = plan_batches(pairs, max_tokens=40)
    rows = [idxs for owners, _ in plan for idxs in owners]
    assert sorted(i for r in rows for i in r) == list(range(5))
    assert [0, 2] in rows  # identical requests share one row
    assert len(plan) == 2 and plan[0][1].ctx_ids.shape == (1, 30)  # longest context first, alone
    b = plan[1][1]
    assert b.ctx_ids.shape == (2, 3) and b.group.tolist() == [0, 0, 1]
    assert b.second_positions.tolist() == [[3, 4], [3, 4], [2, 3]]
    with pytest.raises(ValueError, match="at least one token"):
        plan_batches([([], [1])])
