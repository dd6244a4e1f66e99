"""The train queue (tasks.py) and the finetuning CLI (``python -m services.train``)."""
