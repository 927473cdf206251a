"""The proxy on a Sentinel-watched primary with one replica and three sentinels: it finds the
primary through the sentinels, answers every request while the primary is lost, follows the
promoted replica, and serves nothing a write made stale across the failover."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import REDIS, create_app

from .conftest import ALICE, StubControl, base_config, make_config, proxy_client
from .procs import Sentinels, poll

PAGES = [f"/transactions?session_id=alice-s1&page_size=1&page={n}" for n in range(1, 31)]
ENTRY_KEYS = "{jcache:*}:e:*"


@pytest.fixture
def sentinels() -> Iterator[Sentinels]:
    group = Sentinels(replicas=1, count=3).start()
    try:
        yield group
    finally:
        group.stop()


async def sentinel_proxy(aiohttp_client: Any, stub: TestServer,
                         group: Sentinels) -> TestClient[Any, Any]:
    doc = base_config(str(stub.make_url("")).rstrip("/"), "redis://",
                      redis={"mode": "sentinel", "sentinels": group.addresses(),
                             "service_name": group.service, "timeout_ms": 500,
                             "breaker_reset_s": 0.2},
                      cache={"invalidation_wait_ms": 2000})
    return await proxy_client(aiohttp_client, create_app(make_config(doc)))


async def read_all(proxy: TestClient[Any, Any]) -> list[tuple[int, str, int]]:
    """Every page once: (status, X-Cache, data version)."""
    out = []
    for path in PAGES:
        resp = await proxy.get(path, headers=ALICE)
        body = await resp.json()
        out.append((resp.status, resp.headers.get("X-Cache", ""), int(body["data_version"])))
    return out


async def test_hits_through_the_primary_the_sentinels_name(
        aiohttp_client: Any, stub: TestServer, stubctl: StubControl,
        sentinels: Sentinels) -> None:
    proxy = await sentinel_proxy(aiohttp_client, stub, sentinels)
    await read_all(proxy)
    assert {x for _, x, _ in await read_all(proxy)} == {"HIT"}
    assert await stubctl.count("GET /transactions") == len(PAGES)
    # In the database the config names (1 by default in sentinel mode), on the primary.
    assert len(list(sentinels.primary.client(db=1).scan_iter(match=ENTRY_KEYS))) == len(PAGES)


async def test_the_primary_lost_then_caching_resumes_on_the_promoted_replica(
        aiohttp_client: Any, stub: TestServer, sentinels: Sentinels) -> None:
    proxy = await sentinel_proxy(aiohttp_client, stub, sentinels)
    await read_all(proxy)
    [replica] = sentinels.replicas
    sentinels.primary.kill()
    # Until the sentinels promote the replica, and after: every request answered, no 5xx.
    while sentinels.current_primary_port() != replica.port:
        assert {s for s, _, _ in await read_all(proxy)} == {200}
        await asyncio.sleep(0.1)
    conn = proxy.app[REDIS]
    for _ in range(100):  # the proxy asks the sentinels again when its primary is gone
        answers = await read_all(proxy)
        assert {s for s, _, _ in answers} == {200}
        if conn.primaries[0].port == replica.port and \
                {x for _, x, _ in answers} == {"HIT"}:
            break
        await asyncio.sleep(0.1)
    assert conn.primaries[0].port == replica.port
    assert {x for _, x, _ in answers} == {"HIT"}


@pytest.mark.parametrize("lag", [False, True], ids=["in-sync", "replica-cut-off"])
async def test_no_stale_read_after_a_write_and_a_failover(
        aiohttp_client: Any, stub: TestServer, sentinels: Sentinels, lag: bool) -> None:
    """A write, the primary killed right after it, the replica promoted: no page shows what
    the write made stale. ``replica-cut-off``: the replica never received the purge (its
    WAIT timed out, the invalidation was deferred and replayed on the new primary)."""
    proxy = await sentinel_proxy(aiohttp_client, stub, sentinels)
    before = await read_all(proxy)
    [replica] = sentinels.replicas
    version = before[0][2]
    first = await (await proxy.get(PAGES[0], headers=ALICE)).json()
    txn = first["items"][0]
    new = "Health" if txn["category"] != "Health" else "Bills"
    held = set(replica.client(db=1).scan_iter(match=ENTRY_KEYS))
    if lag:
        replica.freeze()
        sentinels.primary.client(db=0).set("junk", b"x" * 48 * 2**20)  # fills the link
    put = await proxy.put(f"/transactions/{txn['id']}", json={"category": new}, headers=ALICE)
    assert put.status == 200
    pending = "invalidation-pending" in put.headers.get("Cache-Status", "")
    assert pending is lag
    sentinels.primary.kill()
    if lag:
        replica.thaw()
    poll(lambda: sentinels.current_primary_port() == replica.port, "failover", timeout=30)
    if lag:  # the promoted replica still holds what the write made stale
        assert held <= set(replica.client(db=1).scan_iter(match=ENTRY_KEYS))
    for _ in range(2):
        for status, cache, seen in await read_all(proxy):
            assert status == 200
            assert seen > version, cache
