"""Admin routes (under the configured prefix, default ``/cache``) and ``/metrics``."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import Config
from .errors import StoreUnavailable
from .flow import Flow
from .metrics import Metrics
from .store import Store


def register(app: web.Application, config: Config, flow: Flow, store: Store,
             metrics: Metrics) -> None:
    prefix = config.admin.prefix

    async def health(request: web.Request) -> web.Response:
        state = store.breaker.state.value
        try:
            latency = await store.ping()
        except StoreUnavailable as e:
            return web.json_response({"status": "degraded", "redis": {
                "reachable": False, "error": e.kind, "circuit": store.breaker.state.value}},
                status=503, headers={"Cache-Control": "no-store"})
        return web.json_response({"status": "ok", "redis": {
            "reachable": True, "latency_ms": round(latency * 1000, 3), "circuit": state},
            "pending_invalidations": len(flow.pending), "time": time.time()},
            headers={"Cache-Control": "no-store"})

    async def prometheus(request: web.Request) -> web.Response:
        metrics.breaker_state.set({"closed": 0, "half-open": 1, "open": 2}[
            store.breaker.state.value])
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST,
                                     "Cache-Control": "no-store"})

    app.router.add_get(prefix + "/health", health)
    app.router.add_get("/metrics", prometheus)
