"""`python -m services.generate reference | compare` on a tiny model (in-process entry point)."""

from __future__ import annotations

import json

from services.generate.__main__ import main
from services.generate.reference import first_divergence
from tests.inference.helpers import tiny_hf_dir, tiny_native_dir


def test_compare_native_checkpoint_with_hf(tmp_path, capsys):
    hf, native = tiny_hf_dir(tmp_path), tiny_native_dir(tmp_path)
    rc = main(["compare", "--load", str(native), "--model-path", str(hf), "--prompt", "Hello there",
               "--prompt", "The capital of France is", "--tokens-to-generate", "12", "--max-seq-len", "64"])
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert rc == 0, lines
    assert [l["result"] for l in lines] == ["identical", "identical"]
    assert main(["reference", "--model-path", str(hf), "--prompt", "Hello there", "--tokens-to-generate", "5"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert len(ref["token_ids"]) == 5 and ref["prompt"] == "Hello there"
    assert ref["text"] == lines[0]["text"][: len(ref["text"])]


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == (1, 2, 5)
    assert first_divergence([1, 2], [1, 2, 3]) == (2, None, 3)


def test_bad_load_path_is_a_clear_error(tmp_path, capsys):
    assert main(["compare", "--load", str(tmp_path / "nope"), "--model-path", str(tmp_path),
                 "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
