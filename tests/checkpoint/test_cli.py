"""``python -m services.convert``: the seed's flags verbatim, progress, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared.checkpoint import native

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "services.convert", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300, **kw)


def test_seed_command_converts(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama2")
    r = cli("--model-type", "GPT", "--loader", "llama_mistral", "--saver", "mcore", "--checkpoint-type", "hf",
            "--load-dir", src, "--save-dir", tmp_path / "out", "--tokenizer-model", src / "tokenizer.model",
            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--bf16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str((tmp_path / "out").absolute())
    assert "convert:" in r.stderr and "validated" in r.stderr
    m = native.verify(tmp_path / "out")
    assert (m.layout.tp, m.layout.pp, m.dtype.itemsize) == (2, 2, 2)
    assert "--target-tensor-parallel-size 2" in m.raw["provenance"]["command"]


def test_user_error_is_one_line_exit_2(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama3")
    r = cli("--load-dir", src, "--save-dir", tmp_path / "out", "--target-tensor-parallel-size", "3")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "valid TP sizes" in r.stderr
    assert not (tmp_path / "out").exists()


def test_help_explains_every_flag():
    r = cli("--help")
    assert r.returncode == 0
    for flag in ("--model-type", "--loader", "--saver", "--checkpoint-type", "--model-size", "--load-dir",
                 "--save-dir", "--tokenizer-model", "--target-tensor-parallel-size",
                 "--target-pipeline-parallel-size", "--bf16", "--fp16", "--dtype", "--make-vocab-size-divisible-by",
                 "--true-vocab-size", "--ckpt-format", "--saver-transformer-impl", "--no-validate", "--overwrite"):
        assert flag in r.stdout, flag
