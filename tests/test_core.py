"""The core flow end to end: the proxy (aiohttp test client) in front of the real stub (over
HTTP) and a private redis-server."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from proxy import keys
from proxy.app import FLOW, STORE, create_app
from proxy.entry import Entry
from proxy.redisconn import node_of
from proxy.resp import Client

from .conftest import (
    ALICE,
    BOB,
    ENTRY_KEYS,
    OUR_KEYS,
    MakeProxy,
    StubControl,
    base_config,
    make_config,
    settled,
)
from .procs import RedisServer
from .test_observability import total

TXNS = "/transactions?session_id=alice-s1&page_size=5"


def redis_dump(server: RedisServer) -> bytes:
    """Every key and value in the test's Redis, as one byte string to search."""
    r = server.client()
    out: list[bytes] = []
    for key in r.scan_iter(match="*"):
        out.append(key)
        kind = r.type(key)
        if kind == b"hash":
            for k, v in cast(dict[bytes, bytes], r.hgetall(key)).items():
                out += [k, v]
        elif kind == b"zset":
            out += cast(list[bytes], r.zrange(key, 0, -1))
        elif kind == b"string":
            out.append(cast(bytes, r.get(key)))
        else:
            raise AssertionError(f"unexpected {kind!r} at {key!r}")
    return b"".join(out)


def entry_keys(r: RedisServer) -> list[bytes]:
    return sorted(k for k in r.client().scan_iter(match=ENTRY_KEYS))


async def test_hit_after_miss_reaches_upstream_once(proxy: TestClient[Any, Any],
                                                    stubctl: StubControl,
                                                    redis_server: RedisServer) -> None:
    first = await proxy.get(TXNS, headers=ALICE)
    body1 = await first.read()
    assert first.status == 200
    assert first.headers["X-Cache"] == "MISS"
    second = await proxy.get(TXNS, headers=ALICE)
    body2 = await second.read()
    assert second.status == 200
    assert second.headers["X-Cache"] == "HIT"
    assert second.headers["Cache-Status"].startswith("jsoncache; hit; ttl=")
    assert body2 == body1
    assert json.loads(body2)["session_id"] == "alice-s1"
    for name in ("ETag", "Content-Type", "Cache-Control", "Date"):
        assert second.headers[name] == first.headers[name]
    assert int(second.headers["Age"]) >= 0
    assert await stubctl.count("GET /transactions") == 1
    assert len(entry_keys(redis_server)) == 1


async def test_the_application_alone_answers_as_the_proxy_runner_does(
        aiohttp_client: Any, stub: TestServer, stubctl: StubControl,
        redis_server: RedisServer) -> None:
    """Served by a plain ``AppRunner`` (as ``web.run_app`` or gunicorn would serve it), not
    by ``ProxyRunner`` (``python -m proxy``, and every other test): the application's own
    catch-all route answers proxied requests the same way."""
    app = create_app(make_config(base_config(str(stub.make_url("")).rstrip("/"),
                                             redis_server.url())))
    client: TestClient[Any, Any] = await aiohttp_client(TestServer(app))
    first = await client.get(TXNS, headers=ALICE)
    assert first.status == 200
    assert first.headers["X-Cache"] == "MISS"
    await settled(client)
    second = await client.get(TXNS, headers=ALICE)
    assert second.status == 200
    assert second.headers["X-Cache"] == "HIT"
    assert await second.read() == await first.read()
    assert await stubctl.count("GET /transactions") == 1
    live = await client.get("/cache/health/live")
    assert live.status == 200


@pytest.mark.parametrize("answer_first", [True, False])
async def test_a_fill_is_answered_before_it_is_stored(make_proxy: MakeProxy,
                                                      stubctl: StubControl,
                                                      redis_server: RedisServer,
                                                      answer_first: bool) -> None:
    """By default (``cache.answer_before_store``) the client whose request fills an entry
    gets its answer as soon as the upstream's is read: a stalled save does not hold it
    back. Stored first, the answer waits for the save and says how that went."""
    # A 1 s budget: the save is surely still waiting when the answer is looked at.
    proxy = await make_proxy(settle=False, cache={"answer_before_store": answer_first},
                             redis={"timeout_ms": 1000})
    await stubctl.program("fill", headers=[["Cache-Control", "max-age=600"]], body="fresh",
                          delay_ms=200)
    slow = asyncio.ensure_future(proxy.get("/p/fill"))
    await stubctl.arrival("fill")  # looked up (the fill lock taken): now stall the save
    admin = redis_server.client()
    admin.client_pause(30_000, all=False)  # scripts and writes wait; reads go on
    try:
        resp = await asyncio.wait_for(slow, 10)
        assert await resp.text() == "fresh"
        assert resp.headers["X-Cache"] == "MISS"
        status = resp.headers["Cache-Status"]
        assert proxy.app is not None
        if answer_first:
            assert "detail=" not in status, status
            assert "stored" not in status, status
            assert proxy.app[FLOW].storing  # the save is still waiting for Redis
        else:
            assert "detail=redis-timeout" in status, status  # it waited for the save
    finally:
        admin.client_unpause()
    await settled(proxy)
    assert not proxy.app[FLOW].storing


async def test_entry_ttl_comes_from_route(proxy: TestClient[Any, Any],
                                          redis_server: RedisServer) -> None:
    await (await proxy.get("/summary?session_id=alice-s1", headers=ALICE)).read()
    await (await proxy.get("/sessions", headers=ALICE)).read()
    r = redis_server.client()
    ttls = sorted(r.pttl(k) for k in entry_keys(redis_server))
    assert 590_000 < ttls[0] <= 600_000  # sessions: 600 s
    assert 1_790_000 < ttls[1] <= 1_800_000  # summary: 1800 s
    # Index keys expire too: nothing this proxy writes lives forever.
    assert all(r.pttl(k) > 0 for k in r.scan_iter(match=OUR_KEYS))


async def test_entry_expires_after_its_ttl(make_proxy: MakeProxy, stubctl: StubControl,
                                           redis_server: RedisServer) -> None:
    proxy = await make_proxy(routes=[{"name": "t", "match": "GET /transactions",
                                      "mode": "override", "ttl_s": 1, "scope": "user"}])
    sub = aioredis.from_url(redis_server.url()).pubsub()
    await sub.subscribe("__keyevent@1__:expired")
    assert (await proxy.get(TXNS, headers=ALICE)).headers["X-Cache"] == "MISS"
    assert (await proxy.get(TXNS, headers=ALICE)).headers["X-Cache"] == "HIT"
    [key] = entry_keys(redis_server)
    # Wait for Redis to announce the entry's expiry (an event, not a guess at a duration).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        assert loop.time() < deadline, "the entry never expired"
        msg = await sub.get_message(ignore_subscribe_messages=True, timeout=1)
        if msg is not None and msg["data"] == key:
            break
    await sub.aclose()  # type: ignore[no-untyped-call]
    again = await proxy.get(TXNS, headers=ALICE)
    assert again.headers["X-Cache"] == "MISS"
    assert await stubctl.count("GET /transactions") == 2


async def test_two_users_get_their_own_entries(proxy: TestClient[Any, Any],
                                               stubctl: StubControl,
                                               redis_server: RedisServer) -> None:
    a1 = await (await proxy.get("/sessions", headers=ALICE)).json()
    b1 = await (await proxy.get("/sessions", headers=BOB)).json()
    assert {s["owner"] for s in a1["sessions"]} == {"alice"}
    assert {s["owner"] for s in b1["sessions"]} == {"bob"}
    a2 = await proxy.get("/sessions", headers=ALICE)
    b2 = await proxy.get("/sessions", headers=BOB)
    assert (a2.headers["X-Cache"], b2.headers["X-Cache"]) == ("HIT", "HIT")
    assert await a2.json() == a1
    assert await b2.json() == b1
    assert await stubctl.count("GET /sessions") == 2
    assert len(entry_keys(redis_server)) == 2


async def test_raw_credential_never_reaches_redis(proxy: TestClient[Any, Any],
                                                  redis_server: RedisServer) -> None:
    for path in ("/sessions", TXNS, "/rules"):
        await (await proxy.get(path, headers=ALICE)).read()
    dump = redis_dump(redis_server)
    assert dump, "nothing was stored"
    assert b"alice-token" not in dump
    assert b"Bearer" not in dump


async def test_request_without_credential_on_user_route_is_not_cached(
        proxy: TestClient[Any, Any], stubctl: StubControl, redis_server: RedisServer) -> None:
    for _ in range(2):
        resp = await proxy.get("/sessions")
        assert resp.status == 401  # the upstream's answer, passed through
        assert resp.headers["X-Cache"] == "PASS"
        assert "detail=no-credential" in resp.headers["Cache-Status"]
    assert await stubctl.count("GET /sessions") == 2
    assert entry_keys(redis_server) == []


async def test_query_parameter_order_does_not_matter(proxy: TestClient[Any, Any],
                                                     stubctl: StubControl) -> None:
    a = await proxy.get("/transactions?session_id=alice-s1&page_size=3&page=2", headers=ALICE)
    b = await proxy.get("/transactions?page=2&page_size=3&session_id=alice-s1", headers=ALICE)
    c = await proxy.get("/transactions?page_size=3&session_id=alice-s1&page=1", headers=ALICE)
    assert (a.headers["X-Cache"], b.headers["X-Cache"], c.headers["X-Cache"]) == \
        ("MISS", "HIT", "MISS")
    assert await a.read() == await b.read()
    assert await stubctl.count("GET /transactions") == 2


async def test_head_is_answered_from_the_get_entry(proxy: TestClient[Any, Any],
                                                   stubctl: StubControl) -> None:
    get = await proxy.get(TXNS, headers=ALICE)
    body = await get.read()
    head = await proxy.head(TXNS, headers=ALICE)
    assert head.status == 200
    assert head.headers["X-Cache"] == "HIT"
    # The length GET sends (the client decodes what the proxy sent compressed).
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    assert head.headers.get("Content-Encoding") == get.headers.get("Content-Encoding")
    assert body
    assert await head.read() == b""
    # A HEAD miss fills the entry (the upstream is asked with GET), and GET then hits.
    head2 = await proxy.head("/rules", headers=ALICE)
    assert (head2.status, head2.headers["X-Cache"]) == (200, "MISS")
    assert await head2.read() == b""
    get2 = await proxy.get("/rules", headers=ALICE)
    assert get2.headers["X-Cache"] == "HIT"
    assert (await get2.json())["rules"]
    assert await stubctl.count("GET /transactions") == 1
    assert await stubctl.count("GET /rules") == 1


async def test_no_store_response_is_not_stored(proxy: TestClient[Any, Any],
                                               stubctl: StubControl,
                                               redis_server: RedisServer) -> None:
    await stubctl.program("ns", headers=[["Cache-Control", "no-store, max-age=600"]],
                          body='{"n": 1}')
    for _ in range(2):
        resp = await proxy.get("/p/ns")
        assert resp.status == 200
        assert json.loads(await resp.read()) == {"n": 1}
        assert resp.headers["X-Cache"] == "UNCACHEABLE"
        assert "detail=no-store" in resp.headers["Cache-Status"]
    assert await stubctl.count("GET /p/{name}") == 2
    assert all(b"h" in redis_server.client().hgetall(k) for k in entry_keys(redis_server))


async def test_set_cookie_response_is_not_stored(proxy: TestClient[Any, Any],
                                                 stubctl: StubControl) -> None:
    await stubctl.program("cookie", headers=[["Cache-Control", "max-age=600"],
                                             ["Set-Cookie", "sid=example; HttpOnly"]],
                          body='{"n": 2}')
    for _ in range(2):
        resp = await proxy.get("/p/cookie")
        assert resp.status == 200
        assert resp.headers["Set-Cookie"] == "sid=example; HttpOnly"
        assert resp.headers["X-Cache"] == "UNCACHEABLE"
    assert await stubctl.count("GET /p/{name}") == 2


async def test_private_is_not_stored_outside_user_scope(proxy: TestClient[Any, Any],
                                                        stubctl: StubControl) -> None:
    await stubctl.program("priv", headers=[["Cache-Control", "private, max-age=600"]],
                          body="x")
    for _ in range(2):
        resp = await proxy.get("/p/priv")
        assert resp.headers["X-Cache"] == "UNCACHEABLE"
        assert "detail=private" in resp.headers["Cache-Status"]
    assert await stubctl.count("GET /p/{name}") == 2


async def test_oversized_body_streams_through_unstored(proxy: TestClient[Any, Any],
                                                       stubctl: StubControl,
                                                       redis_server: RedisServer) -> None:
    big = "x" * 10_000  # max_body_bytes is 4096 in these tests
    await stubctl.program("big", headers=[["Cache-Control", "max-age=600"]], body=big)
    for _ in range(2):
        resp = await proxy.get("/p/big")
        assert resp.status == 200
        assert await resp.text() == big
        assert resp.headers["X-Cache"] == "UNCACHEABLE"
        assert "detail=too-large" in resp.headers["Cache-Status"]
    assert await stubctl.count("GET /p/{name}") == 2
    assert not any(b"m" in redis_server.client().hgetall(k) for k in entry_keys(redis_server))


async def test_upstream_down_gives_502(make_proxy: MakeProxy) -> None:
    from .procs import free_port

    proxy = await make_proxy(upstream={"url": f"http://127.0.0.1:{free_port()}"})
    resp = await proxy.get(TXNS, headers=ALICE)
    assert resp.status == 502
    body = await resp.json()
    assert body["error"] == "upstream_unavailable"
    assert resp.headers["X-Cache"] == "ERROR"
    assert resp.headers["X-Request-ID"] == body["request_id"]


async def test_upstream_slow_gives_504(make_proxy: MakeProxy, stubctl: StubControl) -> None:
    proxy = await make_proxy(upstream={"timeout_s": 0.2})
    await stubctl.program("slow", headers=[["Cache-Control", "max-age=60"]], body="late",
                          delay_ms=2000)
    resp = await proxy.get("/p/slow")
    assert resp.status == 504
    assert (await resp.json())["error"] == "upstream_timeout"
    assert resp.headers["Cache-Control"] == "no-store"


async def test_redis_down_passes_through_and_recovers(make_proxy: MakeProxy,
                                                      stubctl: StubControl,
                                                      redis_server: RedisServer) -> None:
    proxy = await make_proxy()
    assert (await proxy.get(TXNS, headers=ALICE)).headers["X-Cache"] == "MISS"
    redis_server.kill()
    outcomes = []
    for _ in range(6):
        resp = await proxy.get(TXNS, headers=ALICE)
        assert resp.status == 200
        assert (await resp.json())["session_id"] == "alice-s1"
        outcomes.append(resp.headers["X-Cache"])
        assert "detail=redis-" in resp.headers["Cache-Status"]
    assert set(outcomes) == {"BYPASS"}
    metrics = await (await proxy.get("/metrics")).text()
    # After two failures the breaker opened: later requests did not wait on Redis at all.
    assert 'jsoncache_redis_errors_total{kind="circuit-open",op="lookup"}' in metrics
    assert await stubctl.count("GET /transactions") == 7

    redis_server.start(redis_server.port)
    seen = await _until_not_bypass(proxy)
    assert seen == "MISS"
    assert (await proxy.get(TXNS, headers=ALICE)).headers["X-Cache"] == "HIT"


async def _until_not_bypass(proxy: TestClient[Any, Any]) -> str:
    """Requests until the breaker lets one through to Redis again (bounded)."""
    for _ in range(200):
        resp = await proxy.get(TXNS, headers=ALICE)
        assert resp.status == 200
        if resp.headers["X-Cache"] != "BYPASS":
            return resp.headers["X-Cache"]
        await asyncio.sleep(0.01)  # the breaker's reset interval is 50 ms in these tests
    raise AssertionError("caching never resumed")


async def test_redis_unreachable_at_start(make_proxy: MakeProxy, stubctl: StubControl) -> None:
    from .procs import free_port

    proxy = await make_proxy(redis={"url": f"redis://127.0.0.1:{free_port()}/1"})
    for _ in range(3):
        resp = await proxy.get(TXNS, headers=ALICE)
        assert resp.status == 200
        assert resp.headers["X-Cache"] == "BYPASS"
    health = await proxy.get("/cache/health")
    assert health.status == 503
    assert (await health.json())["redis"]["reachable"] is False


async def test_forwarding_keeps_query_and_body_and_drops_hop_by_hop(
        proxy: TestClient[Any, Any], stubctl: StubControl) -> None:
    await stubctl.program("echo", headers=[["X-Upstream", "yes"], ["Connection", "X-Secret"],
                                           ["X-Secret", "hop"]], body="ok")
    qs = "?b=%2F&a=1&a=2&empty=&=x"
    # encoded=True: the test client must send the query exactly as written, too.
    url = URL(str(proxy.make_url("/p/echo")) + qs, encoded=True)
    resp = await proxy.session.post(url, data=b"payload-bytes",
                            headers={"Connection": "X-Drop-Me", "X-Drop-Me": "1",
                                     "Keep-Alive": "timeout=5", "TE": "trailers",
                                     "X-Keep": "kept", "X-Forwarded-For": "203.0.113.7",
                                     "X-Forwarded-Host": "evil.example", "Via": "1.0 edge"})
    assert resp.status == 200
    assert resp.headers["X-Upstream"] == "yes"
    assert "X-Secret" not in resp.headers
    [got] = await stubctl.received("echo")
    assert got["method"] == "POST"
    assert got["path_qs"] == "/p/echo" + qs
    assert got["body"] == "payload-bytes"
    h = {k.lower(): v for k, v in got["headers"]}
    for gone in ("x-drop-me", "keep-alive", "te"):
        assert gone not in h
    assert h["x-keep"] == "kept"
    assert h["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] != "evil.example"
    assert h["via"] == "1.0 edge, 1.1 jsoncache"
    assert "x-request-id" in h


async def test_request_id_is_passed_on_and_returned(proxy: TestClient[Any, Any],
                                                    stubctl: StubControl) -> None:
    await stubctl.program("rid", body="x")
    resp = await proxy.get("/p/rid", headers={"X-Request-ID": "req-123"})
    assert resp.headers["X-Request-ID"] == "req-123"
    [got] = await stubctl.received("rid")
    assert ["X-Request-ID", "req-123"] in got["headers"]


async def test_commands_reach_redis_byte_for_byte(redis_server: RedisServer) -> None:
    # The proxy's own RESP connection encodes every argument it sends (hiredis in C, a
    # fallback for what hiredis refuses): each value must arrive as the text or bytes meant.
    client = Client(node_of(redis_server.url()), db=1, connect_timeout_s=2)
    values: dict[str, Any] = {"float": 0.1, "big": 12345678901234567890, "neg": -3,
                              "text": "Zoë ✓", "bytes": b"\x00\xff\r\n", "bool": True,
                              "huge": 1e20}
    try:
        replies = await client.call_many([("SET", f"t:{k}", v) for k, v in values.items()])
        assert replies == [b"OK"] * len(values)
        assert await client.call("MGET", *[f"t:{k}" for k in values]) == [
            b"0.1", b"12345678901234567890", b"-3", "Zoë ✓".encode(), b"\x00\xff\r\n",
            b"True", b"1e+20"]
    finally:
        await client.close()


async def test_lookups_issued_in_one_turn_go_to_redis_as_one_pipeline(
        proxy: TestClient[Any, Any], stubctl: StubControl) -> None:
    # A burst of requests costs one round trip: every lookup its handlers issue in one turn
    # of the event loop goes out in one pipeline, one Redis operation, each with its answer.
    assert proxy.app is not None
    await stubctl.program("one", headers=[["Cache-Control", "max-age=600"]], body="first")
    await stubctl.program("two", headers=[["Cache-Control", "max-age=600"]], body="second")
    for name in ("one", "two"):
        assert (await proxy.get(f"/p/{name}")).headers["X-Cache"] == "MISS"
    store = proxy.app[STORE]
    primaries = [keys.primary_key(f"/p/{name}", "", keys.PUBLIC_SCOPE)
                 for name in ["one", "two", *(f"none-{i}" for i in range(28))]]

    async def lookups() -> float:
        text = await (await proxy.get("/metrics")).text()
        return total(text, "jsoncache_redis_operation_duration_seconds_count", op="lookup")

    before = await lookups()
    found = await asyncio.gather(*(store.lookup(p, lambda name: None) for p in primaries))
    assert await lookups() == before + 1
    bodies = [f.stored.body if isinstance(f.stored, Entry) else None for f in found]
    assert bodies == [b"first", b"second"] + [None] * 28
