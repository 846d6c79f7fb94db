"""Prometheus metrics of the service: requests by route and status, time per stage, batch sizes, the index served,
and the process itself (resident memory, CPU time, open files: ``process_*``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """One registry per application, so that two services in one process (tests) count apart."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("fashionrec_requests", "HTTP requests answered, by route template, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.request_seconds = Histogram("fashionrec_request_seconds", "Time to answer a request, by route",
                                         ["route"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("fashionrec_stage_seconds", "Time a query spent in each stage (decode, "
                                       "preprocess, queue, embed, search, total)", ["stage"], buckets=STAGE_BUCKETS,
                                       registry=self.registry)
        self.batch_size = Histogram("fashionrec_batch_size", "Query photos embedded together in one batch",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("fashionrec_batch_seconds", "Time to embed one batch", buckets=STAGE_BUCKETS,
                                       registry=self.registry)
        self.index_version = Gauge("fashionrec_index_version", "Number of the index folder version served "
                                   "(v000003: 3)", registry=self.registry)
        self.index_items = Gauge("fashionrec_index_items", "Live items of the index version served",
                                 registry=self.registry)
        ProcessCollector(registry=self.registry)

    def observe_stages(self, timing_ms: dict[str, float]) -> None:
        for stage, milliseconds in timing_ms.items():
            self.stage_seconds.labels(stage).observe(milliseconds / 1000.0)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def serving(self, version: str, items: int) -> None:
        self.index_version.set(int(version.lstrip("v") or 0))
        self.index_items.set(items)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
