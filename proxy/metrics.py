"""Prometheus objects. Every label value comes from a closed vocabulary (route names from the
config, outcome words, error kinds), so cardinality stays bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.requests = Counter(
            "jsoncache_requests_total", "Client requests by route, method and cache outcome.",
            ["route", "method", "outcome"], registry=r)
        self.request_seconds = Histogram(
            "jsoncache_request_duration_seconds",
            "Time from request to the last byte of the response, by cache outcome.",
            ["outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_seconds = Histogram(
            "jsoncache_upstream_duration_seconds",
            "Time until the upstream's response headers arrived, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter(
            "jsoncache_upstream_errors_total", "Upstream failures by kind.", ["kind"], registry=r)
        self.redis_seconds = Histogram(
            "jsoncache_redis_operation_duration_seconds", "Redis operations by operation.",
            ["op"], buckets=_REDIS_BUCKETS, registry=r)
        self.redis_errors = Counter(
            "jsoncache_redis_errors_total", "Redis operation failures by operation and kind.",
            ["op", "kind"], registry=r)
        self.stored = Counter(
            "jsoncache_entries_stored_total", "Entries written to the cache, by route.",
            ["route"], registry=r)
        self.invalidated = Counter(
            "jsoncache_entries_invalidated_total",
            "Entries deleted or marked stale, by reason (write, purge, corrupt).",
            ["reason"], registry=r)
        self.served_bytes = Counter(
            "jsoncache_served_from_cache_bytes_total", "Body bytes served from the cache.",
            registry=r)
        self.coalesced = Counter(
            "jsoncache_coalesced_requests_total",
            "Requests answered by another request's upstream fetch.", registry=r)
        self.pending_invalidations = Gauge(
            "jsoncache_pending_invalidations",
            "Invalidations waiting for Redis to come back (entries carrying them are bypassed).",
            registry=r)
        self.breaker_state = Gauge(
            "jsoncache_redis_circuit_state",
            "Circuit breaker in front of Redis: 0 closed, 1 half-open, 2 open.", registry=r)
        self.rejected = Counter(
            "jsoncache_rejected_requests_total",
            "Requests refused before reaching the upstream, by reason.", ["reason"], registry=r)
        self.build = Info("jsoncache_build", "Version of the proxy.", registry=r)
        self.build.info({"version": __version__})

    def redis_op(self, op: str, seconds: float, error: str | None) -> None:
        if error is None:
            self.redis_seconds.labels(op).observe(seconds)
        else:
            self.redis_errors.labels(op, error).inc()
