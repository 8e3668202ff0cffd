"""Prometheus metrics of one Ingress replica (its own registry, exposed at /metrics). No label or value
ever holds request text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class Metrics:
    """Request counts by route and status, seconds per stage, adaptation steps, live adapters. Requests in
    flight and queued are Ray Serve's own metrics (`ray_serve_replica_processing_queries`,
    `ray_serve_deployment_queued_queries`), which hold across replicas."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sift_requests", "Requests by route and status", ["route", "status"], registry=self.registry
        )
        self.stage = Histogram(
            "sift_stage_seconds", "Seconds per request stage", ["stage"], registry=self.registry, buckets=_STAGE_BUCKETS
        )
        self.steps = Counter("sift_adaptation_steps", "Test-time training steps", registry=self.registry)
        self.adapters_live = Gauge("sift_adapters_live", "Adapters made and not yet released", registry=self.registry)
