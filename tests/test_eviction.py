"""Memory pressure and lost keys: an evicted (or deleted) key may cost a miss, never a stale
read or another user's data. Real redis-servers under real maxmemory, every policy that can
evict; then every kind of key the proxy writes deleted, one kind at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.config import load_config

from .conftest import ALICE, BOB, MakeProxy, StubControl, proxy_client, shipped_env
from .procs import ROOT, RedisServer

USERS = {name: {"Authorization": f"Bearer {name}-token"}  # example tokens of the stub
         for name in ("alice", "bob", "carol", "dave")}
ALICE_PAGES = [f"/transactions?session_id=alice-s1&page={n}&page_size=40" for n in (1, 2, 3)]
EVICTING = ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
            "volatile-ttl", "volatile-random"]


@pytest.fixture(params=[*EVICTING, "noeviction"])
def pressured_redis(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    server = RedisServer(["--maxmemory-policy", request.param,
                          "--maxmemory-samples", "10"]).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def pressured(aiohttp_client: Any, stub: TestServer,
                    pressured_redis: RedisServer) -> TestClient[Any, Any]:
    config = load_config(ROOT / "config.yaml", shipped_env(stub, pressured_redis))
    return await proxy_client(aiohttp_client, create_app(config))


class Reader:
    """Reads as a user, checking every answer: the user's own data, and never older than
    what the user's acknowledged writes produced."""

    def __init__(self, proxy: TestClient[Any, Any]) -> None:
        self.proxy = proxy
        self.acked: dict[str, int] = {}  # session -> version an acknowledged write made
        self.outcomes: dict[str, int] = {}

    async def read(self, user: str, path: str) -> dict[str, Any]:
        resp = await self.proxy.get(path, headers=USERS[user])
        assert resp.status == 200, (user, path, resp.status)
        body: dict[str, Any] = await resp.json()
        cache = resp.headers["X-Cache"]
        self.outcomes[cache] = self.outcomes.get(cache, 0) + 1
        assert all(t["session_id"].startswith(user + "-") for t in body["items"]), \
            ("another user's data", user, path)
        sid = body["session_id"]
        assert body["data_version"] >= self.acked.get(sid, 0), \
            ("stale read", user, path, resp.headers["Cache-Status"])
        return body

    async def write(self, user: str, txn: dict[str, Any]) -> str:
        new = "Health" if txn["category"] != "Health" else "Bills"
        resp = await self.proxy.put(f"/transactions/{txn['id']}", json={"category": new},
                                    headers=USERS[user])
        assert resp.status == 200
        versions = (await resp.json())["versions"]
        self.acked[txn["session_id"]] = versions["session"]
        return new


def redis_info(server: RedisServer, section: str) -> dict[str, Any]:
    info: dict[str, Any] = server.client().info(section)
    return info


async def build_pressure(reader: Reader, server: RedisServer, rounds: int) -> int:
    """Other users fill pages while alice's stay hot; returns the keys Redis evicted."""
    reads = [(u, f"/transactions?session_id={u}-s{s}&page={p}&page_size={size}")
             for p in range(1, 5) for size in (100, 101) for s in (1, 2, 3)
             for u in ("bob", "carol", "dave")]
    for i in range(rounds):
        await reader.read(*reads[i % len(reads)])
        if i % 8 == 0:
            for page in ALICE_PAGES:
                await reader.read("alice", page)
    return int(redis_info(server, "stats")["evicted_keys"])


async def test_memory_pressure_costs_misses_only(pressured: TestClient[Any, Any],
                                                 pressured_redis: RedisServer) -> None:
    reader = Reader(pressured)
    for page in ALICE_PAGES * 2:
        await reader.read("alice", page)
    used = int(redis_info(pressured_redis, "memory")["used_memory"])
    pressured_redis.client().config_set("maxmemory", used + 150_000)
    policy = redis_info(pressured_redis, "memory")["maxmemory_policy"]
    evicted = 0
    for _ in range(3):  # pressure, then alice writes and reads, three times over
        evicted = await build_pressure(reader, pressured_redis, rounds=160)
        first = (await reader.read("alice", ALICE_PAGES[0]))["items"][0]
        new = await reader.write("alice", first)
        for page in ALICE_PAGES:
            body = await reader.read("alice", page)
            if page == ALICE_PAGES[0]:
                assert body["items"][0]["category"] == new
        # Bob asking for alice's page never gets it (the upstream refuses him).
        assert (await pressured.get(ALICE_PAGES[0], headers=BOB)).status == 404
    if policy == "noeviction":
        assert evicted == 0
        assert reader.outcomes.get("HIT", 0) > 0  # reads of what was stored still work
    else:
        assert evicted >= 100, evicted  # the pressure was real
        assert reader.outcomes.get("HIT", 0) > 0


# -- every kind of key, deleted --------------------------------------------------------------------

KINDS = {
    "entries": "{jcache:*}:e:*",
    "generations": "{jcache:*}:g:*",
    "indexes": "{jcache:*}:t:*",
    "markers": "{jcache:*}:M",
    "locks": "{jcache:*}:l:*",
    "counters": "{jcache}:*",
    "everything": "{jcache*",
}


def delete(server: RedisServer, pattern: str) -> int:
    r = server.client()
    found = list(r.scan_iter(match=pattern, count=1000))
    return int(r.delete(*found)) if found else 0


@pytest.mark.parametrize("kind", list(KINDS))
async def test_losing_any_kind_of_key_costs_misses_only(shipped: TestClient[Any, Any],
                                                        redis_server: RedisServer,
                                                        kind: str) -> None:
    reader = Reader(shipped)
    for page in ALICE_PAGES * 2:
        await reader.read("alice", page)
    await reader.read("bob", "/transactions?session_id=bob-s1&page_size=40")
    first = (await reader.read("alice", ALICE_PAGES[0]))["items"][0]
    if kind not in ("locks", "counters"):  # those exist only now and then
        assert delete(redis_server, KINDS[kind]) > 0
    new = await reader.write("alice", first)
    delete(redis_server, KINDS[kind])  # again, after the write's purge too
    for _ in range(2):
        assert (await reader.read("alice", ALICE_PAGES[0]))["items"][0]["category"] == new
        for page in ALICE_PAGES[1:]:
            await reader.read("alice", page)
        await reader.read("bob", "/transactions?session_id=bob-s1&page_size=40")


@pytest.mark.parametrize("kind", ["generations", "markers", "indexes", "everything"])
async def test_fill_racing_a_write_is_refused_whatever_was_lost(proxy: TestClient[Any, Any],
                                                                stubctl: StubControl,
                                                                redis_server: RedisServer,
                                                                kind: str) -> None:
    await stubctl.program("race", headers=[["Cache-Control", "max-age=600"]], body="old",
                          delay_ms=400)
    slow = asyncio.ensure_future(proxy.get("/p/race"))
    await stubctl.arrival("race")  # looked up, fetching; its answer will be "old"
    await stubctl.program("race", headers=[["Cache-Control", "max-age=600"]], body="new")
    assert (await proxy.post("/p/race", data=b"update")).status == 200
    delete(redis_server, KINDS[kind])  # the write's traces are lost before the fill saves
    stale = await slow
    assert await stale.text() == "old"  # it started before the write: fine to answer ...
    fresh = await proxy.get("/p/race")  # ... never to keep
    assert await fresh.text() == "new"


# -- writes whose outcome is unknown --------------------------------------------------------------

async def test_write_that_timed_out_but_committed_is_not_followed_by_a_stale_read(
        make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(upstream={"timeout_s": 0.3}, cache={"max_body_bytes": 1 << 20})
    reader = Reader(proxy)
    for path in ALICE_PAGES * 2:
        await reader.read("alice", path)
    first = (await reader.read("alice", ALICE_PAGES[0]))["items"][0]
    new = "Health" if first["category"] != "Health" else "Bills"
    put = await proxy.put(f"/transactions/{first['id']}", json={"category": new},
                          headers={**ALICE, "X-Stub-Answer-Late-Ms": "1500"})
    assert put.status == 504  # the proxy gave up; the backend committed all the same
    page = await proxy.get(ALICE_PAGES[0], headers=ALICE)
    assert page.headers["X-Cache"] == "MISS"
    assert (await page.json())["items"][0]["category"] == new


# -- what the operator is told ---------------------------------------------------------------------

async def test_startup_and_health_say_what_the_eviction_policy_means(
        make_proxy: MakeProxy, redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.config_set("maxmemory", 64 * 2**20)
    r.config_set("maxmemory-policy", "allkeys-lfu")
    with structlog.testing.capture_logs() as logs:
        proxy = await make_proxy()
    [started] = [e for e in logs if e["event"] == "redis eviction policy"]
    assert (started["policy"], started["maxmemory"]) == ("allkeys-lfu", 64 * 2**20)
    health = await (await proxy.get("/cache/health")).json()
    eviction = health["redis"]["eviction"]
    assert eviction["policy"] == "allkeys-lfu"
    assert "costs at most a miss" in eviction["meaning"]
    r.config_set("maxmemory-policy", "noeviction")
    health = await (await proxy.get("/cache/health")).json()
    assert "refuses writes" in health["redis"]["eviction"]["meaning"]
    r.config_set("maxmemory", 0)
    health = await (await proxy.get("/cache/health")).json()
    assert "no memory limit" in health["redis"]["eviction"]["meaning"]
