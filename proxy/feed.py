"""The feed: what the shard channels announce (fills finished, tags purged, everything
flushed), read on one dedicated connection per Redis node, by the event loop as bytes arrive
and, on demand, at once: ``drain()`` reads whatever bytes are already waiting, without
blocking, so that an in-process cache can apply every invalidation that reached this host
before it answers from memory.

While any node's connection is down the feed is down (listeners are told): announcements may
have been lost, so waiters look again and the in-process cache empties and stands aside
until every connection is back and subscribed.

A connection can also go silent without closing (a partition, a frozen Redis): each one is
pinged every ``lease_s / 5``, and the feed counts as up only while every connection has
answered a PING sent within the last ``lease_s``. Redis answers in order, so such an answer
proves that everything published before that PING was sent has been received.

A connection is a plain non-blocking socket (TLS and ACL authentication included) read with
hiredis's RESP parser: redis-py's pub/sub reads through the event loop only, and cannot say
"nothing is waiting" without a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import hiredis

from .layout import Shard
from .log import get as get_logger

log = get_logger("feed")

CHUNK = 65536
PING = b"*1\r\n$4\r\nPING\r\n"


class Listener(Protocol):
    def on_fill(self, primary: str) -> None: ...
    def on_purge(self, shard: Shard, tags: Sequence[str]) -> None: ...
    def on_flush(self) -> None: ...
    def on_state(self, up: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class Node:
    """Where a node listens and how to log in."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket instead
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)


Topology = Callable[[], Awaitable[Sequence[tuple[Node, Sequence[Shard]]]]]


def command(*args: str | bytes) -> bytes:
    """A command in RESP, encoded by hiredis as the proxy's own connections encode theirs
    (``resp.pack``, which this module cannot import: resp imports ``Node`` from here)."""
    packed: bytes = hiredis.pack_command(cast(Any, args))  # the stub types a 1-tuple
    return packed


class _Conn:
    """One node's subscribed connection."""

    def __init__(self, sock: socket.socket, shards: Sequence[Shard], reader: hiredis.Reader,
                 early: list[list[bytes]]) -> None:
        self.sock = sock
        self.shards = {s.channel.encode(): s for s in shards}
        self.reader = reader  # may hold messages read past the subscription replies
        self.early = early  # messages that came with the subscription replies
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pings: deque[float] = deque()  # send times of PINGs not answered yet
        self.alive = time.monotonic()  # send time of the last PING answered (or connected)

    def ping(self) -> None:
        try:
            self.sock.send(PING)
        except (BlockingIOError, ssl.SSLWantWriteError):
            return  # the socket's buffer is full: this beat is skipped, the lease runs on
        except OSError as e:
            self.fail(e)
            return
        self.pings.append(time.monotonic())

    def pong(self) -> None:
        if self.pings:
            self.alive = self.pings.popleft()

    def read(self) -> list[list[bytes]]:
        """Whatever complete messages the bytes waiting now make; marks the connection
        lost on EOF or an error."""
        try:
            while True:
                data = self.sock.recv(CHUNK)
                if not data:
                    raise ConnectionResetError("closed by Redis")
                self.reader.feed(data)
                pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
                if len(data) < CHUNK and not pending:
                    break
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except (OSError, hiredis.ProtocolError) as e:
            self.fail(e)
            return []
        out, self.early = self.early, []
        try:
            while (msg := self.reader.gets()) is not False:
                out.append(msg)
        except hiredis.ProtocolError as e:
            self.fail(e)
        return out

    def fail(self, e: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
            log.warning("feed connection lost", error=str(e) or type(e).__name__)


class Feed:
    def __init__(self, topology: Topology, *, sharded: Callable[[], bool],
                 connect_timeout_s: float, lease_s: float) -> None:
        self.topology = topology
        self.sharded = sharded
        self.connect_timeout_s = connect_timeout_s
        self.lease_s = lease_s
        self.listeners: list[Listener] = []
        self.up = False
        self._conns: list[_Conn] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._poll = select.poll()
        self._drained = False  # this turn of the event loop has drained the feed
        self._loop: asyncio.AbstractEventLoop | None = None  # set with the connections

    async def start(self, ready_timeout_s: float) -> None:
        """Connect and subscribe; wait (bounded) until up. Without Redis, start anyway."""
        self._task = asyncio.create_task(self._run(), name="feed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), ready_timeout_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._detach()

    def drain(self, now: bool = False) -> bool:
        """Apply what is waiting on every connection now; False when the feed is down.
        One poll(2) with no timeout when nothing is waiting (the usual case), once per turn
        of the event loop: under load a turn answers many hits, and the poll was the
        largest single cost of each.

        Once per turn is enough for a request handled by a queued step (aiohttp's handler).
        A hit that finds this turn's drain done is handled by a step queued before the reset
        below was (the loop runs callbacks in the order they were queued, asyncio's loop and
        uvloop alike), and a step that handles a request is only queued once the request's
        bytes have been read. So the request reached this host before the drain did, and so
        did anything that reached it before the request.

        ``now``: drain whatever this turn did already. A hit answered inside the callback that
        read its bytes (``fasthit``) needs it: uvloop runs those callbacks after the turn's
        queued ones, on what epoll said after them, so a drain earlier in the turn may come
        before the request's bytes did.
        """
        if self._drained and not now:
            return self.up
        if not self._conns:
            return False
        if self._poll.poll(0):
            for conn in self._conns:
                self._readable(conn)
        self._check_lease()
        if not self._drained:
            self._drained = True
            assert self._loop is not None  # set with the connections
            self._loop.call_soon(self._next_turn)
        return self.up

    def _next_turn(self) -> None:
        self._drained = False

    def _check_lease(self) -> None:
        conns = self._conns
        if len(conns) == 1:  # one node: the usual case, on every L1 answer
            c = conns[0]
            up = c.alive >= time.monotonic() - self.lease_s and not c.lost.done()
        else:
            deadline = time.monotonic() - self.lease_s
            up = bool(conns) and all(c.alive >= deadline and not c.lost.done()
                                     for c in conns)
        if up != self.up:
            self._set_up(up)

    async def _beat(self) -> None:
        """Ping every connection a few times per lease; judge the lease between beats."""
        while True:
            await asyncio.sleep(self.lease_s / 5)
            for c in self._conns:
                c.ping()
            self._check_lease()

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                nodes = await self.topology()
                socks = await self._connect_all(nodes)
            except (OSError, hiredis.ProtocolError, ConnectionError, ValueError) as e:
                log.info("feed not connected", error=str(e) or type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            conns = [_Conn(sock, shards, reader, early)
                     for (sock, reader, early), (_, shards) in zip(socks, nodes, strict=True)]
            self._attach(conns)
            delay = 0.05
            beat = asyncio.create_task(self._beat(), name="feed-heartbeat")
            try:
                await asyncio.wait([c.lost for c in conns],
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                beat.cancel()
                self._detach()
            await asyncio.sleep(delay)

    def _attach(self, conns: list[_Conn]) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._conns = conns
        for c in conns:
            loop.add_reader(c.sock.fileno(), self._readable, c)
            self._poll.register(c.sock.fileno(), select.POLLIN)
        self._set_up(True)
        self._ready.set()
        for c in conns:  # what arrived between subscribing and now
            self._readable(c)

    def _detach(self) -> None:
        conns, self._conns = self._conns, []
        self._set_up(False)
        loop = asyncio.get_running_loop()
        for c in conns:
            with contextlib.suppress(Exception):
                loop.remove_reader(c.sock.fileno())
            with contextlib.suppress(Exception):
                self._poll.unregister(c.sock.fileno())
            with contextlib.suppress(OSError):
                c.sock.close()

    def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        for listener in self.listeners:
            listener.on_state(up)

    def _readable(self, conn: _Conn) -> None:
        for msg in conn.read():
            self._dispatch(conn, msg)
        self._check_lease()

    def _dispatch(self, conn: _Conn, msg: list[bytes]) -> None:
        if msg and msg[0] == b"pong":
            conn.pong()
            return
        if len(msg) != 3 or msg[0] not in (b"message", b"smessage"):
            if msg and msg[0] in (b"sunsubscribe", b"unsubscribe"):
                # A slot moved to another node: its messages go elsewhere from now on.
                conn.fail(ConnectionResetError("unsubscribed: the topology changed"))
                self._set_up(False)
            return
        shard = conn.shards.get(msg[1])
        if shard is None:
            return
        data = msg[2].decode("latin-1")
        kind, _, rest = data.partition(" ")
        for listener in self.listeners:
            if kind == "f":
                listener.on_fill(rest)
            elif kind in ("i", "s"):
                listener.on_purge(shard, rest.split(" "))
            elif kind == "*":
                listener.on_flush()

    # -- connecting (in a thread: blocking, with timeouts) ----------------------------------------

    async def _connect_all(self, nodes: Sequence[tuple[Node, Sequence[Shard]]],
                           ) -> list[tuple[socket.socket, hiredis.Reader, list[list[bytes]]]]:
        """Every node's connection, or none: one node refusing closes the others'."""
        results = await asyncio.gather(*(asyncio.to_thread(self._connect, node, shards)
                                         for node, shards in nodes), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for r in results:
                if not isinstance(r, BaseException):
                    with contextlib.suppress(OSError):
                        r[0].close()
            raise failed[0]
        return results  # type: ignore[return-value]

    def _connect(self, node: Node, shards: Sequence[Shard],
                 ) -> tuple[socket.socket, hiredis.Reader, list[list[bytes]]]:
        t = self.connect_timeout_s
        sock: socket.socket
        if node.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(t)
            sock.connect(node.path)
        else:
            sock = socket.create_connection((node.host, node.port), timeout=t)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if node.tls is not None:
                sock = node.tls.wrap_socket(sock, server_hostname=node.host)
            reader = hiredis.Reader()
            early: list[list[bytes]] = []
            if node.password is not None:
                auth = ("AUTH", node.username, node.password) if node.username \
                    else ("AUTH", node.password)
                sock.sendall(command(*auth))
                _expect(sock, reader, 1, early)
            channels = [s.channel for s in shards]
            if self.sharded():
                sock.sendall(b"".join(command("SSUBSCRIBE", ch) for ch in channels))
            else:
                sock.sendall(command("SUBSCRIBE", *channels))
            _expect(sock, reader, len(channels), early)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock, reader, early


def _expect(sock: socket.socket, reader: hiredis.Reader, n: int,
            early: list[list[bytes]]) -> None:
    """Read ``n`` replies to our commands; raise on an error reply. Messages published
    meanwhile (on channels already subscribed) are kept in ``early``."""
    got = 0
    while got < n:
        reply = reader.gets()
        if reply is False:
            data = sock.recv(CHUNK)
            if not data:
                raise ConnectionResetError("closed by Redis")
            reader.feed(data)
            continue
        if isinstance(reply, hiredis.ReplyError):
            raise ConnectionError(f"redis refused: {reply}")
        if isinstance(reply, list) and reply and reply[0] in (b"message", b"smessage"):
            early.append(reply)
            continue
        got += 1
