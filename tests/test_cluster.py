"""The proxy on a local Redis (or Valkey) Cluster of 3 primaries: entries spread over every
primary, purges reach every shard, a lost primary costs only its slots' hits, and with
replicas an invalidation survives a failover."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app

from .conftest import (
    ALICE,
    AS_PURGER,
    AS_SUPERUSER,
    BOB,
    StubControl,
    base_config,
    make_config,
    proxy_client,
)
from .procs import RedisCluster, command, poll

ENTRY_KEYS = "{jcache:*}:e:*"
PAGES = [f"/transactions?session_id=alice-s1&page_size=1&page={n}" for n in range(1, 301)]


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[RedisCluster]:
    """One 3-primary cluster for the tests that leave it whole (forming one takes seconds)."""
    cluster = RedisCluster(primaries=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(shared_cluster: RedisCluster) -> RedisCluster:
    for node in shared_cluster.primaries:
        shared_cluster.client(node).flushall()
    return shared_cluster


async def cluster_proxy(aiohttp_client: Any, stub: TestServer, cluster: RedisCluster,
                        cache: dict[str, Any] | None = None, **redis: Any,
                        ) -> TestClient[Any, Any]:
    doc = base_config(str(stub.make_url("")).rstrip("/"), cluster.url(),
                      redis={"mode": "cluster", "timeout_ms": 500, **redis},
                      cache={"invalidation_wait_ms": 2000, **(cache or {})})
    return await proxy_client(aiohttp_client, create_app(make_config(doc)))


async def read_all(proxy: TestClient[Any, Any], paths: list[str],
                   who: dict[str, str]) -> list[tuple[int, str]]:
    """Each path once, 20 at a time: (status, X-Cache)."""
    gate = asyncio.Semaphore(20)

    async def one(path: str) -> tuple[int, str]:
        async with gate:
            resp = await proxy.get(path, headers=who)
            await resp.read()
            return resp.status, resp.headers.get("X-Cache", "")
    return list(await asyncio.gather(*(one(p) for p in paths)))


async def test_entries_spread_over_every_primary(aiohttp_client: Any, stub: TestServer,
                                                 stubctl: StubControl,
                                                 cluster: RedisCluster) -> None:
    proxy = await cluster_proxy(aiohttp_client, stub, cluster)
    first = await read_all(proxy, PAGES, ALICE)
    assert {s for s, _ in first} == {200}
    assert await stubctl.count("GET /transactions") == 300
    second = await read_all(proxy, PAGES, ALICE)
    assert sum(1 for s, x in second if s == 200 and x == "HIT") >= 290
    assert await stubctl.count("GET /transactions") <= 310
    held = [len(cluster.keys(n, ENTRY_KEYS)) for n in cluster.primaries]
    assert sum(held) >= 290  # (on a busy machine a save may time out: that URL is a miss)
    assert min(held) >= 0.15 * sum(held), held


async def test_a_write_invalidates_its_session_on_every_shard(
        aiohttp_client: Any, stub: TestServer, cluster: RedisCluster) -> None:
    proxy = await cluster_proxy(aiohttp_client, stub, cluster)
    await read_all(proxy, PAGES[:60], ALICE)
    await read_all(proxy, ["/summary?session_id=bob-s1"], BOB)
    assert all(len(cluster.keys(n, ENTRY_KEYS)) > 0 for n in cluster.primaries)
    page = await (await proxy.get(PAGES[0], headers=ALICE)).json()
    txn = page["items"][0]
    new = "Health" if txn["category"] != "Health" else "Bills"
    put = await proxy.put(f"/transactions/{txn['id']}", json={"category": new}, headers=ALICE)
    assert put.status == 200
    after = await read_all(proxy, PAGES[:60], ALICE)
    assert {x for _, x in after} == {"MISS"}  # every shard's entries of the session went
    first = await (await proxy.get(PAGES[0], headers=ALICE)).json()
    assert first["items"][0]["category"] == new
    assert (await read_all(proxy, ["/summary?session_id=bob-s1"], BOB))[0][1] == "HIT"


async def test_purge_session_reports_what_it_deleted(aiohttp_client: Any, stub: TestServer,
                                                     cluster: RedisCluster) -> None:
    proxy = await cluster_proxy(aiohttp_client, stub, cluster)
    await read_all(proxy, PAGES[:40], ALICE)
    await read_all(proxy, ["/summary?session_id=alice-s2"], ALICE)
    stored = sum(len(cluster.keys(n, ENTRY_KEYS)) for n in cluster.primaries)
    assert stored >= 38  # 41, less any save a busy machine timed out
    resp = await proxy.delete("/cache/session/alice-s1", headers=AS_PURGER)
    assert resp.status == 200
    left = sum(len(cluster.keys(n, ENTRY_KEYS)) for n in cluster.primaries)
    assert (await resp.json())["deleted_keys"] == stored - left
    assert left <= 1  # alice-s2's summary
    assert {x for _, x in await read_all(proxy, PAGES[:40], ALICE)} == {"MISS"}
    assert (await read_all(proxy, ["/summary?session_id=alice-s2"], ALICE))[0][1] == "HIT"


async def test_flush_and_stats_cover_every_primary(aiohttp_client: Any, stub: TestServer,
                                                   cluster: RedisCluster) -> None:
    proxy = await cluster_proxy(aiohttp_client, stub, cluster)
    await read_all(proxy, PAGES[:50], ALICE)
    stored = sum(len(cluster.keys(n, ENTRY_KEYS)) for n in cluster.primaries)
    assert stored >= 48  # less any save a busy machine timed out
    stats = await (await proxy.get("/cache/stats", headers=AS_PURGER)).json()
    assert stats["redis"]["entries"] == stored, stats["redis"]
    assert stats["redis"]["entries_by_route"]["transactions"] == stored
    assert stats["instance"]["misses"] == 50
    resp = await proxy.delete("/cache/flush", headers=AS_SUPERUSER)
    assert resp.status == 200
    assert sum(len(cluster.keys(n, ENTRY_KEYS)) for n in cluster.primaries) == 0
    assert {x for _, x in await read_all(proxy, PAGES[:50], ALICE)} == {"MISS"}


async def test_the_l1_hears_every_shards_purges(aiohttp_client: Any, stub: TestServer,
                                               cluster: RedisCluster) -> None:
    """Instance A answers from its L1 without Redis; a write through instance B purges
    entries on every primary, and A's L1 hears each primary's announcement (sharded
    pub/sub, one connection per node): A serves none of them again."""
    a = await cluster_proxy(aiohttp_client, stub, cluster)
    b = await cluster_proxy(aiohttp_client, stub, cluster)
    paths = PAGES[:30]
    await read_all(a, paths, ALICE)
    for node in cluster.primaries:
        cluster.client(node).config_resetstat()
    assert {x for _, x in await read_all(a, paths, ALICE)} == {"HIT"}
    evals = sum(int(cluster.client(n).info("commandstats").get("cmdstat_evalsha", {})
                    .get("calls", 0)) for n in cluster.primaries)
    assert evals == 0  # every hit from the L1
    page = await (await b.get(paths[0], headers=ALICE)).json()
    txn = page["items"][0]
    new = "Health" if txn["category"] != "Health" else "Bills"
    put = await b.put(f"/transactions/{txn['id']}", json={"category": new}, headers=ALICE)
    assert put.status == 200
    for path in paths:
        resp = await a.get(path, headers=ALICE)
        assert resp.headers["X-Cache"] == "MISS", path
        assert (await resp.json())["data_version"] > page["data_version"]


async def test_a_slot_moved_to_another_primary_is_followed(
        aiohttp_client: Any, stub: TestServer, stubctl: StubControl) -> None:
    """Resharding under the proxy: a shard's slot moves with its entries to another primary.
    Its lookups (the L1 off: each one reaches Redis) follow MOVED, the slot map read again;
    its entries are still hits, and a write purges them on the new owner."""
    cluster = RedisCluster(primaries=3).start()
    try:
        proxy = await cluster_proxy(aiohttp_client, stub, cluster, cache={"l1": {"max_mb": 0}})
        paths = PAGES[:60]
        await read_all(proxy, paths, ALICE)
        # What is stored now (on a busy machine a fill's save may have timed out: a miss)
        stored = [p for p, (_, x) in zip(paths, await read_all(proxy, paths, ALICE),
                                         strict=True) if x == "HIT"]
        assert len(stored) >= 50
        source, target = cluster.primaries[0], cluster.primaries[1]
        key = cluster.keys(source, ENTRY_KEYS)[0]
        slot = int(command(cluster.client(source), "CLUSTER", "KEYSLOT", key))
        assert cluster.migrate_slot(slot, source, target) > 0
        assert key in cluster.keys(target, ENTRY_KEYS)
        async def one(path: str) -> tuple[int, str, str]:
            resp = await proxy.get(path, headers=ALICE)
            await resp.read()
            return resp.status, resp.headers["X-Cache"], resp.headers["Cache-Status"]
        statuses = await asyncio.gather(*(one(p) for p in stored))  # lookups in batches
        assert {s for s, _, _ in statuses} == {200}
        assert {x for _, x, _ in statuses} == {"HIT"}, statuses
        page = await (await proxy.get(paths[0], headers=ALICE)).json()
        fetched = await stubctl.count("GET /transactions")
        txn = page["items"][0]
        new = "Health" if txn["category"] != "Health" else "Bills"
        put = await proxy.put(f"/transactions/{txn['id']}", json={"category": new},
                              headers=ALICE)
        assert put.status == 200
        assert "invalidation-pending" not in put.headers.get("Cache-Status", "")
        assert key not in cluster.keys(target, ENTRY_KEYS)  # purged where it lives now
        answers = await read_all(proxy, paths, ALICE)
        assert {x for _, x in answers} == {"MISS"}
        assert await stubctl.count("GET /transactions") == fetched + len(paths)
    finally:
        cluster.stop()


async def test_a_primary_lost_costs_only_its_slots(aiohttp_client: Any, stub: TestServer,
                                                   stubctl: StubControl) -> None:
    cluster = RedisCluster(primaries=3).start()
    try:
        proxy = await cluster_proxy(aiohttp_client, stub, cluster, breaker_reset_s=0.2)
        paths = PAGES[:90]
        await read_all(proxy, paths, ALICE)
        lost = cluster.primaries[1]
        held = len(cluster.keys(lost, ENTRY_KEYS))
        assert held > 0
        lost.kill()
        # Every request is answered, whatever its slot: no 5xx, never a hang.
        for _ in range(2):
            answers = await read_all(proxy, paths, ALICE)
            assert {s for s, _ in answers} == {200}
        cluster.wait_ok([cluster.primaries[0], cluster.primaries[2]])
        # The other primaries' entries are still hits; only the lost one's are misses.
        answers = await read_all(proxy, paths, ALICE)
        assert {s for s, _ in answers} == {200}
        missed = [p for p, (_, x) in zip(paths, answers, strict=True) if x != "HIT"]
        assert len(missed) == held
        # ... and the other primaries keep caching what is new.
        fresh = PAGES[90:150]
        await read_all(proxy, fresh, ALICE)
        again = await read_all(proxy, fresh, ALICE)
        assert sum(1 for _, x in again if x == "HIT") >= 0.4 * len(fresh)
        # Back (empty, as a restarted cache node is): its slots cache again.
        lost.restart()
        cluster.wait_ok()
        for _ in range(100):
            answers = await read_all(proxy, missed, ALICE)
            if {x for _, x in answers} == {"HIT"}:
                break
            await asyncio.sleep(0.1)  # the breaker's probes: caching resumes in a few tries
        assert {x for _, x in answers} == {"HIT"}
        assert {s for s, _ in answers} == {200}
    finally:
        cluster.stop()


async def _write_then_fail_over(proxy: TestClient[Any, Any], cluster: RedisCluster,
                                *, lag: bool) -> tuple[int, Any]:
    """Fill alice's session, write to it, then kill the first primary and promote its
    replica; returns the session's data version before the write. ``lag``: the replica is
    cut off from before the write until the primary is gone, so it never receives the purge
    (as asynchronous replication allows)."""
    await read_all(proxy, PAGES[:60], ALICE)
    lost = cluster.primaries[0]
    [replica] = cluster.replicas_of(0)
    held = set(cluster.keys(lost, ENTRY_KEYS))
    assert held
    poll(lambda: held <= set(cluster.keys(replica, ENTRY_KEYS)), "the replica has the entries")
    page = await (await proxy.get(PAGES[0], headers=ALICE)).json()
    txn = page["items"][0]
    new = "Health" if txn["category"] != "Health" else "Bills"
    if lag:
        cluster.cut_off(replica, lost)
    put = await proxy.put(f"/transactions/{txn['id']}", json={"category": new}, headers=ALICE)
    assert put.status == 200
    lost.kill()
    if lag:
        replica.thaw()

    poll(lambda: cluster.role(replica) == "master", "the replica promoted")
    cluster.wait_ok()
    if lag:  # the promoted replica holds what the write made stale
        assert held <= set(cluster.keys(replica, ENTRY_KEYS))
    return int(page["data_version"]), put


async def _no_stale_read(proxy: TestClient[Any, Any], before: int) -> None:
    """Every page of the session, twice (the second time from the cache): each shows the
    write (its data version moved on), none what the write made stale."""
    for _ in range(2):
        for path in PAGES[:60]:
            resp = await proxy.get(path, headers=ALICE)
            assert resp.status == 200
            body = await resp.json()
            assert body["data_version"] > before, (path, resp.headers.get("X-Cache"))


@pytest.fixture
def replicated_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster(primaries=3, replicas=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_write_survives_the_failover_of_its_primary(
        aiohttp_client: Any, stub: TestServer, replicated_cluster: RedisCluster) -> None:
    """The purge waits for a replica (WAIT) before the write is answered: a replica
    promoted right after holds no entry the write made stale."""
    cluster = replicated_cluster
    proxy = await cluster_proxy(aiohttp_client, stub, cluster)
    before, put = await _write_then_fail_over(proxy, cluster, lag=False)
    assert "invalidation-pending" not in put.headers.get("Cache-Status", "")
    await _no_stale_read(proxy, before)


async def test_a_lagging_replica_promoted_serves_nothing_stale(
        aiohttp_client: Any, stub: TestServer, replicated_cluster: RedisCluster) -> None:
    """The replica misses the purge (frozen): WAIT times out, the invalidation is deferred,
    and this instance serves none of what it covers until it has been replayed on the
    promoted replica."""
    cluster = replicated_cluster
    proxy = await cluster_proxy(aiohttp_client, stub, cluster)
    before, put = await _write_then_fail_over(proxy, cluster, lag=True)
    assert "invalidation-pending" in put.headers.get("Cache-Status", "")
    await _no_stale_read(proxy, before)
