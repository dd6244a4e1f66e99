"""The packed CPU kernel against torch's GEMM on SmolLM2-sized linears, by rows, same run.

    python bench/kernels.py [--threads 2] [--rows 1,2,4,...,512] [--reps 5] [--logits]

For each of SmolLM2-135M's matrix shapes and each row count (tokens in one product) it times,
best of ``--reps``: ``packed`` (the packed kernel on the panels the inference engine stores),
``gemm`` (what a packed layer does above its crossover: unpack the panels into its scratch
matrix, then torch's GEMM; ``shared.inference.impls.Packing``) and ``torch`` (``F.linear`` on a
row-major copy, which the engine does not keep: the bound for ``gemm``). ``ratio`` is packed
time / gemm time summed over a layer's four matrices (``logits_ratio``: the output projection
alone): above 1 torch's GEMM is the faster. The crossover is the fewest rows from which the
ratio stays above 1; the engine's are ``GEMM_FROM_ROWS`` and ``LOGITS_GEMM_FROM_ROWS`` in
``shared.inference.impls``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (out, in) of SmolLM2-135M: hidden 576, 9 heads / 3 kv heads of 64, FFN 1536, vocab 49152
SHAPES = {"qkv": (960, 576), "proj": (576, 576), "fc1": (3072, 576), "fc2": (576, 1536)}
LOGITS = {"logits": (49152, 576)}
ROWS = "1,2,4,8,16,32,48,64,96,128,192,256,384,512"


def best_of(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def time_shape(n: int, k: int, rows: int, reps: int) -> dict[str, float]:
    from shared import kernels
    from shared.inference.impls import Packing

    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(1, rows, k, generator=g)
    packed = kernels.pack(w)
    packing = Packing()
    with torch.no_grad():
        return {"packed": best_of(lambda: kernels.packed_linear(x, packed), reps),
                "gemm": best_of(lambda: F.linear(x, packing.unpacked_t(packed).t()), reps),
                "torch": best_of(lambda: F.linear(x, w), reps)}


def crossover(table: list[dict], key: str) -> int | None:
    """The fewest rows from which the GEMM beats the packed kernel (``row[key]`` > 1) at every
    larger count."""
    best = None
    for row in reversed(table):
        if row[key] <= 1.0:
            break
        best = row["rows"]
    return best


def main(argv=None) -> int:
    from shared import kernels

    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=ROWS)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--logits", action="store_true", help="also time the (49152, 576) output projection")
    a = p.parse_args(argv)
    if not kernels.available():
        print("the native kernels are not available here", file=sys.stderr)
        return 1
    torch.set_num_threads(a.threads)
    shapes = SHAPES | (LOGITS if a.logits else {})
    table = []
    for rows in [int(r) for r in a.rows.split(",")]:
        per = {name: time_shape(n, k, rows, a.reps) for name, (n, k) in shapes.items()}
        layer = {key: sum(per[s][key] for s in SHAPES) for key in ("packed", "gemm", "torch")}
        row = {"rows": rows, **{f"layer_{key}_ms": round(v * 1e3, 3) for key, v in layer.items()},
               "ratio": round(layer["packed"] / layer["gemm"], 2)}
        if a.logits:
            row["logits_ratio"] = round(per["logits"]["packed"] / per["logits"]["gemm"], 2)
        table.append(row)
        print(json.dumps(row), flush=True)
    out = {"threads": a.threads, "crossover_rows": crossover(table, "ratio")}
    if a.logits:
        out["logits_crossover_rows"] = crossover(table, "logits_ratio")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
