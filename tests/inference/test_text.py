"""Stop strings across token boundaries, never leaked; UTF-8 held back until complete."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from shared.assets import smollm2_hf_dir
from shared.inference.stop import TextTracker


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(smollm2_hf_dir())


def feed(tok, text, stop=(), include_stop=False, prompt="Say:"):
    ids = tok(text).input_ids
    tr = TextTracker(tok, tok(prompt).input_ids, stop, include_stop)
    chunks = []
    for i in ids:
        chunks.append(tr.add([i]))
        if tr.stopped:
            break
    else:
        chunks.append(tr.finish())
    return tr, chunks, ids


def test_no_stop_reproduces_the_text_with_leading_space(tok):
    tr, chunks, _ = feed(tok, " Hello world, how are you?")
    assert "".join(chunks) == " Hello world, how are you?" == tr.text


def test_stop_string_split_across_tokens_is_not_leaked(tok):
    text = " The answer is 42. END OF STORY and more"
    ids = tok(text).input_ids
    pieces = [tok.decode([i]) for i in ids]
    assert not any("END OF" in p for p in pieces)  # the stop string really spans tokens
    tr, chunks, _ = feed(tok, text, stop=["END OF STORY"])
    assert tr.stopped == "END OF STORY"
    assert "".join(chunks) == tr.text == " The answer is 42. "
    assert all("END" not in c for c in chunks)
    # the ids kept end with the token that completed the stop string
    assert tok.decode(tr.ids).endswith("STORY")


def test_partial_prefix_is_held_then_released(tok):
    tr = TextTracker(tok, [], stop=["<<STOP>>"])
    ids = tok(" a <<ST").input_ids
    shown = "".join(tr.add([i]) for i in ids)
    assert shown == " a "  # "<<ST" might still become the stop string
    shown += tr.add(tok(" no").input_ids)
    assert shown == " a <<ST no"
    assert tr.stopped is None


def test_include_stop(tok):
    tr, chunks, _ = feed(tok, " one\ntwo\nthree", stop=["\n"], include_stop=True)
    assert "".join(chunks) == " one\n" == tr.text


def test_earliest_stop_wins(tok):
    tr, chunks, _ = feed(tok, " alpha beta gamma", stop=["gamma", "beta"])
    assert tr.text == " alpha " and tr.stopped == "beta"


def test_incomplete_utf8_is_held_back(tok):
    ids = tok(" café ☃ ok").input_ids
    tr = TextTracker(tok, [], ())
    shown = [tr.add([i]) for i in ids] + [tr.finish()]
    assert "".join(shown) == " café ☃ ok"
    assert not any("\ufffd" in s for s in shown)
