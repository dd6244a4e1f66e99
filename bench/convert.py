"""Benchmark: convert the real SmolLM2-135M (≈540 MB fp32) at TP1 and TP3·PP2.

Prints, per layout: conversion wall time as a ratio to copying the same bytes in the same
run (in-process, imports excluded; copy and conversion alternate --repeats times and the ratio
is the median of each conversion over the copy just before it, so the disk's drift during the
run hits both alike; the range of those ratios is shown too, and the CLI's wall time including
interpreter start), and the converting process's peak RSS (the highest of up to three CLI
runs) as a ratio to the checkpoint size
(targets: ≤ 1.5× copy; peak RSS ≤ 0.3× checkpoint + 0.5 GB).

    python bench/convert.py [--layouts 1x1,3x2] [--validate]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def copy_seconds(files: list[Path], dest: Path) -> float:
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dest / f.name)
        with open(dest / f.name, "rb") as fh:
            os.fsync(fh.fileno())  # the converter fsyncs its files too
    return time.perf_counter() - t0


def quiet_disk(work: Path) -> None:
    """Remove the previous outputs and let the file system finish with them, so neither timed
    step pays for freeing the other's blocks."""
    for d in ("copy", "out"):
        shutil.rmtree(work / d, ignore_errors=True)
    os.sync()


def cli_run(src: Path, out: Path, tp: int, pp: int, validate: bool) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of `python -m services.convert` as a child process."""
    cmd = [sys.executable, "-m", "services.convert", "--model-type", "GPT", "--loader", "llama_mistral",
           "--saver", "mcore", "--checkpoint-type", "hf", "--load-dir", str(src), "--save-dir", str(out),
           "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp), "--overwrite"]
    if not validate:
        cmd.append("--no-validate")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    # VmHWM is the child's own high-water mark (ru_maxrss would inherit this process's peak)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="1x1,3x2", help="comma-separated TPxPP list (default: %(default)s)")
    ap.add_argument("--validate", action="store_true", help="also run with the parity check on")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per layout; medians are reported")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    from shared.assets import smollm2_hf_dir
    from shared.checkpoint.convert import ConvertOptions, convert

    src = smollm2_hf_dir()
    from shared.tokenizer import load_source_tokenizer

    load_source_tokenizer(src)  # warm the transformers imports, which the timing excludes
    weights = sorted(src.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    results = []
    try:
        for spec in args.layouts.split(","):
            tp, pp = (int(x) for x in spec.lower().split("x"))
            for validate in ([False, True] if args.validate else [False]):
                copies, convs = [], []
                for _ in range(args.repeats):  # alternate, so drift hits both alike; report medians
                    quiet_disk(work)
                    copies.append(copy_seconds(weights, work / "copy"))
                    quiet_disk(work)
                    t0 = time.perf_counter()
                    convert(ConvertOptions(load_dir=src, save_dir=work / "out", target_tp=tp, target_pp=pp,
                                           validate=validate))
                    convs.append(time.perf_counter() - t0)
                copy_s, conv_s = statistics.median(copies), statistics.median(convs)
                ratios = [c / k for c, k in zip(convs, copies)]
                clis = [cli_run(src, work / "out_cli", tp, pp, validate) for _ in range(min(3, args.repeats))]
                cli_s = statistics.median(w for w, _ in clis)
                rss = max(r for _, r in clis)  # a memory bound: the worst run counts
                row = {"layout": f"TP{tp}·PP{pp}", "validate": validate, "checkpoint_mb": round(size / 1e6),
                       "copy_s": round(copy_s, 3), "convert_s": round(conv_s, 3),
                       "convert_over_copy": round(statistics.median(ratios), 2),
                       "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)], "cli_wall_s": round(cli_s, 2),
                       "peak_rss_mb": round(rss / 1e6), "rss_over_checkpoint": round(rss / size, 3),
                       "rss_target_mb": round((0.3 * size + 0.5e9) / 1e6)}
                results.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(work / "copy", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| layout | validate | copy s | convert s | ×copy | ×copy range | CLI wall s | peak RSS MB | RSS/ckpt "
          "| RSS target MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lo, hi = r["ratio_range"]
        print(f"| {r['layout']} | {r['validate']} | {r['copy_s']} | {r['convert_s']} | {r['convert_over_copy']} | "
              f"{lo}–{hi} | "
              f"{r['cli_wall_s']} | {r['peak_rss_mb']} | {r['rss_over_checkpoint']} | {r['rss_target_mb']} |")


if __name__ == "__main__":
    main()
