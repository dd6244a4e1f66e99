"""The engine against HF transformers on the real SmolLM2, and its recovery from a failed plan."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.assets import smollm2_hf_dir
from shared.inference import ranks
from shared.inference.engine import Engine, LengthError
from shared.parallel.launcher import RemoteError
from tests.inference.helpers import tiny_hf_dir

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "<|im_start|>user\nName a color."]
NEW = 12


@pytest.fixture(scope="module")
def hf_ref():
    path = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [tok(p).input_ids for p in PROMPTS]
    greedy = []
    with torch.no_grad():
        for p in ids:
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=[2],
                                 pad_token_id=2, temperature=None, top_p=None, top_k=None)
            greedy.append(out[0, len(p):].tolist())
        logits = model(torch.tensor([ids[0]])).logits[0].float()
    scores = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[0][1:]).unsqueeze(-1)).squeeze(-1)
    return path, ids, greedy, scores


@pytest.fixture(scope="module")
def engine_tp1(hf_ref):
    e = Engine(hf_ref[0], max_batch=4, max_seq_len=128)
    yield e
    e.close()


def test_greedy_matches_hf_tp1(engine_tp1, hf_ref):
    _, ids, greedy, _ = hf_ref
    outs = engine_tp1.generate_ids(ids, NEW)  # all four prompts batched, different lengths
    assert [o.tokens for o in outs] == greedy


def test_scoring_logprobs_match_hf(engine_tp1, hf_ref):
    _, ids, _, scores = hf_ref
    out = engine_tp1.generate_ids([ids[0]], 0, prompt_logprobs=True)[0]
    assert out.tokens == [] and out.finish == "length"
    assert len(out.prompt_logprobs) == len(ids[0]) - 1
    assert torch.allclose(torch.tensor(out.prompt_logprobs), scores, atol=1e-4)


def test_length_limits_checked_before_work(engine_tp1):
    with pytest.raises(LengthError, match="120 new tokens"):
        engine_tp1.check_lengths(10, 120)
    with pytest.raises(LengthError, match="empty"):
        engine_tp1.check_lengths(0, 4)


def test_seeded_sampling_is_reproducible(engine_tp1, hf_ref):
    ids = hf_ref[1][:1]
    kw = dict(greedy=False, temperature=0.9, top_p=0.9)
    a = engine_tp1.generate_ids(ids, 8, seed=123, **kw)[0].tokens
    b = engine_tp1.generate_ids(ids, 8, seed=123, **kw)[0].tokens
    c = engine_tp1.generate_ids(ids, 8, seed=124, temperature=5.0, greedy=False)[0].tokens
    assert a == b and a != c


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2)])
def test_greedy_matches_hf_parallel(dist_pool, hf_ref, tp, pp):
    path, ids, greedy, scores = hf_ref
    e = Engine(path, tp, pp, max_batch=4, max_seq_len=64, pool=dist_pool)
    try:
        outs = e.generate_ids(ids[:3], NEW)
        assert [o.tokens for o in outs] == greedy[:3]
        out = e.generate_ids([ids[0]], 0, prompt_logprobs=True)[0]
        assert torch.allclose(torch.tensor(out.prompt_logprobs), scores, atol=1e-4)
    finally:
        e.close()


def test_failed_plan_recovers_the_ranks(dist_pool, tmp_path_factory):
    path = tiny_hf_dir(tmp_path_factory.mktemp("tiny"))
    e = Engine(path, 2, 1, max_batch=2, max_seq_len=64, pool=dist_pool)
    try:
        prompt = e.tokenizer("Hello there").input_ids
        before = e.generate_ids([prompt], 6)[0].tokens
        with pytest.raises(RemoteError, match="out of range"):
            e.run(ranks.Plan(admit=[ranks.SlotSpec(slot=99, prompt=prompt, max_new=3)]))
        assert e.restarts == 1
        assert e.generate_ids([prompt], 6)[0].tokens == before
    finally:
        e.close()
