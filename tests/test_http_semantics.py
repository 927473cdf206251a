"""RFC 9111 / 5861 behaviour through the proxy, against the stub's programmable endpoint
(/p/{name}: the test chooses status, headers, body and delay) and a private redis-server.

Time is never slept through: responses are made old with an upstream ``Age`` header, which
the RFC's age calculation (§4.2.3) counts like time spent in caches on the way.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import FLOW

from .conftest import ALICE, BOB, ENTRY_KEYS, MakeOrigin, MakeProxy, StubControl
from .procs import RedisServer

ETAG = '"v1"'
PUBLIC = {"name": "programmed", "match": "GET /p/*", "mode": "honor", "scope": "public"}


def route(**kw: Any) -> list[dict[str, Any]]:
    return [{**PUBLIC, **kw}]


async def body_of(resp: aiohttp.ClientResponse) -> str:
    return (await resp.read()).decode()


async def settle(proxy: TestClient[Any, Any]) -> None:
    """Wait for the proxy's background refreshes (stale-while-revalidate) to finish."""
    assert proxy.app is not None
    flow = proxy.app[FLOW]
    while flow.background:
        await asyncio.gather(*list(flow.background), return_exceptions=True)


# -- conditional requests -------------------------------------------------------------------------

async def test_client_conditionals_answered_from_fresh_entry(proxy: TestClient[Any, Any],
                                                             stubctl: StubControl) -> None:
    lm = "Sun, 06 Nov 1994 08:49:37 GMT"
    await stubctl.program("c", headers=[["Cache-Control", "max-age=600"], ["ETag", ETAG],
                                        ["Last-Modified", lm]], body="content")
    assert (await proxy.get("/p/c")).status == 200
    inm = await proxy.get("/p/c", headers={"If-None-Match": ETAG})
    assert inm.status == 304
    assert inm.headers["X-Cache"] == "HIT"
    assert inm.headers["ETag"] == ETAG
    assert await inm.read() == b""
    ims = await proxy.get("/p/c", headers={"If-Modified-Since": lm})
    assert ims.status == 304
    other = await proxy.get("/p/c", headers={"If-None-Match": '"other"'})
    assert other.status == 200
    assert await body_of(other) == "content"
    assert await stubctl.count("GET /p/{name}") == 1


async def test_stale_entry_is_revalidated_and_304_updates_headers(
        make_proxy: MakeProxy, stubctl: StubControl) -> None:
    proxy = await make_proxy(routes=route(keep_s=600))
    # Stored already stale (Age >= max-age): kept for revalidation because it has an ETag.
    await stubctl.program("r", headers=[["Cache-Control", "max-age=60"], ["Age", "60"],
                                        ["ETag", ETAG], ["X-Version", "1"]], body="original")
    first = await proxy.get("/p/r")
    assert first.headers["X-Cache"] == "MISS"
    await stubctl.program("r", headers=[["Cache-Control", "max-age=600"], ["ETag", ETAG],
                                        ["X-Version", "2"]], body="new body, never sent")
    second = await proxy.get("/p/r")
    assert second.status == 200
    assert second.headers["X-Cache"] == "REVALIDATED"
    assert "fwd-status=304" in second.headers["Cache-Status"]
    assert await body_of(second) == "original"  # the body was not fetched again
    assert second.headers["X-Version"] == "2"  # §4.3.4: the 304's fields replace stored ones
    received = await stubctl.received("r")
    assert ["If-None-Match", ETAG] in received[-1]["headers"]
    third = await proxy.get("/p/r")
    assert third.headers["X-Cache"] == "HIT"
    assert third.headers["X-Version"] == "2"
    assert await stubctl.count("GET /p/{name}") == 2


async def test_no_cache_response_is_stored_but_validated_each_time(
        proxy: TestClient[Any, Any], stubctl: StubControl) -> None:
    await stubctl.program("nc", headers=[["Cache-Control", "no-cache, max-age=600"],
                                         ["ETag", ETAG]], body="body")
    assert (await proxy.get("/p/nc")).headers["X-Cache"] == "MISS"
    for _ in range(2):
        resp = await proxy.get("/p/nc")
        assert resp.headers["X-Cache"] == "REVALIDATED"
        assert await body_of(resp) == "body"
    assert await stubctl.count("GET /p/{name}") == 3


async def test_changed_validator_replaces_the_entry(make_proxy: MakeProxy,
                                                   stubctl: StubControl) -> None:
    proxy = await make_proxy(routes=route(keep_s=600))
    await stubctl.program("e", headers=[["Cache-Control", "max-age=60"], ["Age", "60"],
                                        ["ETag", ETAG]], body="one")
    await (await proxy.get("/p/e")).read()
    await stubctl.program("e", headers=[["Cache-Control", "max-age=600"], ["ETag", '"v2"']],
                          body="two")
    resp = await proxy.get("/p/e")
    assert await body_of(resp) == "two"
    assert resp.headers["X-Cache"] == "MISS"
    assert (await proxy.get("/p/e")).headers["X-Cache"] == "HIT"


# -- stale serving --------------------------------------------------------------------------------

async def test_stale_while_revalidate_serves_stale_and_refreshes_once(
        proxy: TestClient[Any, Any], stubctl: StubControl) -> None:
    await stubctl.program("swr", headers=[
        ["Cache-Control", "max-age=10, stale-while-revalidate=600"], ["Age", "20"]], body="old")
    assert (await proxy.get("/p/swr")).headers["X-Cache"] == "MISS"
    await stubctl.program("swr", headers=[["Cache-Control", "max-age=600"]], body="new")
    stale = await asyncio.gather(*(proxy.get("/p/swr") for _ in range(5)))
    for resp in stale:
        assert resp.headers["X-Cache"] == "STALE"
        assert "detail=stale-while-revalidate" in resp.headers["Cache-Status"]
        assert await body_of(resp) == "old"
    await settle(proxy)
    assert await stubctl.count("GET /p/{name}") == 2  # one background refresh for five
    fresh = await proxy.get("/p/swr")
    assert fresh.headers["X-Cache"] == "HIT"
    assert await body_of(fresh) == "new"


async def test_route_grace_period_in_override_mode(make_proxy: MakeProxy,
                                                   stubctl: StubControl) -> None:
    proxy = await make_proxy(routes=route(mode="override", ttl_s=0, grace_s=600))
    await stubctl.program("g", headers=[["Cache-Control", "no-cache"]], body="v1")
    assert (await proxy.get("/p/g")).headers["X-Cache"] == "MISS"
    resp = await proxy.get("/p/g")
    assert resp.headers["X-Cache"] == "STALE"
    await settle(proxy)
    assert await stubctl.count("GET /p/{name}") == 2


@pytest.mark.parametrize("failure", ["503", "timeout", "reset", "closed-before-response",
                                     "reset-before-response"])
async def test_stale_if_error(make_proxy: MakeProxy, stubctl: StubControl,
                              failure: str) -> None:
    proxy = await make_proxy(upstream={"timeout_s": 0.3})
    await stubctl.program("sie", headers=[
        ["Cache-Control", "max-age=10, stale-if-error=600"], ["Age", "20"]], body="saved")
    assert (await proxy.get("/p/sie")).headers["X-Cache"] == "MISS"
    if failure == "503":
        await stubctl.program("sie", status=503, body="down")
    elif failure == "timeout":
        await stubctl.program("sie", delay_ms=3000, body="late")
    elif failure.endswith("-before-response"):  # RFC 9111 §4.2.4: as for a 5xx
        await stubctl.program("sie", cut_before_response=failure.split("-")[0].replace(
            "closed", "close"))
    else:
        await stubctl.program("sie", headers=[["Cache-Control", "max-age=600"]],
                              body="x" * 100, close_mid_body=True)
    resp = await proxy.get("/p/sie")
    assert resp.status == 200
    assert await body_of(resp) == "saved"
    assert resp.headers["X-Cache"] == "STALE"
    assert "detail=stale-if-error" in resp.headers["Cache-Status"]


@pytest.mark.parametrize("cut", ["close", "reset"])
async def test_a_cut_connection_with_nothing_stored_is_a_502(proxy: TestClient[Any, Any],
                                                            stubctl: StubControl,
                                                            cut: str) -> None:
    await stubctl.program("cut", cut_before_response=cut)
    resp = await proxy.get("/p/cut")
    assert resp.status == 502
    assert resp.headers["X-Cache"] == "ERROR"
    assert await stubctl.count("GET /p/{name}") == 1  # reached once, never retried


async def test_on_a_kept_alive_connection_a_read_is_resent_once_a_write_never(
        proxy: TestClient[Any, Any], stubctl: StubControl) -> None:
    """RFC 9112 §9.3.1: a connection the upstream closes just as it is reused says nothing
    about the request: a GET is sent once more on a new connection; a PUT never is."""
    await stubctl.program("warm", body="ok")
    await stubctl.program("gone", cut_before_response="close")
    assert (await proxy.get("/p/warm")).status == 200  # leaves a kept-alive connection
    assert (await proxy.get("/p/gone")).status == 502
    assert await stubctl.count("GET /p/{name}") == 3  # warm, and gone twice
    assert (await proxy.get("/p/warm")).status == 200
    put = await proxy.put("/p/gone", data=b"once")
    assert put.status == 502
    assert len(await stubctl.received("gone")) == 3  # two GETs, one PUT


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "s-maxage=10"])
async def test_directives_that_forbid_serving_stale(proxy: TestClient[Any, Any],
                                                    stubctl: StubControl,
                                                    directive: str) -> None:
    await stubctl.program("mr", headers=[
        ["Cache-Control", f"max-age=10, stale-if-error=600, {directive}"], ["Age", "20"]],
        body="saved")
    await (await proxy.get("/p/mr")).read()
    await stubctl.program("mr", status=503, body="down")
    resp = await proxy.get("/p/mr")
    assert resp.status == 503
    assert await body_of(resp) == "down"


async def test_route_stale_if_error_without_upstream_directive(make_proxy: MakeProxy,
                                                               stubctl: StubControl) -> None:
    proxy = await make_proxy(routes=route(stale_if_error_s=600))
    await stubctl.program("rs", headers=[["Cache-Control", "max-age=10"], ["Age", "20"]],
                          body="saved")
    await (await proxy.get("/p/rs")).read()
    await stubctl.program("rs", status=500, body="boom")
    resp = await proxy.get("/p/rs")
    assert (resp.status, await body_of(resp)) == (200, "saved")


# -- RFC 9213 targeted cache control --------------------------------------------------------------

async def test_targeted_fields_end_to_end(make_proxy: MakeProxy, stubctl: StubControl) -> None:
    """The API team's "cache this 30 s here, let browsers keep it 0": the proxy obeys its own
    field (and CDN-Cache-Control) ahead of Cache-Control, passes CDN-Cache-Control and
    Cache-Control on, and never lets its own field out."""
    proxy = await make_proxy(routes=[{**route()[0], "name": "strict", "match": "GET /p/strict",
                                      "cache_control_fields": []}, *route()])
    await stubctl.program("own", headers=[["JSONCache-Cache-Control", "max-age=30"],
                                          ["Cache-Control", "no-store"]], body="own")
    await stubctl.program("cdn", headers=[["CDN-Cache-Control", "max-age=30"],
                                          ["Cache-Control", "max-age=0"]], body="cdn")
    await stubctl.program("bad", headers=[["CDN-Cache-Control", "max-age=30,,"],
                                          ["Cache-Control", "no-store"]], body="bad")
    await stubctl.program("strict", headers=[["CDN-Cache-Control", "max-age=30"],
                                               ["Cache-Control", "no-store"]], body="strict")
    for name, cached in [("own", True), ("cdn", True), ("bad", False), ("strict", False)]:
        for i in range(2):
            resp = await proxy.get(f"/p/{name}")
            assert resp.status == 200
            await resp.read()
            assert "JSONCache-Cache-Control" not in resp.headers
            expected = ("HIT" if i == 1 else "MISS") if cached else "UNCACHEABLE"
            assert resp.headers["X-Cache"] == expected, name
    cdn = await proxy.get("/p/cdn")
    assert (cdn.headers["Cache-Control"], cdn.headers["CDN-Cache-Control"]) == \
        ("max-age=0", "max-age=30")
    assert (await proxy.get("/p/own")).headers["Cache-Control"] == "no-store"
    assert await stubctl.count("GET /p/{name}") == 6


# -- request directives ---------------------------------------------------------------------------

async def test_request_directives(proxy: TestClient[Any, Any], stubctl: StubControl) -> None:
    await stubctl.program("rq", headers=[["Cache-Control", "max-age=600"], ["ETag", ETAG]],
                          body="b")
    oic = await proxy.get("/p/rq", headers={"Cache-Control": "only-if-cached"})
    assert oic.status == 504
    assert await stubctl.count() == 0
    await (await proxy.get("/p/rq")).read()
    assert (await proxy.get("/p/rq", headers={"Cache-Control": "only-if-cached"})).status == 200
    for headers in ({"Cache-Control": "no-cache"}, {"Cache-Control": "max-age=0"},
                    {"Pragma": "no-cache"}):
        resp = await proxy.get("/p/rq", headers=headers)
        assert resp.headers["X-Cache"] == "REVALIDATED", headers
    unknown = await proxy.get("/p/rq", headers={"Cache-Control": "frobnicate=1"})
    assert unknown.headers["X-Cache"] == "HIT"
    no_store = await proxy.get("/p/rq", headers={"Cache-Control": "no-store"})
    assert no_store.headers["X-Cache"] == "PASS"
    assert await stubctl.count("GET /p/{name}") == 5


async def test_request_directives_can_be_ignored_per_route(make_proxy: MakeProxy,
                                                           stubctl: StubControl) -> None:
    proxy = await make_proxy(routes=route(honor_request_directives=False))
    await stubctl.program("ig", headers=[["Cache-Control", "max-age=600"]], body="b")
    await (await proxy.get("/p/ig")).read()
    resp = await proxy.get("/p/ig", headers={"Cache-Control": "no-cache"})
    assert resp.headers["X-Cache"] == "HIT"


# -- Vary -----------------------------------------------------------------------------------------

async def test_vary_keeps_variants_apart_and_together(proxy: TestClient[Any, Any],
                                                      stubctl: StubControl) -> None:
    await stubctl.program("v", headers=[["Cache-Control", "max-age=600"], ["Vary", "X-Foo"]],
                          body="varied")
    expect = [({"X-Foo": "1"}, "MISS"), ({"X-Foo": "1"}, "HIT"), ({"X-Foo": "2"}, "MISS"),
              ({"X-Foo": "1"}, "HIT"), ({"X-Foo": "2", "Other": "x"}, "HIT"), ({}, "MISS"),
              ({}, "HIT"), ({"X-Foo": " 2 "}, "HIT")]
    for headers, outcome in expect:
        resp = await proxy.get("/p/v", headers=headers)
        assert resp.headers["X-Cache"] == outcome, headers
    assert await stubctl.count("GET /p/{name}") == 3


async def test_vary_star_is_never_stored(proxy: TestClient[Any, Any],
                                         stubctl: StubControl) -> None:
    await stubctl.program("vs", headers=[["Cache-Control", "max-age=600"], ["Vary", "*"]])
    for _ in range(2):
        assert (await proxy.get("/p/vs")).headers["X-Cache"] == "UNCACHEABLE"


async def test_vary_on_authorization_keeps_the_credential_out_of_redis(
        make_proxy: MakeProxy, stubctl: StubControl, redis_server: RedisServer) -> None:
    proxy = await make_proxy(routes=route(scope="user"))
    await stubctl.program("va", headers=[["Cache-Control", "private, max-age=600"],
                                         ["Vary", "Authorization"]], body="mine")
    for who in (ALICE, ALICE, BOB):
        await (await proxy.get("/p/va", headers=who)).read()
    assert (await proxy.get("/p/va", headers=ALICE)).headers["X-Cache"] == "HIT"
    r = redis_server.client()
    for key in r.scan_iter(match="*"):
        assert b"alice-token" not in key
        if r.type(key) == b"hash":
            assert not any(b"alice-token" in v for v in r.hgetall(key).values())


# -- headers --------------------------------------------------------------------------------------

async def test_stored_headers(proxy: TestClient[Any, Any], stubctl: StubControl) -> None:
    date = email.utils.formatdate(time.time() - 2, usegmt=True)
    await stubctl.program("h", headers=[
        ["Cache-Control", 'max-age=600, no-cache="X-Private"'], ["Date", date],
        ["Connection", "X-A, X-B"], ["X-A", "1"], ["X-B", "2"], ["X-C", "3"],
        ["X-Private", "secret"], ["Age", "5"]], body="h")
    miss = await proxy.get("/p/h")
    hit = await proxy.get("/p/h")
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["X-C"] == "3"
    assert hit.headers["Date"] == date  # kept as the upstream sent it
    for gone in ("X-A", "X-B", "X-Private"):
        assert gone not in hit.headers
    assert int(hit.headers["Age"]) >= 5  # generated, counting the upstream's Age
    assert miss.headers["X-C"] == "3"
    assert miss.headers["X-Private"] == "secret"  # the fetching client gets every field
    assert "X-A" not in miss.headers  # ... but never hop-by-hop ones


# -- invalidation (§4.4) --------------------------------------------------------------------------

async def test_unsafe_methods_invalidate_their_url(proxy: TestClient[Any, Any],
                                                   stubctl: StubControl) -> None:
    await stubctl.program("inv", headers=[["Cache-Control", "max-age=600"]], body="i")
    for method in ("POST", "PUT", "DELETE", "PATCH", "M-SEARCH"):
        await (await proxy.get("/p/inv")).read()
        assert (await proxy.get("/p/inv")).headers["X-Cache"] == "HIT"
        write = await proxy.request(method, "/p/inv", data=b"abc")
        assert write.status == 200
        assert write.headers["X-Cache"] == "PASS"
        assert (await proxy.get("/p/inv")).headers["X-Cache"] == "MISS", method


async def test_failed_write_and_safe_methods_do_not_invalidate(proxy: TestClient[Any, Any],
                                                               stubctl: StubControl) -> None:
    await stubctl.program("keep", headers=[["Cache-Control", "max-age=600"]], body="k")
    await (await proxy.get("/p/keep")).read()
    await stubctl.program("keep", status=500, body="failed")
    assert (await proxy.post("/p/keep", data=b"x")).status == 500
    assert (await proxy.options("/p/keep")).status == 500
    await stubctl.program("keep", headers=[["Cache-Control", "max-age=600"]], body="k")
    assert (await proxy.get("/p/keep")).headers["X-Cache"] == "HIT"


async def test_location_and_content_location_are_invalidated(proxy: TestClient[Any, Any],
                                                             stubctl: StubControl) -> None:
    await stubctl.program("t1", headers=[["Cache-Control", "max-age=600"]], body="1")
    await stubctl.program("t2", headers=[["Cache-Control", "max-age=600"]], body="2")
    await stubctl.program("t3", headers=[["Cache-Control", "max-age=600"]], body="3")
    for name in ("t1", "t2", "t3"):
        await (await proxy.get(f"/p/{name}")).read()
    host = proxy.make_url("").host
    port = proxy.make_url("").port
    await stubctl.program("create", status=201, headers=[
        ["Location", "/p/t1"], ["Content-Location", f"http://{host}:{port}/p/t2"],
        ["X-Other", "https://elsewhere.example/p/t3"]])
    assert (await proxy.post("/p/create", data=b"{}")).status == 201
    assert (await proxy.get("/p/t1")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/p/t2")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/p/t3")).headers["X-Cache"] == "HIT"
    await stubctl.program("create", status=201,
                          headers=[["Location", "https://elsewhere.example/p/t3"]])
    await (await proxy.post("/p/create", data=b"{}")).read()
    assert (await proxy.get("/p/t3")).headers["X-Cache"] == "HIT"  # other origin: untouched


async def test_write_invalidates_every_scope_and_variant(make_proxy: MakeProxy,
                                                         stubctl: StubControl) -> None:
    proxy = await make_proxy(routes=route(scope="user"))
    await stubctl.program("shared", headers=[["Cache-Control", "private, max-age=600"],
                                             ["Vary", "X-Lang"]], body="s")
    variants = [(ALICE, {"X-Lang": "en"}), (ALICE, {"X-Lang": "de"}), (BOB, {"X-Lang": "en"})]
    for who, extra in variants:
        await (await proxy.get("/p/shared", headers={**who, **extra})).read()
        assert (await proxy.get("/p/shared", headers={**who, **extra})).headers["X-Cache"] \
            == "HIT"
    assert (await proxy.put("/p/shared", data=b"x", headers=ALICE)).status == 200
    for who, extra in variants:
        assert (await proxy.get("/p/shared", headers={**who, **extra})).headers["X-Cache"] \
            == "MISS"


# -- pass-through ---------------------------------------------------------------------------------

async def test_interim_responses_pass_through(make_proxy: MakeProxy,
                                              origin_server: MakeOrigin) -> None:
    origin = await origin_server(lambda _: (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{origin.port}"},
                             routes=[{"name": "all", "match": "GET /*", "mode": "honor"}])
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
                           b"\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\n")
    hit = await proxy.get("/x")  # the final response was stored, the hints were not
    assert hit.headers["X-Cache"] == "HIT"
    assert await hit.text() == "ok"
    # An HTTP/1.0 client is never sent 1xx (RFC 9110 §15.2).
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(b"GET /y HTTP/1.0\r\nHost: a\r\n\r\n")
    await writer.drain()
    old = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert old.split(b"\r\n", 1)[0].endswith(b" 200 OK")
    assert b" 103 " not in old


KEPT_FIELDS = [  # end-to-end fields a cache stores and delivers as the upstream sent them
    ["Content-Type", "application/json; charset=utf-8"], ["Content-Language", "en, de"],
    ["Content-Location", "/p/fields/v1"], ["Content-Disposition", 'inline; filename="a.json"'],
    ["ETag", '"abc"'], ["Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT"],
    ["Link", '</next>; rel="next"'], ["X-Frame-Options", "DENY"],
    ["Strict-Transport-Security", "max-age=31536000"],
    ["Access-Control-Allow-Origin", "*"], ["Content-Security-Policy", "default-src 'none'"],
    ["X-Custom", "one"], ["X-Custom", "two"], ["Cache-Control", "max-age=600"],
]


async def test_stored_fields_are_delivered_as_sent(proxy: TestClient[Any, Any],
                                                   stubctl: StubControl) -> None:
    """RFC 9111 §3.1: a cache stores the header section as received (less hop-by-hop
    fields); Content-Length is the upstream's own on a hit too."""
    await stubctl.program("fields", headers=[*KEPT_FIELDS, ["Connection", "X-Hop"],
                                             ["X-Hop", "gone"], ["Keep-Alive", "timeout=5"]],
                          body='{"a": 1}')
    for expected in ("MISS", "HIT"):
        resp = await proxy.get("/p/fields")
        assert resp.headers["X-Cache"] == expected
        assert await resp.read() == b'{"a": 1}'
        assert resp.headers["Content-Length"] == "8"
        for name in {n for n, _ in KEPT_FIELDS}:
            sent = [v for n, v in KEPT_FIELDS if n == name]
            assert resp.headers.getall(name) == sent, (expected, name)
        assert "X-Hop" not in resp.headers
        assert "Keep-Alive" not in resp.headers


async def test_several_ranges_and_206_pass_through(proxy: TestClient[Any, Any],
                                                   stubctl: StubControl) -> None:
    """Several ranges would need multipart/byteranges: the upstream answers them, and its
    206 is never stored (RFC 9111 §3.4: no combining here)."""
    await stubctl.program("part", status=206, headers=[["Cache-Control", "max-age=600"],
                                                       ["Content-Range", "bytes 0-1/10"]],
                          body="01")
    for _ in range(2):
        resp = await proxy.get("/p/part", headers={"Range": "bytes=0-1, 4-5"})
        assert resp.status == 206
        assert resp.headers["Content-Range"] == "bytes 0-1/10"
        assert resp.headers["X-Cache"] == "PASS"
    [got, _] = await stubctl.received("part")
    assert ["Range", "bytes=0-1, 4-5"] in got["headers"]
    no_range = await proxy.get("/p/part")
    assert no_range.headers["X-Cache"] == "UNCACHEABLE"  # a 206 is never stored


RANGES = [  # (Range, If-Range, status, body, Content-Range)  RFC 9110 §14, §13.1.5
    ("bytes=2-4", None, 206, "234", "bytes 2-4/10"),
    ("bytes=7-", None, 206, "789", "bytes 7-9/10"),
    ("bytes=-3", None, 206, "789", "bytes 7-9/10"),
    ("bytes=-30", None, 206, "0123456789", "bytes 0-9/10"),
    ("bytes=8-30", None, 206, "89", "bytes 8-9/10"),
    ("BYTES = 0-0", None, 206, "0", "bytes 0-0/10"),
    ("bytes=10-", None, 416, "", "bytes */10"),  # unsatisfiable
    ("bytes=-0", None, 416, "", "bytes */10"),
    ("bytes=5-2", None, 200, "0123456789", None),  # invalid: ignored
    ("pages=1-2", None, 200, "0123456789", None),
    ("bytes=0-0", '"v1"', 206, "0", "bytes 0-0/10"),  # If-Range: the stored ETag
    ("bytes=0-0", '"v0"', 200, "0123456789", None),  # another one: the whole
    ("bytes=0-0", 'W/"v1"', 200, "0123456789", None),  # weak: never matches
    ("bytes=0-0", "Sun, 06 Nov 1994 08:49:37 GMT", 206, "0", "bytes 0-0/10"),
    ("bytes=0-0", "Mon, 07 Nov 1994 08:49:37 GMT", 200, "0123456789", None),
]


async def test_a_range_is_answered_from_the_stored_response(proxy: TestClient[Any, Any],
                                                            stubctl: StubControl) -> None:
    await stubctl.program("whole", headers=[["Cache-Control", "max-age=600"],
                                            ["ETag", '"v1"'],
                                            ["Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT"]],
                          body="0123456789")
    first = await proxy.get("/p/whole", headers={"Range": "bytes=2-4"})
    assert (first.status, await body_of(first)) == (206, "234")
    assert first.headers["X-Cache"] == "MISS"
    [got] = await stubctl.received("whole")  # the fill fetched the whole representation
    assert not any(k.lower() == "range" for k, _ in got["headers"])
    for rng, if_range, code, body, content_range in RANGES:
        headers = {"Range": rng, **({"If-Range": if_range} if if_range else {})}
        resp = await proxy.get("/p/whole", headers=headers)
        assert (resp.status, await body_of(resp)) == (code, body), (rng, if_range)
        assert resp.headers.get("Content-Range") == content_range, (rng, if_range)
        assert resp.headers["X-Cache"] == "HIT"
    head = await proxy.head("/p/whole", headers={"Range": "bytes=0-1"})
    assert head.status == 200
    assert await stubctl.count("GET /p/{name}") == 1


async def test_a_range_of_a_gzip_stored_body_is_taken_from_the_identity(
        proxy: TestClient[Any, Any], stubctl: StubControl) -> None:
    text = "".join(f"{i:04d}," for i in range(400))  # 2,000 bytes: stored gzipped
    await stubctl.program("big", headers=[["Cache-Control", "max-age=600"],
                                          ["Content-Type", "application/json"]], body=text)
    await (await proxy.get("/p/big")).read()
    resp = await proxy.get("/p/big", headers={"Range": "bytes=5-14",
                                              "Accept-Encoding": "gzip"})
    assert resp.status == 206
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == text[5:15].encode()
    assert resp.headers["Content-Range"] == f"bytes 5-14/{len(text)}"


async def test_any_method_with_a_body_passes_through(proxy: TestClient[Any, Any],
                                                     stubctl: StubControl) -> None:
    await stubctl.program("m", status=202, headers=[["X-Seen", "yes"]], body="accepted")
    big = b"z" * 300_000
    for method in ("PATCH", "DELETE", "PROPFIND", "GET"):
        resp = await proxy.request(method, "/p/m", data=big)
        assert resp.status == 202
        assert await body_of(resp) == "accepted"
    received = await stubctl.received("m")
    assert [r["method"] for r in received] == ["PATCH", "DELETE", "PROPFIND", "GET"]
    assert all(len(r["body"]) == len(big) for r in received)


async def test_upstream_closing_mid_body(proxy: TestClient[Any, Any], stubctl: StubControl,
                                         redis_server: RedisServer) -> None:
    # Small enough to be buffered for the cache: the client gets a clean 502.
    await stubctl.program("cut", headers=[["Cache-Control", "max-age=600"]], body="x" * 1000,
                          close_mid_body=True)
    resp = await proxy.get("/p/cut")
    assert resp.status == 502
    assert (await resp.json())["error"] == "upstream_broken"
    # Too large to buffer: the headers are gone already, so the client sees a broken body.
    await stubctl.program("cut2", headers=[["Cache-Control", "max-age=600"]],
                          body="x" * 100_000, close_mid_body=True)
    resp = await proxy.get("/p/cut2")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    r = redis_server.client()
    assert not any(b"m" in r.hgetall(k) for k in r.scan_iter(match=ENTRY_KEYS))


# -- coalescing -----------------------------------------------------------------------------------

async def test_concurrent_misses_coalesce_in_process(proxy: TestClient[Any, Any],
                                                     stubctl: StubControl) -> None:
    await stubctl.program("co", headers=[["Cache-Control", "max-age=600"]], body="one fetch",
                          delay_ms=200)
    responses = await asyncio.gather(*(proxy.get("/p/co") for _ in range(30)))
    outcomes = sorted(r.headers["X-Cache"] for r in responses)
    assert outcomes == ["COALESCED"] * 29 + ["MISS"]
    assert [await body_of(r) for r in responses] == ["one fetch"] * 30
    assert await stubctl.count("GET /p/{name}") == 1


async def test_private_responses_are_not_shared_with_waiters(make_proxy: MakeProxy,
                                                             stubctl: StubControl) -> None:
    proxy = await make_proxy(routes=route(scope="user"))
    await stubctl.program("pv", headers=[["Cache-Control", "private, max-age=600"],
                                         ["Vary", "X-Who"]], body="p", delay_ms=200)
    # Same user (same key), different variants: the waiter must not get the leader's variant.
    a, b = await asyncio.gather(proxy.get("/p/pv", headers={**ALICE, "X-Who": "1"}),
                                proxy.get("/p/pv", headers={**ALICE, "X-Who": "2"}))
    assert sorted([a.headers["X-Cache"], b.headers["X-Cache"]]) == ["MISS", "MISS"]
    assert await stubctl.count("GET /p/{name}") == 2


async def test_failed_fetch_releases_waiters_promptly(make_proxy: MakeProxy,
                                                      stubctl: StubControl) -> None:
    proxy = await make_proxy(cache={"coalesce_wait_ms": 60_000})
    await stubctl.program("fail", status=500, headers=[["Cache-Control", "no-store"]],
                          body="no", delay_ms=200)
    # With a 60 s wait bound, only a prompt release finishes within 10 s.
    responses = await asyncio.wait_for(
        asyncio.gather(*(proxy.get("/p/fail") for _ in range(10))), timeout=10)
    assert [r.status for r in responses] == [500] * 10


async def test_hit_for_miss_skips_the_queue(proxy: TestClient[Any, Any],
                                            stubctl: StubControl) -> None:
    await stubctl.program("hfm", headers=[["Cache-Control", "no-store"]], body="n")
    await (await proxy.get("/p/hfm")).read()
    await stubctl.program("hfm", headers=[["Cache-Control", "no-store"]], body="n",
                          delay_ms=100)
    responses = await asyncio.gather(*(proxy.get("/p/hfm") for _ in range(10)))
    assert {r.headers["X-Cache"] for r in responses} == {"UNCACHEABLE"}
    assert all("detail=no-store" in r.headers["Cache-Status"] for r in responses)
    assert await stubctl.count("GET /p/{name}") == 11


async def test_json_bodies_survive_byte_for_byte(proxy: TestClient[Any, Any],
                                                 stubctl: StubControl) -> None:
    doc = json.dumps({"ünï": "çødé", "n": [1, 2.5, None]}, ensure_ascii=False)
    await stubctl.program("u", headers=[["Cache-Control", "max-age=600"],
                                        ["Content-Type", "application/json; charset=utf-8"]],
                          body=doc)
    miss = await (await proxy.get("/p/u")).read()
    hit_resp = await proxy.get("/p/u")
    assert hit_resp.headers["X-Cache"] == "HIT"
    assert await hit_resp.read() == miss == doc.encode()
