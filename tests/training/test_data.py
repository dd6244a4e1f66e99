"""JSONL records -> masked tokens -> packed rows, and the LR schedule (no processes)."""

from __future__ import annotations

import json

import pytest
import torch

from shared.specs.train import ConfigError, TrainConfig
from shared.training.data import DataError, batch_indices, build_datasets, load_samples
from shared.training.optim import learning_rate
from tests.training.conftest import write_jsonl


@pytest.fixture(scope="module")
def tok(assets):
    return assets.tok


MALFORMED = {
    "bad_json": ('{"text": "fine"}\n{"text": "oops"\n', r":2: not valid JSON"),
    "not_object": ('{"text": "fine"}\n["a", "b"]\n', r":2: expected a JSON object, got list"),
    "unknown_keys": ('{"body": "x"}\n', r":1: a record needs \"text\".*found keys \['body'\]"),
    "text_not_string": ('{"text": 5}\n', r":1: \"text\" must be a string, got int"),
    "empty_text": ('\n\n{"text": ""}\n', r":3: \"text\" is empty"),
    "prompt_without_completion": ('{"prompt": "q"}\n', r":1: a prompt/completion record lacks \"completion\""),
    "messages_not_list": ('{"messages": "hi"}\n', r":1: \"messages\" must be a non-empty list"),
    "message_without_content": ('{"messages": [{"role": "user"}]}\n', r":1: messages\[0\] must be an object"),
    "bad_role": ('{"messages": [{"role": "robot", "content": "x"}]}\n', r":1: messages\[0\] has role 'robot'"),
    "no_assistant": ('{"messages": [{"role": "user", "content": "x"}]}\n', r":1: the conversation has no assistant"),
    "assistant_first": ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}\n',
                        r":1: the conversation starts with an assistant message"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_line_names_file_and_line(tmp_path, tok, case):
    text, pattern = MALFORMED[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + pattern):
        load_samples([path], tok)


def test_missing_file_and_non_utf8(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        load_samples([tmp_path / "nope.jsonl"], tok)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="latin1.jsonl: not UTF-8"):
        load_samples([bad], tok)


def test_messages_without_chat_template_is_refused(tmp_path, assets):
    from copy import deepcopy

    tok = deepcopy(assets.tok)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: \"messages\" needs a tokenizer with a chat template"):
        load_samples([path], tok)


def _targets(tok, sample) -> str:
    return tok.decode([i for i, m in zip(sample.ids, sample.mask) if m])


def test_loss_only_on_completion_and_assistant_tokens(tmp_path, tok):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Question: what is it?", "completion": " A license."}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"}]}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "all of it"}])
    (s_pc,), (s_chat,), (s_text,) = (load_samples([p], tok) for p in (pc, chat, text))
    assert _targets(tok, s_pc) == " A license.</s>"
    assert s_pc.ids[0] == tok.bos_token_id and s_pc.mask[0] == 0
    assert _targets(tok, s_chat) == "first answer<|im_end|>\nsecond answer<|im_end|>\n"
    assert tok.decode(s_chat.ids) == tok.apply_chat_template(json.loads(chat.read_text())["messages"], tokenize=False)
    assert s_text.mask == [0] + [1] * (len(s_text.ids) - 1)  # BOS is never a target
    assert _targets(tok, s_text) == "all of it</s>"


def test_overlong_samples_truncated_or_dropped_with_counts(tmp_path, tok):
    recs = [{"text": "short one"}, {"text": "word " * 200}, {"prompt": "word " * 200, "completion": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    train, _ = build_datasets(tok, [str(path)], 32, seed=0, overlong="truncate")
    # the long text is cut to one row; the long prompt leaves no target within the row: dropped
    assert (train.stats["truncated"], train.stats["dropped"], train.stats["samples"]) == (2, 1, 2)
    train, _ = build_datasets(tok, [str(path)], 32, seed=0, overlong="drop")
    assert (train.stats["truncated"], train.stats["dropped"], train.stats["samples"]) == (0, 2, 1)
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "completion": "x"}])
    with pytest.raises(DataError, match="no train sample has a target token within --seq-length 32"):
        build_datasets(tok, [str(only_long)], 32, seed=0)


def test_packing_shuffling_and_validation_split(assets, tok):
    train, valid = build_datasets(tok, [str(assets.text)], 128, seed=3, valid_fraction=0.1)
    assert train.tokens.shape[1] == 129 and train.mask.shape == train.tokens.shape
    assert valid is not None and valid.stats["samples"] == 12 and train.stats["samples"] == 108
    assert train.stats["rows"] < train.stats["samples"]  # several samples share a row
    again, _ = build_datasets(tok, [str(assets.text)], 128, seed=3, valid_fraction=0.1)
    other, _ = build_datasets(tok, [str(assets.text)], 128, seed=4, valid_fraction=0.1)
    assert again.fingerprint() == train.fingerprint() != other.fingerprint()
    # validation rows are held-out samples: none of their rows appear among the training rows
    train_rows = {tuple(r.tolist()) for r in train.tokens}
    assert not any(tuple(r.tolist()) in train_rows for r in valid.tokens)
    # padding is never a target; every row has targets
    assert not train.mask[train.tokens == tok.pad_token_id].any() and train.mask.any(dim=1).all()


def test_batches_are_a_seeded_epoch_stream():
    n, g = 10, 4
    stream = torch.cat([batch_indices(n, 7, i, g) for i in range(5)])  # two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:20].tolist()) == list(range(10))
    assert stream[:10].tolist() != stream[10:20].tolist()
    assert torch.equal(batch_indices(n, 7, 3, g), stream[12:16])
    assert not torch.equal(batch_indices(n, 8, 0, g), stream[:4])


def _cfg(**kw):
    base = dict(load="x", save="y", data_path=("d",), train_iters=100, lr=1.0, min_lr=0.1, lr_warmup_iters=10)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule():
    cos = _cfg(lr_decay_style="cosine")
    assert learning_rate(0, cos) == pytest.approx(0.1) and learning_rate(9, cos) == pytest.approx(1.0)
    assert learning_rate(54, cos) == pytest.approx(0.55)  # halfway through the decay
    assert learning_rate(99, cos) == pytest.approx(0.1)
    lin = _cfg(lr_decay_style="linear")
    assert learning_rate(31, lin) == pytest.approx(1.0 - 0.9 * 22 / 90)
    assert learning_rate(50, _cfg(lr_decay_style="constant")) == 1.0
    assert learning_rate(150, _cfg(lr_decay_iters=100, train_iters=200)) == pytest.approx(0.1)


def test_bad_options_are_refused_with_the_flag_named():
    with pytest.raises(ConfigError, match="--global-batch-size 6 must be a multiple of --micro-batch-size"):
        _cfg(micro_batch_size=4, global_batch_size=6)
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of TP"):
        _cfg(tensor_model_parallel_size=2, world_size=3)
    with pytest.raises(ConfigError, match="--lora-targets"):
        _cfg(finetune_method="lora", lora_targets=("q_proj",))
    with pytest.raises(ConfigError, match="--lr-decay-style 'exp'"):
        _cfg(lr_decay_style="exp")
