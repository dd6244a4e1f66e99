"""The `openai` SDK against the gateway stack (gateway → Redis → generate worker): the same
surface as the standalone server, errors as the SDK's exception classes."""

from __future__ import annotations

import openai
import pytest

from tests.inference.helpers import assert_chat_top_logprobs
from tests.services.conftest import stack_serving

# one generation at a time, so a second concurrent request is the gateway's 429
ENV = {"LLAMA_SVC_MAX_CONCURRENT_GENERATIONS": "1", "LLAMA_SVC_RETRY_AFTER_S": "3"}


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, tiny_hf):
    with stack_serving(request, tmp_path_factory.mktemp("oaigw"), tiny_hf, env=ENV) as s:
        yield s


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="key-team-a", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(tiny_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf)


def _hf_greedy_tops(ckpt, prompt: list[int], n: int, k: int) -> list[dict[str, float]]:
    """HF's top-k log-probs at each of ``n`` greedy steps after ``prompt``, keyed by piece (the
    likelier kept when two pieces decode alike, as the servers do)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            row = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            vals, idx = row.topk(k)
            d: dict[str, float] = {}
            for v, t in zip(vals.tolist(), idx.tolist()):
                d.setdefault(tok.decode([t], skip_special_tokens=False), v)
            out.append(d)
            ids.append(idx[0].item())
    return out


def test_logprobs_n_alternatives_top1_is_greedy(oai, tok, tiny_hf):
    prompt = tok("the quick brown").input_ids
    r = oai.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=4)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for piece, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        best = max(top, key=top.get)
        assert best == piece and top[best] == pytest.approx(chosen, abs=1e-5)
    assert "".join(lp.tokens) == r.choices[0].text
    # the alternatives are HF's top 4 at every step (distinct ids; alike pieces merged), HF's values
    want = _hf_greedy_tops(tiny_hf, prompt, 5, 4)
    assert [list(t) for t in lp.top_logprobs] == [list(w) for w in want]
    for got, exp in zip(lp.top_logprobs, want):
        assert got == pytest.approx(exp, abs=1e-4)


def test_chat_top_logprobs(oai):
    assert_chat_top_logprobs(oai, "tiny", "hello world")


def test_prompt_forms_n_and_echo(oai, tok):
    text = oai.completions.create(model="tiny", prompt="hello world", max_tokens=4, temperature=0)
    ids = tok("hello world").input_ids
    by_ids = oai.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    many = oai.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=2, temperature=0)
    assert len(many.choices) == 2 and many.choices[0].text == text.choices[0].text[:len(many.choices[0].text)]
    strs = oai.completions.create(model="tiny", prompt=["hello world", "the lazy"], max_tokens=2, n=3, seed=1)
    assert len(strs.choices) == 6 and [c.index for c in strs.choices] == list(range(6))
    score = oai.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=0, echo=True, logprobs=1)
    choice = score.choices[0]
    assert choice.text == "the quick brown fox" and choice.logprobs.token_logprobs[0] is None
    assert all(v < 0 for v in choice.logprobs.token_logprobs[1:]) and score.usage.completion_tokens == 0


def test_stream_with_usage(oai):
    chunks = list(oai.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, logprobs=2))
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    assert sum(len(ch.logprobs.tokens) for c in chunks[:-1] for ch in c.choices if ch.logprobs) == 6
    plain = list(oai.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)
    chat = list(oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chat[-1].usage.completion_tokens == 3


def test_errors_are_the_sdks(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="tools"):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="max_position_embeddings") as e:
        oai.completions.create(model="tiny", prompt="x", max_tokens=1000)
    assert e.value.param == "max_tokens" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="missing", prompt="x", max_tokens=1)
    assert e.value.param == "model" and e.value.body["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("missing")
    assert e.value.param == "model"
    assert oai.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(oai.base_url), api_key="wrong", max_retries=0).models.list()


def test_gateway_refusals_name_their_param(oai, stack):
    """The gateway's own refusals carry OpenAI's `param`, as the standalone server's do."""
    with pytest.raises(openai.BadRequestError, match="max_position_embeddings") as e:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    max_completion_tokens=1000)
    assert e.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1000)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert e.value.param == "model" and e.value.body["message"] == "model 'missing' not found"
    with pytest.raises(openai.BadRequestError) as e:  # no model named: the gateway cannot pick one
        oai.completions.create(model=None, prompt="x", max_tokens=1)
    assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt="x", max_tokens=100_000)  # over LLAMA_SVC_MAX_NEW_TOKENS
    assert e.value.param == "max_tokens"
    r = _raw_post(stack, {"prompt": "x", "max_tokens": 1})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == "model"


def _raw_post(stack, body: dict):
    import httpx

    return httpx.post(stack.url + "/v1/completions", json=body, headers={"Authorization": "Bearer key-team-a"},
                      timeout=60)


def test_over_capacity_is_rate_limit_error(oai):
    held = oai.completions.create(model="tiny", prompt="hello", max_tokens=200, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    try:
        with pytest.raises(openai.RateLimitError) as e:
            oai.completions.create(model="tiny", prompt="x", max_tokens=1)
        assert e.value.response.headers["Retry-After"] == "3"
    finally:
        held.close()
