"""One device check that always reports: a JSON line per section, printed the moment it is measured.

    bench/gpu_check.sh                      # on a GPU: the full check (a few minutes on one H200)
    bench/gpu_check.sh --tiny               # tiny shapes on any machine (CI runs it on CPU); also --dry-run
    bench/gpu_check.sh --sections decode,train --new-tokens 64

Sections, in order: ``env``; ``bandwidth`` (device copy GB/s, bf16 matmul TFLOP/s: the two
ceilings); ``decode`` (the engine at batch 1 and 16 on a Llama-3-8B-shaped random bf16
model, and batch 1 as a fraction of the copy-bandwidth roofline); ``graph_vs_eager`` (one
decode step's logits replayed from the CUDA graph, compiled without a graph, and eager, on
identical inputs); ``decode_hf`` (HF ``generate`` on the same shapes, and the ratios);
``train`` (a training step on a Llama-3.2-1B shape: our trainer against an HF step on the
same card, tokens/s and model TFLOP/s); ``devices`` (a dry run of the device assignment).
A failing section prints its error and the next runs; the HF parts print a note and skip
when transformers is not installed, the rest needs only torch. TP/PP across GPUs cannot be
timed on one GPU (NCCL refuses two ranks on one device): the CPU tests cover that code
(``shared.parallel.p2p``'s check). Without a GPU the tiny shapes run the GPU plan's compiled
ops and device-side steps on the CPU (CUDA graphs need CUDA): the numbers then only show
that every section runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

SECTIONS = ("env", "bandwidth", "decode", "graph_vs_eager", "decode_hf", "train", "devices")
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=5e5,
                  max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False)


def emit(section: str, **fields) -> dict:
    line = {"section": section, **fields}
    print(json.dumps(line, default=str), flush=True)
    return line


def hf_config(shape: dict) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", bos_token_id=0,
                eos_token_id=1, **shape)


def transformers_or_none():
    try:
        import transformers

        return transformers
    except ImportError:
        return None


def synced_time(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


class Check:
    def __init__(self, args):
        self.args = args
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.tiny = args.tiny or not self.cuda
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.results: dict = {}
        self.engine = None

    # ---- sections ----------------------------------------------------------------------------
    def env(self) -> dict:
        tf = transformers_or_none()
        info = {"torch": torch.__version__, "cuda": self.cuda, "mode": "tiny" if self.tiny else "full",
                "transformers": getattr(tf, "__version__", None)}
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            info.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), devices=torch.cuda.device_count())
        return info

    def bandwidth(self) -> dict:
        n = (64 << 20) if self.tiny else (2 << 30)  # bf16 elements: 128 MiB / 4 GiB
        a = torch.empty(n, dtype=torch.bfloat16, device=self.device)
        b = torch.empty_like(a)
        copy = max(2 * a.numel() * 2 / synced_time(lambda: b.copy_(a), self.device) for _ in range(5)) / 1e9
        del a, b
        size = 512 if self.tiny else 8192
        dtype = torch.bfloat16 if self.cuda else torch.float32
        x = torch.randn(size, size, dtype=dtype, device=self.device)
        tflops = max(2 * size ** 3 / synced_time(lambda: x @ x, self.device) for _ in range(5)) / 1e12
        self.results["copy_gbs"] = copy
        return {"copy_gbs": round(copy, 1), "matmul_tflops": round(tflops, 3), "matmul_dtype": str(dtype)}

    def _engine(self):
        if self.engine is None:
            from shared.inference.device_step import DecodePlan
            from shared.inference.engine import Engine
            from shared.checkpoint.opener import Checkpoint

            shape = TINY if self.tiny else LLAMA3_8B
            (self.tmp / "config.json").write_text(json.dumps(hf_config(shape)))
            plan = None if self.cuda else DecodePlan(compiled=True, device_steps=True, batched_prefill=True)
            t = time.perf_counter()
            self.engine = Engine(self.tmp, dtype="bf16" if self.cuda else "fp32", max_batch=16,
                                 max_seq_len=128 if self.tiny else 1024, in_process=True, decode_plan=plan,
                                 source=Checkpoint.random(self.tmp / "config.json"))
            self.engine.eos_ids = ()
            self.results["engine_load_s"] = time.perf_counter() - t
        return self.engine

    def _prompts(self, n: int, vocab: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(2, vocab, (self.args.prompt_len,), generator=g).tolist() for _ in range(n)]

    def decode(self) -> dict:
        eng = self._engine()
        new = self.args.new_tokens
        prompts = self._prompts(16, eng.cfg.vocab_size)
        out = {"load_s": round(self.results["engine_load_s"], 1), "new_tokens": new, "plan": str(eng.loaded[0]["plan"]), "ops": eng.loaded[0]["ops"],
               "graphs": eng.loaded[0]["graphs"], "max_batch": eng.max_batch}
        for bsz in (1, 16):
            eng.generate_ids(prompts[:bsz], 8, steps=8)  # warm-up
            dt = synced_time(lambda: eng.generate_ids(prompts[:bsz], new, steps=new), self.device)
            out[f"engine_batch{bsz}_tok_s"] = round(bsz * new / dt, 1)
        cfg = eng.cfg
        weights = (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) * (2 if self.cuda else 4)
        roofline = self.results.get("copy_gbs", 0) * 1e9 / weights
        if roofline:
            out["roofline_tok_s_batch1"] = round(roofline, 1)
            out["batch1_roofline_fraction"] = round(out["engine_batch1_tok_s"] / roofline, 3)
        self.results.update(out)
        return out

    def graph_vs_eager(self) -> dict:
        from shared.model import CacheRows
        from shared.model.ops import EAGER

        eng = self._engine()
        w = eng.local_rank_engine()
        b, dev = 4, w.ctx.device
        ids = torch.randint(2, eng.cfg.vocab_size, (b, 1), generator=torch.Generator().manual_seed(1)).to(dev)
        pos = torch.tensor([[5], [17], [33], [60]], device=dev)
        kv = 64

        def step(ops):
            saved, w.stage.ops = w.stage.ops, ops
            try:
                with torch.no_grad(), eng.device_scope():
                    return w.stage(ids, position_ids=pos, cache=CacheRows(w.cache, 0, b), kv_len=kv)[:, -1].float()
            finally:
                w.stage.ops = saved

        eager, fused = step(EAGER), step(w.stage.ops)
        out = {"rows": b, "compiled_vs_eager_max_abs": float((fused - eager).abs().max()),
               "compiled_vs_eager_argmax_equal": bool(torch.equal(fused.argmax(-1), eager.argmax(-1)))}
        if w.graphs is None:
            return {**out, "graph": "not captured (CUDA graphs need CUDA)"}
        w.rows.ids.zero_(), w.rows.pos.zero_()
        w.rows.ids[:b].copy_(ids), w.rows.pos[:b].copy_(pos)
        with torch.no_grad(), eng.device_scope():
            graph = w.graphs.run(b, kv)[:b, -1].float()
        w.rows.live = ()  # the next plan rebuilds the step state
        return {**out, "graph_vs_eager_max_abs": float((graph - eager).abs().max()),
                "graph_vs_compiled_max_abs": float((graph - fused).abs().max()),
                "graph_vs_eager_argmax_equal": bool(torch.equal(graph.argmax(-1), eager.argmax(-1)))}

    def decode_hf(self) -> dict:
        tf = transformers_or_none()
        if tf is None:
            return {"skipped": "transformers is not installed (the engine sections need only torch)"}
        self._close_engine()
        shape = TINY if self.tiny else LLAMA3_8B
        dtype = torch.bfloat16 if self.cuda else torch.float32
        model = _hf_model(tf, shape, dtype, self.device).eval()
        new, out = self.args.new_tokens, {}
        prompts = self._prompts(16, shape["vocab_size"])
        for bsz in (1, 16):
            ids = torch.tensor(prompts[:bsz], device=self.device)
            kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
            with torch.no_grad():
                model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
                dt = synced_time(lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw), self.device)
            out[f"hf_batch{bsz}_tok_s"] = round(bsz * new / dt, 1)
            if f"engine_batch{bsz}_tok_s" in self.results:
                out[f"speedup_batch{bsz}"] = round(self.results[f"engine_batch{bsz}_tok_s"] / out[f"hf_batch{bsz}_tok_s"], 2)
        del model
        if self.cuda:
            torch.cuda.empty_cache()
        return out

    def train(self) -> dict:
        self._close_engine()
        shape = TINY if self.tiny else LLAMA32_1B
        batch, seq, steps = (2, 64, 2) if self.tiny else (4, 2048, 3)
        ours = _our_train_steps(shape, self.tmp, batch, seq, steps, self.cuda)
        from shared.config import ModelConfig

        cfg = ModelConfig.from_hf(hf_config(shape))
        per_token = 6 * cfg.num_parameters() + 12 * cfg.num_layers * cfg.hidden_size * seq
        out = {"shape": "tiny" if self.tiny else "llama-3.2-1b", "batch": batch, "seq": seq,
               "ours_tok_s": round(batch * seq / ours, 1),
               "ours_model_tflops": round(per_token * batch * seq / ours / 1e12, 3)}
        tf = transformers_or_none()
        if tf is None:
            return {**out, "hf": "skipped: transformers is not installed"}
        hf = _hf_train_steps(tf, shape, batch, seq, steps, self.device, self.cuda)
        return {**out, "hf_tok_s": round(batch * seq / hf, 1), "ratio": round(hf / ours, 3)}

    def devices(self) -> dict:
        from shared.parallel.devices import DeviceError, assign_devices, dry_run, visible_devices

        n = torch.cuda.device_count() if self.cuda else 8
        half = max(1, n // 2)
        workers = {"train": os.environ.get("LLAMA_SVC_TRAIN_GPUS", ",".join(map(str, range(half)))),
                   "generate": os.environ.get("LLAMA_SVC_GENERATE_GPUS", ",".join(map(str, range(half, n))) or "0")}
        out = dry_run(n, workers, {"train": [1, 2, 4, 8], "generate": [1, 2]})
        out["simulated_node"] = not self.cuda
        try:
            assign_devices(2, visible_devices(), "a 2-rank pool on this machine")
            out["two_ranks_here"] = "placed"
        except DeviceError as e:
            out["two_ranks_here"] = f"refused: {e}"
        return out

    def _close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            if self.cuda:
                torch.cuda.empty_cache()


def _hf_model(tf, shape: dict, dtype: torch.dtype, device: str):
    config = tf.LlamaConfig(**{k: v for k, v in hf_config(shape).items() if k != "architectures"})
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return tf.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)


def _our_train_steps(shape: dict, tmp: Path, batch: int, seq: int, steps: int, cuda: bool) -> float:
    """Median seconds of our training step (one rank: 1F1B, fp32 masters, AdamW, clipping)."""
    from shared.checkpoint.opener import Checkpoint
    from shared.config import ModelConfig
    from shared.parallel.dims import ParallelDims
    from shared.parallel.launcher import ProcessGroupPool
    from shared.training import TrainConfig
    from shared.training import rank as rank_fns

    (tmp / "train.json").write_text(json.dumps(hf_config(shape)))
    cfg = ModelConfig.from_hf(hf_config(shape))
    config = TrainConfig(load=str(tmp), save=str(tmp / "unused"), data_path=("unused",), train_iters=1,
                         micro_batch_size=batch, global_batch_size=batch, seq_length=seq, lr=1e-5, bf16=cuda)
    plan = rank_fns.RankPlan(config, cfg.to_dict(), Checkpoint.random(tmp / "train.json"), None)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq)
    dims = ParallelDims()
    with ProcessGroupPool(1, threads=torch.get_num_threads(), timeout_s=1200) as pool:
        pool.run(dims, rank_fns.rank_setup, "check", plan)
        step = lambda: pool.run(dims, rank_fns.rank_step, "check", tokens, mask, int(mask.sum()), 1e-5)  # noqa: E731
        step()  # warm-up: allocations, compilation
        times = sorted(_timed(step) for _ in range(steps))
        pool.run(dims, rank_fns.rank_teardown, "check")
    return times[len(times) // 2]


def _hf_train_steps(tf, shape: dict, batch: int, seq: int, steps: int, device: str, cuda: bool) -> float:
    """Median seconds of an HF step: bf16 autocast over fp32 weights, AdamW, clipping (as bench/train.py)."""
    model = _hf_model(tf, shape, torch.float32, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    step()
    times = sorted(_timed(step) for _ in range(steps))
    del model, opt
    return times[len(times) // 2]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new_tokens_pos", nargs="?", type=int, help=argparse.SUPPRESS)  # the old positional form
    ap.add_argument("--tiny", "--dry-run", action="store_true", help="tiny shapes (any machine, CI)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per timed run (default 128; tiny 8)")
    ap.add_argument("--prompt-len", type=int, default=32)
    args = ap.parse_args(argv)
    args.new_tokens = args.new_tokens or args.new_tokens_pos or (8 if args.tiny or not torch.cuda.is_available() else 128)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    check, failed, t_all = Check(args), 0, time.perf_counter()
    for name in (s for s in SECTIONS if s in wanted):
        t = time.perf_counter()
        try:
            fields = getattr(check, name)()
            emit(name, seconds=round(time.perf_counter() - t, 1), **fields)
        except Exception as e:  # noqa: BLE001 - reported, and the next section runs
            failed += 1
            emit(name, seconds=round(time.perf_counter() - t, 1), error=f"{type(e).__name__}: {e}",
                 traceback=traceback.format_exc()[-2000:])
    check._close_engine()
    emit("done", seconds=round(time.perf_counter() - t_all, 1), failed_sections=failed,
         measured_on_gpu=check.cuda, note=None if check.cuda else "no GPU: tiny shapes on the CPU, not GPU figures")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
