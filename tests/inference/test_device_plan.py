"""The GPU decode plan, run on CPU: compiled ops against eager, batched prefill, device-side
sampling (per-row settings, reproducible per seed whatever the batch), graph buckets."""

from __future__ import annotations

import pytest
import torch

from shared.inference import sampling as S
from shared.inference.cuda_graphs import batch_buckets, bucket_for, kv_buckets
from shared.inference.device_step import DecodePlan
from shared.inference.engine import Engine
from shared.inference.ranks import SamplingParams
from tests.inference.helpers import tiny_hf_dir
from tests.inference.test_kernels import _decode_logits, _stage

FAST = DecodePlan(compiled=True, device_steps=True, batched_prefill=True)
STEPS = DecodePlan(device_steps=True, batched_prefill=True)


def test_compiled_decode_steps_equal_eager():
    """Prefill and batched decode steps through the fused (inductor) ops give eager's logits."""
    from shared.model.ops import compiled

    cfg, stage = _stage("qkv_bias")
    prompts = [[1, 5, 9, 2, 7], [3, 4], [8, 8, 8, 1, 2, 6, 5, 4, 3]]
    eager = _decode_logits(stage, prompts, 4)
    stage.ops = compiled()
    fused = _decode_logits(stage, prompts, 4)
    assert torch.allclose(fused, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused.argmax(-1), eager.argmax(-1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_hf_dir(tmp_path_factory.mktemp("tiny-plan"))


@pytest.fixture(scope="module")
def engines(tiny):
    made = {name: Engine(tiny, max_batch=4, max_seq_len=96, decode_plan=plan)
            for name, plan in (("cpu", None), ("steps", STEPS), ("fast", FAST))}
    yield made
    for e in made.values():
        e.close()


def _prompts(engine):
    texts = ["Hello there, how are", "The capital of France is", "def add(a, b):", "Once"]
    return [engine.tokenizer(t).input_ids for t in texts]


def test_greedy_tokens_are_the_cpu_plans_under_the_gpu_plan(engines):
    """Batched prefill of prompts of different lengths, device-side steps, compiled ops."""
    ref = engines["cpu"].generate_ids(_prompts(engines["cpu"]), 10)
    for name in ("steps", "fast"):
        got = engines[name].generate_ids(_prompts(engines[name]), 10)
        assert [o.tokens for o in got] == [o.tokens for o in ref], name
        for a, b in zip(got, ref):
            assert a.finish == b.finish
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4), name


def test_scoring_and_top_logprobs_under_the_gpu_plan(engines):
    prompt = _prompts(engines["cpu"])[1]
    kw = dict(prompt_logprobs=True, top_logprobs=2)
    ref = engines["cpu"].generate_ids([prompt], 3, **kw)[0]
    got = engines["steps"].generate_ids([prompt], 3, **kw)[0]
    assert torch.allclose(torch.tensor(got.prompt_logprobs), torch.tensor(ref.prompt_logprobs), atol=1e-5)
    assert [[i for i, _ in alt] for alt in got.top_logprobs] == [[i for i, _ in alt] for alt in ref.top_logprobs]


def test_device_sampling_depends_only_on_the_seed(engines):
    """A sampled row's tokens are the same alone or beside other rows, and change with its seed."""
    e = engines["steps"]
    prompts = _prompts(e)
    kw = dict(greedy=False, temperature=0.8, top_k=50, top_p=0.9, seed=11)
    alone = e.generate_ids([prompts[0]], 12, **kw)[0].tokens
    beside = e.generate_ids([prompts[2], prompts[0], prompts[3]], 12, **kw)[1].tokens
    assert alone == beside
    assert e.generate_ids([prompts[0]], 12, **{**kw, "seed": 12})[0].tokens != alone


def test_bans_and_penalties_under_the_gpu_plan(engines):
    e = engines["steps"]
    prompt = _prompts(e)[0]
    greedy = e.generate_ids([prompt], 6)[0].tokens
    first, eos = greedy[0], e.eos_ids
    e.eos_ids = (first,)  # the first greedy token is a stop id, banned for the first 3 tokens
    try:
        banned = e.generate_ids([prompt], 6, min_tokens=3)[0].tokens
    finally:
        e.eos_ids = eos
    assert first not in banned[:3] and len(banned) >= 3
    ref = engines["cpu"].generate_ids([prompt], 8, repetition_penalty=1.5, frequency_penalty=0.5)[0].tokens
    assert e.generate_ids([prompt], 8, repetition_penalty=1.5, frequency_penalty=0.5)[0].tokens == ref


def _batch(rows, vocab=4):
    return S.BatchParams.build([(SamplingParams(**r), 0, r.get("top_p", 0.0), []) for r in rows],
                               torch.device("cpu"), vocab)


def test_batched_penalties_are_the_row_penalties():
    from shared.inference.ranks import SlotSpec

    torch.manual_seed(5)
    x = torch.randn(3, 50) * 2
    specs = [SlotSpec(slot=0, prompt=[1, 2, 3], max_new=4, presence_penalty=0.5, frequency_penalty=0.3),
             SlotSpec(slot=1, prompt=[0, 7, 7], max_new=4, repetition_penalty=1.3, logit_bias=((4, 2.0), (0, -1.0))),
             SlotSpec(slot=2, prompt=[5], max_new=4)]
    generated = [[3, 9, 9], [0, 11], [6]]
    params = S.BatchParams.build([(sp, len(g), 0.0, g) for sp, g in zip(specs, generated)], torch.device("cpu"), 50)
    got = S.penalize_batch(x, params)
    for i, (sp, g) in enumerate(zip(specs, generated)):
        want = S.penalize(x[i], g, sp.prompt, sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty,
                          sp.logit_bias) if sp.penalized else x[i]
        assert torch.equal(got[i], want), i
    params.advance(torch.tensor([9, 1, 6]))  # the next tokens join the counts on the device
    want = S.penalize(x[0], generated[0] + [9], specs[0].prompt, 0.5, 0.3, 1.0, ())
    assert torch.equal(S.penalize_batch(x, params)[0], want)


def test_batched_filter_is_the_row_filter_for_each_row():
    torch.manual_seed(0)
    x = torch.randn(4, 300) * 3
    settings = [(1.0, 0, 0.0, 0.0), (0.7, 5, 0.0, 0.0), (1.3, 0, 0.8, 0.0), (0.9, 40, 0.6, 0.05)]
    t, k, p, m = (torch.tensor(c, dtype=dt) for c, dt in zip(zip(*settings), (torch.float64, torch.long,
                                                                              torch.float64, torch.float64)))
    got = S.filter_batch(x, t, k, p, m, max_k=40)
    for i, (ti, ki, pi, mi) in enumerate(settings):
        assert torch.equal(torch.isfinite(got[i]), torch.isfinite(S.filter_logits(x[i], ti, ki, pi, mi)))


def test_batched_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    params = _batch([dict(greedy=False, seed=s) for s in range(n)])
    tokens, _ = S.sample_batch(probs.log().expand(n, 4), params, torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(tokens, minlength=4).double() / n
    assert torch.allclose(freq, probs.double(), atol=0.03), freq
    u = S.uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.long), 1000)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_buckets_cover_every_step():
    assert batch_buckets(1) == [1] and batch_buckets(12) == [1, 2, 4, 8, 12]
    assert kv_buckets(2048) == [256, 512, 1024, 2048] and kv_buckets(100) == [100]
    assert bucket_for(5, batch_buckets(12)) == 8 and bucket_for(2049, kv_buckets(4096)) == 4096
    with pytest.raises(ValueError):
        bucket_for(13, batch_buckets(12))
    with pytest.raises(ValueError, match="needs device_steps"):
        DecodePlan(graphs=True)
    assert DecodePlan.for_device("cpu") == DecodePlan()
    assert DecodePlan.for_device("cuda") == DecodePlan(True, True, True, True)


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_the_gpu_plan_over_tensor_and_pipeline_ranks(dist_pool, engines, tiny, tp, pp):
    """Device-side steps and batched prefill on every stage (transfers checked as NCCL orders them)."""
    ref = engines["cpu"].generate_ids(_prompts(engines["cpu"]), 8)
    e = Engine(tiny, tp, pp, max_batch=4, max_seq_len=96, pool=dist_pool, decode_plan=STEPS)
    try:
        got = e.generate_ids(_prompts(e), 8)
    finally:
        e.close()
    assert [o.tokens for o in got] == [o.tokens for o in ref]
