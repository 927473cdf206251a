"""``create_app(config)``: the aiohttp application, its state (``web.AppKey``) and lifecycle
(``cleanup_ctx``). Wiring only: no business rules here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.web_server import Server
from multidict import CIMultiDictProxy

from . import admin as admin_routes
from . import fasthit
from .accesslog import AccessLog
from .admin import Admin, new_instance_id
from .breaker import State
from .coalesce import Coalescer
from .config import Config
from .errors import StoreUnavailable
from .feed import Feed, Node
from .flow import Flow
from .invalidator import Invalidator
from .keyspace import Keyspace
from .l1 import L1
from .layout import Layout, Shard
from .log import get as get_logger
from .metrics import Metrics
from .prewarm import Prewarmer
from .redisconn import RedisConn
from .stats import Stats
from .store import Store
from .upstream import Upstream

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
STATS = web.AppKey("stats", Stats)
REDIS = web.AppKey("redis", RedisConn)
STORE = web.AppKey("store", Store)
KEYSPACE = web.AppKey("keyspace", Keyspace)
UPSTREAM = web.AppKey("upstream", Upstream)
COALESCER = web.AppKey("coalescer", Coalescer)
FEED = web.AppKey("feed", Feed)
INVALIDATOR = web.AppKey("invalidator", Invalidator)
FLOW = web.AppKey("flow", Flow)
PREWARMER = web.AppKey("prewarmer", Prewarmer)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
ADMIN = web.AppKey("admin", Admin)

log = get_logger("app")

# How often deferred invalidations are retried while Redis is away, and how often this
# instance's counters are added to the shared ones.
REPLAY_INTERVAL_S = 0.25
STATS_PUSH_INTERVAL_S = 1.0
RESTART_WATCH_INTERVAL_S = 2.0
TOPOLOGY_INTERVAL_S = 5.0


def create_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    """The proxy. Admin routes and /metrics are on it too, unless ``admin.port`` is set:
    then ``create_admin_app`` serves them on their own port."""
    app = web.Application(handler_args={
        "max_field_size": config.server.max_header_bytes,
        "max_line_size": config.server.max_header_bytes,
        # aiohttp closes a connection that has not completed a request's header section
        # within this time (also between keep-alive requests): slow clients cannot hold
        # connections open forever.
        "keepalive_timeout": config.server.client_timeout_s,
    })
    metrics = metrics or Metrics()
    stats = Stats()
    conn = RedisConn(config.redis, observer=metrics.redis_op)
    layout = Layout(config.redis.prefix, config.redis.shards)
    store = Store(conn, layout, lock_ms=config.cache.coalesce_lock_ms,
                  wait_replicas=config.redis.wait_replicas,
                  wait_ms=max(10, config.cache.invalidation_wait_ms // 4))
    upstream = Upstream(config.upstream, via=f"1.1 {config.cache.status_name}",
                        strip=config.server.strip_request_headers)
    coalescer = Coalescer(store, wait_s=config.cache.coalesce_wait_ms / 1000)

    async def topology() -> list[tuple[Node, list[Shard]]]:
        """Each primary with the shards it serves (its slots), read afresh: the feed asks
        after losing a connection, which is what a failover looks like."""
        if config.redis.mode != "single":
            await conn.topology.refresh()
        return list(conn.by_node(layout.shards).items())

    feed = Feed(topology, sharded=lambda: store.publish == "SPUBLISH",
                connect_timeout_s=config.redis.connect_timeout_ms / 1000,
                lease_s=config.cache.l1.lease_ms / 1000)
    l1 = L1(layout, config.cache.l1.max_mb * 2**20)
    feed.listeners += [coalescer, l1]
    invalidator = Invalidator(store, l1, metrics, stats,
                              wait_ms=config.cache.invalidation_wait_ms,
                              max_entry_ttl_s=config.cache.max_entry_ttl_s)
    access = AccessLog(config.log)
    flow = Flow(config, store, upstream, metrics, coalescer, invalidator, stats, l1, feed,
                access)
    keyspace = Keyspace(store)
    prewarmer = Prewarmer(config, metrics, stats, flow.warm,
                          breaker_open=lambda: conn.breaker.state is State.OPEN)
    flow.prewarmer = prewarmer
    app[PREWARMER] = prewarmer
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STATS] = stats
    app[REDIS] = conn
    app[STORE] = store
    app[KEYSPACE] = keyspace
    app[UPSTREAM] = upstream
    app[COALESCER] = coalescer
    app[FEED] = feed
    app[INVALIDATOR] = invalidator
    app[FLOW] = flow
    app[ACCESS_LOG] = access
    app[ADMIN] = Admin(config, flow, invalidator, keyspace, conn, metrics, stats,
                       new_instance_id())
    app.cleanup_ctx.append(_lifecycle)
    if config.admin.port is None:
        admin_routes.register(app, app[ADMIN])
    app.router.add_route("*", "/{tail:.*}", flow.handle)
    return app


class ProxyRunner(web.AppRunner):
    """Runs the proxy with proxied requests handed straight to the flow: only the admin
    routes (and /metrics) go through the application's router and middleware machinery,
    which otherwise cost a tenth of a hit's CPU (README, "Performance"). The application
    keeps its state and lifecycle; what answers is the same either way."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        routed = server.request_handler
        flow = self.app[FLOW]
        handle = flow.handle
        config = self.app[CONFIG]
        prefix = config.admin.prefix if config.admin.port is None else None

        def admin(path: str) -> bool:
            return prefix is not None and (path.startswith(prefix) or path == "/metrics")

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            if admin(request.path):
                return await routed(request)
            return await handle(request)

        server.request_handler = dispatch
        if not config.server.fast_hits or not fasthit.supported(server):
            return server

        def hit_now(method: str, target: str, headers: CIMultiDictProxy[str],
                    keep_alive: bool) -> bytes | None:
            if admin(target.partition("?")[0]):
                return None
            return flow.hit_now(method, target, headers, keep_alive)

        return fasthit.FastServer(dispatch, hit_now=hit_now, may_hold=flow.l1.may_hold,
                                  max_bytes=config.server.max_header_bytes,
                                  request_factory=server.request_factory,
                                  handler_cancellation=server.handler_cancellation,
                                  loop=server._loop, **server._kwargs)


def create_admin_app(proxy_app: web.Application) -> web.Application:
    """Admin routes and /metrics on their own application (``admin.port``); the resources
    belong to ``proxy_app``, which must be running."""
    app = web.Application()
    admin_routes.register(app, proxy_app[ADMIN])
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config, conn, flow = app[CONFIG], app[REDIS], app[FLOW]
    if config.cache.key_secret_is_default:
        log.warning("CACHE_KEY_SECRET is not set: using the development default; set a secret "
                    "shared by all instances in production")
    await app[UPSTREAM].start()
    await conn.start()
    await app[STORE].start()
    await app[FEED].start(ready_timeout_s=2 * config.redis.connect_timeout_ms / 1000)
    instance = app[ADMIN].instance
    tasks = [asyncio.create_task(_replay_loop(app[INVALIDATOR]), name="replay-invalidations"),
             asyncio.create_task(_topology_loop(conn), name="redis-topology"),
             asyncio.create_task(_stats_loop(app[STATS], app[KEYSPACE], instance),
                                 name="push-stats")]
    app[PREWARMER].start()
    if config.cache.rewarm_top_n > 0:
        tasks.append(asyncio.create_task(_restart_watch(app[KEYSPACE], app[PREWARMER]),
                                         name="redis-restart-watch"))
    log.info("started", upstream=config.upstream.url, routes=len(config.routes),
             cache_enabled=config.cache.enabled, instance=instance)
    await _report_eviction(app[KEYSPACE])
    try:
        yield
    finally:
        if flow.storing:  # fills answered but not stored yet (handlers cancelled)
            await asyncio.wait(set(flow.storing), timeout=config.cache.invalidation_wait_ms / 1000)
        for task in tasks:
            task.cancel()
        for task in list(flow.background):
            task.cancel()
        await asyncio.gather(*tasks, *flow.background, return_exceptions=True)
        await app[PREWARMER].close()
        await push_stats(app[STATS], app[KEYSPACE], instance)
        await app[FEED].close()
        await app[UPSTREAM].close()
        redis_closed = True
        try:
            await conn.close()
        except Exception:
            redis_closed = False
        app[ACCESS_LOG].flush()
        log.info("stopped", upstream_closed=True, redis_closed=redis_closed)


async def _report_eviction(keyspace: Keyspace) -> None:
    """Say at start-up what Redis does when its memory is full, and what that means."""
    try:
        eviction = await keyspace.eviction()
    except StoreUnavailable:
        return
    level = log.warning if eviction["maxmemory"] == 0 else log.info
    level("redis eviction policy", **eviction)


async def _replay_loop(invalidator: Invalidator) -> None:
    """Replays invalidations that could not reach Redis when their write succeeded."""
    while True:
        await asyncio.sleep(REPLAY_INTERVAL_S)
        if invalidator.pending:
            try:
                await invalidator.replay()
            except Exception:  # never let the loop die; the next round tries again
                log.exception("replaying invalidations failed")


async def _restart_watch(keyspace: Keyspace, prewarmer: Prewarmer) -> None:
    """Notice a Redis restart (its run id changes: the data is gone) and rewarm."""
    known = ""
    while True:
        try:
            run_id = await keyspace.run_id()
        except StoreUnavailable:
            run_id = ""
        if run_id and known and run_id != known:
            log.info("redis restarted: its data is gone", rewarm_top_n=prewarmer.rewarm_top_n)
            prewarmer.rewarm_soon("redis-restart")
        known = run_id or known
        await asyncio.sleep(RESTART_WATCH_INTERVAL_S)


async def _topology_loop(conn: RedisConn) -> None:
    """Read the topology now and then: replicas come and go (a purge waits for one only
    where there is one), primaries move; redirections and lost connections read it too."""
    while True:
        await asyncio.sleep(TOPOLOGY_INTERVAL_S)
        await conn.topology.refresh()


async def _stats_loop(stats: Stats, keyspace: Keyspace, instance: str) -> None:
    while True:
        await asyncio.sleep(STATS_PUSH_INTERVAL_S)
        await push_stats(stats, keyspace, instance)


async def push_stats(stats: Stats, keyspace: Keyspace, instance: str) -> None:
    """Add this instance's counters to the shared ones (and take a history sample)."""
    stats.sample(time.time())
    deltas = stats.take_unpushed()
    try:
        await keyspace.push_stats(deltas, instance)
    except StoreUnavailable:
        stats.give_back(deltas)
    except Exception:
        stats.give_back(deltas)
        log.exception("pushing statistics failed")
