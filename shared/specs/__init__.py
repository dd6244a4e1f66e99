"""Typed specifications that the gateway checks at submit and the workers run: a finetune's
``TrainConfig`` (``train``), a conversion's ``ConvertOptions`` (``convert``) and the JSONL record
format of training data (``records``).

Torch-free and below every engine, so the CLIs parse and the gateway validates exactly what the
workers will run, without loading them.
"""
