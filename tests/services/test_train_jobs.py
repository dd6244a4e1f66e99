"""Finetune and eval jobs end to end: upload -> convert -> finetune -> eval, over HTTP with real workers."""

from __future__ import annotations

import pytest

from tests.services.conftest import client, dump_logs, start_stack


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("stack-train"), queues=("convert", "train"))
    yield s
    if request.session.testsfailed:
        dump_logs(s)
    s.__exit__(None, None, None)


def test_finetune_then_eval(stack, tiny_hf):
    a = client(stack, "team-a")
    a.upload_checkpoint("base", tiny_hf)
    conv = a.wait(a.submit("convert", source="base", output="base-tp1", check_parity=False)["id"], timeout=300)
    assert conv["state"] == "succeeded", (conv, stack.log_tail())

    records = [{"text": "the quick brown fox jumps over the lazy dog. " * 4} for _ in range(16)]
    config = {"data": records, "train_iters": 4, "micro_batch_size": 2, "global_batch_size": 2, "seq_length": 32,
              "lr": 1e-3, "lr_warmup_iters": 0, "export_hf": False}
    job = a.submit("finetune", source="base-tp1", output="base-ft", config=config)
    events = list(a.stream_events(job["id"]))
    done = a.get(job["id"])
    assert done["state"] == "succeeded", (done, stack.log_tail())
    steps = [e for e in events if e["type"] == "progress" and e.get("phase") == "train"]
    # progress is throttled: the first and last steps are always reported
    assert steps[0]["step"] == 1 and steps[-1]["step"] == 4 and all(e["loss"] > 0 for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns the repeated sentence
    ck = a.get_checkpoint("base-ft")
    assert ck["layout"]["tp"] == 1 and ck["service"]["job_id"] == job["id"]

    # eval: the converted checkpoint against its own HF source reproduces the scores exactly
    ev = a.wait(a.submit("eval", source="base-tp1", reference="base", tasks=["arithmetic_mc"], limit=8)["id"],
                timeout=600)
    assert ev["state"] == "succeeded", (ev, stack.log_tail())
    report = ev["result"]["reports"][0]
    assert ev["result"]["passed"] is True and report["dtype"] == "fp32"
    assert report["mean_percent_error"] == 0.0
    # the finetuned checkpoint is a different model: its log-probs move away from the reference
    ev2 = a.wait(a.submit("eval", source="base-ft", reference="base", tasks=["arithmetic_mc"], limit=8)["id"],
                 timeout=600)
    assert ev2["state"] == "succeeded", (ev2, stack.log_tail())
    assert ev2["result"]["reports"][0]["logprob"]["mean_abs_delta"] > 1e-3


def test_eval_needs_an_uploaded_reference(stack, tiny_hf):
    from services.client import ApiError

    a = client(stack, "team-a")
    with pytest.raises(ApiError) as e:
        a.submit("eval", source="base", reference="nope", tasks=["arithmetic_mc"])
    assert e.value.status == 404 and "reference checkpoint 'nope' not found" in str(e.value)
