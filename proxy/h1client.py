"""A lean HTTP/1.1 client for upstream GETs: kept-alive connections over asyncio protocols,
responses parsed by httptools (llhttp, the parser of Node and of aiohttp's own C speedups).

Why not aiohttp's client for these: building a ``ClientRequest``, its URL and header
multidicts, its timers and its response object costs a sequential miss about 0.35 ms of
CPU on this machine kind, more than a third of what the origin itself takes (``make
bench-client``). A GET without a body needs little of that: one request head written in one
call, one parser fed as bytes arrive, one future resolved when the header section is in.

Only for what it can do exactly as aiohttp does: ``GET`` without a body, to a plain
``http://`` upstream without credentials in its URL (``Upstream`` sends the rest, and
everything when ``upstream.lean_client`` is off, through aiohttp). Knows HTTP, not caching.
Failures leave as ``UpstreamError`` subclasses; a connection that had served a response and
broke before the next one's first byte raises ``ReusedConnectionLost``, which the caller may
answer by sending the request again on a new connection (RFC 9112 §9.3.1).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import httptools

from .errors import UpstreamBroken, UpstreamError, UpstreamTimeout, UpstreamUnavailable

Headers = list[tuple[str, str]]

# As aiohttp's response parser: a longer header field is an upstream error, not memory use.
MAX_FIELD = 8190
MAX_HEAD = 256 * 1024
# Reading pauses while this much body is buffered and unread (a slow client downstream).
HIGH_WATER = 256 * 1024


class ReusedConnectionLost(UpstreamBroken):
    """A kept-alive connection closed before any byte of the response (the upstream may
    have closed it as idle just as it was reused): safe to send a GET again."""


class H1Response:
    """The status line and headers of one final response; its body is read from here."""

    __slots__ = ("_conn", "content_length", "headers", "interim", "reason", "status")

    def __init__(self, conn: _Conn, status: int, reason: str, headers: Headers,
                 interim: list[tuple[int, str, Headers]], content_length: int | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.interim = interim
        self.content_length = content_length
        self._conn = conn

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the body; ``b""`` at its end."""
        return await self._conn.read(n)

    def release(self) -> None:
        """The body was read to its end: the connection goes back to the pool if it can."""
        self._conn.finish()

    def close(self) -> None:
        self._conn.abort()


class _Conn(asyncio.Protocol):
    """One upstream connection, carrying one request at a time."""

    def __init__(self, pool: H1Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.served = 0  # responses completed on this connection
        self.idle_timer: asyncio.TimerHandle | None = None
        self.lost = False
        self.paused = False
        self._reset()

    def _reset(self) -> None:
        if self.paused and self.transport is not None:
            self.transport.resume_reading()  # paused by the last body's read-ahead
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[H1Response] | None = None
        self.started = False  # a byte of this response arrived
        self.headers: Headers = []
        self.head_bytes = 0
        self.interim: list[tuple[int, str, Headers]] = []
        self.reason = ""
        self.content_length: int | None = None
        self.framed = False  # Content-Length or chunked: the end is known without EOF
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.head is None or self.complete:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.keep = False
            self._drop()
            return
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self._whole():  # what was asked for arrived whole; only the rest is wrong
                self._drop()
            else:
                self._fail(self.error or UpstreamBroken(f"invalid response: {e}"))

    def _whole(self) -> bool:
        return self.complete  # (a method: the parser's callbacks set it during feed_data)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        if self.head is None or self.complete:
            return
        if self.head.done() and not self.framed:
            self._message_done(keep=False)  # a body delimited by the connection's close
            return
        if not self.started and self.served:
            self._fail(ReusedConnectionLost("connection closed before the response"))
        else:
            self._fail(UpstreamBroken("server disconnected" + (f": {exc}" if exc else "")))

    def pause_writing(self) -> None:  # a request head is small; nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second response in the bytes of the first: out of step
            self.keep = False
            raise ValueError("unrequested response")

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if len(name) + len(value) > MAX_FIELD or self.head_bytes > MAX_HEAD:
            self.error = UpstreamBroken("response header section too large")
            raise ValueError("too large")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                self.error = UpstreamBroken("unexpected 101 Switching Protocols")
                raise ValueError("101")
            if status != 100:  # passed on as aiohttp's client does: 1xx except 100 and 101
                self.interim.append((status, self.reason, self.headers))
            self.headers, self.reason = [], ""
            return
        chunked = False
        for k, v in self.headers:
            lk = k.lower()
            if lk == "content-length":
                self.content_length = int(v) if v.isdigit() else None
                self.framed = True
            elif lk == "transfer-encoding":
                chunked = True
                self.framed = True
        if chunked:
            self.content_length = None
        if status in (204, 304):
            self.framed = True
        head = self.head
        if head is not None and not head.done():
            head.set_result(H1Response(self, status, self.reason, self.headers, self.interim,
                                       self.content_length))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.head is not None and not self.head.done():
            return  # the end of an interim (1xx) response; the final one follows
        self._message_done(keep=self.parser.should_keep_alive())

    # -- the request's side ------------------------------------------------------------------

    def _message_done(self, *, keep: bool) -> None:
        self.complete = True
        self.keep = keep
        self.served += 1
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, err: UpstreamError) -> None:
        self.error = err
        if self.head is not None and not self.head.done():
            self.head.set_exception(err)
        self._wake()
        self._drop()

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def read(self, n: int) -> bytes:
        while not self.body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            try:
                async with asyncio.timeout(self.pool.read_timeout_s):
                    await self.waiter
            except TimeoutError:
                self._fail(UpstreamTimeout("timed out reading the response body"))
                raise self.error from None  # type: ignore[misc]
            finally:
                self.waiter = None
        if self.buffered <= n:
            data = b"".join(self.body) if len(self.body) > 1 else self.body[0]
            self.body.clear()
        else:
            data = self.body.popleft()
            if len(data) > n:
                self.body.appendleft(data[n:])
                data = data[:n]
        self.buffered -= len(data)
        if self.paused and self.buffered < HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        if self.complete and self.keep and not self.lost:
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.keep = False
        self._drop()


class H1Pool:
    """Kept-alive connections to one host, most recently used first."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float,
                 read_timeout_s: float, keepalive_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self.idle: list[_Conn] = []
        self.all: set[_Conn] = set()

    async def request(self, head: bytes, *, fresh: bool = False) -> H1Response:
        """Write a request head (no body) and return when the response's header section
        is in. ``fresh``: on a new connection, not a kept-alive one."""
        conn = None if fresh else self._idle()
        if conn is None:
            conn = await self._connect()
        conn._reset()
        conn.head = self.loop.create_future()
        assert conn.transport is not None
        conn.transport.write(head)
        try:
            return await conn.head
        except BaseException:
            conn.abort()
            raise

    def _idle(self) -> _Conn | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: _Conn(self), self.host, self.port)
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as e:
            raise UpstreamUnavailable(
                f"cannot connect to {self.host}:{self.port}: {e.strerror or e}") from None
        self.all.add(conn)
        return conn

    def put(self, conn: _Conn) -> None:
        conn.idle_timer = self.loop.call_later(self.keepalive_s, conn.abort)
        self.idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        self.all.discard(conn)
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        for conn in list(self.all):
            conn.abort()
        self.idle.clear()


def request_head(method: str, target: str, host: str, headers: Any) -> bytes:
    """The request line and header section, encoded as aiohttp's client encodes them (UTF-8,
    surrogates back to the bytes the server decoded them from). A CR or LF in a name or
    value is refused (ValueError), as aiohttp refuses it."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for k, v in headers:
        if "\r" in v or "\n" in v or "\r" in k or "\n" in k or ":" in k:
            raise ValueError(f"invalid header field {k!r}")
        lines.append(f"{k}: {v}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")
