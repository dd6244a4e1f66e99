"""Prometheus metrics: job counts and timings read from the job records at scrape time, plus
generation tokens and latency observed in the gateway."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from shared.jobs import KINDS, STATES, JobStore

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
    def __init__(self, jobs: JobStore):
        self.registry = CollectorRegistry()
        self.registry.register(JobsCollector(jobs))
        self.gen_tokens = Counter("llama_svc_generation_tokens", "Generated tokens relayed", ["api"],
                                  registry=self.registry)
        self.gen_latency = Histogram("llama_svc_generation_latency_seconds", "Generation round trip at the gateway",
                                     ["api"], registry=self.registry,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.http = Counter("llama_svc_http_requests", "HTTP requests", ["method", "route", "status"],
                            registry=self.registry)
