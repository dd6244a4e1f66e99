"""``python -m services.train``: finetune a checkpoint with Megatron-style flags.

It starts its own TP x PP x DP processes (data parallel = world size / (TP x PP)); ``--load`` is a
native checkpoint, an HF model directory, or a run directory to resume. Example:

    python -m services.train --load ckpt --save out --data-path train.jsonl --train-iters 100 \\
        --micro-batch-size 2 --global-batch-size 8 --seq-length 1024 --lr 2e-5 --lr-warmup-iters 10 \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --bf16 --save-interval 50
"""

from __future__ import annotations

import argparse
import json
import sys

from shared.training.config import DECAY_STYLES, FINETUNE_METHODS, LORA_TARGETS, OVERLONG, TrainConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("checkpoints and data")
    io.add_argument("--load", required=True, help="native checkpoint, HF model dir, or a run dir to resume")
    io.add_argument("--save", required=True, help="run directory (checkpoints, release/, hf/, lora/)")
    io.add_argument("--data-path", nargs="+", required=True, metavar="FILE", help="JSONL training files")
    io.add_argument("--valid-data-path", nargs="*", default=[], metavar="FILE", help="JSONL validation files")
    io.add_argument("--valid-fraction", type=float, default=0.0,
                    help="without --valid-data-path: hold out this fraction of the samples")
    io.add_argument("--overlong", choices=OVERLONG, default="truncate", help="samples longer than a sequence")
    io.add_argument("--finetune", action="store_true",
                    help="from a training checkpoint: load the weights only (new optimizer, iteration 0)")
    io.add_argument("--no-export-hf", dest="export_hf", action="store_false", help="skip the HF export")
    io.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    tr = p.add_argument_group("training")
    tr.add_argument("--train-iters", type=int, required=True)
    tr.add_argument("--micro-batch-size", type=int, default=1)
    tr.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    tr.add_argument("--seq-length", type=int, default=512)
    tr.add_argument("--lr", type=float, default=1e-5)
    tr.add_argument("--min-lr", type=float, default=0.0)
    tr.add_argument("--lr-warmup-iters", type=int, default=0)
    tr.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    tr.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine")
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--clip-grad", type=float, default=1.0, help="global gradient norm limit (0: off)")
    tr.add_argument("--adam-beta1", type=float, default=0.9)
    tr.add_argument("--adam-beta2", type=float, default=0.999)
    tr.add_argument("--adam-eps", type=float, default=1e-8)
    tr.add_argument("--seed", type=int, default=1234)
    tr.add_argument("--bf16", action="store_true", help="bf16 weights and activations, fp32 master weights")
    tr.add_argument("--recompute-activations", action="store_true")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--world-size", type=int, default=None,
                     help="processes to start (data parallel = world / (TP x PP)); default: TP x PP on CPU, "
                          "all of the worker's GPUs (LLAMA_SVC_DEVICES, else every visible one; rounded down "
                          "to a multiple of TP x PP) on GPU, one process per GPU")

    ev = p.add_argument_group("checkpointing, evaluation and logging")
    ev.add_argument("--save-interval", type=int, default=None)
    ev.add_argument("--eval-interval", type=int, default=None)
    ev.add_argument("--eval-iters", type=int, default=10)
    ev.add_argument("--exit-interval", type=int, default=None, help="save and stop at this iteration")
    ev.add_argument("--metrics-file", default=None, help="JSONL: one line per iteration and evaluation")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--finetune-method", choices=FINETUNE_METHODS, default="full")
    lo.add_argument("--lora-rank", type=int, default=8)
    lo.add_argument("--lora-alpha", type=float, default=16.0)
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGETS), choices=LORA_TARGETS)
    return p


def default_world(tp: int, pp: int) -> int:
    from shared.parallel.devices import configured_devices

    n = len(configured_devices())
    return max(tp * pp, n // (tp * pp) * (tp * pp))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    opts = vars(args).copy()
    tp, pp = opts["tensor_model_parallel_size"], opts["pipeline_model_parallel_size"]
    if opts["world_size"] is None:
        opts["world_size"] = default_world(tp, pp)
    if opts["global_batch_size"] is None:
        opts["global_batch_size"] = opts["micro_batch_size"] * max(1, opts["world_size"] // max(1, tp * pp))
    return TrainConfig.from_dict(opts)


def main(argv: list[str] | None = None) -> int:
    from shared.checkpoint.safe_io import CheckpointError
    from shared.parallel.dims import LayoutError
    from shared.tokenizer import TokenizerError
    from shared.parallel.devices import DeviceError, configured_devices
    from shared.training import Cancelled, ConfigError, DataError, TrainingError, train

    args = parser().parse_args(argv)

    def show(event: dict) -> None:
        if event.get("phase") == "eval":
            print(f"iteration {event['iteration']:>6} | validation loss {event['valid_loss']:.4f} "
                  f"| ppl {event['valid_ppl']:.2f}", flush=True)
        else:
            print(f"iteration {event['iteration']:>6}/{event['train_iters']} | loss {event['loss']:.4f} "
                  f"| lr {event['lr']:.3e} | grad norm {event['grad_norm']:.3f} "
                  f"| {event['tokens_per_s']:.0f} tok/s | eta {event['eta_s']:.0f} s", flush=True)

    try:
        result = train(config_from_args(args), progress=show, devices=configured_devices() or None)
    except (ConfigError, DataError, CheckpointError, LayoutError, TokenizerError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Cancelled as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
