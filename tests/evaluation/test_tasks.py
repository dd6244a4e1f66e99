"""Bundled task generation and user task files."""

from __future__ import annotations

import json
import re

import pytest

from shared.evaluation.tasks import (BUNDLED, WORDS, TaskFileError, bundled_items, english_sentences, prepare_tasks,
                                     read_task_file, task_yaml)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".jsonl"}


def test_bundled_tasks_are_deterministic_and_seeded(tmp_path):
    a = prepare_tasks(["all"], tmp_path / "a", items=60)
    b = prepare_tasks(["all"], tmp_path / "b", items=60)
    c = prepare_tasks(["all"], tmp_path / "c", items=60, seed=7)
    assert a.names == list(BUNDLED)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    for name in BUNDLED:
        assert _files(tmp_path / "a")[f"{name}.jsonl"] != _files(tmp_path / "c")[f"{name}.jsonl"]
        items = a.items[name]
        assert len(items) == 60
        assert len({it["gold"] for it in items}) > 1, "the right answer must not sit at one position"
        assert all(len(set(it["choices"])) == len(it["choices"]) == 4 for it in items)


def test_default_size_is_a_few_hundred_items():
    for name in BUNDLED:
        assert len(bundled_items(name)) == 300


def test_arithmetic_gold_is_the_right_answer():
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    for it in bundled_items("arithmetic_mc", 200):
        a, op, b = re.match(r"Question: What is (\d+) (\w+) (\d+)\?", it["query"]).groups()
        assert it["choices"][it["gold"]] == str(ops[op](int(a), int(b)))


def test_unscramble_gold_is_the_word_and_the_rest_are_its_letters():
    for it in bundled_items("unscramble_mc", 200):
        scrambled = re.search(r'"(\w+)"', it["query"]).group(1)
        assert it["choices"][it["gold"]] in WORDS
        assert scrambled not in it["choices"]
        assert all(sorted(c) == sorted(scrambled) for c in it["choices"])


def test_dates_gold_is_the_right_date():
    import datetime as dt

    offsets = {"tomorrow": 1, "yesterday": -1, "one week from today": 7, "one week ago": -7,
               "the day after tomorrow": 2, "the day before yesterday": -2}
    for it in bundled_items("dates_mc", 200):
        m = re.match(r"Today is (\w+), (\w+ \d+, \d+)\. What (?:is|was) the date (.+)\?\nAnswer:", it["query"])
        weekday, today, when = m.groups()
        today = dt.datetime.strptime(today, "%B %d, %Y").date()
        assert today.strftime("%A") == weekday
        k = re.match(r"(\d+) days (from today|ago)", when)
        delta = (int(k.group(1)) * (1 if k.group(2) == "from today" else -1)) if k else offsets[when]
        gold = dt.datetime.strptime(it["choices"][it["gold"]], "%B %d, %Y").date()
        assert gold == today + dt.timedelta(days=delta)


def test_cloze_items_are_real_sentence_prefixes():
    sentences, source = english_sentences()
    assert len(sentences) > 300 and "pydoc_data" in source
    text = "\n".join(sentences)
    for it in bundled_items("cloze_mc", 100):
        assert f"{it['query']} {it['choices'][it['gold']]}" in text


def test_yaml_points_at_the_absolute_jsonl(tmp_path):
    ts = prepare_tasks(["arithmetic_mc"], tmp_path / "t")
    y = (tmp_path / "t" / "arithmetic_mc.yaml").read_text()
    assert "task: arithmetic_mc" in y and "output_type: multiple_choice" in y
    assert json.dumps(str((tmp_path / "t" / "arithmetic_mc.jsonl").resolve())) in y
    assert "relative" not in task_yaml("x", tmp_path / "x.jsonl")
    assert ts.names == ["arithmetic_mc"]


def test_user_jsonl_task(tmp_path):
    f = tmp_path / "my_task.jsonl"
    f.write_text('{"query": "Q1", "choices": ["a", "b"], "gold": 1, "id": 3}\n\n{"query": "Q2", "choices": ["x", "y", "z"], "gold": 0}\n')
    ts = prepare_tasks(["arithmetic_mc", str(f), f"other={f}"], tmp_path / "t", items=10)
    assert ts.names == ["arithmetic_mc", "my_task", "other"]
    assert len(ts.items["my_task"]) == 2
    assert str(f.resolve()) in (tmp_path / "t" / "my_task.yaml").read_text()


BAD_LINES = [
    ('{"query": "Q", "choices": ["a", "b"], "gold": 0', r"line 2: not valid JSON"),
    ('["Q", ["a", "b"], 0]', r"line 2: expected a JSON object, got list"),
    ('{"query": "Q", "choices": ["a", "b"]}', r"line 2: missing field\(s\) gold"),
    ('{"choices": ["a", "b"], "gold": 0}', r"line 2: missing field\(s\) query"),
    ('{"query": "Q", "choices": ["a", "b"], "gold": 2}', r"line 2: \"gold\" 2 is out of range for 2 choices"),
    ('{"query": "Q", "choices": ["a", "b"], "gold": -1}', r"line 2: \"gold\" -1 is out of range"),
    ('{"query": "Q", "choices": ["a", "b"], "gold": true}', r"line 2: \"gold\" must be an integer"),
    ('{"query": "Q", "choices": ["a"], "gold": 0}', r"line 2: \"choices\" must be a list of at least two"),
    ('{"query": "Q", "choices": ["a", "a"], "gold": 0}', r"line 2: \"choices\" must be distinct"),
    ('{"query": "", "choices": ["a", "b"], "gold": 0}', r"line 2: \"query\" must be a non-empty string"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_task_file_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"query": "ok", "choices": ["a", "b"], "gold": 0}\n' + line + "\n")
    with pytest.raises(TaskFileError, match=message) as e:
        prepare_tasks([str(f)], tmp_path / "t")
    assert str(f) in str(e.value) and '"query"' in str(e.value)  # the schema is quoted as the fix
    assert not (tmp_path / "t" / "bad.yaml").exists()


def test_missing_empty_unknown_and_clashing_tasks(tmp_path):
    with pytest.raises(TaskFileError, match=r"nope\.jsonl does not exist"):
        read_task_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskFileError, match=r"empty\.jsonl holds no items"):
        prepare_tasks([str(tmp_path / "empty.jsonl")], tmp_path / "t")
    with pytest.raises(TaskFileError, match=r"unknown task 'hellaswag'.*arithmetic_mc"):
        prepare_tasks(["hellaswag"], tmp_path / "t")
    clash = tmp_path / "arithmetic_mc.jsonl"
    clash.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(TaskFileError, match=r"bundled task; pass NAME=PATH"):
        prepare_tasks([str(clash)], tmp_path / "t")
    with pytest.raises(TaskFileError, match=r"given twice"):
        prepare_tasks(["arithmetic_mc", "arithmetic_mc"], tmp_path / "t")
    with pytest.raises(TaskFileError, match=r"no tasks given"):
        prepare_tasks([" "], tmp_path / "t")
