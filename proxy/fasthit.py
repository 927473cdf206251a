"""L1 hits answered at the protocol level, as the request's bytes arrive (``server.fast_hits``).

aiohttp spends more on a request than a hit from the L1 costs: a request object, a task and
a writer per request, and a turn of the event loop before the handler runs. A hit read
from the L1 needs none of it: here a connection's bytes are looked at before aiohttp's parser
sees them, and when they are one whole, plain request (a GET or HEAD of an origin-form
target, HTTP/1.1, no body, nothing but printable ASCII) whose answer the L1 holds, that answer
is made at once (``Flow.hit_now``: the same plan, L1 lookup, answer bytes, line and metrics
as the ordinary path) and written when the loop's turn has read what it had to read.
Everything else is handed to aiohttp unchanged, byte for byte. A request whose URL the L1
holds nothing for (``L1.may_hold``) goes to aiohttp before its fields are even read: a miss
pays little for having been looked at.

Request smuggling is the risk of a second parser, so this one never decides where a message
ends on its own: it answers only while aiohttp's parser stands at a message boundary, which
it knows because every byte fed to that parser so far was one whole request without a body.
A connection whose bytes ever look otherwise (a request split over two reads, pipelined
requests, a body, an upgrade) is aiohttp's alone from then on. It also answers only while
aiohttp is idle on the connection (no request in progress, none queued; a new connection
that aiohttp was fed nothing of counts as idle), so answers keep their order, and while the
connection is not applying back-pressure. A request with ``Connection: close`` is answered
and the connection closed after it, as aiohttp does.

``supported`` checks once that aiohttp's request handler has the fields this relies on;
without them, every request takes aiohttp's path.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web_protocol, web_server
from multidict import CIMultiDict, CIMultiDictProxy

from .log import get as get_logger

log = get_logger("fasthit")

# One request as it may be answered here, and nothing after it: method, origin-form target,
# HTTP/1.1, header fields of printable ASCII (values may hold spaces and tabs), the empty
# line. No nested repetition: a match costs time linear in the request's size.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST = re.compile(rb"(" + _TOKEN + rb") (/[!-~]*) HTTP/1\.1\r\n((?:" + _TOKEN
                      + rb":[\t -~]*\r\n)*)\r\n")
_FIELD = re.compile(r"(" + _TOKEN.decode() + r"):([\t -~]*)\r\n")  # on the fields, decoded
# Fields that give a request a body or make the connection something else (content-length,
# transfer-encoding, upgrade): with one of them, aiohttp's parser may not end the message
# where _REQUEST does. A match inside a value only sends the connection to aiohttp for good,
# which is always safe. A Connection field with another option than keep-alive or close
# alone (hop-by-hop names, both) leaves the request to aiohttp.
_CONNECTION = re.compile(rb"^connection:[ \t]*(.*?)[ \t]*\r$", re.MULTILINE)
_ANSWERED = frozenset({b"GET", b"HEAD"})
_MAX_FIELDS = 128  # aiohttp's own limit (max_headers): more, and it answers 400
_ASPECTS = ("_waiter", "_messages", "_force_close", "_close", "_payload_parser", "_upgraded",
            "_paused", "_keepalive_timeout", "_keepalive_handle", "_next_keepalive_close_time",
            "_process_keepalive")

HitNow = Callable[[str, str, CIMultiDictProxy[str], bool], "bytes | None"]


def supported(server: web_server.Server) -> bool:
    """Whether this aiohttp's server and request handler have the fields the fast path
    reads and sets."""
    if not all(hasattr(server, a) for a in ("_kwargs", "_loop")):
        return False
    probe = web_protocol.RequestHandler(server, loop=server._loop)
    return all(hasattr(probe, a) for a in _ASPECTS)


def _keep_alive(lowered: bytes) -> bool | None:
    """Whether the connection stays open after the answer, by the request's (lower-cased)
    fields: yes without a Connection field (HTTP/1.1's default) or with keep-alive alone, no
    with close alone; None for any other option (hop-by-hop names, both): aiohttp answers."""
    if b"connection:" not in lowered:
        return True
    options = set(_CONNECTION.findall(lowered))
    if options == {b"keep-alive"}:
        return True
    return False if options == {b"close"} else None


class FastHandler(web_protocol.RequestHandler):
    """aiohttp's request handler, with L1 hits answered before its parser."""

    __slots__ = ("_at_boundary", "_fed", "_hit_now", "_max_bytes", "_may_hold")  # no __dict__

    def __init__(self, manager: web_server.Server, *, hit_now: HitNow,
                 may_hold: Callable[[str], bool], max_bytes: int, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._hit_now = hit_now
        self._may_hold = may_hold
        self._max_bytes = max_bytes
        # Every byte aiohttp's parser was fed so far was whole requests without bodies.
        self._at_boundary = True
        # aiohttp's parser was fed something: until then it has no request to answer.
        self._fed = False

    def data_received(self, data: bytes) -> None:
        if self._at_boundary:
            m = _REQUEST.fullmatch(data) if len(data) <= self._max_bytes else None
            if m is None:
                self._at_boundary = False
            else:
                fields = m[3]
                lowered = fields.lower()
                if b"content-length:" in lowered or b"transfer-encoding:" in lowered or \
                        b"upgrade:" in lowered or fields.count(b"\n") > _MAX_FIELDS:
                    self._at_boundary = False
                elif m[1] in _ANSWERED and self._idle():
                    keep_alive = _keep_alive(lowered)
                    if keep_alive is not None and self._answer(m[1], m[2], fields, keep_alive):
                        return
        self._fed = True
        super().data_received(data)

    def _idle(self) -> bool:
        """No request in progress or queued: an answer written now comes in order. That
        holds while aiohttp waits for a request, and also before its request loop first ran
        (a new connection's first request, often read in the turn that accepted it) as long
        as it was fed nothing."""
        waiter = self._waiter
        return (not self._fed or (waiter is not None and not waiter.done())) and \
            not self._messages and \
            not self._force_close and not self._close and self._payload_parser is None and \
            not self._upgraded and not self._paused and self.transport is not None

    def _answer(self, method: bytes, target: bytes, fields: bytes, keep_alive: bool) -> bool:
        url = target.decode()
        if not self._may_hold(url):  # a miss, most likely: aiohttp's, without more ado
            return False
        headers = CIMultiDictProxy(CIMultiDict(
            [(name, value.strip(" \t")) for name, value in _FIELD.findall(fields.decode())]))
        try:
            answer = self._hit_now(method.decode(), url, headers, keep_alive)
        except Exception:  # a bug: aiohttp's path answers instead, and it is logged
            log.exception("a fast hit failed; aiohttp answers it")
            return False
        if answer is None:
            return False
        transport = self.transport
        assert transport is not None
        if not keep_alive:  # as aiohttp closes: what was written is sent first
            transport.write(answer)
            self.force_close()
            return True
        # Written once this turn's reads are done, as aiohttp's answers are (its handlers run
        # after them): the answers of a turn then reach the clients together, and the clients'
        # next requests come back together, instead of one wake-up of a client per answer
        # while the other reads wait. Measured: about 1.4 times the hits per second under
        # load (README, "Performance"). Order holds: whatever this connection sends next is
        # read in a later turn, or queued behind this write (a fast answer, or aiohttp's task).
        self._loop.call_soon(_send, transport, answer)
        if self._keepalive_timeout > 0:  # as aiohttp does after each answer
            loop = self._loop
            self._next_keepalive_close_time = loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = loop.call_at(self._next_keepalive_close_time,
                                                      self._process_keepalive)
        return True


def _send(transport: asyncio.Transport, answer: bytes) -> None:
    """Write a fast answer, unless the client went away since it was made."""
    if not transport.is_closing():
        transport.write(answer)


class FastServer(web_server.Server):
    """aiohttp's server, making ``FastHandler``s."""

    def __init__(self, handler: Any, *, hit_now: HitNow, may_hold: Callable[[str], bool],
                 max_bytes: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._hit_now = hit_now
        self._may_hold = may_hold
        self._max_bytes = max_bytes

    def __call__(self) -> web_protocol.RequestHandler:
        return FastHandler(self, loop=self._loop, hit_now=self._hit_now,
                           may_hold=self._may_hold, max_bytes=self._max_bytes, **self._kwargs)
