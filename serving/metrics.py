"""The server's own metrics: requests by route and status, seconds per stage, adaptation steps, live adapters,
and the adapter cache's hits and misses.

Two homes for the same five series. Under Ray Serve they are Ray metrics (`ray.serve.metrics`), which every
node's Ray exports to Prometheus with the replica's tags, so they add up across replicas and nodes
(scraped as `ray_sift_requests_total`, `ray_sift_stage_seconds_bucket`, `ray_sift_adaptation_steps_total`,
`ray_sift_adapters_live`, `ray_sift_adapter_cache_total`, beside Ray Serve's and vLLM's own). Without Ray
(one process) they live in a prometheus_client registry that the app serves at /metrics
(`sift_requests_total`, ...). No label or value ever holds request text.
"""

from __future__ import annotations

from typing import Protocol

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
_REQUESTS = ("sift_requests", "Requests by route and status")
_STAGE = ("sift_stage_seconds", "Seconds per request stage (select, train, generate)")
_STEPS = ("sift_adaptation_steps", "Test-time training steps")
_LIVE = ("sift_adapters_live", "Adapters made and not yet released")
_CACHE = ("sift_adapter_cache", "Trained adapters asked of the cache of identical training, by result (hit, miss)")


class Metrics(Protocol):
    """What the server records; one implementation per home."""

    def request(self, route: str, status: int) -> None: ...

    def stage(self, stage: str, seconds: float) -> None: ...

    def steps(self, count: int) -> None: ...

    def adapters_live(self, delta: int) -> None: ...

    def adapter_cache(self, hit: bool) -> None: ...


class PrometheusMetrics:
    """The series in this process's own registry, exposed by the app at /metrics."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._requests = Counter(*_REQUESTS, ["route", "status"], registry=self.registry)
        self._stage = Histogram(*_STAGE, ["stage"], registry=self.registry, buckets=STAGE_BUCKETS)
        self._steps = Counter(*_STEPS, registry=self.registry)
        self._live = Gauge(*_LIVE, registry=self.registry)
        self._cache = Counter(*_CACHE, ["result"], registry=self.registry)

    def request(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()

    def stage(self, stage: str, seconds: float) -> None:
        self._stage.labels(stage).observe(seconds)

    def steps(self, count: int) -> None:
        self._steps.inc(count)

    def adapters_live(self, delta: int) -> None:
        self._live.inc(delta)

    def adapter_cache(self, hit: bool) -> None:
        self._cache.labels("hit" if hit else "miss").inc()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class RayMetrics:
    """The series as Ray metrics, tagged by Ray Serve with application, deployment and replica."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self._requests = Counter(_REQUESTS[0], description=_REQUESTS[1], tag_keys=("route", "status"))
        self._stage = Histogram(_STAGE[0], description=_STAGE[1], boundaries=list(STAGE_BUCKETS), tag_keys=("stage",))
        self._steps = Counter(_STEPS[0], description=_STEPS[1])
        self._live = Gauge(_LIVE[0], description=_LIVE[1])
        self._cache = Counter(_CACHE[0], description=_CACHE[1], tag_keys=("result",))
        self._live_value = 0
        self._live.set(0)

    def request(self, route: str, status: int) -> None:
        self._requests.inc(1, tags={"route": route, "status": str(status)})

    def stage(self, stage: str, seconds: float) -> None:
        self._stage.observe(seconds, tags={"stage": stage})

    def steps(self, count: int) -> None:
        if count > 0:
            self._steps.inc(count)

    def adapters_live(self, delta: int) -> None:
        self._live_value += delta
        self._live.set(self._live_value)

    def adapter_cache(self, hit: bool) -> None:
        self._cache.inc(1, tags={"result": "hit" if hit else "miss"})
