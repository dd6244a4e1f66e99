"""The compose files give the train and generate workers disjoint GPUs by configuration."""

from __future__ import annotations

import yaml

from tests.services.test_compose import REMOTE, _compose, _env


def _gpus(files, env) -> dict[str, list[str]]:
    out = _compose(files=files, env=env)
    assert out.returncode == 0, out.stderr
    svc = yaml.safe_load(out.stdout)["services"]
    return {name: [d for r in svc[name]["deploy"]["resources"]["reservations"]["devices"] for d in r["device_ids"]]
            for name in ("train-worker", "generate-worker")}


def test_train_and_generate_reserve_disjoint_gpus():
    for files, env in ((("docker-compose.yml",), _env()), (("docker-compose.workers.yml",), _env(**REMOTE))):
        assert _gpus(files, env) == {"train-worker": ["0"], "generate-worker": ["1"]}, files
    picked = _gpus(("docker-compose.yml",), _env(LLAMA_SVC_TRAIN_GPUS="0,1,2,3", LLAMA_SVC_GENERATE_GPUS="4,5"))
    assert picked == {"train-worker": ["0,1,2,3"], "generate-worker": ["4,5"]}
