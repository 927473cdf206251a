"""Bodies stored compressed: gzip in Redis, sent as stored to clients that accept gzip,
decoded for the others; Vary and ETag say so; bodies the upstream encoded, small bodies and
non-textual ones are stored as sent."""

from __future__ import annotations

import gzip
import json
from typing import Any, cast

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy import encoding
from proxy.entry import unpack_meta

from .conftest import ENTRY_KEYS, MakeProxy, StubControl, settled
from .procs import RedisServer

BIG = json.dumps({"items": [{"id": i, "name": f"item {i}", "tags": ["a", "b"]}
                            for i in range(200)]})
JSON = [["Cache-Control", "max-age=600"], ["Content-Type", "application/json"],
        ["ETag", '"v1"']]


async def raw(proxy: TestClient[Any, Any], path: str, method: str = "GET",
              **headers: str) -> tuple[aiohttp.ClientResponse, bytes]:
    """The bytes as sent (the test client would decode them)."""
    async with aiohttp.ClientSession(auto_decompress=False,
                                     skip_auto_headers=["Accept-Encoding"]) as s, \
            s.request(method, proxy.make_url(path), headers=headers) as resp:
        body = await resp.read()
    await settled(proxy)  # stored too (this session is not the proxy's settling client)
    return resp, body


def stored(server: RedisServer) -> list[dict[bytes, bytes]]:
    r = server.client()
    return [cast(dict[bytes, bytes], r.hgetall(k)) for k in r.scan_iter(match=ENTRY_KEYS)
            if r.type(k) == b"hash"]


@pytest.fixture
async def big(make_proxy: MakeProxy, stubctl: StubControl) -> TestClient[Any, Any]:
    await stubctl.program("big", headers=JSON, body=BIG)
    proxy: TestClient[Any, Any] = await make_proxy(cache={"max_body_bytes": 1 << 20})
    return proxy


async def test_json_is_stored_gzipped_and_sent_as_stored_to_gzip_clients(
        big: TestClient[Any, Any], redis_server: RedisServer) -> None:
    miss, body = await raw(big, "/p/big", **{"Accept-Encoding": "gzip, br"})
    assert miss.headers["X-Cache"] == "MISS"
    assert miss.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == BIG.encode()
    [entry] = stored(redis_server)
    assert entry[b"b"].startswith(b"\x1f\x8b")  # gzip in Redis
    assert len(entry[b"b"]) < len(BIG) / 4
    assert json.loads(unpack_meta(entry[b"m"]))["ce"] == "gzip"
    hit, hit_body = await raw(big, "/p/big", **{"Accept-Encoding": "gzip"})
    assert hit.headers["X-Cache"] == "HIT"
    assert hit_body == entry[b"b"]  # byte for byte as stored
    assert hit.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in hit.headers["Vary"]
    assert hit.headers["ETag"] == 'W/"v1"'  # another representation: a weak validator
    assert int(hit.headers["Content-Length"]) == len(hit_body)
    head, head_body = await raw(big, "/p/big", "HEAD", **{"Accept-Encoding": "gzip"})
    assert (head_body, head.headers["Content-Length"]) == (b"", str(len(hit_body)))
    same = await raw(big, "/p/big", **{"Accept-Encoding": "gzip", "If-None-Match": 'W/"v1"'})
    assert same[0].status == 304


@pytest.mark.parametrize("accept", [None, "identity", "br", "gzip;q=0", "*;q=0"])
async def test_clients_that_do_not_accept_gzip_get_the_json_as_sent(
        big: TestClient[Any, Any], accept: str | None) -> None:
    await raw(big, "/p/big", **{"Accept-Encoding": "gzip"})  # stored compressed
    resp, body = await (raw(big, "/p/big", **{"Accept-Encoding": accept}) if accept
                        else raw(big, "/p/big"))
    assert resp.headers["X-Cache"] == "HIT"
    assert "Content-Encoding" not in resp.headers
    assert body == BIG.encode()
    assert resp.headers["ETag"] == '"v1"'
    assert "Accept-Encoding" in resp.headers["Vary"]


async def test_small_encoded_or_binary_bodies_are_stored_as_sent(
        make_proxy: MakeProxy, stubctl: StubControl, redis_server: RedisServer) -> None:
    proxy = await make_proxy(cache={"max_body_bytes": 1 << 20})
    await stubctl.program("small", headers=JSON, body='{"a": 1}')
    await stubctl.program("png", headers=[["Cache-Control", "max-age=600"],
                                          ["Content-Type", "image/png"]], body="p" * 4000)
    await stubctl.program("pre", headers=[*JSON, ["Content-Encoding", "x-custom"]],
                          body="e" * 4000)
    for name in ("small", "png", "pre"):
        await raw(proxy, f"/p/{name}", **{"Accept-Encoding": "gzip"})
    bodies = sorted(e[b"b"] for e in stored(redis_server))
    assert bodies == sorted([b'{"a": 1}', b"p" * 4000, b"e" * 4000])
    pre, body = await raw(proxy, "/p/pre")
    assert (pre.headers["Content-Encoding"], body) == ("x-custom", b"e" * 4000)
    assert "Vary" not in pre.headers


@pytest.mark.parametrize(("accept", "gzip_ok"), [
    (None, False), ("", False), ("gzip", True), ("GZIP", True), ("x-gzip", True),
    ("br, gzip;q=0.5", True), ("gzip;q=0", False), ("gzip; q=0.000", False),
    ("*", True), ("*;q=0", False), ("*, gzip;q=0", False), ("identity", False),
    ("deflate, br", False),
])
def test_accept_encoding(accept: str | None, gzip_ok: bool) -> None:
    """RFC 9110 §12.5.3."""
    assert encoding.accepts_gzip(accept) is gzip_ok
