"""Two gateways on one PostgreSQL jobs database (as two replicas, or two hosts would run them): each
sees the other's jobs and idempotency keys, and a worker with its own data directory, given only the
Redis, jobs-database and object-store URLs, runs a job submitted to either."""

from __future__ import annotations

import pytest

from services.client import ApiError
from services.stack import LocalStack
from tests.services.conftest import FAST, KEYS, client, dump_logs, start_stack, wait_state


@pytest.fixture
def gateways(tmp_path, postgres):
    env = {"LLAMA_SVC_JOBS_DB": postgres.new_database()}
    storage = f"file://{tmp_path / 'objects'}"
    a = start_stack(tmp_path / "a", storage_url=storage, queues=(), env=env)
    try:
        b = LocalStack(tmp_path / "b", api_keys=KEYS, storage_url=storage, redis_url=a.redis_url,
                       queues=("convert",), env={**FAST, **env}).__enter__()
    except BaseException:
        dump_logs(a)
        a.__exit__(None, None, None)
        raise
    yield a, b
    for s in (b, a):
        s.__exit__(None, None, None)


def test_two_gateways_share_jobs_and_keys(gateways, tiny_hf):
    a, b = gateways
    assert not (a.data_dir / "jobs.sqlite3").exists() and not (b.data_dir / "jobs.sqlite3").exists()
    ca, cb = client(a), client(b)
    ca.upload_checkpoint("tiny", tiny_hf)
    job = ca.submit("convert", source="tiny", output="tiny-pp2", target_pp=2, check_parity=False,
                    idempotency_key="conv-1")
    assert cb.get(job["id"])["id"] == job["id"]
    assert [j["id"] for j in cb.list_jobs()["jobs"]] == [job["id"]]
    again = cb.submit("convert", source="tiny", output="tiny-pp2", target_pp=2, check_parity=False,
                      idempotency_key="conv-1")
    assert again["id"] == job["id"]  # the key is known to the other gateway
    with pytest.raises(ApiError) as e:
        cb.submit("convert", source="tiny", output="other", target_pp=2, check_parity=False, idempotency_key="conv-1")
    assert e.value.status == 409
    other_team = client(b, "team-b")
    other_team.upload_checkpoint("tiny", tiny_hf)
    assert other_team.submit("convert", source="tiny", target_pp=2, idempotency_key="conv-1")["id"] != job["id"]
    final = wait_state(ca, job["id"], lambda j: j["state"] in ("succeeded", "failed"), timeout=120, what="an end")
    assert final["state"] == "succeeded", (final, b.log_tail())
    assert cb.get(job["id"])["state"] == "succeeded" and ca.get_checkpoint("tiny-pp2")["layout"]["pp"] == 2
