#!/usr/bin/env bash
# One short GPU check (about 3-5 minutes on an H100/H200):
#   batch-1 and batch-16 greedy decode of a Llama-3-8B-shaped random model in bf16,
#   the engine (preallocated KV cache, CUDA-graph decode) against the card's measured copy
#   bandwidth roofline and against HF generate in the same run; plus graph-vs-eager agreement.
# Usage: bench/gpu_check.sh [NEW_TOKENS]   (PYTHON=... to pick the interpreter; needs a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NEW=${1:-128}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
NEW="$NEW" PYTHONPATH=. "$PY" - <<'PYEOF'
import json, os, tempfile, time
from pathlib import Path

import torch

from shared.config import ModelConfig
from shared.inference.engine import Engine
from shared.inference.source import ModelSource

assert torch.cuda.is_available(), "no CUDA device"
NEW = int(os.environ["NEW"])
PROMPT_LEN = 32
hf_cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
              intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
              rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
              hidden_act="silu", bos_token_id=128000, eos_token_id=128001)
tmp = Path(tempfile.mkdtemp())
(tmp / "config.json").write_text(json.dumps(hf_cfg))
cfg = ModelConfig.from_hf(hf_cfg)
out = {"device": torch.cuda.get_device_name(0), "new_tokens": NEW, "prompt_len": PROMPT_LEN}


def cuda_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


# bandwidth roofline: best device-to-device copy of 4 GiB (read + write)
a = torch.empty(2 << 30, dtype=torch.bfloat16, device="cuda")
b = torch.empty_like(a)
bw = max(2 * a.numel() * 2 / cuda_time(lambda: b.copy_(a)) for _ in range(5)) / 1e9
del a, b
weights = cfg.num_parameters() * 2 - cfg.vocab_size * cfg.hidden_size * 2  # the embedding is only gathered
out["bandwidth_gbs"] = round(bw, 1)
out["roofline_tok_s_batch1"] = round(bw * 1e9 / weights, 1)

gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, cfg.vocab_size, (PROMPT_LEN,), generator=gen).tolist() for _ in range(16)]

# ---- the engine
eng = Engine(tmp, dtype="bf16", max_batch=16, max_seq_len=1024, in_process=True,
             source=ModelSource(str(tmp / "config.json"), "random"))
eng.eos_ids = ()
for bsz in (1, 16):  # warm-up: captures the graphs these shapes need
    eng.generate_ids(prompts[:bsz], NEW, steps=NEW)
for bsz in (1, 16):
    dt = cuda_time(lambda: eng.generate_ids(prompts[:bsz], NEW, steps=NEW))
    out[f"engine_batch{bsz}_tok_s"] = round(bsz * NEW / dt, 1)
out["engine_batch1_roofline_fraction"] = round(out["engine_batch1_tok_s"] / out["roofline_tok_s_batch1"], 3)

# graph vs eager on the same weights: greedy tokens should agree (bf16: report, do not assert)
from shared.parallel.launcher import worker_state
w = worker_state()["inference"]
graphed = eng.generate_ids(prompts[:4], 32, steps=32)
saved, w.graphs = w.graphs, None
eager = eng.generate_ids(prompts[:4], 32, steps=32)
w.graphs = saved
same = sum(x == y for g, e in zip(graphed, eager) for x, y in zip(g.tokens, e.tokens))
out["graph_vs_eager_token_agreement"] = round(same / (4 * 32), 3)
eng.close()
del eng, w, saved
torch.cuda.empty_cache()

# ---- HF generate, same shapes, same dtype
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
with torch.device("cuda"):
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"})).to(torch.bfloat16).eval()
for bsz in (1, 16):
    ids = torch.tensor(prompts[:bsz], device="cuda")
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        hf.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
        dt = cuda_time(lambda: hf.generate(ids, **kw))
    out[f"hf_batch{bsz}_tok_s"] = round(bsz * NEW / dt, 1)
for bsz in (1, 16):
    out[f"speedup_batch{bsz}"] = round(out[f"engine_batch{bsz}_tok_s"] / out[f"hf_batch{bsz}_tok_s"], 2)
print(json.dumps(out, indent=2))
PYEOF
