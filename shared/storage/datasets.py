"""Team datasets and job artifacts in the object store.

A dataset (finetune or evaluation JSONL, uploaded through ``POST /v1/datasets``) is stored like
a checkpoint of one file, ``data.jsonl``, under ``datasets/<team>/<name>/`` and committed by
its manifest (size, sha256, record count). Artifacts a job writes for its team (a finetune's
``metrics.jsonl``) live under ``jobs/<team>/<job id>/``. Nothing here names a host path.
"""

from __future__ import annotations

from .base import ObjectStore
from .checkpoints import CheckpointStore, check_name

DATASET_FILE = "data.jsonl"
DATASETS_PREFIX = "datasets"
METRICS_ARTIFACT = "metrics.jsonl"


def dataset_store(store: ObjectStore) -> CheckpointStore:
    return CheckpointStore(store, prefix=DATASETS_PREFIX)


def artifact_key(team: str, job_id: str, name: str) -> str:
    return f"jobs/{check_name(team, 'team')}/{check_name(job_id, 'job id')}/{check_name(name, 'artifact name')}"
