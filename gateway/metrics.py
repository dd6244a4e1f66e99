"""Prometheus metrics: job counts and timings read from the job records at scrape time, queue
depth and live workers per queue read from Redis at scrape time, plus generation tokens and
latencies (end to end, time to first token) observed in the gateway."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from shared.jobs import KINDS, STATES, JobStore
from shared.jobs.transport import QUEUES

WORKER_KEYS = "llama_svc:worker:*"  # llama_svc:worker:<queue>:<host>:<pid>, refreshed by each worker
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 3600)


class JobsCollector:
    def __init__(self, jobs: JobStore):
        self.jobs = jobs

    def collect(self):
        g = GaugeMetricFamily("llama_svc_jobs", "Jobs by kind and state", labels=["kind", "state"])
        counts = self.jobs.counts()
        for kind in KINDS:
            for state in STATES:
                g.add_metric([kind, state], counts.get((kind, state), 0))
        yield g
        rows = self.jobs.finished_timings()
        yield _histogram("llama_svc_job_duration_seconds", "Run time of finished jobs",
                         [((k, s), d) for k, s, _, d in rows], ["kind", "state"], DURATION_BUCKETS)
        yield _histogram("llama_svc_job_queue_wait_seconds", "Time from submission to start",
                         [((k,), w) for k, _, w, _ in rows], ["kind"], WAIT_BUCKETS)


def live_workers(redis) -> dict[str, int]:
    """Workers that announced themselves in the last seconds, per queue."""
    workers = {q: 0 for q in QUEUES}
    for k in redis.scan_iter(WORKER_KEYS, count=100):
        q = (k.decode() if isinstance(k, bytes) else k).split(":")[2]
        workers[q] = workers.get(q, 0) + 1
    return workers


class QueueCollector:
    """Messages waiting in each Celery queue and the workers serving it; absent when Redis is down."""

    def __init__(self, redis):
        self.redis = redis

    def collect(self):
        depth = GaugeMetricFamily("llama_svc_queue_depth", "Messages waiting in the queue", labels=["queue"])
        live = GaugeMetricFamily("llama_svc_workers", "Live workers per queue", labels=["queue"])
        try:
            for q, n in live_workers(self.redis).items():
                live.add_metric([q], n)
                depth.add_metric([q], self.redis.llen(q))
        except Exception:  # noqa: BLE001 - a scrape never fails on Redis
            return
        yield depth
        yield live


def _histogram(name, doc, samples, labels, buckets):
    h = HistogramMetricFamily(name, doc, labels=labels)
    groups: dict[tuple, list[float]] = {}
    for key, v in samples:
        groups.setdefault(key, []).append(max(0.0, v or 0.0))
    for key, values in sorted(groups.items()):
        cum = [(str(b), sum(1 for v in values if v <= b)) for b in buckets] + [("+Inf", len(values))]
        h.add_metric(list(key), cum, sum(values))
    return h


class Metrics:
    def __init__(self, jobs: JobStore, redis=None):
        self.registry = CollectorRegistry()
        self.registry.register(JobsCollector(jobs))
        if redis is not None:
            self.registry.register(QueueCollector(redis))
        self.gen_tokens = Counter("llama_svc_generation_tokens", "Tokens generated for relayed requests", ["api"],
                                  registry=self.registry)
        self.gen_latency = Histogram("llama_svc_generation_latency_seconds", "Generation round trip at the gateway",
                                     ["api"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.gen_ttft = Histogram("llama_svc_generation_time_to_first_chunk_seconds",
                                  "Request to the first streamed chunk at the gateway", ["api"],
                                  registry=self.registry, buckets=LATENCY_BUCKETS)
        self.http = Counter("llama_svc_http_requests", "HTTP requests", ["method", "route", "status"],
                            registry=self.registry)

    def observe(self, api: str, seconds: float, usage: dict | None) -> None:
        """A finished generation: its round trip and the tokens it generated."""
        self.gen_latency.labels(api).observe(seconds)
        if usage:
            self.gen_tokens.labels(api).inc(usage.get("completion_tokens", 0))

    def first_token(self, api: str, seconds: float) -> None:
        self.gen_ttft.labels(api).observe(seconds)
