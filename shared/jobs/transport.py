"""Celery over Redis as transport only: configuration shared by the gateway and the workers.

Delivery design (Redis visibility timeout, REFERENCE-style hazards):
- Job tasks are acknowledged *early* (when a worker starts them) and workers never prefetch,
  so a job that runs for hours holds no unacknowledged message and the visibility timeout can
  never redeliver it behind a live worker's back.
- The job record (SQLite, outside Redis) is the truth. A worker claims a job with a conditional
  update keyed by the message's dispatch token, so duplicate or stale messages are dropped.
- While it runs, the worker refreshes a heartbeat in the record. The reaper re-queues (bounded
  by ``max_attempts``) or fails a running job whose heartbeat is stale (worker killed, host
  lost), and re-publishes a queued job whose message is no longer in Redis (Redis restarted
  without its data, publish failed while Redis was down). Nothing accepted is lost with Redis.
- Generation requests are short and ephemeral: lost with Redis, they time out at the gateway.
"""

from __future__ import annotations

import json

from celery import Celery

from .state import QUEUE_OF

QUEUES = ("convert", "train", "generate")
GENERATE_REQUEST = "generate.request"


def job_task_name(queue: str) -> str:
    return f"{queue}.job"


def message_id(job_id: str, dispatch: int) -> str:
    return f"{job_id}.{dispatch}"


def make_celery(broker_url: str, *, visibility_timeout: int = 3600) -> Celery:
    app = Celery("llama_svc", broker=broker_url)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True, result_backend=None,
        task_acks_late=False, task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1, worker_disable_prefetch=True,
        broker_transport_options={"visibility_timeout": visibility_timeout},
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        task_default_queue="convert", task_create_missing_queues=True,
        # Publishing must not hang a request while Redis is down: the reaper re-publishes later.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        # task events (received, started, succeeded, failed) for Flower or `celery events`; without a
        # listener they go nowhere (a Redis pub/sub fanout), so they cost no memory
        worker_hijack_root_logger=False, worker_send_task_events=True, task_send_sent_event=True,
        broker_pool_limit=4,
    )
    return app


def publish_job(app: Celery, job_id: str, kind: str, dispatch: int) -> None:
    queue = QUEUE_OF[kind]
    app.send_task(job_task_name(queue), args=[job_id, dispatch], queue=queue,
                  task_id=message_id(job_id, dispatch))


def queued_message_ids(redis_client, queue: str) -> set[str]:
    """Ids of the task messages waiting in a Celery queue (a Redis list)."""
    out = set()
    for raw in redis_client.lrange(queue, 0, -1):
        try:
            out.add(json.loads(raw)["headers"]["id"])
        except (ValueError, KeyError, TypeError):
            continue
    return out
