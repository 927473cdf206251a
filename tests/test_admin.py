"""The admin API: roles, stats, flush, purges (hard and soft), key listing, explain."""

from __future__ import annotations

import re
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient

from proxy.app import ADMIN, INVALIDATOR, KEYSPACE, STATS, push_stats

from .conftest import (
    ALICE,
    AS_PURGER,
    AS_READER,
    AS_SUPERUSER,
    BOB,
    ENTRY_KEYS,
    OUR_KEYS,
    PURGE_TOKEN,
    SUPER_TOKEN,
    MakeProxy,
    StubControl,
)
from .procs import RedisServer

S1 = ["/transactions?session_id=alice-s1&page_size=5", "/summary?session_id=alice-s1",
      "/category-summary?session_id=alice-s1"]


async def cached(proxy: TestClient[Any, Any], path: str, who: dict[str, str]) -> str:
    resp = await proxy.get(path, headers=who)
    await resp.read()
    return resp.headers["X-Cache"]


async def fill(proxy: TestClient[Any, Any], paths: list[str], who: dict[str, str]) -> None:
    for p in paths:
        await cached(proxy, p, who)


@pytest.mark.parametrize(("method", "path", "needed"), [
    ("GET", "/cache/stats", "read"),
    ("GET", "/cache/keys", "read"),
    ("GET", "/cache/explain?url=/rules", "read"),
    ("DELETE", "/cache/session/alice-s1", "purge"),
    ("DELETE", "/cache/tags/x", "purge"),
    ("POST", "/cache/purge", "purge"),
    ("POST", "/cache/prewarm", "purge"),
    ("DELETE", "/cache/flush", "superuser"),
])
async def test_roles(shipped: TestClient[Any, Any], method: str, path: str,
                     needed: str) -> None:
    anonymous = await shipped.request(method, path)
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = await shipped.request(method, path, headers={"Authorization": "Bearer nope-nope"})
    assert wrong.status == 401
    rank = ["read", "purge", "superuser"]
    for role, headers in zip(rank, (AS_READER, AS_PURGER, AS_SUPERUSER), strict=True):
        resp = await shipped.request(method, path, headers=headers, json={"tags": ["x"]})
        if rank.index(role) < rank.index(needed):
            assert resp.status == 403, role
        elif path == "/cache/prewarm":  # past the role check, the body is judged: 400
            assert resp.status == 400, (role, await resp.text())
        else:
            assert resp.status == 200, (role, await resp.text())


async def test_health_is_open_for_probes(shipped: TestClient[Any, Any],
                                         redis_server: RedisServer) -> None:
    resp = await shipped.get("/cache/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["redis"]["reachable"] is True
    assert body["redis"]["circuit"] == "closed"
    redis_server.freeze()
    try:
        resp = await shipped.get("/cache/health")
        assert resp.status == 503
        assert (await resp.json())["redis"]["reachable"] is False
    finally:
        redis_server.thaw()


async def test_admin_actions_are_logged_by_token_name(shipped: TestClient[Any, Any]) -> None:
    with structlog.testing.capture_logs() as logs:
        await shipped.delete("/cache/tags/anything", headers=AS_PURGER)
        await shipped.delete("/cache/flush", headers=AS_PURGER)
    actions = [e for e in logs if e["event"].startswith("admin action")]
    assert [(e["action"], e["token"]) for e in actions] == [
        ("purge-tag", "env-admin"), ("flush", "env-admin")]
    assert PURGE_TOKEN not in repr(logs)


async def test_stats_for_this_instance_and_all(shipped_no_prewarm: TestClient[Any, Any]) -> None:
    shipped = shipped_no_prewarm  # counts exactly: no prewarming
    await fill(shipped, ["/sessions", "/sessions", "/sessions", "/rules"], ALICE)
    await fill(shipped, ["/sessions"], BOB)
    stats = await (await shipped.get("/cache/stats", headers=AS_READER)).json()
    sessions = stats["instance"]["by_route"]["sessions"]
    assert (sessions["requests"], sessions["hits"], sessions["misses"], sessions["sets"]) == \
        (4, 2, 2, 2)
    assert sessions["hit_rate"] == 0.5
    assert stats["instance"]["requests"] == 5
    assert stats["redis"]["entries"] == 3
    assert stats["redis"]["entries_by_route"]["sessions"] == 2
    assert stats["redis"]["used_memory"] > 0
    assert shipped.app is not None
    await push_stats(shipped.app[STATS], shipped.app[KEYSPACE], shipped.app[ADMIN].instance)
    stats = await (await shipped.get("/cache/stats", headers=AS_READER)).json()
    assert stats["cluster"]["instances"] == 1
    assert stats["cluster"]["by_route"]["sessions"]["hits"] == 2
    assert stats["cluster"]["hits"] == stats["instance"]["hits"] == 2


async def test_flush_deletes_only_this_proxys_keys(shipped_no_prewarm: TestClient[Any, Any],
                                                   redis_server: RedisServer) -> None:
    shipped = shipped_no_prewarm  # counts exactly: no prewarming
    await fill(shipped, [*S1, "/sessions"], ALICE)
    r = redis_server.client()
    r.set("queue:job:1", "someone else's")
    r.hset("{other}:e:abc", "m", "another proxy")
    ours = len(list(r.scan_iter(match=OUR_KEYS)))
    assert ours > 4
    resp = await shipped.delete("/cache/flush", headers=AS_SUPERUSER)
    assert resp.status == 200
    assert (await resp.json())["deleted_keys"] == ours
    assert list(r.scan_iter(match=OUR_KEYS)) == []
    assert r.get("queue:job:1") == b"someone else's"
    assert r.hget("{other}:e:abc", "m") == b"another proxy"
    assert await cached(shipped, S1[0], ALICE) == "MISS"


async def test_purge_session(shipped: TestClient[Any, Any]) -> None:
    await fill(shipped, [*S1, "/transactions?session_id=alice-s2&page_size=5"], ALICE)
    await fill(shipped, ["/summary?session_id=alice-s1"], {"Authorization": "Bearer root-token"})
    resp = await shipped.delete("/cache/session/alice-s1", headers=AS_PURGER)
    assert resp.status == 200
    assert (await resp.json())["deleted_keys"] == 4  # three of alice's, one of root's
    for p in S1:
        assert await cached(shipped, p, ALICE) == "MISS"
    assert await cached(shipped, "/transactions?session_id=alice-s2&page_size=5", ALICE) == "HIT"


async def test_purge_by_tag_url_and_prefix(shipped_no_prewarm: TestClient[Any, Any]) -> None:
    shipped = shipped_no_prewarm  # counts exactly: no prewarming
    await fill(shipped, [*S1, "/sessions", "/rules"], ALICE)
    await fill(shipped, [S1[0], "/rules"], BOB)  # bob's session filter gives him a 404
    resp = await shipped.post("/cache/purge", headers=AS_PURGER,
                              json={"urls": ["/rules"]})
    assert (await resp.json())["deleted_keys"] == 2  # the URL, in every user's scope
    assert await cached(shipped, "/rules", ALICE) == "MISS"
    resp = await shipped.post("/cache/purge", headers=AS_PURGER,
                              json={"prefixes": ["/transactions"], "tags": ["nothing-here"]})
    assert (await resp.json())["deleted_keys"] == 2
    assert await cached(shipped, S1[0], ALICE) == "MISS"
    assert await cached(shipped, S1[1], ALICE) == "HIT"  # /summary is not under /transactions
    bad = await shipped.post("/cache/purge", headers=AS_PURGER, json={"prefixes": ["x"]})
    assert bad.status == 400
    bad = await shipped.post("/cache/purge", headers=AS_PURGER, json={"everything": True})
    assert bad.status == 400
    bad = await shipped.post("/cache/purge", headers=AS_PURGER, data=b"not json")
    assert bad.status == 400


async def test_soft_purge_marks_stale_instead_of_deleting(shipped: TestClient[Any, Any],
                                                          stubctl: StubControl,
                                                          redis_server: RedisServer) -> None:
    await fill(shipped, S1, ALICE)
    keys_before = sorted(redis_server.client().scan_iter(match=ENTRY_KEYS))
    resp = await shipped.post("/cache/purge", headers=AS_PURGER,
                              json={"tags": ["session:alice-s1"], "soft": True})
    assert (await resp.json())["marked_stale"] == 3
    assert sorted(redis_server.client().scan_iter(match=ENTRY_KEYS)) == keys_before
    upstream_before = await stubctl.count()
    # The stub sends ETags: a soft-purged entry is revalidated, not refetched.
    for p in S1:
        assert await cached(shipped, p, ALICE) == "REVALIDATED"
        assert await cached(shipped, p, ALICE) == "HIT"
    assert await stubctl.count() == upstream_before + 3


async def test_keys_listing(shipped_no_prewarm: TestClient[Any, Any]) -> None:
    shipped = shipped_no_prewarm  # counts exactly: no prewarming
    await fill(shipped, [*S1, "/sessions"], ALICE)
    resp = await shipped.get("/cache/keys?route=summary", headers=AS_READER)
    page = await resp.json()
    assert page["total"] == 1
    [item] = page["keys"]
    assert item["url"] == "/summary?session_id=alice-s1"
    assert item["route"] == "summary"
    assert "session:alice-s1" in item["tags"]
    assert 0 < item["ttl_ms"] <= 1_800_000
    assert "body" not in item
    all_keys = await (await shipped.get("/cache/keys?limit=2", headers=AS_READER)).json()
    assert (all_keys["total"], len(all_keys["keys"]), all_keys["next_offset"]) == (4, 2, 2)
    rest = await (await shipped.get("/cache/keys?limit=2&offset=2", headers=AS_READER)).json()
    assert rest["next_offset"] is None
    urls = {k["url"] for k in all_keys["keys"] + rest["keys"]}
    assert urls == {*S1, "/sessions"}
    forbidden = await shipped.get("/cache/keys?bodies=true", headers=AS_PURGER)
    assert forbidden.status == 403
    with_bodies = await (await shipped.get("/cache/keys?route=summary&bodies=true",
                                           headers={"Authorization": f"Bearer {SUPER_TOKEN}"})
                         ).json()
    assert '"session_id":"alice-s1"' in with_bodies["keys"][0]["body"]
    missing = await shipped.get("/cache/keys?route=nope", headers=AS_READER)
    assert missing.status == 404


async def test_explain(shipped: TestClient[Any, Any]) -> None:
    await fill(shipped, ["/summary?session_id=alice-s1"], ALICE)
    url = "/cache/explain?url=/summary%3Fsession_id%3Dalice-s1"
    alice = await (await shipped.get(url, headers={
        **AS_READER, "X-Explain-Authorization": ALICE["Authorization"]})).json()
    assert alice["route"] == "summary"
    assert alice["would_be"] == "hit"
    assert re.match(r"^\{jcache:\d+\}:e:", alice["key"])
    assert 0 < alice["ttl_ms"] <= 1_800_000
    assert "session:alice-s1" in alice["tags"]
    bob = await (await shipped.get(url, headers={
        **AS_READER, "X-Explain-Authorization": BOB["Authorization"]})).json()
    assert bob["would_be"] == "miss"
    assert bob["key"] != alice["key"]
    nobody = await (await shipped.get(url, headers=AS_READER)).json()
    assert nobody["would_be"] == "pass"
    unrouted = await (await shipped.get("/cache/explain?url=/nowhere",
                                        headers=AS_READER)).json()
    assert unrouted["route"] is None
    bad = await shipped.get("/cache/explain?url=nowhere", headers=AS_READER)
    assert bad.status == 400


async def test_purge_with_redis_down_is_deferred(shipped: TestClient[Any, Any],
                                                 redis_server: RedisServer) -> None:
    await fill(shipped, S1, ALICE)
    redis_server.kill()
    resp = await shipped.delete("/cache/session/alice-s1", headers=AS_PURGER)
    assert resp.status == 503
    assert (await resp.json())["deferred"] is True
    assert shipped.app is not None
    assert shipped.app[INVALIDATOR].pending


# -- explain walks the request's own plan ---------------------------------------------------------

EXPLAIN_ROUTES = [
    {"name": "raw", "match": "GET /p/raw/*", "mode": "honor",
     "honor_request_directives": False},
    {"name": "mine", "match": "GET /p/mine/*", "mode": "honor", "scope": "user"},
    {"name": "programmed", "match": "GET /p/*", "mode": "honor"},
]
ETAG = [["Cache-Control", "max-age=600"], ["ETag", '"e"']]
SWR = [["Cache-Control", "max-age=10, stale-while-revalidate=600"], ["Age", "20"]]
# (program, its headers, url, request headers, explain's prediction, the X-Cache it gets)
EXPLAINED: list[tuple[str, list[list[str]], str, dict[str, str], str, str]] = [
    ("e", ETAG, "/p/e", {}, "miss", "MISS"),
    ("e", ETAG, "/p/e", {}, "hit", "HIT"),
    ("e", ETAG, "/p/e", {"Cache-Control": "no-cache"}, "revalidate", "REVALIDATED"),
    ("e", ETAG, "/p/e", {"Cache-Control": "max-age=0"}, "revalidate", "REVALIDATED"),
    ("e", ETAG, "/p/e", {"Range": "bytes=0-1, 3-4"}, "pass", "PASS"),
    ("e", ETAG, "/p/e", {"Range": "bytes=0-1"}, "hit", "HIT"),
    ("n", ETAG, "/p/n", {"Cache-Control": "only-if-cached"}, "pass", "PASS"),
    ("ns", [["Cache-Control", "no-store"]], "/p/ns", {}, "miss", "UNCACHEABLE"),
    ("ns", [["Cache-Control", "no-store"]], "/p/ns", {}, "uncacheable", "UNCACHEABLE"),
    ("s", SWR, "/p/s", {}, "miss", "MISS"),
    ("s", SWR, "/p/s", {}, "stale", "STALE"),
    ("raw", ETAG, "/p/raw/x", {}, "miss", "MISS"),
    # The route ignores request directives: explain must too.
    ("raw", ETAG, "/p/raw/x", {"Cache-Control": "no-cache"}, "hit", "HIT"),
    ("mine", ETAG, "/p/mine/x", {}, "pass", "PASS"),
]


async def test_explain_predicts_what_the_request_gets(make_proxy: MakeProxy,
                                                      stubctl: StubControl) -> None:
    proxy = await make_proxy(routes=EXPLAIN_ROUTES)
    for name, program, url, headers, would_be, outcome in EXPLAINED:
        await stubctl.program(name, headers=program, body="b")
        explained = await (await proxy.get("/cache/explain", params={"url": url},
                                           headers={**AS_PURGER, **headers})).json()
        assert explained["would_be"] == would_be, (url, headers, explained)
        resp = await proxy.get(url, headers=headers)
        await resp.read()
        assert resp.headers["X-Cache"] == outcome, (url, headers, explained)
