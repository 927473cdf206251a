"""Prometheus objects. Every label value comes from a closed vocabulary (route names from the
config, outcome words, error kinds, operation names), so cardinality stays bounded.

With several worker processes (``--workers``), ``PROMETHEUS_MULTIPROC_DIR`` is set before
this module is imported: each worker writes its samples to files there and ``/metrics``
merges them (counters and histograms summed, gauges per their mode).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclass
class RedisGauges:
    """Values read from Redis at scrape time (cached briefly by the caller)."""

    reachable: bool = False
    used_memory: int = 0
    maxmemory: int = 0
    entries: int = 0
    entries_by_route: dict[str, int] = field(default_factory=dict)


class _RedisCollector(Collector):
    def __init__(self, source: RedisGauges) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        g = self.source
        yield GaugeMetricFamily("jsoncache_redis_up",
                                "1 when the last scrape could read Redis.", value=int(g.reachable))
        yield GaugeMetricFamily("jsoncache_redis_used_memory_bytes",
                                "Redis used_memory.", value=g.used_memory)
        yield GaugeMetricFamily("jsoncache_redis_maxmemory_bytes",
                                "Redis maxmemory (0: no limit).", value=g.maxmemory)
        per_route = GaugeMetricFamily("jsoncache_cache_entries",
                                      "Live entries of this proxy, by route ('' for all).",
                                      labels=["route"])
        per_route.add_metric([""], g.entries)
        for route, n in sorted(g.entries_by_route.items()):
            per_route.add_metric([route], n)
        yield per_route


# Bucket bounds as prometheus_client writes them ("0.0005", ..., "+Inf").
_BOUNDS = [floatToGoString(b) for b in _LATENCY_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]
_REQUESTS = ("jsoncache_requests", "Client requests by route, method and cache outcome.")
_DURATION = ("jsoncache_request_duration_seconds",
             "Time from request to the response leaving the proxy, by cache outcome.")
_SERVED = ("jsoncache_served_from_cache_bytes", "Body bytes served from the cache.")
_FAST = ("jsoncache_fast_hits",
         "L1 hits answered as their bytes arrived, before aiohttp (server.fast_hits); "
         "they are counted in jsoncache_requests_total too.")


class _PerRequest(Collector):
    """The three metrics every request updates, counted in plain Python (a dict update and a
    bisect) and turned into metric families at scrape time: prometheus_client's objects take
    a lock on every update, which cost a fifth of a hit. One process only: with several
    workers the prometheus_client objects, which add up across processes, are used."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}  # per outcome; the last one is +Inf
        self.sums: dict[str, float] = {}
        self.served = 0
        self.fast = 0

    def record(self, route: str, method: str, outcome: str, seconds: float,
               served: int) -> None:
        key = (route, method, outcome)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        buckets = self.buckets.get(outcome)
        if buckets is None:
            buckets = self.buckets[outcome] = [0] * (len(_LATENCY_BUCKETS) + 1)
            self.sums[outcome] = 0.0
        buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.sums[outcome] += seconds
        self.served += served

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(*_REQUESTS, labels=["route", "method", "outcome"])
        for labels, n in sorted(self.requests.items()):
            requests.add_metric(list(labels), n)
        yield requests
        duration = HistogramMetricFamily(*_DURATION, labels=["outcome"])
        for outcome, counts in sorted(self.buckets.items()):
            duration.add_metric([outcome], list(zip(_BOUNDS, accumulate(counts), strict=True)),
                                self.sums[outcome])
        yield duration
        yield CounterMetricFamily(*_SERVED, value=self.served)
        yield CounterMetricFamily(*_FAST, value=self.fast)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.redis_gauges = RedisGauges()
        self._redis_collector = _RedisCollector(self.redis_gauges)
        self._per_request: _PerRequest | None = None
        if multiprocess_dir() is None:
            self._per_request = _PerRequest()
            r.register(self._per_request)
        else:
            self._requests = Counter(_REQUESTS[0] + "_total", _REQUESTS[1],
                                     ["route", "method", "outcome"], registry=r)
            self._request_seconds = Histogram(*_DURATION, ["outcome"],
                                              buckets=_LATENCY_BUCKETS, registry=r)
            self._served_bytes = Counter(_SERVED[0] + "_total", _SERVED[1], registry=r)
            self._fast_hits = Counter(_FAST[0] + "_total", _FAST[1], registry=r)
        self.upstream_seconds = Histogram(
            "jsoncache_upstream_duration_seconds",
            "Time until the upstream's response headers arrived, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter(
            "jsoncache_upstream_errors_total", "Upstream failures by kind.", ["kind"], registry=r)
        self.redis_seconds = Histogram(
            "jsoncache_redis_operation_duration_seconds",
            "Successful Redis operations by operation.", ["op"], buckets=_REDIS_BUCKETS,
            registry=r)
        self._redis_children: dict[str, Histogram] = {}  # bound once per operation
        self.redis_errors = Counter(
            "jsoncache_redis_errors_total", "Redis operation failures by operation and kind.",
            ["op", "kind"], registry=r)
        self.stored = Counter(
            "jsoncache_entries_stored_total", "Entries written to the cache, by route.",
            ["route"], registry=r)
        self.invalidated = Counter(
            "jsoncache_entries_invalidated_total",
            "Entries deleted or marked stale, by reason (write, purge, soft-purge, flush).",
            ["reason"], registry=r)
        self.coalesced = Counter(
            "jsoncache_coalesced_requests_total",
            "Requests answered by another request's upstream fetch.", registry=r)
        self.prewarm = Counter(
            "jsoncache_prewarm_total",
            "Prewarm fetches by rule and outcome (stored, fresh, skipped, dropped, error).",
            ["rule", "outcome"], registry=r)
        self.rejected = Counter(
            "jsoncache_rejected_requests_total",
            "Requests refused before reaching the upstream, by reason.", ["reason"], registry=r)
        self.pending_invalidations = Gauge(
            "jsoncache_pending_invalidations",
            "Invalidations waiting for Redis (entries they cover are bypassed meanwhile).",
            registry=r, multiprocess_mode="livesum")
        self.breaker_state = Gauge(
            "jsoncache_redis_circuit_state",
            "Circuit breaker in front of Redis: 0 closed, 1 half-open, 2 open (worst worker).",
            registry=r, multiprocess_mode="livemax")
        self.build = Gauge("jsoncache_build_info", "Version of the proxy (always 1).",
                           ["version"], registry=r, multiprocess_mode="max")
        self.build.labels(__version__).set(1)
        if multiprocess_dir() is None:
            r.register(self._redis_collector)

    def request(self, route: str, method: str, outcome: str, seconds: float,
                served: int) -> None:
        """One client request answered (``served``: body bytes from the cache)."""
        if self._per_request is not None:
            self._per_request.record(route, method, outcome, seconds, served)
            return
        self._requests.labels(route, method, outcome).inc()
        self._request_seconds.labels(outcome).observe(seconds)
        if served:
            self._served_bytes.inc(served)

    def fast_hit(self) -> None:
        """A hit answered by the protocol-level fast path (``fasthit``)."""
        if self._per_request is not None:
            self._per_request.fast += 1
        else:
            self._fast_hits.inc()

    def redis_op(self, op: str, seconds: float, error: str | None) -> None:
        if error is None:
            child = self._redis_children.get(op)
            if child is None:
                child = self._redis_children[op] = self.redis_seconds.labels(op)
            child.observe(seconds)
        else:
            self.redis_errors.labels(op, error).inc()

    def exposition(self) -> bytes:
        """The text format for a scrape: this process's registry, or, with several workers,
        every worker's samples merged."""
        mp_dir = multiprocess_dir()
        if mp_dir is None:
            return generate_latest(self.registry)
        scrape = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(scrape, path=mp_dir)  # type: ignore[no-untyped-call]
        scrape.register(self._redis_collector)
        return generate_latest(scrape)


def mark_dead(pid: int, path: str) -> None:
    """A worker exited: drop its live gauges from the merged view."""
    prom_multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
