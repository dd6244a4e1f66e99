"""python -m services.generate serve | reference | compare | eval

serve      load a checkpoint once into its TP x PP process group and answer Megatron's PUT /api and
           the OpenAI endpoints, batching concurrent requests continuously
reference  HF transformers' greedy generation, like for like (dtype, new tokens, stop ids)
compare    the engine against the reference on the same prompts; reports the first divergence
parity     the parity report of a stored checkpoint against its HF or Meta source: logits, log-probs,
           top-1 tokens and every layer's hidden states, layer by layer at the checkpoint's TP/PP
eval       lm-eval tasks on a checkpoint and its HF reference, with the percent-error table
"""

from __future__ import annotations

import argparse
import json
import sys


def _dtype(name: str | None):
    from shared.dtypes import parse_dtype

    return parse_dtype(name)


def _serve(a) -> int:
    import uvicorn

    from services.generate.runtime import GenerationRuntime
    from services.generate.server import create_app

    def factory():
        from shared.parallel.devices import configured_devices

        return GenerationRuntime(a.load, a.tensor_parallel_size, a.pipeline_parallel_size, a.dtype,
                                 max_batch=a.max_batch, max_queue=a.max_queue, max_seq_len=a.max_seq_len,
                                 model_name=a.model_name, threads=a.threads, devices=configured_devices() or None)

    uvicorn.run(create_app(factory), host=a.host, port=a.port, log_level="warning")
    return 0


def _reference(a) -> int:
    import torch

    from services.generate.reference import hf_reference

    for c in hf_reference(a.model_path, a.prompt, a.tokens_to_generate, _dtype(a.dtype) or torch.float32):
        print(json.dumps({"prompt": c.prompt, "prompt_ids": c.prompt_ids, "token_ids": c.token_ids,
                          "text": c.text}))
    return 0


def _compare(a) -> int:
    import torch

    from services.generate.reference import engine_continuations, first_divergence, hf_reference
    from shared.inference.engine import Engine

    engine = Engine(a.load, a.tensor_parallel_size, a.pipeline_parallel_size, a.dtype,
                    max_batch=max(1, len(a.prompt)), max_seq_len=a.max_seq_len)
    try:
        ours = engine_continuations(engine, a.prompt, a.tokens_to_generate)
        dtype = engine.dtype
    finally:
        engine.close()
    ref = hf_reference(a.model_path, a.prompt, a.tokens_to_generate, dtype or torch.float32)
    same = True
    for o, r in zip(ours, ref):
        if o.prompt_ids != r.prompt_ids:
            print(json.dumps({"prompt": o.prompt, "result": "prompt tokenized differently",
                              "engine": o.prompt_ids, "hf": r.prompt_ids}))
            same = False
            continue
        d = first_divergence(o.token_ids, r.token_ids)
        if d is None:
            print(json.dumps({"prompt": o.prompt, "result": "identical", "tokens": len(o.token_ids), "text": o.text}))
        else:
            same = False
            print(json.dumps({"prompt": o.prompt, "result": "diverged", "index": d[0], "engine_token": d[1],
                              "hf_token": d[2], "engine_text": o.text, "hf_text": r.text}))
    return 0 if same else 1


def _parity(a) -> int:
    import torch

    from shared.checkpoint import parity
    from shared.dtypes import parse_dtype

    torch.set_num_threads(1)  # the reference and the candidate run side by side, one core each
    rep = parity.check_directories(a.load, a.model_path, compute_dtype=parse_dtype(a.compute_dtype),
                                   greedy_tokens=a.greedy_tokens)
    if a.output:
        parity.store_report(a.output, rep)
    print(json.dumps(rep.to_dict()))
    print(rep.summary(), file=sys.stderr)
    return 0 if rep.passed else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # benchmark parity lives in its own module with its own options
        from services.generate import eval as bench_eval

        return bench_eval.main(argv[1:])
    p = _parser()
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="also: eval (see `eval --help`)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_serve_args, _reference_args, _compare_args, _parity_args):
        add(sub)
    return p


def _layout_args(sp) -> None:
    sp.add_argument("--tensor-parallel-size", type=int, default=None, help="default: the checkpoint's")
    sp.add_argument("--pipeline-parallel-size", type=int, default=None, help="default: the checkpoint's")
    sp.add_argument("--max-seq-len", type=int, default=None, help="KV cache slots per sequence (default 2048)")


def _serve_args(sub) -> None:
    s = sub.add_parser("serve", help="serve a checkpoint over HTTP")
    s.add_argument("--load", required=True, help="a checkpoint: converted (manifest.json), HF, Meta, Megatron-LM, "
                   "or a training run's --save directory (its latest iteration)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=5000, help="port to listen on (default: %(default)s)")
    s.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the checkpoint's)")
    s.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (KV cache rows; default: %(default)s)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="sequences waiting beyond the free cache rows before answering 429; 0: no waiting room "
                        "(default: %(default)s)")
    s.add_argument("--model-name", default=None, help="the name /v1/models reports (default: the checkpoint's)")
    s.add_argument("--threads", type=int, default=1,
                   help="CPU threads per rank (default: %(default)s; more helps only on otherwise idle cores)")
    _layout_args(s)
    s.set_defaults(fn=_serve)


def _reference_args(sub) -> None:
    r = sub.add_parser("reference", help="HF transformers greedy generation (the parity reference)")
    r.add_argument("--model-path", required=True, help="an HF model directory")
    r.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    r.add_argument("--tokens-to-generate", type=int, default=32, help="new tokens (default: %(default)s)")
    r.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32)")
    r.set_defaults(fn=_reference)


def _compare_args(sub) -> None:
    c = sub.add_parser("compare", help="greedy engine vs HF on the same prompts; exit 1 on divergence")
    c.add_argument("--load", required=True,
                   help="a checkpoint: converted, HF, Meta, Megatron-LM, or a training run directory")
    c.add_argument("--model-path", required=True, help="the HF model directory to compare against")
    c.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    c.add_argument("--tokens-to-generate", type=int, default=32, help="new tokens (default: %(default)s)")
    c.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16, both sides (default: the checkpoint's)")
    _layout_args(c)
    c.set_defaults(fn=_compare)


def _parity_args(sub) -> None:
    q = sub.add_parser("parity", help="the parity report of a checkpoint against its source; exit 1 on failure")
    q.add_argument("--load", required=True,
                   help="a checkpoint: converted, HF, Meta, Megatron-LM, or a training run directory")
    q.add_argument("--model-path", required=True, help="the HF or Meta directory it was converted from")
    q.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="compute dtype of both sides; bf16 has its own tolerance (default: %(default)s)")
    q.add_argument("--greedy-tokens", type=int, default=None,
                   help="greedy tokens per prompt (default: 4 where re-reading the weights per token is cheap)")
    q.add_argument("--output", default=None, help="a directory to write parity.json and parity.txt into")
    q.set_defaults(fn=_parity)


if __name__ == "__main__":
    sys.exit(main())
