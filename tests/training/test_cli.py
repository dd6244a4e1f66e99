"""``python -m services.train`` end to end in its own processes, and its refusal of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from shared.checkpoint.native import load_manifest, load_rank_state_dict
from shared.model import load_stage
from shared.parallel.state import ParallelContext
from tests.training.conftest import write_jsonl


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "services.train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_trains_saves_and_exports_native_and_hf(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    r = cli("--load", assets.hf, "--save", out, "--data-path", assets.pc, assets.chat, "--train-iters", 4,
            "--micro-batch-size", 2, "--global-batch-size", 4, "--seq-length", 96, "--lr", 3e-3,
            "--lr-warmup-iters", 1, "--lr-decay-style", "linear", "--save-interval", 2, "--eval-interval", 2,
            "--eval-iters", 1, "--valid-fraction", 0.1, "--recompute-activations", "--bf16",
            "--metrics-file", tmp_path / "metrics.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "iteration      4/4 | loss" in r.stdout and "validation loss" in r.stdout
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["phase"] == "train"]
    assert [x["iteration"] for x in train_lines] == [1, 2, 3, 4]
    assert all(x["tokens_per_s"] > 0 and x["grad_norm"] > 0 for x in train_lines)
    assert sum(x["phase"] == "eval" for x in lines) == 2
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert {p.name for p in out.iterdir()} >= {"iter_0000002", "iter_0000004", "release", "hf"}
    # bf16 model files, fp32 master weights in the optimizer state
    m = load_manifest(out / "release")
    assert m.dtype == torch.bfloat16 and (out / "release" / "tokenizer" / "tokenizer.json").exists()
    from safetensors import safe_open
    with safe_open(str(out / "iter_0000004" / "training" / "optim_tp0_pp0.safetensors"), "pt") as f:
        masters = [k for k in f.keys() if k.endswith("/master")]
        assert masters and f.get_tensor(masters[0]).dtype == torch.float32
    # the native release and the HF export are the same model
    stage = load_stage(m.config, ParallelContext.single(),
                       load_rank_state_dict(out / "release", 0, 0), dtype=torch.float32)
    ids = torch.randint(0, m.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (stage(ids) - hf(ids).logits).abs().max() < 1e-4


def test_cli_refuses_malformed_data_before_starting_processes(assets, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}])
    with open(bad, "a") as f:
        f.write('{"prompt": 1, "completion": "x"}\n')
    r = cli("--load", assets.hf, "--save", tmp_path / "run", "--data-path", bad, "--train-iters", 2, timeout=120)
    assert r.returncode == 2
    assert f'{bad}:2: "prompt" must be a string' in r.stderr
    assert not (tmp_path / "run" / "latest_checkpointed_iteration.txt").exists()


def test_cli_refuses_a_layout_the_model_cannot_take(assets, tmp_path):
    r = cli("--load", assets.native, "--save", tmp_path / "run", "--data-path", assets.text, "--train-iters", 2,
            "--tensor-model-parallel-size", 3, timeout=120)
    assert r.returncode == 2 and "tensor-parallel size 3 does not divide the 2 kv heads" in r.stderr


def test_run_finetune_job_entry_point(assets, tmp_path):
    """The train queue's entry point: options from the job, inline data, the native model in save_dir."""
    from shared.checkpoint.native import verify
    from shared.training import run_finetune

    events = []
    records = [{"prompt": p[:40], "completion": p[40:120]} for p in assets.paras[:8]]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_finetune({"train_iters": 2, "micro_batch_size": 2, "global_batch_size": 2, "seq_length": 64,
                           "lr": 1e-3, "export_hf": False},
                          assets.native, tmp_path / "output", data=[data], progress=events.append,
                          should_cancel=lambda: False)
    assert result["status"] == "completed" and result["checkpoint"] == str(tmp_path / "output")
    assert verify(tmp_path / "output").config == assets.cfg
    steps = [e for e in events if e.get("phase") == "train"]
    assert [e["step"] for e in steps] == [1, 2] and all({"loss", "tokens_per_s", "eta_s"} <= set(e) for e in steps)
    metrics = [json.loads(line) for line in (tmp_path / "output-run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m and "step" in m][:2] == [1, 2]


def test_run_finetune_refuses_host_paths_from_a_job(assets, tmp_path):
    from shared.training import ConfigError, run_finetune

    for key, value in (("metrics_file", str(tmp_path / "x")), ("data_path", ["/etc/passwd"]), ("save", "/tmp")):
        try:
            run_finetune({"train_iters": 1, key: value}, assets.native, tmp_path / "out", data=[tmp_path / "d"])
        except ConfigError as e:
            assert key in str(e) and "host paths" in str(e)
        else:
            raise AssertionError(f"{key} was accepted")
    assert not (tmp_path / "x").exists() and not (tmp_path / "out-run").exists()
