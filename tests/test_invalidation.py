"""Tags, write rules and read-your-writes, with the shipped config.yaml in front of the stub
and a private redis-server; Redis faults are real (SIGSTOP, CLIENT PAUSE, SIGKILL)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy.app import INVALIDATOR

from .conftest import ALICE, BOB, MakeProxy, StubControl
from .procs import RedisServer

ALICE_S1 = ["/transactions?session_id=alice-s1&page_size=5", "/summary?session_id=alice-s1",
            "/category-summary?session_id=alice-s1"]
ALICE_S2 = ["/transactions?session_id=alice-s2&page_size=5", "/summary?session_id=alice-s2",
            "/category-summary?session_id=alice-s2"]
ALICE_ALL = ["/transactions?page_size=5", "/summary"]
BOB_VIEWS = ["/summary?session_id=bob-s1", "/sessions"]


async def outcome(proxy: TestClient[Any, Any], path: str, who: dict[str, str]) -> str:
    resp = await proxy.get(path, headers=who)
    assert resp.status == 200, path
    await resp.read()
    return resp.headers["X-Cache"]


async def warm(proxy: TestClient[Any, Any], paths: list[str], who: dict[str, str]) -> None:
    for p in paths:
        await outcome(proxy, p, who)
        assert await outcome(proxy, p, who) == "HIT", p


async def first_txn(proxy: TestClient[Any, Any], session: str) -> dict[str, Any]:
    resp = await proxy.get(f"/transactions?session_id={session}&page_size=1", headers=ALICE)
    item: dict[str, Any] = (await resp.json())["items"][0]
    return item


async def test_update_invalidates_that_sessions_views_only(shipped: TestClient[Any, Any],
                                                           stubctl: StubControl) -> None:
    await warm(shipped, [*ALICE_S1, *ALICE_S2, *ALICE_ALL, "/sessions", "/rules"], ALICE)
    await warm(shipped, BOB_VIEWS, BOB)
    before = await (await shipped.get(ALICE_S1[2], headers=ALICE)).json()
    txn = await first_txn(shipped, "alice-s1")
    new = "Health" if txn["category"] != "Health" else "Bills"
    put = await shipped.put(f"/transactions/{txn['id']}", json={"category": new}, headers=ALICE)
    assert put.status == 200
    assert (await put.json())["session_id"] == "alice-s1"
    # That session's views, the all-sessions views and /sessions were dropped ...
    for p in [*ALICE_S1, *ALICE_ALL, "/sessions"]:
        assert await outcome(shipped, p, ALICE) == "MISS", p
    after = await (await shipped.get(ALICE_S1[2], headers=ALICE)).json()
    assert after["data_version"] == before["data_version"] + 1
    assert after["categories"] != before["categories"]
    # ... everything else kept its entry.
    for p in [*ALICE_S2, "/rules"]:
        assert await outcome(shipped, p, ALICE) == "HIT", p
    for p in BOB_VIEWS:
        assert await outcome(shipped, p, BOB) == "HIT", p


async def test_bulk_categorise_invalidates_session_and_rules(shipped: TestClient[Any, Any],
                                                             stubctl: StubControl) -> None:
    await warm(shipped, [*ALICE_S1, *ALICE_S2, "/rules", "/sessions"], ALICE)
    await warm(shipped, BOB_VIEWS, BOB)
    resp = await shipped.post("/bulk-categorise", headers=ALICE, json={
        "session_id": "alice-s2", "rules": [{"match": "NETFLIX", "category": "Bills"}]})
    assert resp.status == 200
    for p in [*ALICE_S2, "/rules", "/sessions"]:
        assert await outcome(shipped, p, ALICE) == "MISS", p
    rules = await (await shipped.get("/rules", headers=ALICE)).json()
    assert {"match": "NETFLIX", "category": "Bills"} in rules["rules"]
    for p in ALICE_S1:
        assert await outcome(shipped, p, ALICE) == "HIT", p
    for p in BOB_VIEWS:
        assert await outcome(shipped, p, BOB) == "HIT", p


async def test_failed_write_invalidates_nothing(shipped: TestClient[Any, Any]) -> None:
    await warm(shipped, ALICE_S1, ALICE)
    resp = await shipped.put("/transactions/100000", json={"category": "Nope"}, headers=ALICE)
    assert resp.status == 400
    for p in ALICE_S1:
        assert await outcome(shipped, p, ALICE) == "HIT", p


async def test_another_users_write_cannot_touch_your_data(shipped: TestClient[Any, Any]) -> None:
    await warm(shipped, ALICE_S1, ALICE)
    txn = await first_txn(shipped, "alice-s1")
    resp = await shipped.put(f"/transactions/{txn['id']}", json={"category": "Bills"},
                             headers=BOB)
    assert resp.status == 404  # the upstream refuses; nothing is invalidated
    for p in ALICE_S1:
        assert await outcome(shipped, p, ALICE) == "HIT", p


async def test_surrogate_keys_tag_entries_and_are_stripped(make_proxy: MakeProxy,
                                                          stubctl: StubControl) -> None:
    proxy = await make_proxy(admin={"tokens": [{"name": "ops", "role": "purge",
                                                "env": "OPS_TOKEN"}]})
    await stubctl.program("sk", headers=[["Cache-Control", "max-age=600"],
                                         ["Surrogate-Key", "product-1  catalogue"],
                                         ["Cache-Tag", "shelf-9,product-1"]], body="p")
    await stubctl.program("other", headers=[["Cache-Control", "max-age=600"],
                                            ["Surrogate-Key", "catalogue"]], body="o")
    miss = await proxy.get("/p/sk")
    assert "Surrogate-Key" not in miss.headers
    assert "Cache-Tag" not in miss.headers
    await (await proxy.get("/p/other")).read()
    assert proxy.app is not None
    invalidator = proxy.app[INVALIDATOR]
    assert await invalidator.invalidate(["shelf-9"], reason="test") == ""
    assert (await proxy.get("/p/sk")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/p/other")).headers["X-Cache"] == "HIT"
    await invalidator.invalidate(["catalogue"], reason="test")
    assert (await proxy.get("/p/sk")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/p/other")).headers["X-Cache"] == "MISS"


async def test_entries_with_too_many_tags_are_not_stored(proxy: TestClient[Any, Any],
                                                       stubctl: StubControl) -> None:
    keys = " ".join(f"k{i}" for i in range(300))
    await stubctl.program("many", headers=[["Cache-Control", "max-age=600"],
                                           ["Surrogate-Key", keys]])
    for _ in range(2):
        resp = await proxy.get("/p/many")
        assert resp.headers["X-Cache"] == "UNCACHEABLE"
        assert "detail=too-many-tags" in resp.headers["Cache-Status"]


async def test_surrogate_headers_can_be_kept(make_proxy: MakeProxy,
                                             stubctl: StubControl) -> None:
    proxy = await make_proxy(cache={"keep_surrogate_headers": True})
    await stubctl.program("kept", headers=[["Cache-Control", "max-age=600"],
                                           ["Surrogate-Key", "a b"]], body="k")
    await (await proxy.get("/p/kept")).read()
    hit = await proxy.get("/p/kept")
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["Surrogate-Key"] == "a b"


async def test_no_scan_or_keys_on_the_request_path(shipped: TestClient[Any, Any],
                                                   redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.config_resetstat()
    await warm(shipped, [*ALICE_S1, "/sessions"], ALICE)
    txn = await first_txn(shipped, "alice-s1")
    await shipped.put(f"/transactions/{txn['id']}", json={"category": "Bills"}, headers=ALICE)
    await shipped.post("/bulk-categorise", headers=ALICE,
                       json={"session_id": "alice-s1", "rules": []})
    stats = r.info("commandstats")
    assert "cmdstat_scan" not in stats
    assert "cmdstat_keys" not in stats
    assert stats["cmdstat_evalsha"]["calls"] > 0  # it did store and purge


async def test_tag_index_expires_and_stays_bounded(make_proxy: MakeProxy,
                                                   stubctl: StubControl,
                                                   redis_server: RedisServer) -> None:
    # 3 s: the five fills and the counts below fit in it on a busy machine.
    proxy = await make_proxy(routes=[{"name": "short", "match": "GET /p/*", "mode": "override",
                                      "ttl_s": 3, "scope": "public",
                                      "tags": ["group:{query.g}"]}])
    await stubctl.program("x", body="x")
    events = aioredis.from_url(redis_server.url())
    sub = events.pubsub()
    try:
        await sub.subscribe("__keyevent@1__:expired")
        for i in range(5):
            await (await proxy.get(f"/p/x?g=one&i={i}")).read()
        r = redis_server.client()
        indexes = list(r.scan_iter(match="{jcache:*}:t:group:one"))  # one per shard used
        assert sum(r.zcard(i) for i in indexes) == 5
        assert all(0 < r.pttl(i) <= 3000 for i in indexes)  # they expire with their entries
        # Wait until Redis has expired all five entries (events, not a sleep; bounded).
        expired = 0
        async with asyncio.timeout(30):
            while expired < 5:
                msg = await sub.get_message(ignore_subscribe_messages=True, timeout=5)
                if msg is not None and re.match(rb"^\{jcache:\d+\}:e:", msg["data"]):
                    expired += 1
    finally:
        await sub.aclose()  # type: ignore[no-untyped-call]
        await events.aclose()
    await (await proxy.get("/p/x?g=one&i=new")).read()
    assert sum(r.zcard(i) for i in r.scan_iter(match="{jcache:*}:t:group:one")) == 1


# -- read-your-writes -----------------------------------------------------------------------------

async def test_fill_racing_a_write_is_not_stored(proxy: TestClient[Any, Any],
                                                 stubctl: StubControl) -> None:
    await stubctl.program("race", headers=[["Cache-Control", "max-age=600"]], body="old",
                          delay_ms=400)
    slow = asyncio.ensure_future(proxy.get("/p/race"))
    await stubctl.arrival("race")  # the GET is at the upstream, its answer will be "old"
    await stubctl.program("race", headers=[["Cache-Control", "max-age=600"]], body="new")
    write = await proxy.post("/p/race", data=b"update")
    assert write.status == 200
    stale = await slow
    assert await stale.text() == "old"  # it started before the write: fine to answer ...
    fresh = await proxy.get("/p/race")  # ... not to keep
    assert await fresh.text() == "new"
    assert fresh.headers["X-Cache"] == "MISS"


async def test_writes_do_not_refuse_unrelated_fills(proxy: TestClient[Any, Any],
                                                    stubctl: StubControl) -> None:
    """Fills in flight while writes purge other URLs are stored: a purge moves only its own
    tags' generations and its tags' buckets of the shard marker (a new URL's tags have no
    generation yet), so the writes of other users do not turn concurrent misses into
    misses again."""
    names = [f"quiet{i}" for i in range(8)]
    for name in names:
        await stubctl.program(name, headers=[["Cache-Control", "max-age=600"]], body=name,
                              delay_ms=300)
    await stubctl.program("busy", status=204)
    fills = [asyncio.ensure_future(proxy.get(f"/p/{name}")) for name in names]
    for name in names:
        await stubctl.arrival(name)  # every fill is at the upstream; now the writes
    for i in range(20):
        assert (await proxy.put(f"/p/busy?n={i}", data=b"x")).status == 204
    for resp in await asyncio.gather(*fills):
        assert resp.headers["X-Cache"] == "MISS"
    for name in names:
        assert (await proxy.get(f"/p/{name}")).headers["X-Cache"] == "HIT"


async def _read_your_write_with_fault(proxy: TestClient[Any, Any], fault: Any,
                                      recover: Any) -> None:
    await warm(proxy, ALICE_S1, ALICE)
    before = await (await proxy.get(ALICE_S1[1], headers=ALICE)).json()
    txn = await first_txn(proxy, "alice-s1")
    await fault()
    put = await proxy.put(f"/transactions/{txn['id']}", json={"category": "Bills"
                          if txn["category"] != "Bills" else "Health"}, headers=ALICE)
    assert put.status == 200  # the write went through; its invalidation could not
    assert "detail=invalidation-pending" in put.headers["Cache-Status"]
    assert proxy.app is not None
    invalidator = proxy.app[INVALIDATOR]
    assert invalidator.pending
    for _ in range(2):  # while Redis is away, and once it is back
        for p in ALICE_S1:
            resp = await proxy.get(p, headers=ALICE)
            assert resp.status == 200
            body = await resp.json()
            assert body["data_version"] > before["data_version"], (p, resp.headers)
        await recover()
    # The replay loop gets the invalidation through once Redis (and the breaker) let it.
    await asyncio.wait_for(invalidator.replayed.wait(), timeout=15)
    assert not invalidator.pending
    for p in ALICE_S1:
        resp = await proxy.get(p, headers=ALICE)
        assert (await resp.json())["data_version"] > before["data_version"]


async def test_read_your_write_with_redis_frozen(shipped: TestClient[Any, Any],
                                                 redis_server: RedisServer) -> None:
    async def fault() -> None:
        redis_server.freeze()

    async def recover() -> None:
        redis_server.thaw()

    await _read_your_write_with_fault(shipped, fault, recover)


async def test_read_your_write_with_redis_paused_for_writes(shipped: TestClient[Any, Any],
                                                            redis_server: RedisServer) -> None:
    admin = redis_server.client()

    async def fault() -> None:
        admin.client_pause(30_000, all=False)  # reads go on; scripts and writes wait

    async def recover() -> None:
        admin.client_unpause()

    await _read_your_write_with_fault(shipped, fault, recover)


async def test_read_your_write_with_redis_killed(shipped: TestClient[Any, Any],
                                                 redis_server: RedisServer) -> None:
    async def fault() -> None:
        redis_server.kill()

    async def recover() -> None:
        if redis_server.proc is None:
            redis_server.start(redis_server.port)

    await _read_your_write_with_fault(shipped, fault, recover)
