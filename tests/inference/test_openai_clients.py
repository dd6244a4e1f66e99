"""The standalone server through the real clients: the `openai` SDK, Megatron's error path and a
Prometheus parser, on a tiny random model with SmolLM2's tokenizer and chat template."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.generate.runtime import GenerationRuntime
from tests.inference.helpers import assert_chat_top_logprobs, tiny_native_dir
from tests.inference.test_server import Served


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = tiny_native_dir(tmp_path_factory.mktemp("oai"))
    rt = GenerationRuntime(ckpt, max_batch=8, max_queue=64, max_seq_len=256, steps_per_plan=4)
    s = Served(rt)
    yield s
    s.stop()
    rt.close()


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)


def test_logprobs_n_alternatives_top1_is_greedy(oai):
    r = oai.completions.create(model="tiny-native", prompt="Hello there", max_tokens=5, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 5
        best = max(top, key=top.get)
        assert best == tok and top[best] == pytest.approx(chosen, abs=1e-5)


def test_chat_top_logprobs(oai):
    assert_chat_top_logprobs(oai, "tiny-native", "Hi")


def test_prompt_forms_n_and_echo_scoring(oai):
    text = oai.completions.create(model="tiny-native", prompt="Hello there", max_tokens=4, temperature=0)
    ids = [19556, 665]
    by_ids = oai.completions.create(model="tiny-native", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    many = oai.completions.create(model="tiny-native", prompt=[ids, [19556]], max_tokens=2, temperature=0)
    assert len(many.choices) == 2
    strs = oai.completions.create(model="tiny-native", prompt=["Hello there", "A"], max_tokens=2, n=3, seed=1)
    assert len(strs.choices) == 6 and [c.index for c in strs.choices] == list(range(6))
    score = oai.completions.create(model="tiny-native", prompt="Hello there my friend", max_tokens=0, echo=True,
                                   logprobs=1)
    lp = score.choices[0].logprobs
    assert score.choices[0].text == "Hello there my friend" and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])


def test_stream_with_usage_and_logprobs(oai):
    chunks = list(oai.completions.create(model="tiny-native", prompt="Hello", max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True}, logprobs=2))
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    toks = [t for c in chunks[:-1] for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert len(toks) == 6
    chat = list(oai.chat.completions.create(model="tiny-native", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chat[-1].usage.completion_tokens == 3


def test_penalties_and_logit_bias(oai):
    base = oai.completions.create(model="tiny-native", prompt="Hello", max_tokens=1, temperature=0)
    forced = oai.completions.create(model="tiny-native", prompt="Hello", max_tokens=3, temperature=0,
                                    logit_bias={"1838": 100})
    assert forced.choices[0].text == " little" * 3 != base.choices[0].text
    rep = oai.completions.create(model="tiny-native", prompt="Hello", max_tokens=3, temperature=0,
                                 logit_bias={"1838": 5}, frequency_penalty=2, presence_penalty=2)
    assert rep.choices[0].text.count(" little") < 3


def test_errors_are_openai_errors(oai, served):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny-native", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="tools"):
        oai.chat.completions.create(model="tiny-native", messages=[{"role": "user", "content": "x"}],
                                    tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("other")
    assert e.value.param == "model"
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="other", prompt="x", max_tokens=1)
    assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError, match="ask for fewer tokens") as e:
        oai.completions.create(model="tiny-native", prompt="x", max_tokens=1000)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="ask for fewer tokens") as e:
        oai.chat.completions.create(model="tiny-native", messages=[{"role": "user", "content": "x"}],
                                    max_completion_tokens=1000)
    assert e.value.param == "max_completion_tokens"
    assert oai.models.retrieve("tiny-native").id == "tiny-native"
    r = httpx.put(served.url + "/api", json={"prompts": ["a"], "top_k": 5, "top_p": 0.5})
    assert r.status_code == 400 and r.json() == {"message": "cannot set both top-k and top-p samplings."}


def test_metrics_are_typed(oai, served):
    oai.completions.create(model="tiny-native", prompt="Hello", max_tokens=2)
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)}
    for name in ("generate_requests", "generate_generated_tokens", "generate_prompt_tokens",
                 "generate_completion_tokens"):
        assert fams[name].type == "counter", name
    for name in ("generate_time_to_first_token_seconds", "generate_inter_token_latency_seconds",
                 "generate_request_seconds"):
        assert fams[name].type == "histogram", name
