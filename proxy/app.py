"""``create_app(config)``: the aiohttp application, its state (``web.AppKey``) and lifecycle
(``cleanup_ctx``). Wiring only: no business rules here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from . import admin
from .coalesce import Coalescer
from .config import Config
from .flow import Flow
from .log import get as get_logger
from .metrics import Metrics
from .store import Store
from .upstream import Upstream

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", Store)
UPSTREAM = web.AppKey("upstream", Upstream)
COALESCER = web.AppKey("coalescer", Coalescer)
FLOW = web.AppKey("flow", Flow)

log = get_logger("app")

# How often deferred invalidations are retried while Redis is away.
REPLAY_INTERVAL_S = 0.25


def create_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(handler_args={
        "max_field_size": config.server.max_header_bytes,
        "max_line_size": config.server.max_header_bytes,
    })
    metrics = metrics or Metrics()
    store = Store(config.redis, observer=metrics.redis_op)
    upstream = Upstream(config.upstream, via=f"1.1 {config.cache.status_name}")
    coalescer = Coalescer(store, wait_s=config.cache.coalesce_wait_ms / 1000,
                          lock_ms=config.cache.coalesce_lock_ms)
    flow = Flow(config, store, upstream, metrics, coalescer)
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STORE] = store
    app[UPSTREAM] = upstream
    app[COALESCER] = coalescer
    app[FLOW] = flow
    app.cleanup_ctx.append(_lifecycle)
    admin.register(app, config, flow, store, metrics)
    app.router.add_route("*", "/{tail:.*}", flow.handle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config, store, flow = app[CONFIG], app[STORE], app[FLOW]
    if config.cache.key_secret_is_default:
        log.warning("CACHE_KEY_SECRET is not set: using the development default; set a secret "
                    "shared by all instances in production")
    await app[UPSTREAM].start()
    await store.warm()
    await app[COALESCER].start(ready_timeout_s=2 * config.redis.connect_timeout_ms / 1000)
    replayer = asyncio.create_task(_replay_loop(flow), name="replay-invalidations")
    log.info("started", upstream=config.upstream.url, routes=len(config.routes),
             cache_enabled=config.cache.enabled)
    try:
        yield
    finally:
        replayer.cancel()
        for task in list(flow.background):
            task.cancel()
        await asyncio.gather(replayer, *flow.background, return_exceptions=True)
        await app[COALESCER].close()
        await app[UPSTREAM].close()
        with contextlib.suppress(Exception):
            await store.close()


async def _replay_loop(flow: Flow) -> None:
    """Replays invalidations that could not reach Redis when their write succeeded."""
    while True:
        await asyncio.sleep(REPLAY_INTERVAL_S)
        if flow.pending:
            try:
                await flow.replay_pending()
            except Exception:  # never let the loop die; the next round tries again
                log.exception("replaying invalidations failed")
