"""Where the data lives: which Redis node serves a key, in each ``redis.mode``.

* ``single``: one server, the configured URL.
* ``sentinel``: the primary the sentinels name for ``redis.service_name``, asked again after
  a failover (a connection lost, a ``READONLY`` reply from a demoted primary).
* ``cluster``: the primaries of a Redis (or Valkey) Cluster and the slots each serves
  (``CLUSTER SLOTS``, from any reachable seed), asked again on ``MOVED`` / ``ASK`` and after
  a connection to a primary is lost.

Every node is reached with the URL's TLS setting and credentials. Besides the map, each
primary's count of connected replicas is kept (``INFO replication``): a purge waits for a
replica only where there is one (see ``store``). ``refresh`` is shared by concurrent
callers and spaced out, so a burst of redirections costs one lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .config import RedisConfig
from .feed import Node
from .log import get as get_logger
from .resp import Client, RespError

log = get_logger("topology")

MIN_REFRESH_INTERVAL_S = 0.1


class TopologyError(Exception):
    """No node could say where the data lives."""


@dataclass(frozen=True, slots=True)
class View:
    """One reading of the topology: the primaries and, for a cluster, the slot map."""

    primaries: tuple[Node, ...]
    slots: tuple[int, ...] = ()  # slot -> index into primaries (cluster only)
    replicas: tuple[int, ...] = ()  # connected replicas of each primary


def slot_of(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


def parse_cluster_slots(reply: Sequence[Sequence[object]], template: Node) -> View:
    """``CLUSTER SLOTS`` -> a view (pure): each range's first node is its primary."""
    primaries: list[Node] = []
    index: dict[tuple[str, int], int] = {}
    slots = [-1] * REDIS_CLUSTER_HASH_SLOTS
    replicas: list[int] = []
    for entry in reply:
        start, end, primary = int(entry[0]), int(entry[1]), entry[2]  # type: ignore[call-overload]
        host = _text(primary[0]) or template.host  # type: ignore[index]
        port = int(primary[1])  # type: ignore[index]
        at = index.get((host, port))
        if at is None:
            at = index[(host, port)] = len(primaries)
            primaries.append(replace(template, host=host, port=port, path=None))
            replicas.append(0)
        replicas[at] = max(replicas[at], len(entry) - 3)
        for s in range(start, end + 1):
            slots[s] = at
    if not primaries or -1 in slots:
        raise TopologyError("the cluster does not serve every slot (cluster_state fail?)")
    return View(tuple(primaries), tuple(slots), tuple(replicas))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _connected_replicas(info: bytes) -> int:
    for line in info.decode("latin-1").splitlines():
        if line.startswith("connected_slaves:"):
            return int(line.split(":", 1)[1])
    return 0


class Topology:
    def __init__(self, cfg: RedisConfig, template: Node, *, connect_timeout_s: float) -> None:
        self.mode = cfg.mode
        self.cfg = cfg
        self.template = template  # TLS and credentials of every node; host/port of the first
        self.connect_timeout_s = connect_timeout_s
        self.view = View((template,), replicas=(0,))
        self._refreshing: asyncio.Task[View] | None = None
        self._last_refresh = -MIN_REFRESH_INTERVAL_S
        self.changes = 0  # how many times the primaries changed (tests, logs)

    @property
    def primaries(self) -> tuple[Node, ...]:
        return self.view.primaries

    def node_for(self, key: str) -> Node:
        view = self.view
        if not view.slots:
            return view.primaries[0]
        return view.primaries[view.slots[slot_of(key)]]

    def replicas_of(self, node: Node) -> int:
        view = self.view
        with contextlib.suppress(ValueError):
            return view.replicas[view.primaries.index(node)]
        return 0

    async def refresh(self, *, force: bool = False) -> View:
        """Read the topology again (one reading at a time, at most every 100 ms unless
        ``force``); keeps the last view when no node answers."""
        task = self._refreshing
        if task is None:
            wait = 0.0 if force else \
                self._last_refresh + MIN_REFRESH_INTERVAL_S - time.monotonic()
            task = self._refreshing = asyncio.ensure_future(self._read(max(0.0, wait)))
            task.add_done_callback(self._refreshed)
        return await asyncio.shield(task)

    def _refreshed(self, task: asyncio.Task[View]) -> None:
        self._refreshing = None
        self._last_refresh = time.monotonic()
        if task.cancelled() or task.exception() is not None:
            return
        view = task.result()
        if view.primaries != self.view.primaries:
            self.changes += 1
            log.info("redis topology", mode=self.mode,
                     primaries=[f"{n.host}:{n.port}" for n in view.primaries])
        self.view = view

    async def _read(self, delay: float) -> View:
        if delay:
            await asyncio.sleep(delay)
        try:
            if self.mode == "cluster":
                view = await self._read_cluster()
            elif self.mode == "sentinel":
                view = View((await self._ask_sentinels(),))
            else:
                view = View((self.template,))
            return await self._with_replicas(view)
        except (OSError, TimeoutError, RespError, TopologyError) as e:
            log.warning("redis topology unknown: keeping the last one", mode=self.mode,
                        error=str(e) or type(e).__name__)
            return self.view

    async def _ask(self, node: Node, *args: str) -> object:
        client = Client(node, db=0, connect_timeout_s=self.connect_timeout_s, connections=1)
        try:
            async with asyncio.timeout(self.connect_timeout_s * 2):
                return await client.call(*args)
        finally:
            await client.close()

    async def _read_cluster(self) -> View:
        seeds = [*self.view.primaries] if self.view.slots else []
        seeds += [_node_from_url(u, self.template) for u in self.cfg.urls]
        last: Exception = TopologyError("no seed node")
        for seed in dict.fromkeys(seeds):
            try:
                reply = await self._ask(seed, "CLUSTER", "SLOTS")
                return parse_cluster_slots(reply, self.template)  # type: ignore[arg-type]
            except (OSError, TimeoutError, RespError, TopologyError) as e:
                last = e
        raise last

    async def _ask_sentinels(self) -> Node:
        last: Exception = TopologyError("no sentinel")
        for address in self.cfg.sentinels:
            host, _, port = address.rpartition(":")
            sentinel = replace(self.template, host=host.strip("[]"), port=int(port), path=None,
                               username=None, password=None)
            try:
                reply = await self._ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                        self.cfg.service_name)
            except (OSError, TimeoutError, RespError) as e:
                last = e
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return replace(self.template, host=_text(reply[0]), port=int(reply[1]),
                               path=None)
            last = TopologyError(f"no sentinel knows {self.cfg.service_name!r}")
        raise last

    async def _with_replicas(self, view: View) -> View:
        async def count(node: Node) -> int:
            try:
                return _connected_replicas(await self._ask(node, "INFO", "replication"))  # type: ignore[arg-type]
            except (OSError, TimeoutError, RespError):
                return 0
        found = await asyncio.gather(*(count(n) for n in view.primaries))
        return replace(view, replicas=tuple(found))


def _node_from_url(url: str, template: Node) -> Node:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return replace(template, host=parts.hostname or template.host,
                   port=parts.port or 6379, path=None)
