"""The two upstream clients, side by side: GETs go through the lean HTTP/1.1 client
(``upstream.lean_client``, on by default), everything else and every GET with the option off
through aiohttp's. Each test runs the proxy against a scripted upstream on a loopback port
(a real socket speaking raw HTTP/1.1), with the option on and off, and asserts what the
client got and what the upstream received: the two must not differ."""

from __future__ import annotations

import asyncio

import pytest

from proxy.app import UPSTREAM

from .conftest import MakeOrigin, MakeProxy

ROUTES = [{"name": "all", "match": "GET /*", "mode": "honor", "scope": "public"}]


def _fields(head: bytes) -> list[tuple[str, str]]:
    """The header fields of a request head, without X-Request-ID (one per request)."""
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [(k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines if line)
            if k.lower() != "x-request-id"]


FRAMINGS = {
    "content-length": (b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n"
                       b"Content-Length: 11\r\n\r\nhello world", b"hello world"),
    "chunked": (b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked"
                b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    "http/1.0, until close": (b"HTTP/1.0 200 OK\r\nCache-Control: max-age=60\r\n\r\n"
                              b"hello world", b"hello world"),
}


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("framing", list(FRAMINGS))
async def test_each_framing_arrives_whole_and_is_stored(
        make_proxy: MakeProxy, origin_server: MakeOrigin,
        lean: bool, framing: str) -> None:
    raw, body = FRAMINGS[framing]
    origin = await origin_server(lambda _: raw, close_after_reply=framing.startswith("http/1.0"))
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{origin.port}",
                                       "lean_client": lean}, routes=ROUTES)
    for want in ("MISS", "HIT"):
        resp = await proxy.get("/x")
        assert resp.status == 200
        assert await resp.read() == body
        assert resp.headers["X-Cache"] == want
    assert len(origin.heads) == 1


@pytest.mark.parametrize("lean", [True, False])
async def test_what_the_upstream_receives_is_the_same_with_either_client(
        make_proxy: MakeProxy, origin_server: MakeOrigin,
        lean: bool) -> None:
    """Request line, Host (from the upstream URL, with its path prefix), forwarded and
    dropped fields: byte for byte what aiohttp's client sends, non-ASCII values included."""
    origin = await origin_server(
        lambda _: b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 2\r\n\r\nok")
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{origin.port}/api/v2",
                                       "lean_client": lean}, routes=ROUTES)
    resp = await proxy.get("/x/%C3%A9?b=2&a=%20", headers={
        "Accept": "application/json", "Connection": "close, X-Secret", "X-Secret": "hop",
        "X-Name": "Zoë", "Host": "shop.example"})
    assert resp.status == 200
    assert await resp.read() == b"ok"
    [head] = origin.heads
    assert head.split(b"\r\n", 1)[0] == b"GET /api/v2/x/%C3%A9?b=2&a=%20 HTTP/1.1"
    fields = _fields(head)
    assert ("host", f"127.0.0.1:{origin.port}") in fields
    assert ("x-name", "Zoë".encode().decode("latin-1")) in fields  # the UTF-8 bytes received
    assert ("x-forwarded-host", "shop.example") in fields
    assert not any(k in ("connection", "x-secret") for k, _ in fields)
    assert sorted(k for k, _ in fields) == sorted([
        "host", "accept", "accept-encoding", "user-agent", "x-name", "x-forwarded-for",
        "x-forwarded-proto", "x-forwarded-host", "via"])


@pytest.mark.parametrize("lean", [True, False])
async def test_a_body_too_large_to_store_streams_through(
        make_proxy: MakeProxy, origin_server: MakeOrigin,
        lean: bool) -> None:
    """Bigger than ``cache.max_body_bytes`` and than the lean client's read-ahead (it stops
    reading from the upstream until the client takes what is buffered): the client gets
    every byte, nothing is stored, and the connection serves the next request."""
    big = bytes(range(256)) * 4096  # 1 MiB
    origin = await origin_server(
        lambda _: b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: %d\r\n\r\n"
        % len(big) + big)
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{origin.port}",
                                       "lean_client": lean}, routes=ROUTES)
    for _ in range(2):
        resp = await proxy.get("/big")
        assert resp.status == 200
        assert await resp.read() == big
        assert resp.headers["X-Cache"] == "UNCACHEABLE"
    assert len(origin.heads) == 2
    assert origin.connections == 1  # kept alive after a body read to its end


@pytest.mark.parametrize("lean", [True, False])
async def test_idle_upstream_connections_close_after_keepalive(
        make_proxy: MakeProxy, origin_server: MakeOrigin,
        lean: bool) -> None:
    origin = await origin_server(
        lambda _: b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 2\r\n\r\nok")
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{origin.port}",
                                       "keepalive_s": 0.3, "lean_client": lean}, routes=ROUTES)
    assert (await proxy.get("/a")).status == 200
    assert (await proxy.get("/b")).status == 200
    assert origin.connections == 1  # reused while fresh
    await asyncio.wait_for(origin.closed.get(), 10)  # the proxy closes it once idle
    assert (await proxy.get("/c")).status == 200
    assert origin.connections == 2


async def test_an_upstream_sending_what_was_not_asked_for_is_not_reused(
        make_proxy: MakeProxy, origin_server: MakeOrigin) -> None:
    """Bytes after a complete response (a second response nobody asked for) put the
    connection out of step: it is closed, and the next request gets its own answer."""
    replies = iter([b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 3\r\n\r\none"
                    b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 5\r\n\r\nextra",
                    b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 3\r\n\r\ntwo"])
    origin = await origin_server(lambda _: next(replies))
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{origin.port}"},
                             routes=ROUTES)
    assert await (await proxy.get("/1")).read() == b"one"
    second = await proxy.get("/2")
    assert await second.read() == b"two"
    assert origin.connections == 2
    assert proxy.app is not None
    upstream = proxy.app[UPSTREAM]
    assert upstream._slots._value == upstream.cfg.max_connections  # no slot leaked
