"""The connection to Redis: where the data lives (``topology``), the connections to each
node (``router``), the time budget of each call and a circuit breaker per node. Redis
errors leave this module as StoreUnavailable / EntryCorrupt, so callers fall back by kind."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from redis.asyncio.connection import SSLConnection, parse_url

from .breaker import Breaker, State
from .config import RedisConfig
from .errors import EntryCorrupt, StoreUnavailable
from .feed import Node
from .layout import Shard
from .log import get as get_logger
from .resp import RespError
from .router import Router
from .topology import Topology

T = TypeVar("T")
log = get_logger("redis")

OpObserver = Callable[[str, float, str | None], None]


class Breakers:
    """A circuit breaker per Redis node, so that one primary lost on a cluster stops
    caching for its slots only. ``state``: the worst of them (health, metrics)."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._by_node: dict[Node, Breaker] = {}

    def of(self, node: Node) -> Breaker:
        breaker = self._by_node.get(node)
        if breaker is None:
            breaker = self._by_node[node] = Breaker(self.failures, self.reset_s)
        return breaker

    @property
    def state(self) -> State:
        states = {b.state for b in self._by_node.values()}
        for worst in (State.OPEN, State.HALF_OPEN):
            if worst in states:
                return worst
        return State.CLOSED

    def all_open(self, nodes: Sequence[Node]) -> bool:
        return all(self.of(n).state is State.OPEN for n in nodes)



class _Budget:
    """A Redis call's deadline. When its timer fires late (by more than a tenth of the
    budget), this process was busy and the reply may be waiting unread, or read but a few
    loop turns from its caller: the call gets one more budget from then (a grace) instead
    of failing, so that a burst or a busy CPU does not turn lookups into bypasses. Late by
    more than half the budget, at either expiry, counts as starvation (``local-slow``)."""

    __slots__ = ("_handle", "_loop", "_timeout", "deadline", "graced", "limit", "starved")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        self._loop = loop
        self.limit = limit
        self.deadline = loop.time() + limit
        self.graced = False
        self.starved = False  # an expiry came very late: local starvation, not Redis
        self._timeout: asyncio.Timeout | None = None
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, timeout: asyncio.Timeout) -> None:
        self._timeout = timeout
        self._handle = self._loop.call_at(self.deadline, self._fire)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _fire(self) -> None:
        now = self._loop.time()
        late = now - self.deadline
        self.starved = self.starved or late > self.limit / 2
        if late > self.limit / 10 and not self.graced:
            self.graced = True
            self.deadline = now + self.limit
            self._handle = self._loop.call_at(self.deadline, self._fire)
            return
        assert self._timeout is not None
        self._timeout.reschedule(now)  # expires at once: the call is cancelled

class RedisConn:
    def __init__(self, cfg: RedisConfig, *, observer: OpObserver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.budget_s = cfg.timeout_ms / 1000.0
        # The socket timeout bounds each command; a call that must open a connection first
        # may also spend the connect timeout.
        self.call_limit_s = self.budget_s + cfg.connect_timeout_ms / 1000.0
        self.breaker = Breakers(cfg.breaker_failures, cfg.breaker_reset_s)
        self._clock = clock
        self._observer = observer
        connect_s = cfg.connect_timeout_ms / 1000.0
        self.topology = Topology(cfg, node_of(cfg.urls[0]), connect_timeout_s=connect_s)
        # Every command of the proxy goes over lean pipelined connections, one set per node
        # (see resp, router); redis-py only parses URLs and computes slots.
        self.data = Router(self.topology, db=cfg.database, connect_timeout_s=connect_s)
        self._refreshes: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Read the topology (best effort: without Redis, start anyway and read it later),
        then open a connection to each primary before traffic arrives."""
        await self.topology.refresh(force=True)

        async def ping(node: Node) -> None:
            with contextlib.suppress(StoreUnavailable):
                await self.run("ping", lambda: self.data.client(node).call("PING"), node=node,
                               trips=False)
        await asyncio.gather(*(ping(n) for n in self.topology.primaries))

    async def close(self) -> None:
        for task in self._refreshes:
            task.cancel()
        await self.data.close()

    @property
    def primaries(self) -> tuple[Node, ...]:
        return self.topology.primaries

    def node_for(self, key: str) -> Node:
        return self.topology.node_for(key)

    def by_node(self, shards: Iterable[Shard]) -> dict[Node, list[Shard]]:
        """``shards`` grouped by the primary serving each (a shard is one slot)."""
        out: dict[Node, list[Shard]] = {}
        for shard in shards:
            out.setdefault(self.node_for(shard.marker), []).append(shard)
        return out

    async def ping(self) -> float:
        """The slowest primary's PING round trip (seconds); raises when one fails."""
        async def one(node: Node) -> float:
            started = time.perf_counter()
            await self.run("ping", lambda: self.data.client(node).call("PING"), node=node)
            return time.perf_counter() - started
        return max(await asyncio.gather(*(one(n) for n in self.primaries)))

    async def run(self, op: str, fn: Callable[[], Awaitable[T]], *,
                  node: Node | None = None, budget_s: float | None = None,
                  trips: bool = True, force: bool = False) -> T:
        """Run one Redis operation on ``node`` (default: the first primary) under the budget
        and that node's breaker (``force``: try even when the breaker is open, for
        invalidations that must not be given up lightly)."""
        breaker = self.breaker.of(node if node is not None else self.primaries[0])
        if not force and not breaker.allow(self._clock()):
            self.observe(op, 0.0, "circuit-open")
            raise StoreUnavailable("circuit-open")
        started = time.perf_counter()
        limit = budget_s or self.call_limit_s
        loop = asyncio.get_running_loop()
        budget = _Budget(loop, limit)
        try:
            async with asyncio.timeout(None) as timeout:
                budget.arm(timeout)
                try:
                    result = await fn()
                finally:
                    budget.disarm()
        except RespError as e:
            if str(e).startswith("WRONGTYPE"):
                breaker.success()
                self.observe(op, time.perf_counter() - started, "wrongtype")
                raise EntryCorrupt("wrong type") from None
            kind = "oom" if str(e).startswith("OOM") else "response"
        except OSError as e:  # the lean connection's: ConnectionError, TimeoutError, ...
            kind = "timeout" if isinstance(e, TimeoutError) else "connection"
            if kind == "timeout" and budget.starved:
                # A timer that fired long after its time: this process was starved (a
                # burst, a busy CPU), not Redis slow. Counted, but it does not trip the
                # breaker.
                kind = "local-slow"
        else:
            if breaker.state is not State.CLOSED:
                log.info("redis is back: caching resumes", op=op, node=_name(node))
            breaker.success()
            self.observe(op, time.perf_counter() - started, None)
            return result
        self._failed(op, kind, trips, breaker, node)
        self.observe(op, time.perf_counter() - started, kind)
        raise StoreUnavailable(kind)

    def _failed(self, op: str, kind: str, trips: bool, breaker: Breaker,
                node: Node | None) -> None:
        if kind in ("oom", "response"):
            breaker.success()  # Redis answered: it is up, only this command failed
            return
        if kind == "connection" and self.cfg.mode != "single":
            self._refresh_topology()  # a failover or a lost primary: ask where things are now
        if trips and kind != "local-slow":  # says nothing about Redis
            was_open = breaker.state is State.OPEN
            breaker.failure(self._clock())
            if breaker.state is State.OPEN and not was_open:
                log.warning("redis unavailable: requests bypass the cache", kind=kind, op=op,
                            node=_name(node), retry_after_s=breaker.reset_s)

    def _refresh_topology(self) -> None:
        task = asyncio.ensure_future(self.topology.refresh())
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    def observe(self, op: str, seconds: float, error: str | None) -> None:
        if self._observer is not None:
            self._observer(op, seconds, error)


def _name(node: Node | None) -> str | None:
    return None if node is None else (node.path or f"{node.host}:{node.port}")


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
