"""bench/gpu_check.sh end to end in its tiny mode on CPU: every section reports, none crashes unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import SECTIONS

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, env_extra: dict | None = None) -> tuple[int, list[dict]]:
    env = {**os.environ, "PYTHON": sys.executable, **(env_extra or {})}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stderr[-3000:]
    return out.returncode, lines


@pytest.mark.slow
def test_every_section_reports_a_line_in_order():
    rc, lines = _run()
    names = [line["section"] for line in lines]
    assert names == [*SECTIONS, "done"], names
    errors = {line["section"]: line.get("traceback") for line in lines if "error" in line}
    assert not errors and rc == 0, errors
    by = {line["section"]: line for line in lines}
    assert by["decode"]["engine_batch1_tok_s"] > 0 and by["decode"]["engine_batch16_tok_s"] > 0
    assert by["graph_vs_eager"]["compiled_vs_eager_argmax_equal"] is True
    assert by["train"]["ours_tok_s"] > 0 and by["train"]["hf_tok_s"] > 0
    assert by["devices"]["disjoint"] is True
    assert by["done"]["measured_on_gpu"] is False and "not GPU figures" in by["done"]["note"]


def test_without_transformers_the_hf_parts_skip_and_the_rest_runs(tmp_path):
    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('transformers hidden for this test')\n")
    rc, lines = _run("--sections", "env,decode_hf,train,devices", env_extra={"PYTHONPATH": str(tmp_path)})
    by = {line["section"]: line for line in lines}
    assert rc == 0, lines
    assert by["env"]["transformers"] is None
    assert "not installed" in by["decode_hf"]["skipped"]
    assert by["train"]["ours_tok_s"] > 0 and "not installed" in by["train"]["hf"]


def test_a_failing_section_is_reported_and_the_next_still_runs():
    rc, lines = _run("--sections", "bandwidth,devices", "--prompt-len", "0", env_extra={"LLAMA_SVC_TRAIN_GPUS": "x"})
    by = {line["section"]: line for line in lines}
    assert rc == 1 and "error" in by["devices"] and "not a CUDA device" in by["devices"]["error"]
    assert "copy_gbs" in by["bandwidth"] and by["done"]["failed_sections"] == 1
