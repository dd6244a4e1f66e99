"""lm-eval's own API models against both servers: ``local-completions`` with its defaults (token-id
prompts, ``echo`` + ``logprobs=1``) scores every choice exactly as lm-eval's ``hf`` model does on
the same weights, through the standalone server and through the gateway; ``local-chat-completions`` on a
generate_until task (lm-eval's chat messages, the server's chat template) writes, item for item, the text
lm-eval's ``hf`` model generates greedily with the same chat template."""

from __future__ import annotations

import contextlib

import pytest

from services.generate.runtime import GenerationRuntime
from shared.evaluation.report import _offline
from shared.evaluation.tasks import prepare_tasks
from tests.inference.helpers import tiny_hf_dir, tiny_native_dir
from tests.inference.test_server import Served
from tests.services.conftest import client, dump_logs, start_stack

TASK, ITEMS = "arithmetic_mc", 6


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    return tiny_hf_dir(root), tiny_native_dir(root)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return prepare_tasks([TASK], tmp_path_factory.mktemp("tasks"), items=ITEMS)


def _evaluate(model, model_args, tasks) -> list[list[tuple[float, bool]]]:
    """Per item, (log-likelihood, is_greedy) of each choice."""
    _offline()
    from lm_eval import evaluator

    res = evaluator.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=tasks.task_manager(),
                                    log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    return [[(float(r[0][0]), bool(r[0][1])) for r in s["resps"]] for s in samples]


@pytest.fixture(scope="module")
def reference(weights, tasks):
    hf, _ = weights
    return _evaluate("hf", {"pretrained": str(hf), "dtype": "float32", "device": "cpu", "batch_size": 8}, tasks)


def _local(url: str, model: str, hf) -> dict:
    return {"base_url": url + "/v1/completions", "model": model, "tokenizer_backend": "huggingface",
            "tokenizer": str(hf), "max_retries": 1}


def _same(got, want):
    assert len(got) == len(want) == ITEMS
    for g_item, w_item in zip(got, want):
        assert [g for _, g in g_item] == [w for _, w in w_item], (g_item, w_item)
        assert all(abs(g - w) < 1e-4 for (g, _), (w, _) in zip(g_item, w_item)), (g_item, w_item)


@contextlib.contextmanager
def _standalone(native):
    """The standalone server on ``native``; yields its URL."""
    rt = GenerationRuntime(native, max_batch=8, max_queue=64, max_seq_len=256, steps_per_plan=4)
    served = Served(rt)
    try:
        served.wait_ready()
        yield served.url
    finally:
        served.stop()
        rt.close()


def test_local_completions_on_the_standalone_server(weights, tasks, reference):
    hf, native = weights
    with _standalone(native) as url:
        _same(_evaluate("local-completions", _local(url, "tiny-native", hf), tasks), reference)


def test_local_completions_through_the_gateway(request, tmp_path_factory, weights, tasks, reference, monkeypatch):
    hf, _ = weights
    stack = start_stack(tmp_path_factory.mktemp("lmeval-gw"), queues=("generate",))
    try:
        client(stack).upload_checkpoint("tiny", hf)
        monkeypatch.setenv("OPENAI_API_KEY", "key-team-a")  # lm-eval's local-completions sends it as a bearer key
        _same(_evaluate("local-completions", _local(stack.url, "tiny", hf), tasks), reference)
    finally:
        if request.session.testsfailed:
            dump_logs(stack)
        stack.__exit__(None, None, None)


# ---- generate_until through local-chat-completions -------------------------------------------
GEN_TASK = "tiny_chat_gen"
GEN_DOCS = [{"question": "What is two plus two?", "answer": "4"},
            {"question": "Name a colour of the sky.", "answer": "blue"},
            {"question": "Say hello.", "answer": "hello"},
            {"question": "Count to three:", "answer": "1 2 3"},
            {"question": "The capital of France is", "answer": "Paris"}]


@pytest.fixture(scope="module")
def gen_tasks(tmp_path_factory):
    """An offline generate_until task: local JSON docs, greedy, 8 new tokens at most, stopped at a newline
    or at " recipe" (which these random weights do write on some items, so stop strings are exercised)."""
    import json

    root = tmp_path_factory.mktemp("gen-task")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    (root / f"{GEN_TASK}.yaml").write_text(json.dumps({
        "task": GEN_TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", " recipe"], "max_gen_toks": 8, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return root


def _generate(model, model_args, task_dir) -> tuple[list[str], dict]:
    """Per item, the text lm-eval read from the model (chat-templated prompts), and the metrics."""
    _offline()
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    res = evaluator.simple_evaluate(model=model, model_args=model_args, tasks=[GEN_TASK], apply_chat_template=True,
                                    task_manager=TaskManager(include_path=[str(task_dir)], include_defaults=False),
                                    log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    samples = sorted(res["samples"][GEN_TASK], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples], res["results"][GEN_TASK]


@pytest.fixture(scope="module")
def gen_reference(weights, gen_tasks):
    hf, _ = weights
    return _generate("hf", {"pretrained": str(hf), "dtype": "float32", "device": "cpu", "batch_size": 1}, gen_tasks)


def _chat(url: str, model: str) -> dict:
    return {"base_url": url + "/v1/chat/completions", "model": model, "max_retries": 1}


def _same_generations(got, want):
    texts, metrics = got
    assert len(texts) == len(want[0]) == len(GEN_DOCS)
    assert all(isinstance(t, str) for t in texts), texts  # lm-eval parsed every response
    assert texts == want[0]
    assert metrics["exact_match,none"] == want[1]["exact_match,none"]


def test_local_chat_completions_on_the_standalone_server(weights, gen_tasks, gen_reference):
    _, native = weights
    with _standalone(native) as url:
        _same_generations(_generate("local-chat-completions", _chat(url, "tiny-native"), gen_tasks), gen_reference)


def test_local_chat_completions_through_the_gateway(request, tmp_path_factory, weights, gen_tasks, gen_reference,
                                                    monkeypatch):
    hf, _ = weights
    stack = start_stack(tmp_path_factory.mktemp("lmeval-chat-gw"), queues=("generate",))
    try:
        client(stack).upload_checkpoint("tiny", hf)
        monkeypatch.setenv("OPENAI_API_KEY", "key-team-a")
        _same_generations(_generate("local-chat-completions", _chat(stack.url, "tiny"), gen_tasks), gen_reference)
    finally:
        if request.session.testsfailed:
            dump_logs(stack)
        stack.__exit__(None, None, None)
