"""Typed specifications that the gateway checks at submit and the workers run: a finetune's
``TrainConfig`` (``train``) and the JSONL record format of training data (``records``).

Torch-free and below every engine, so the gateway validates exactly what the trainer will run.
"""
