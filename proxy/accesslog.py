"""What every request leaves behind: its metrics, its counters and its access log line."""

from __future__ import annotations

import time
from typing import Any

from .context import Ctx
from .log import get as get_logger
from .metrics import Metrics
from .stats import Stats

access_log = get_logger("access")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Recorder:
    def __init__(self, metrics: Metrics, stats: Stats) -> None:
        self.metrics = metrics
        self.stats = stats

    def done(self, ctx: Ctx) -> None:
        elapsed = time.perf_counter() - ctx.started
        outcome = ctx.cache.outcome.value
        method = ctx.method if ctx.method in _METHODS else "other"
        self.metrics.requests.labels(ctx.route, method, outcome).inc()
        self.metrics.request_seconds.labels(outcome).observe(elapsed)
        self.stats.request(ctx.route, ctx.cache.outcome, ctx.path_qs)
        if ctx.served_bytes:
            self.metrics.served_bytes.inc(ctx.served_bytes)
        fields: dict[str, Any] = {
            "request_id": ctx.rid, "method": ctx.method, "path": ctx.path, "route": ctx.route,
            "status": ctx.http_status, "outcome": outcome, "duration_ms": round(elapsed * 1000, 3),
        }
        if ctx.cache.detail:
            fields["detail"] = ctx.cache.detail
        if ctx.upstream_s is not None:
            fields["upstream_ms"] = round(ctx.upstream_s * 1000, 3)
        if ctx.error:
            fields["error"] = ctx.error
        access_log.info("request", **fields)
