"""Training throughput: our training step against an HF transformers step on the same batch, same run.

    python bench/train.py                      # SmolLM2-135M fp32 on the CPU, B4 x T256
    python bench/train.py --model llama-1b     # a Llama-3.2-1B-shaped model (random weights), bf16, GPU

Ours: one TP1/PP1 training process (``shared.training`` rank code: 1F1B, fp32 master AdamW,
global-norm clipping), each step's batch handed over from this process as in a real run.
HF: ``LlamaForCausalLM`` forward with labels, backward, ``torch.optim.AdamW`` step (on the GPU
in bf16 autocast over fp32 weights). Steps alternate between the two so machine noise hits both.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shared.parallel.dims import ParallelDims
from shared.parallel.launcher import ProcessGroupPool
from shared.training import TrainConfig
from shared.training import rank as rank_fns

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=5e5,
                max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)


def model_dir(name: str, tmp: Path) -> Path:
    if name == "smollm2":
        from shared.assets import smollm2_hf_dir

        return Path(smollm2_hf_dir())
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).save_pretrained(tmp / "llama-1b")
    return tmp / "llama-1b"


def hf_stepper(directory: Path, device: str, bf16: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(tokens: torch.Tensor) -> float:
        ids = tokens[:, :-1].to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return model, step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "llama-1b"), default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, bf16 = ("cuda", True) if cuda else ("cpu", False)
    if args.model == "llama-1b" and not cuda:
        ap.error("--model llama-1b needs a GPU")
    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir(args.model, Path(tmp))
        from shared.checkpoint.opener import open_checkpoint
        from shared.config import ModelConfig

        cfg = ModelConfig.from_hf_file(directory / "config.json")
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        mask = torch.ones(args.batch, args.seq)
        config = TrainConfig(load=str(directory), save=str(Path(tmp) / "unused"), data_path=("unused",), train_iters=1,
                             micro_batch_size=args.batch, global_batch_size=args.batch, seq_length=args.seq,
                             lr=1e-5, clip_grad=1.0, bf16=bf16)
        plan = rank_fns.RankPlan(config, cfg.to_dict(), open_checkpoint(directory), None)
        dims = ParallelDims()
        with ProcessGroupPool(1, threads=torch.get_num_threads(), timeout_s=3600) as pool:
            pool.run(dims, rank_fns.rank_setup, "bench", plan)
            model, hf_step = hf_stepper(directory, device, bf16)

            def ours() -> float:
                return pool.run(dims, rank_fns.rank_step, "bench", tokens, mask, int(mask.sum()), 1e-5)[0]["loss"]

            ours(), hf_step(tokens)  # warm-up (allocations, kernels)
            times = {"ours": [], "hf": []}
            for _ in range(args.steps):
                for name, fn in (("ours", ours), ("hf", lambda: hf_step(tokens))):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            pool.run(dims, rank_fns.rank_teardown, "bench")
        del model
    n = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "threads": torch.get_num_threads(), "dtype": "bf16" if bf16 else "fp32",
              "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "ours_tok_s": round(n / med["ours"], 1), "hf_tok_s": round(n / med["hf"], 1),
              "ratio": round(med["hf"] / med["ours"], 3),
              "ours_step_s": [round(t, 3) for t in times["ours"]], "hf_step_s": [round(t, 3) for t in times["hf"]]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
