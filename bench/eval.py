"""Evaluation throughput: our lm-eval model class against lm-eval's own HF model, same items.

    python bench/eval.py [--model HF_DIR] [--tasks all] [--limit 25] [--threads 1] [--tp 1] [--pp 1]

Both run the bundled tasks through ``lm_eval.simple_evaluate`` on the same CPU thread budget
(our engine's workers get ``--threads`` each). Prints items/s for each, the ratio, and the
per-task accuracies (which should be equal in fp32). Default model: SmolLM2-135M (fp32).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _evaluate(lm, tasks, limit):
    from lm_eval import evaluator

    t0 = time.perf_counter()
    res = evaluator.simple_evaluate(model=lm, tasks=list(tasks.names), task_manager=tasks.task_manager(),
                                    limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    items = sum(min(limit or 10**9, len(tasks.items[n])) for n in tasks.names)
    return items / seconds, {n: res["results"][n]["acc,none"] for n in tasks.names}, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from shared.assets import smollm2_hf_dir
    from shared.evaluation.lm import MegatronLM
    from shared.evaluation.tasks import prepare_tasks
    from shared.parallel.launcher import ProcessGroupPool

    model = args.model or str(smollm2_hf_dir())
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        tasks = prepare_tasks(args.tasks.split(","), Path(work) / "tasks")
        pool = ProcessGroupPool(args.tp * args.pp, threads=args.threads)
        try:
            ours_lm = MegatronLM(model, dtype="fp32", tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
                                 pool=pool)
            ours, ours_acc, ours_s = _evaluate(ours_lm, tasks, args.limit)
            ours_lm.close()
        finally:
            pool.close()
        hf_lm = HFLM(pretrained=model, dtype="float32", device="cpu", batch_size=args.hf_batch_size)
        ref, ref_acc, ref_s = _evaluate(hf_lm, tasks, args.limit)

    print(f"model {model}, tasks {','.join(tasks.names)}, {args.limit} items each, fp32, "
          f"{args.threads} thread(s) per process, ours TP={args.tp} PP={args.pp}, lm-eval hf batch {args.hf_batch_size}")
    print(f"ours (llama-megatron):  {ours:7.2f} items/s  ({ours_s:.1f} s)")
    print(f"lm-eval hf:             {ref:7.2f} items/s  ({ref_s:.1f} s)")
    print(f"ratio ours / hf:        {ours / ref:7.2f}x")
    for n in tasks.names:
        print(f"  {n:14s} acc ours {ours_acc[n]:.4f}  hf {ref_acc[n]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
