"""``python -m services.convert``: the checkpoint converter's command line.

Takes Megatron-LM's ``tools/checkpoint/convert.py`` flags verbatim, so the documented commands
work as written, e.g.::

    python -m services.convert --model-type GPT --loader llama_mistral --saver mcore \
        --checkpoint-type hf --model-size llama2-7B --load-dir ./Llama-2-7b-hf \
        --save-dir ./llama2-7b-tp2 --tokenizer-model ./Llama-2-7b-hf/tokenizer.model \
        --target-tensor-parallel-size 2 --bf16
"""

from __future__ import annotations

import argparse
import shlex
import sys

from shared.checkpoint.presets import PRESETS
from shared.cli import add_dataclass_arguments, dataclass_kwargs

EPILOG = """\
examples:
  HF -> this project's format at TP2 (bf16):
    python -m services.convert --model-type GPT --loader llama_mistral --checkpoint-type hf \\
      --saver mcore --load-dir HF_DIR --save-dir OUT --target-tensor-parallel-size 2 --bf16
  Meta (consolidated.*.pth) -> TP1:
    python -m services.convert --loader llama_mistral --checkpoint-type meta --model-size llama2-7B \\
      --load-dir META_DIR --tokenizer-model META_DIR/tokenizer.model --save-dir OUT
  reshard a converted checkpoint to TP1 x PP2:
    python -m services.convert --loader mcore --saver mcore --load-dir OUT --save-dir OUT_PP2 \\
      --target-pipeline-parallel-size 2
  export to HF:              --loader mcore --saver hf --load-dir OUT --save-dir HF_OUT
  Megatron-LM's layout:      --saver megatron --ckpt-format torch

exit status: 0 success, 2 bad input (one line on stderr saying what to fix), 130 interrupted.
"""


def _options() -> dict[str, dict]:
    """Megatron-LM's flag spellings and help for the ``ConvertOptions`` fields (their defaults and
    types come from the dataclass)."""
    from shared.specs.convert import CHECKPOINT_TYPES, CKPT_FORMATS, LOADERS, SAVERS, TRANSFORMER_IMPLS, VALIDATE_DTYPES

    return {
        "loader": dict(choices=LOADERS, help="llama_mistral: an HF or Meta Llama/Mistral checkpoint (see "
                       "--checkpoint-type); mcore: a checkpoint this tool wrote, Megatron-LM's torch layout, or a "
                       "training run directory (--save OUT of services.train: its latest iteration) "
                       "(default: %(default)s)"),
        "saver": dict(choices=SAVERS, help="mcore / megatron: a Megatron-style sharded checkpoint (format from "
                      "--ckpt-format; both names write megatron-core parameter names); hf: an HF checkpoint "
                      "(default: %(default)s)"),
        "checkpoint_type": dict(choices=CHECKPOINT_TYPES, help="with --loader llama_mistral: hf (config.json + "
                                "safetensors/bin) or meta (params.json + consolidated.NN.pth) (default: %(default)s)"),
        "model_size": dict(choices=sorted(PRESETS), metavar="PRESET", help="optional cross-check of the source's "
                           f"architecture against a known model ({', '.join(PRESETS)}); a disagreement is an error"),
        "load_dir": dict(help="the source checkpoint directory"),
        "save_dir": dict(help="the output directory; must be empty or absent unless --overwrite"),
        "tokenizer_model": dict(help="a SentencePiece tokenizer.model file or an HF tokenizer directory (default: "
                                "the one inside --load-dir). It is copied into the output"),
        "target_tp": dict(flag="--target-tensor-parallel-size", metavar="TP", help="tensor-parallel size of the "
                          "output; must divide heads, kv heads and FFN (default: %(default)s)"),
        "target_pp": dict(flag="--target-pipeline-parallel-size", metavar="PP", help="pipeline-parallel size of "
                          "the output; must divide the layer count (default: %(default)s)"),
        "make_vocab_size_divisible_by": dict(metavar="M", help="pad the vocabulary to a multiple of M x TP, as "
                                             "Megatron does (default: %(default)s)"),
        "true_vocab_size": dict(metavar="V", help="the real vocabulary size when the source embedding has extra "
                                "rows (default: config.json's)"),
        "ckpt_format": dict(choices=CKPT_FORMATS, help="native: per-rank safetensors + manifest (loads in this "
                            "project's services); torch: Megatron-LM's iter_0000001/mp_rank_*/model_optim_rng.pt "
                            "layout (default: %(default)s)"),
        "transformer_impl": dict(flag="--saver-transformer-impl", choices=TRANSFORMER_IMPLS, help="parameter names "
                                 "for --ckpt-format torch: megatron-core's local layer spec or the Transformer "
                                 "Engine spec (norms fused into the linears); same weights (default: %(default)s)"),
        "validate": dict(help="skip the parity report (logits, log-probs, top-1 tokens and every layer's hidden "
                         "states against HF transformers on the source weights, run layer by layer at the target "
                         "TP/PP in bounded memory), which otherwise runs for every conversion"),
        "validate_dtype": dict(choices=VALIDATE_DTYPES, help="compute dtype of the parity report; bf16 has its "
                               "own, looser tolerance (default: %(default)s)"),
        "overwrite": dict(help="replace a non-empty --save-dir; the old contents stay until the new checkpoint is "
                          "complete"),
        **{name: dict(cli=False) for name in ("dtype", "command", "source_label")},
    }


def build_parser() -> argparse.ArgumentParser:
    from shared.specs.convert import ConvertOptions

    p = argparse.ArgumentParser(
        prog="python -m services.convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert Llama-family checkpoints (HF, Meta) into a Megatron-style tensor/pipeline-parallel "
                    "checkpoint, reshard one, or export it to HF or Megatron-LM's layout. The architecture is "
                    "always read from the source (config.json / params.json / the checkpoint's manifest).",
        epilog=EPILOG)
    p.add_argument("--model-type", default="GPT", choices=["GPT"],
                   help="model family; only GPT (decoder-only) exists. Accepted for compatibility with Megatron-LM")
    add_dataclass_arguments(p, ConvertOptions, overrides=_options())
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bf16", action="store_const", dest="dtype", const="bf16", help="store weights in bfloat16")
    g.add_argument("--fp16", action="store_const", dest="dtype", const="fp16", help="store weights in float16")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], dest="dtype",
                   help="store weights in this dtype (default: the source's dtype)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from shared.checkpoint.convert import Cancelled, ConvertOptions, convert
    from shared.checkpoint.progress import TerminalProgress

    opts = ConvertOptions(**dataclass_kwargs(args, ConvertOptions),
                          command="python -m services.convert " + " ".join(shlex.quote(a) for a in argv))
    try:
        result = convert(opts, progress=TerminalProgress(sys.stderr))
    except (ValueError, OSError) as e:  # every input problem is a ValueError subclass with its fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Cancelled as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    parity = result.get("parity") or {}
    if parity.get("passed"):
        print(f"validated at TP{parity['tp']} PP{parity['pp']}: max |dlogits| {parity['max_abs_logit_diff']:.3g}, "
              f"top-1 agreement {parity['top1_agreement']:.0%} over {parity['positions']} positions, largest "
              f"|dhidden| at {parity['worst']['where']} ({parity['seconds']:.0f} s; per layer in parity.txt)",
              file=sys.stderr)
    print(result["save_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
