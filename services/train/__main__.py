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

from shared.cli import add_dataclass_arguments
from shared.specs.train import TrainConfig


def parser() -> argparse.ArgumentParser:
    """Every option of ``TrainConfig`` (names, types, defaults, choices and help from its fields)."""
    p = argparse.ArgumentParser(prog="python -m services.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_dataclass_arguments(p, TrainConfig)


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
    from shared.checkpoint.errors import CheckpointError
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
