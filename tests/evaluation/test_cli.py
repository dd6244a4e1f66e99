"""The eval command end to end on a tiny random model: our TP2 x PP2 engine against HF."""

from __future__ import annotations

import json
import shutil

import pytest

from services.generate.eval import main
from shared.checkpoint import native
from shared.checkpoint.convert import ConvertOptions, convert
from tests.model.families import make_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bpe_tokenizer_dir):
    """A tiny Llama-3 style HF model with a real BPE tokenizer, and its native conversion (TP1 PP1)."""
    root = tmp_path_factory.mktemp("tiny_eval")
    hf = root / "hf"
    make_hf_model("llama3", seed=3).save_pretrained(hf)
    for f in bpe_tokenizer_dir.iterdir():
        shutil.copy(f, hf / f.name)
    ckpt = root / "native"
    convert(ConvertOptions(load_dir=hf, save_dir=ckpt, validate=False))
    return hf, ckpt


def test_eval_native_checkpoint_tp2_pp2_writes_passing_reports_beside_the_manifest(tiny, tmp_path, capsys, dist_pool):
    hf, ckpt = tiny
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"query": f"The capital of {c} is", "choices": [" Paris", " Rome", " Oslo"],
                                        "gold": g}) + "\n" for c, g in [("France", 0), ("Italy", 1)]))
    rc = main(["--load", str(ckpt), "--reference", str(hf), "--tasks", f"arithmetic_mc,dates_mc,{mine}",
               "--dtype", "fp32,bf16", "--limit", "6", "--greedy-items", "2",
               "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], pool=dist_pool)
    out = capsys.readouterr().out
    eval_dir = ckpt / "eval"
    native.verify(ckpt)  # the reports beside the checkpoint leave its manifest's hashes valid
    fp32 = json.loads((eval_dir / "eval_fp32.json").read_text())
    assert [r["task"] for r in fp32["tasks"]] == ["arithmetic_mc", "dates_mc", "mine"]
    assert [r["n"] for r in fp32["tasks"]] == [6, 6, 2]
    assert all(r["percent_error"] == 0.0 for r in fp32["tasks"]) and fp32["mean_percent_error"] == 0.0
    assert fp32["logprob"]["n"] == 6 * 4 * 2 + 2 * 3
    assert fp32["logprob"]["max_abs_delta"] < 1e-4
    assert fp32["greedy"]["n"] == 6 and fp32["greedy"]["agreement"] == 1.0
    assert fp32["passed"] and fp32["parallel"] == {"tp": 2, "pp": 2}
    bf16 = json.loads((eval_dir / "eval_bf16.json").read_text())
    assert bf16["dtype"] == bf16["reference_dtype"] == "bf16"
    assert isinstance(bf16["mean_percent_error"], float) and bf16["logprob"]["n"] == fp32["logprob"]["n"]
    assert 0 < bf16["logprob"]["mean_abs_delta"] < 0.02
    assert rc == (0 if bf16["passed"] else 1), out  # the exit status says whether every report passed
    md = (eval_dir / "eval_fp32.md").read_text()
    assert "| arithmetic_mc | acc | 6 |" in md and "**0.00%**" in md and "PASSED" in md
    assert (eval_dir / "tasks" / "mine.yaml").exists() and (eval_dir / "tasks" / "arithmetic_mc.jsonl").exists()


def test_eval_rejects_a_bad_task_file_before_running(tiny, tmp_path, capsys):
    hf, ckpt = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 5}\n')
    rc = main(["--load", str(hf), "--reference", str(hf), "--tasks", str(bad), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}, line 1: \"gold\" 5 is out of range for 2 choices" in err
    assert not (tmp_path / "o").exists()  # nothing left behind


def test_eval_rejects_bad_layouts_and_paths(tiny, tmp_path, capsys):
    hf, _ = tiny
    assert main(["--load", str(hf), "--reference", str(hf), "--tensor-parallel-size", "3",
                 "--output", str(tmp_path / "o")]) == 2
    assert "tensor-parallel size 3" in capsys.readouterr().err
    assert main(["--load", str(tmp_path / "missing"), "--reference", str(hf), "--output", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["--load", str(hf), "--reference", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "not an HF model directory" in capsys.readouterr().err
