"""`make demo`: the whole service on the embedded default, end to end.

Brings up the local stack (Redis, local-directory storage, gateway, one worker per queue),
uploads the real SmolLM2-135M-Instruct HF checkpoint, converts it over HTTP to a pipeline-parallel
(PP=2) native checkpoint while showing progress, generates through `PUT /api`, prints the text
and where the checkpoint lives, and shuts down.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from services.client import Client
from services.stack import ROOT, LocalStack
from shared.assets import smollm2_hf_dir

PROMPT = "The three primary colors are"


def _bar(e: dict) -> str:
    cur, tot = e.get("current") or 0, e.get("total") or 0
    pct = f"{100 * cur / tot:5.1f}%" if tot else "     "
    eta = f" eta {e['eta_s']:.0f}s" if e.get("eta_s") else ""
    return f"  {e.get('phase', ''):<10} {pct} ({cur}/{tot} {e.get('unit', '')}){eta}"


def main() -> int:
    hf = smollm2_hf_dir()
    data = ROOT / ".data" / "demo"
    shutil.rmtree(data, ignore_errors=True)  # the previous demo's stack and checkpoints
    t0 = time.time()
    with LocalStack(data, restart_workers=True) as stack:
        print(f"stack up at {stack.url} in {time.time() - t0:.1f}s (docs: {stack.url}/docs)")
        c = Client(stack.url, stack.api_key, timeout=600)
        name = f"smollm2-{int(time.time())}"
        print(f"uploading {hf.name} as checkpoint {name!r} ...")
        c.upload_checkpoint(name, hf)
        job = c.submit("convert", source=name, output=f"{name}-pp2", target_pp=2)
        print(f"conversion job {job['id']} submitted (HF -> native, TP=1 PP=2)")
        last = None
        for e in c.stream_events(job["id"]):
            if e.get("type") == "progress":
                line = _bar(e)
                if line != last:
                    print(line, flush=True)
                    last = line
            elif e.get("type") == "state":
                print(f"  state: {e['state']}" + (f" ({e['error']})" if e.get("error") else ""), flush=True)
        job = c.get(job["id"])
        if job["state"] != "succeeded":
            print(f"conversion {job['state']}: {job['error']}\n{stack.log_tail()}", file=sys.stderr)
            return 1
        ck = c.get_checkpoint(f"{name}-pp2")
        parity = ck.get("parity") or {}
        print(f"converted in {job['finished_at'] - job['started_at']:.1f}s: {len(ck['files'])} files, "
              f"{ck['bytes'] / 1e6:.0f} MB, layout tp={ck['layout']['tp']} pp={ck['layout']['pp']}"
              + (f", parity vs transformers: {'passed' if parity.get('passed') else 'FAILED'} "
                 f"(max |logit diff| {parity.get('max_abs_logit_diff')})" if parity else ""))
        t = time.time()
        out = c.generate(f"{name}-pp2", [PROMPT], tokens_to_generate=24, top_k=1)
        print(f"\nPUT /api ({time.time() - t:.1f}s, first request loads the model):\n  {out['text'][0]!r}\n")
        where = Path(stack.data_dir) / "objects" / "checkpoints" / "local" / f"{name}-pp2"
        print(f"checkpoint: {where}")
        print(f"  or over HTTP: GET {stack.url}/v1/checkpoints/{name}-pp2 (Authorization: Bearer {stack.api_key})")
    print("stack stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
