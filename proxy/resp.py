"""A lean pipelined connection to one Redis node, for the request path (lookups, saves,
purges, locks): commands are written as they come and replies matched in order, parsed by
hiredis. redis-py stays for everything else (admin reads, statistics, topology); on the
request path its per-command machinery (a pool, a lock, a Python packer) cost more than
Redis itself (README, "Performance").

Errors leave as ``RespError`` (a reply Redis refused) or ``ConnectionError`` / ``OSError``;
``redisconn`` turns them into the proxy's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis

from .feed import Node

Arg = bytes | str | int | float


class RespError(Exception):
    """Redis answered with an error reply."""


def pack(args: Sequence[Arg]) -> bytes:
    """A command in RESP: an array of bulk strings. hiredis encodes it in C; what it does not
    take (a bool, say) is encoded here, as before hiredis did it."""
    try:
        # (hiredis's stub types the argument as a 1-tuple: any tuple is meant.)
        packed: bytes = hiredis.pack_command(cast(Any, args if type(args) is tuple
                                                  else tuple(args)))
        return packed
    except TypeError:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n" % len(b))
            out.append(b)
            out.append(b"\r\n")
        return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=RespError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: they only quack alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        try:
            while (reply := self.reader.gets()) is not False:
                fut = waiting.popleft()
                if not fut.done():  # a caller that gave up (its budget ran out) is skipped
                    fut.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as e:
            self._fail(ConnectionError(f"unreadable reply: {e}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(str(exc) if exc else "closed by Redis"))

    def _fail(self, e: Exception) -> None:
        self.closed = True
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(e)

    def send(self, commands: Sequence[Sequence[Arg]]) -> list[asyncio.Future[Any]]:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("not connected")
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in commands]
        self.waiting.extend(futs)
        self.transport.write(b"".join(pack(c) for c in commands))
        return futs


class Client:
    """A few pipelined connections to one node, opened on demand, used in turn."""

    def __init__(self, node: Node, *, db: int, connect_timeout_s: float,
                 connections: int = 4) -> None:
        self.node = node
        self.db = db
        self.connect_timeout_s = connect_timeout_s
        self._slots: list[_Protocol | None] = [None] * max(1, connections)
        self._turn = itertools.cycle(range(len(self._slots)))
        self._opening: dict[int, asyncio.Task[_Protocol]] = {}

    async def call(self, *args: Arg) -> Any:
        [reply] = await self.call_many([args])
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def call_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Replies in order; an error reply is returned in its place, not raised."""
        proto = await self._connection(next(self._turn))
        futs = proto.send(commands)
        # Awaited one by one rather than gathered: replies arrive in order, and a gather
        # costs a future and a loop turn more per call. A lost connection fails them all
        # at once (``_fail``); the first failure is raised, the others are marked seen.
        try:
            return [await fut for fut in futs]
        except BaseException:
            for fut in futs:
                if fut.done() and not fut.cancelled():
                    fut.exception()
                else:
                    fut.cancel()
            raise

    async def _connection(self, i: int) -> _Protocol:
        proto = self._slots[i]
        if proto is not None and not proto.closed:
            return proto
        task = self._opening.get(i)
        if task is None:  # one connect per slot at a time, whoever asks meanwhile waits
            task = self._opening[i] = asyncio.ensure_future(self._open())
            task.add_done_callback(lambda _: self._opening.pop(i, None))
        proto = await asyncio.shield(task)
        self._slots[i] = proto
        return proto

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        node = self.node
        async with asyncio.timeout(self.connect_timeout_s):
            if node.path is not None:
                _, proto = await loop.create_unix_connection(_Protocol, node.path)
            else:
                _, proto = await loop.create_connection(
                    _Protocol, node.host, node.port, ssl=node.tls,
                    server_hostname=node.host if node.tls else None)
            hello: list[list[Arg]] = []
            if node.password is not None:
                hello.append(["AUTH", node.username, node.password] if node.username
                             else ["AUTH", node.password])
            if self.db:
                hello.append(["SELECT", self.db])
            if hello:
                for reply in await asyncio.gather(*proto.send(hello)):
                    if isinstance(reply, RespError):
                        if proto.transport is not None:
                            proto.transport.close()
                        raise reply
        return proto

    async def close(self) -> None:
        for task in list(self._opening.values()):
            task.cancel()
        for proto in self._slots:
            if proto is not None and proto.transport is not None:
                with contextlib.suppress(Exception):
                    proto.transport.close()
        self._slots = [None] * len(self._slots)
