"""The service's Prometheus metrics, in a registry of its own (several apps in one process stay apart):

    pinnerformer_requests_total{endpoint, status}        requests answered
    pinnerformer_request_seconds{endpoint}               latency histogram per endpoint
    pinnerformer_stage_seconds{stage}                    store_append, retrieval, batch_queue (per request: from
                                                         queued to scored), model (one per micro-batch)
    pinnerformer_batch_size                              ranking requests per forward pass
    pinnerformer_events_total                            events appended to the store
    pinnerformer_version_info{ranker, index, day}        the versions being served
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pinnerformer_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("pinnerformer_request_seconds", "Latency per endpoint", ["endpoint"],
                                 buckets=BUCKETS, registry=r)
        self.stages = Histogram("pinnerformer_stage_seconds", "Time per stage", ["stage"], buckets=BUCKETS,
                                registry=r)
        self.batch = Histogram("pinnerformer_batch_size", "Ranking requests per forward pass",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.event_count = Counter("pinnerformer_events", "Events appended to the store", registry=r)
        self.versions = Info("pinnerformer_version", "Versions being served", registry=r)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def stage(self, stage: str, seconds: float, batch: int | None = None) -> None:
        self.stages.labels(stage).observe(seconds)
        if batch is not None:
            self.batch.observe(batch)

    def events(self, n: int) -> None:
        self.event_count.inc(n)

    def set_versions(self, bundle_version: dict[str, str], day: str) -> None:
        self.versions.info({**bundle_version, "day": day})

    def render(self) -> str:
        return generate_latest(self.registry).decode()
