"""The upstream client: pooled connections, forwarded headers, timeouts, error translation.

Knows HTTP, not caching. GETs without a body go through the lean client of ``h1client``
(``upstream.lean_client``), everything else through one aiohttp session; either way,
failures leave this module as UpstreamError subclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from .config import UpstreamConfig
from .errors import (
    UpstreamBroken,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .h1client import H1Pool, ReusedConnectionLost, request_head
from .policy import HOP_BY_HOP, connection_listed

Headers = list[tuple[str, str]]

# Request fields never forwarded, beyond the hop-by-hop ones: the proxy sets Host and the
# X-Forwarded-* family itself (a client must not choose what the upstream believes about the
# original request), and answers Expect itself.
_REQUEST_DROP = frozenset({"host", "expect", "x-forwarded-host", "x-forwarded-proto",
                           "forwarded"})

CHUNK = 64 * 1024


# Upstream connections that carried a response already: a request failing on one of them
# before its response may be sent again (``Upstream._request``). Marked here rather than
# through an aiohttp trace config, whose signals cost every request about 40 µs of CPU.
_SERVED: weakref.WeakSet[Any] = weakref.WeakSet()


class _ClientResponse(aiohttp.ClientResponse):
    """Keeps the interim (1xx) responses that aiohttp reads and discards before the final
    one, so that the proxy can pass them on (103 Early Hints, 102 Processing); marks the
    connection as having served a response, and a failure on one that had as ``reused``."""

    interim: list[tuple[int, str, Headers]]

    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        self.interim = []
        protocol = connection.protocol
        read = protocol.read

        async def observed_read() -> Any:
            message, payload = await read()
            if 100 < message.code < 200 and message.code != 101:
                self.interim.append((message.code, message.reason, [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.raw_headers]))
            return message, payload

        protocol.read = observed_read
        try:
            response = await super().start(connection)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            if protocol in _SERVED:
                setattr(e, "reused", True)  # noqa: B010 (aiohttp's exceptions have no such field)
            raise
        finally:
            del protocol.read  # the pooled connection reads as before
        _SERVED.add(protocol)
        return response


class _Body(Protocol):
    """A response's body and connection, from either client."""

    async def read(self, n: int) -> bytes: ...  # b"" at the end
    def release(self) -> None: ...
    def close(self) -> None: ...


class _AiohttpBody:
    __slots__ = ("_resp",)

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp

    async def read(self, n: int) -> bytes:
        return await self._resp.content.read(n)

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    reason: str
    headers: Headers
    request_time: float  # wall clock when the request was sent (RFC 9111 §4.2.3)
    response_time: float  # wall clock when the header section arrived
    content_length: int | None
    interim: list[tuple[int, str, Headers]]  # 1xx received before this one (not 100, 101)
    _body: _Body
    _free_slot: Callable[[], None]
    _released: bool = field(default=False)

    async def read_up_to(self, limit: int) -> tuple[bytes, bool]:
        """Read the body while it fits in ``limit`` bytes. Returns (bytes read, complete)."""
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = await self._body.read(min(CHUNK, limit - size + 1))
                if not chunk:
                    return b"".join(parts), True
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    return b"".join(parts), False
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.close()
            raise _translate(e) from None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The rest of the body as it arrives."""
        try:
            while chunk := await self._body.read(CHUNK):
                yield chunk
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.close()
            raise _translate(e) from None

    def release(self) -> None:
        """Return the connection to the pool (the body was read to the end)."""
        if not self._released:
            self._released = True
            self._body.release()
            self._free_slot()

    def close(self) -> None:
        """Drop the connection (the body was not read to the end, or it broke)."""
        if not self._released:
            self._released = True
            self._body.close()
            self._free_slot()

    def __del__(self) -> None:
        # A response dropped without release/close (a bug) must not keep its slot forever.
        if not self._released:
            self._released = True
            self._free_slot()
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                self._body.close()


class Upstream:
    def __init__(self, cfg: UpstreamConfig, via: str,
                 strip: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.base = cfg.url
        parts = urlsplit(cfg.url)
        self.netloc = parts.netloc.lower()
        self.via = via
        self._drop = HOP_BY_HOP | _REQUEST_DROP | frozenset(h.lower() for h in strip)
        self._session: aiohttp.ClientSession | None = None
        self._prefix = parts.path
        self._lean: H1Pool | None = None
        host = parts.hostname or ""
        port = parts.port or 80
        # Where the lean client connects; None when aiohttp's client sends everything.
        self._lean_addr = (host, port) if cfg.lean_client and parts.scheme == "http" and not (
            parts.username or parts.password) else None
        shown = f"[{host}]" if ":" in host else host
        self._host = shown if port == 80 else f"{shown}:{port}"
        # One slot per upstream connection; a request that cannot get one within
        # queue_timeout_s is answered 503 instead of queueing without bound.
        self._slots = asyncio.Semaphore(cfg.max_connections)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, limit_per_host=0,
                                         enable_cleanup_closed=False, ttl_dns_cache=60,
                                         keepalive_timeout=self.cfg.keepalive_s)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Bodies pass through byte for byte, compressed or not.
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s,
                                          sock_read=self.cfg.timeout_s),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
            response_class=_ClientResponse,
        )
        # aiohttp retries any idempotent request (PUT and DELETE too) once when its
        # connection breaks (aio-libs/aiohttp#10790). Writes must reach the upstream exactly
        # once, so that is off; ``send`` retries only what RFC 9112 §9.3.1 allows.
        self._session._retry_connection = False
        if self._lean_addr is not None:
            self._lean = H1Pool(*self._lean_addr, connect_timeout_s=self.cfg.connect_timeout_s,
                                read_timeout_s=self.cfg.timeout_s,
                                keepalive_s=self.cfg.keepalive_s)

    async def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
            self._lean = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def forward_headers(self, headers: Sequence[tuple[str, str]], *, client_ip: str | None,
                        proto: str, host: str | None) -> Headers:
        drop = self._drop | connection_listed(headers)
        out = [(k, v) for k, v in headers if k.lower() not in drop]
        xff = [v for k, v in out if k.lower() == "x-forwarded-for"]
        out = [(k, v) for k, v in out if k.lower() not in ("x-forwarded-for", "via")]
        vias = [v for k, v in headers if k.lower() == "via"]
        if client_ip:
            xff.append(client_ip)
        if xff:
            out.append(("X-Forwarded-For", ", ".join(xff)))
        out.append(("X-Forwarded-Proto", proto))
        if host:
            out.append(("X-Forwarded-Host", host))
        out.append(("Via", ", ".join([*vias, self.via])))
        return out

    async def send(self, method: str, path_qs: str, headers: Headers,
                   body: AsyncIterable[bytes] | bytes | None = None) -> UpstreamResponse:
        """Send a request; returns once the response header section has arrived."""
        assert self._session is not None, "Upstream.start() was not awaited"
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot: taken at once, no deadline to arm
        else:
            try:
                async with asyncio.timeout(self.cfg.queue_timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise UpstreamBusy("no free upstream connection") from None
        request_time = time.time()
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                if self._lean is not None and method == "GET" and body is None:
                    return await self._lean_get(path_qs, headers, request_time)
                resp = await self._request(method, URL(self.base + path_qs, encoded=True),
                                           headers, body)
        except BaseException as e:
            self._slots.release()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _translate(e) from None
        headers_out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
        return UpstreamResponse(resp.status, resp.reason or "", headers_out, request_time,
                                time.time(), resp.content_length,
                                getattr(resp, "interim", []), _AiohttpBody(resp),
                                self._slots.release)

    async def _lean_get(self, path_qs: str, headers: Headers,
                        request_time: float) -> UpstreamResponse:
        """A GET through the lean client; sent once more on a new connection when a
        kept-alive one closed before any byte of its response (as ``_request``)."""
        assert self._lean is not None
        head = request_head("GET", self._prefix + path_qs, self._host, headers)
        try:
            r = await self._lean.request(head)
        except ReusedConnectionLost:
            r = await self._lean.request(head, fresh=True)
        return UpstreamResponse(r.status, r.reason, r.headers, request_time, time.time(),
                                r.content_length, r.interim, r, self._slots.release)


    async def _request(self, method: str, url: URL, headers: Headers,
                       body: AsyncIterable[bytes] | bytes | None) -> aiohttp.ClientResponse:
        """One request; a safe one without a body is sent again, once, when it failed on a
        kept-alive connection before any response arrived: the upstream may have closed that
        connection as idle just as it was reused (RFC 9112 §9.3.1; node's http server does
        so after 5 s). A request on a new connection, and every write, is sent once."""
        assert self._session is not None
        for last in (False, True):
            try:
                return await self._session.request(
                    method, url, headers=headers, data=body, allow_redirects=False,
                    compress=None, chunked=None)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                if last or not getattr(e, "reused", False) or body is not None or \
                        method not in ("GET", "HEAD") or \
                        isinstance(e, aiohttp.ClientConnectorError):
                    raise
        raise AssertionError("unreachable")


def _translate(e: BaseException) -> UpstreamError:
    if isinstance(e, UpstreamError):
        return e
    if isinstance(e, aiohttp.ConnectionTimeoutError | aiohttp.ServerTimeoutError | TimeoutError):
        err: UpstreamError = UpstreamTimeout(str(e) or "timed out")
    elif isinstance(e, aiohttp.ClientConnectorError):
        err = UpstreamUnavailable(str(e))
    elif isinstance(e, aiohttp.ClientError | OSError | ValueError):
        err = UpstreamBroken(f"{type(e).__name__}: {e}")
    else:
        err = UpstreamBroken(repr(e))
    return err
