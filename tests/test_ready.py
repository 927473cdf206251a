"""Ready-made answers (hits written as serialised bytes): framing, keep-alive, HEAD, HTTP/1.0,
checked byte for byte over raw sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy import ready

from .conftest import StubControl

BODY = '{"ok": true}'


async def exchange(proxy: TestClient[Any, Any], raw: bytes,
                   until_eof: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        writer.write(raw)
        await writer.drain()
        if until_eof:
            return await asyncio.wait_for(reader.read(), 10)
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


def split(data: bytes, methods: list[str]) -> list[tuple[str, dict[str, str], bytes]]:
    """Responses framed by Content-Length (none for HEAD): (status line, fields, body)."""
    out = []
    for method in methods:
        head, _, data = data.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines)
        n = 0 if method == "HEAD" else int(fields["Content-Length"])
        out.append((status, fields, data[:n]))
        data = data[n:]
    assert data == b""
    return out


@pytest.fixture
async def cached(proxy: TestClient[Any, Any], stubctl: StubControl) -> TestClient[Any, Any]:
    await stubctl.program("r", headers=[["Cache-Control", "max-age=600"],
                                        ["Content-Type", "application/json"]], body=BODY)
    await (await proxy.get("/p/r")).read()  # stored (and held in the L1)
    return proxy


def test_this_aiohttp_takes_the_ready_made_path() -> None:
    assert ready.supported()


async def test_pipelined_hits_on_one_connection(cached: TestClient[Any, Any]) -> None:
    get = b"GET /p/r HTTP/1.1\r\nHost: a\r\n\r\n"
    head = b"HEAD /p/r HTTP/1.1\r\nHost: a\r\n\r\n"
    close = b"GET /p/r HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    data = await exchange(cached, get + get + head + close, until_eof=True)
    answers = split(data, ["GET", "GET", "HEAD", "GET"])  # the server closed after the last
    for status, fields, body in answers:
        assert status == "HTTP/1.1 200 OK"
        assert (fields["X-Cache"], fields["Content-Length"]) == ("HIT", str(len(BODY)))
        assert body == (b"" if fields is answers[2][1] else BODY.encode())
    assert [a[1].get("Connection") for a in answers] == [None, None, None, "close"]
    assert len({a[1]["X-Request-ID"] for a in answers}) == 4


@pytest.mark.parametrize(("request_line", "connection", "closes"), [
    (b"GET /p/r HTTP/1.0\r\nHost: a\r\n\r\n", None, True),
    (b"GET /p/r HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", "keep-alive", False),
])
async def test_http_1_0(cached: TestClient[Any, Any], request_line: bytes,
                       connection: str | None, closes: bool) -> None:
    reader, writer = await asyncio.open_connection(cached.server.host, cached.server.port)
    try:
        writer.write(request_line)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        [(status, fields, _)] = split(head, ["HEAD"])
        assert status == "HTTP/1.0 200 OK"
        assert fields.get("Connection") == connection
        body = await asyncio.wait_for(reader.readexactly(len(BODY)), 10)
        assert body == BODY.encode()
        rest = await asyncio.wait_for(reader.read(), 10) if closes else b""
        assert rest == b""
    finally:
        writer.close()


@pytest.mark.parametrize(("status", "fields", "made"), [
    (200, [("Content-Type", "application/json")], True),
    (404, [], True),
    (204, [], False),  # no body, no Content-Length
    (200, [("X-Bad", "a\r\nInjected: 1")], False),
    (200, [("Cache-Status", "upstream; hit")], False),  # the answer merges its own into it
    (200, [("X-Name", "caf\u00e9")], True),
    (200, [("X-Name", "\u2603")], False),  # not latin-1
])
def test_header_block(status: int, fields: list[tuple[str, str]], made: bool) -> None:
    block = ready.header_block(status, fields, b"body")
    assert (block is not None) is made
    if block is not None:
        assert block.endswith(b"Content-Length: 4\r\n")
