"""Ready-made responses: a stored entry's status line and header block serialised once,
sent with this answer's own fields (Age, X-Cache, Cache-Status, the request id) in a single
write. Building, checking and serialising a header multidict for every hit cost a third of
what aiohttp spends on a response (README, "Performance").

``ReadyResponse`` is an aiohttp ``StreamResponse`` that writes those bytes itself in
``prepare``, through the request's public writer. It sets the few fields aiohttp's own
``prepare`` sets (keep-alive, the writer, end of stream), which ``supported`` checks once:
with an aiohttp that lays them out otherwise, every answer takes the ordinary path.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from aiohttp import web

# Statuses whose answers carry a body and a Content-Length (RFC 9110 §6.4.1, §8.6).
_WITH_BODY = frozenset(range(200, 600)) - {204, 304}
_ASPECTS = ("_eof_sent", "_payload_writer", "_req", "_keep_alive", "_body_length")


def supported() -> bool:
    """Whether this aiohttp has the fields ``ReadyResponse`` sets."""
    probe = web.StreamResponse()
    return all(hasattr(probe, a) for a in _ASPECTS) and hasattr(web.BaseRequest, "writer")


def header_block(status: int, fields: Iterable[tuple[str, str]], body: bytes) -> bytes | None:
    """``name: value\\r\\n`` lines of a stored header section, Content-Length included;
    None when an answer with it cannot be ready-made (no body allowed, a field with CR or
    LF, or fields the answer merges its own into)."""
    if status not in _WITH_BODY:
        return None
    lines = []
    for name, value in fields:
        lower = name.lower()
        if lower in ("cache-status", "content-length", "connection", "transfer-encoding"):
            return None
        if any(c in name or c in value for c in "\r\n"):
            return None
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        return None


def message(status: int, block: bytes, extra: str, body: bytes, *,
            version: tuple[int, int] = (1, 1), keep_alive: bool = True,
            head_only: bool = False) -> bytes:
    """The whole answer: status line, the stored block, this answer's ``extra`` lines (and
    the Connection field its version and keep-alive call for), the body unless HEAD."""
    major, minor = version
    connection = ""
    if keep_alive and minor == 0:
        connection = "Connection: keep-alive\r\n"
    elif not keep_alive and minor == 1:
        connection = "Connection: close\r\n"
    line = _LINES_11.get(status) if version == (1, 1) else None
    if line is None:
        line = f"HTTP/{major}.{minor} {status} {_reason(status)}\r\n".encode()
    tail = (extra + connection + "\r\n").encode("latin-1")
    # One join: each + would copy everything before it again (the body included).
    return b"".join((line, block, tail) if head_only else (line, block, tail, body))


class ReadyResponse(web.StreamResponse):
    def __init__(self, status: int, block: bytes, extra: str, body: bytes) -> None:
        super().__init__(status=status)
        self._block = block
        self._extra = extra  # this answer's own fields, "name: value\r\n" lines
        self._bytes = body

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        writer = request.writer
        self._req = request
        self._payload_writer = writer
        keep_alive = self._keep_alive if self._keep_alive is not None else request.keep_alive
        self._keep_alive = keep_alive
        await writer.write(message(self.status, self._block, self._extra, self._bytes,
                                   version=request.version, keep_alive=keep_alive,
                                   head_only=request.method == "HEAD"))
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        writer = self._payload_writer
        assert writer is not None, "prepare() first"
        await writer.write_eof(data)
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None


_REASONS = {s.value: s.phrase for s in HTTPStatus}
_LINES_11 = {code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in _REASONS.items()}


def _reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")
