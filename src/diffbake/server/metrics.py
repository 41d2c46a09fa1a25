"""Prometheus metrics of one server, in a registry of its own (several servers may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "diffbake_requests", "Image requests answered, by HTTP status", ["status"], registry=self.registry
        )
        self.latency = Histogram(
            "diffbake_request_seconds",
            "Time from receiving an image request to answering it",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.queue_depth = Gauge("diffbake_queue_depth", "Requests waiting for a worker", registry=self.registry)
        self.images = Counter("diffbake_images", "Images returned", registry=self.registry)
        self.batch_images = Histogram(
            "diffbake_batch_images",
            "Images per pipeline call (above 1 request's n when micro-batching merges requests)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=self.registry,
        )
        self.dropped = Counter(
            "diffbake_requests_dropped",
            "Queued requests dropped because their client went away",
            registry=self.registry,
        )
        self.ready = Gauge(
            "diffbake_ready", "1 once the artifact is loaded, checked and warmed up", registry=self.registry
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
