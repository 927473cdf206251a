"""The connection to Redis: the pooled client, the time budget of each call and the circuit
breaker. Redis errors leave this module as StoreUnavailable / EntryCorrupt, never as
redis-py exceptions, so callers fall back by kind."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .breaker import Breaker, State
from .config import RedisConfig
from .errors import EntryCorrupt, StoreUnavailable
from .feed import Node
from .log import get as get_logger
from .resp import Client, RespError

T = TypeVar("T")
log = get_logger("redis")

OpObserver = Callable[[str, float, str | None], None]


class RedisConn:
    def __init__(self, cfg: RedisConfig, *, observer: OpObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.budget_s = cfg.timeout_ms / 1000.0
        # The socket timeout bounds each command; a call that must open a connection first
        # may also spend the connect timeout.
        self.call_limit_s = self.budget_s + cfg.connect_timeout_ms / 1000.0
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_reset_s)
        self._clock = clock
        self._observer = observer
        pool = aioredis.BlockingConnectionPool.from_url(
            cfg.url,
            max_connections=cfg.max_connections,
            timeout=self.budget_s,
            socket_timeout=self.budget_s,
            socket_connect_timeout=cfg.connect_timeout_ms / 1000.0,
            # Retrying inside redis-py would spend the budget several times over.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            # No CLIENT SETINFO round trips on every new connection.
            driver_info=None,
        )
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # The request path's own connections (see resp): lookups, saves, purges, locks.
        self.data = Client(self.node(), db=int(parse_url(cfg.url).get("db") or 0),
                           connect_timeout_s=cfg.connect_timeout_ms / 1000.0)
        # Pub/sub blocks on reads for as long as nothing is published: it gets its own client
        # without the per-call socket timeout.
        self.listener: aioredis.Redis = aioredis.Redis.from_url(
            cfg.url, socket_timeout=None,
            socket_connect_timeout=cfg.connect_timeout_ms / 1000.0,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, max_connections=4,
            driver_info=None)

    async def warm(self, connections: int = 4) -> None:
        """Open a few pooled connections before traffic arrives (best effort)."""
        async def ping() -> None:
            with contextlib.suppress(StoreUnavailable):
                await self.run("ping", lambda: self.client.ping(), trips=False)
        await asyncio.gather(*(ping() for _ in range(connections)))

    async def close(self) -> None:
        await self.data.close()
        await self.client.aclose(close_connection_pool=True)
        await self.listener.aclose()

    def node(self) -> Node:
        """Where the configured server listens, for the feed's own connection."""
        return node_of(self.cfg.url)

    async def ping(self) -> float:
        started = time.perf_counter()
        await self.run("ping", lambda: self.client.ping())
        return time.perf_counter() - started

    async def run(self, op: str, fn: Callable[[], Awaitable[T]], *,
                  budget_s: float | None = None, trips: bool = True,
                  force: bool = False) -> T:
        """Run one Redis operation under the budget and the breaker (``force``: try even
        when the breaker is open, for invalidations that must not be given up lightly)."""
        if not force and not self.breaker.allow(self._clock()):
            self.observe(op, 0.0, "circuit-open")
            raise StoreUnavailable("circuit-open")
        started = time.perf_counter()
        limit = budget_s or self.call_limit_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        try:
            async with asyncio.timeout(limit):
                result = await fn()
        except (rex.ResponseError, RespError) as e:
            if str(e).startswith("WRONGTYPE"):
                self.breaker.success()
                self.observe(op, time.perf_counter() - started, "wrongtype")
                raise EntryCorrupt("wrong type") from None
            oom = isinstance(e, rex.OutOfMemoryError) or str(e).startswith("OOM")
            kind = "oom" if oom else "response"
        except (TimeoutError, rex.RedisError, OSError) as e:
            kind = _kind(e)
            if kind == "timeout" and loop.time() - deadline > limit / 2:
                # The timer fired long after its time: this process was starved (a burst,
                # a busy CPU), not Redis slow. Counted, but it does not trip the breaker.
                kind = "local-slow"
        else:
            if self.breaker.state is not State.CLOSED:
                log.info("redis is back: caching resumes", op=op)
            self.breaker.success()
            self.observe(op, time.perf_counter() - started, None)
            return result
        self._failed(op, kind, trips)
        self.observe(op, time.perf_counter() - started, kind)
        raise StoreUnavailable(kind)

    def _failed(self, op: str, kind: str, trips: bool) -> None:
        if kind in ("oom", "response"):
            self.breaker.success()  # Redis answered: it is up, only this command failed
        elif trips and kind not in ("pool", "local-slow"):  # says nothing about Redis
            was_open = self.breaker.state is State.OPEN
            self.breaker.failure(self._clock())
            if self.breaker.state is State.OPEN and not was_open:
                log.warning("redis unavailable: requests bypass the cache", kind=kind, op=op,
                            retry_after_s=self.breaker.reset_s)

    def observe(self, op: str, seconds: float, error: str | None) -> None:
        if self._observer is not None:
            self._observer(op, seconds, error)


def _kind(e: BaseException) -> str:
    if isinstance(e, TimeoutError | rex.TimeoutError):
        return "timeout"
    if isinstance(e, rex.ConnectionError):
        return "pool" if "No connection available" in str(e) else "connection"
    if isinstance(e, OSError):  # the lean connection's (ConnectionError is one)
        return "connection"
    return "error"


def node_of(url: str) -> Node:
    """A feed node from a redis:// rediss:// or unix:// URL (credentials, TLS options)."""
    kw: dict[str, Any] = dict(parse_url(url))
    tls = None
    if kw.get("connection_class") is SSLConnection:
        tls = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
        if str(kw.get("ssl_cert_reqs", "required")).lower() in ("none", "cert_none"):
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
    return Node(host=kw.get("host", "localhost"), port=int(kw.get("port", 6379)),
                path=kw.get("path"), tls=tls, username=kw.get("username"),
                password=kw.get("password"))
