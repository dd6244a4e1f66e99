"""Benchmark parity of a checkpoint against its HF reference, through lm-eval.

- ``tasks``: bundled generated tasks and user JSONL tasks as lm-eval YAML configs.
- ``lm``: lm-eval model classes ``llama-megatron`` (our TP/PP engine) and ``llama-megatron-hf``
  (HF transformers), sharing one tokenization path.
- ``engine``: our model in a process-group pool (scoring, greedy decoding).
- ``reference``: the HF model behind the same interface.
- ``report``: run tasks, compare, write the JSON/Markdown table.
- ``run``: one evaluation as a pure function (``EvalParams``, ``run_eval``): the CLI and the eval job.

Importing this package imports neither lm-eval nor transformers (worker processes load it).
"""
