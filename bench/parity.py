"""Benchmark: the default conversion (conversion + parity report) of a Llama-3-8B-shaped bf16 checkpoint at TP2·PP2.

Builds a random checkpoint of that shape itself (16 GB of bf16 in four safetensors shards with an
index, SmolLM2's tokenizer) in a temporary directory, then times, each after the previous output
is removed, synced and the source dropped from the page cache:

    copy      the four shard files copied and fsynced (as the converter syncs its output)
    convert   `python -m services.convert ... --no-validate` (the CLI's wall time)
    default   the same command without --no-validate: the conversion and its parity report

and prints each as a ratio to the copy with the peak RSS of all the command's processes (the
highest sampled sum, and the sum of every process's own high-water mark, an upper bound), the
stored report's summary, and the planner's figures for this shape and a 70B one (no weights).
Targets: default ≤ 5× the copy and ≤ 4 GB; --no-validate ≤ 1.5× and ≤ 2 GB.

    python bench/parity.py [--workdir DIR] [--layers N] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.convert import copy_seconds, quiet_disk  # noqa: E402

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
             "bos_token_id": 1, "eos_token_id": 2}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}
SHARD_BYTES = 4_000_000_000


def write_random_hf(directory: Path, config: dict, dtype="bf16", shard_bytes: int = SHARD_BYTES, seed: int = 0) -> int:
    """A random HF checkpoint of ``config`` (weights N(0, 0.02²), norms ≈ 1), written one tensor at a
    time into safetensors shards with an index. Returns the bytes of weights written."""
    import torch

    from shared.checkpoint import layout as param_layout
    from shared.checkpoint.writer import StreamingSafetensorsWriter
    from shared.dtypes import parse_dtype
    from shared.config import ModelConfig

    cfg, dt = ModelConfig.from_hf(config), parse_dtype(dtype)
    names = param_layout.hf_names(cfg)
    groups, used = [[]], 0
    for n in names:
        size = torch.Size(param_layout.hf_shape(cfg, n)).numel() * dt.itemsize
        if groups[-1] and used + size > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += size
    directory.mkdir(parents=True, exist_ok=True)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    g, total = torch.Generator().manual_seed(seed), 0
    for fname, group in zip(files, groups):
        entries = [(n, param_layout.hf_shape(cfg, n), dt) for n in group]
        w = StreamingSafetensorsWriter(directory / fname, entries, {"format": "pt"})
        for n in group:
            t = torch.empty(param_layout.hf_shape(cfg, n), dtype=dt)
            t.normal_(1.0 if "norm" in n else 0.0, 0.1 if "norm" in n else 0.02, generator=g)
            w.add(n, t)
            total += t.numel() * dt.itemsize
        w.close()
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, grp in zip(files, groups) for n in grp}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config))
    return total


def _forget(files: list[Path]) -> None:
    """Drop the files from the page cache, so every timed step reads them from the disk alike."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_tree(cmd: list[str]) -> dict:
    """Wall seconds of ``cmd`` and the RSS of it and all its children: the highest sampled sum, and the
    sum of each process's own high-water mark (VmHWM)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    root, peak_sum, hwm = psutil.Process(proc.pid), 0, {}
    while proc.poll() is None:
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                total += p.memory_info().rss
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm[p.pid] = max(hwm.get(p.pid, 0), int(line.split()[1]) * 1024)
            except (psutil.Error, OSError):
                pass
        peak_sum = max(peak_sum, total)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(peak_sum / 1e9, 2),
            "sum_of_hwm_gb": round(sum(hwm.values()) / 1e9, 2), "processes": len(hwm)}


def convert_cmd(src: Path, out: Path, tok: Path, validate: bool, full_depth: bool) -> list[str]:
    """The README's command (the size cross-check only for the full 32 layers)."""
    cmd = [sys.executable, "-m", "services.convert", "--model-type", "GPT", "--loader", "llama_mistral",
           "--saver", "mcore", "--checkpoint-type", "hf", "--load-dir", str(src), "--save-dir", str(out),
           "--tokenizer-model", str(tok), "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size",
           "2", "--bf16", "--overwrite"] + (["--model-size", "llama3-8B"] if full_depth else [])
    return cmd if validate else cmd + ["--no-validate"]


def plans() -> list[dict]:
    import torch

    from shared.checkpoint.layout import Layout
    from shared.checkpoint.parity.plan import make_plan
    from shared.config import ModelConfig

    rows = []
    for name, hf in (("8B", LLAMA3_8B), ("70B", LLAMA3_70B)):
        cfg = ModelConfig.from_hf(hf)
        p = make_plan(cfg, Layout(2, 2), torch.bfloat16, torch.float32, 4, 32)
        rows.append({"shape": name, "params_b": round(cfg.num_parameters() / 1e9, 2),
                     "planned_peak_gb": round(p.peak_bytes / 1e9, 2),
                     "one_layer_fp32_gb": round(p.reference_layer_bytes / 1e9, 2),
                     "two_fp32_models_gb": round(2 * 4 * cfg.num_parameters() / 1e9, 1),
                     "greedy_tokens": p.greedy_tokens})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir under /work)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B shape (default: %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="only the planner's figures (no weights)")
    args = ap.parse_args()
    for row in plans():
        print(json.dumps({"plan": row}), flush=True)
    if args.dry_run:
        return
    from shared.assets import smollm2_hf_dir

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-parity-", dir="/work"))
    src = work / "src"
    try:
        t0 = time.perf_counter()
        size = write_random_hf(src, {**LLAMA3_8B, "num_hidden_layers": args.layers})
        print(json.dumps({"source_gb": round(size / 1e9, 2), "written_s": round(time.perf_counter() - t0, 1)}),
              flush=True)
        shards = sorted(src.glob("*.safetensors"))
        tok = smollm2_hf_dir()
        rows = {}
        for step in ("copy", "convert", "default"):
            quiet_disk(work)
            _forget(shards)
            if step == "copy":
                rows[step] = {"wall_s": round(copy_seconds(shards, work / "copy"), 1)}
            else:
                rows[step] = run_tree(convert_cmd(src, work / "out", tok, step == "default", args.layers == 32))
            print(json.dumps({step: rows[step]}), flush=True)
        report = json.loads((work / "out" / "parity.json").read_text())
        _print(rows, report)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _print(rows: dict, report: dict) -> None:
    copy = rows["copy"]["wall_s"]
    print(f"\nparity {'PASS' if report['passed'] else 'FAIL'}: max |dlogits| {report['max_abs_logit_diff']:.3g}, "
          f"top-1 {report['top1_agreement']:.1%} over {report['positions']} positions, largest |dhidden| "
          f"{report['worst']['relative']:.2g} of scale at {report['worst']['where']}, {report['seconds']} s, "
          f"planned peak {report['planned_peak_bytes'] / 1e9:.2f} GB")
    print("\n| step | wall s | × copy | peak RSS GB (sampled sum) | sum of VmHWM GB |")
    print("|---|---|---|---|---|")
    for step, r in rows.items():
        print(f"| {step} | {r['wall_s']} | {r['wall_s'] / copy:.2f} | {r.get('peak_rss_gb', '')} | "
              f"{r.get('sum_of_hwm_gb', '')} |")


if __name__ == "__main__":
    main()
