"""The in-process L1: hits without Redis, invalidations driven by Redis's feed, a write on
another instance never overtaken, the L1 standing aside when its feed is lost or silent,
bounded in bytes."""

from __future__ import annotations

import asyncio
import select
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import FLOW
from proxy.entry import Entry
from proxy.l1 import L1
from proxy.layout import Layout, Shard

from .conftest import ALICE, AS_SUPERUSER, MakeProxy
from .procs import ROOT, RedisServer, command, proxies

PAGE = "/transactions?session_id=alice-s1&page_size=5"


async def cache_of(proxy: TestClient[Any, Any], path: str = PAGE) -> str:
    resp = await proxy.get(path, headers=ALICE)
    assert resp.status == 200
    await resp.read()
    return resp.headers["X-Cache"]


def lookups(server: RedisServer) -> int:
    """Scripts Redis ran (every lookup is one)."""
    stats = server.client().info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_hits_come_from_the_l1_without_a_redis_call(shipped: TestClient[Any, Any],
                                                         redis_server: RedisServer) -> None:
    assert await cache_of(shipped) == "MISS"
    assert await cache_of(shipped) == "HIT"
    redis_server.client().config_resetstat()
    for _ in range(20):
        assert await cache_of(shipped) == "HIT"
    assert lookups(redis_server) == 0


async def test_a_write_drops_its_tags_from_this_instances_l1(shipped: TestClient[Any, Any]
                                                             ) -> None:
    await cache_of(shipped)
    page = await (await shipped.get(PAGE, headers=ALICE)).json()
    txn = page["items"][0]
    put = await shipped.put(f"/transactions/{txn['id']}",
                            json={"category": "Bills" if txn["category"] != "Bills" else "Health"},
                            headers=ALICE)
    assert put.status == 200
    assert await cache_of(shipped) == "MISS"
    # An admin purge too, and a flush (announced to every instance on the feed).
    assert await cache_of(shipped) == "HIT"
    await shipped.delete("/cache/session/alice-s1", headers=AS_SUPERUSER)
    assert await cache_of(shipped) == "MISS"
    assert await cache_of(shipped) == "HIT"
    await shipped.delete("/cache/flush", headers=AS_SUPERUSER)
    assert await cache_of(shipped) == "MISS"


async def test_the_l1_stands_aside_while_its_feed_is_silent(make_proxy: MakeProxy,
                                                            redis_server: RedisServer) -> None:
    proxy = await make_proxy(cache={"max_body_bytes": 1 << 20, "l1": {"lease_ms": 200}},
                             redis={"timeout_ms": 50})
    await cache_of(proxy)
    assert await cache_of(proxy) == "HIT"
    redis_server.freeze()  # no PING answered: the lease runs out
    try:
        for _ in range(200):  # bounded: within the lease, the L1 stops answering
            if await cache_of(proxy) == "BYPASS":
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the L1 kept answering with its feed silent")
    finally:
        redis_server.thaw()
    for _ in range(200):
        if await cache_of(proxy) == "HIT":
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("caching did not resume")


async def test_the_l1_is_emptied_when_its_feed_is_lost(make_proxy: MakeProxy,
                                                       redis_server: RedisServer) -> None:
    proxy = await make_proxy(cache={"max_body_bytes": 1 << 20})
    await cache_of(proxy)
    assert proxy.app is not None
    l1 = proxy.app[FLOW].l1
    assert l1.bytes > 0
    redis_server.restart()  # everything Redis knew is gone: the L1 must not outlive it
    for _ in range(200):
        outcome = await cache_of(proxy)
        assert outcome != "HIT" or l1.up  # never a hit from before the restart
        if outcome == "MISS":
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("caching did not resume")


async def test_the_l1_is_bounded_in_bytes(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(cache={"max_body_bytes": 1 << 20, "l1": {"max_mb": 1}})
    for page in range(1, 40):
        await cache_of(proxy, f"/transactions?session_id=alice-s1&page={page}&page_size=30")
        await cache_of(proxy, f"/transactions?session_id=alice-s1&page={page}&page_size=30")
    assert proxy.app is not None
    l1 = proxy.app[FLOW].l1
    assert 0 < l1.bytes <= 1 << 20


# -- a write on one instance, a read on another ---------------------------------------------------

@pytest.fixture
def two_instances(stub: TestServer, redis_server: RedisServer,
                  tmp_path: Path) -> Iterator[tuple[str, str]]:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["log"] = {"level": "warning"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"UPSTREAM_URL": str(stub.make_url("")).rstrip("/"),
           "REDIS_CACHE_URL": redis_server.url(), "CACHE_KEY_SECRET": "l1-secret-0123456789"}
    with proxies(2, path, env) as (a, b):
        yield a, b


async def test_a_write_on_another_instance_is_never_overtaken(
        two_instances: tuple[str, str]) -> None:
    writer, reader = two_instances
    async with aiohttp.ClientSession(headers=ALICE) as s:
        async def read() -> tuple[str, dict[str, Any]]:
            async with s.get(reader + PAGE) as r:
                return r.headers["X-Cache"], await r.json()

        outcomes = set()
        for i in range(40):
            outcome, page = await read()
            outcomes.add(outcome)
            txn = page["items"][i % 5]
            new = "Bills" if txn["category"] != "Bills" else "Health"
            async with s.put(writer + f"/transactions/{txn['id']}",
                             json={"category": new}) as w:
                assert w.status == 200
                acked = (await w.json())["versions"]["session"]
            # Right after the write was acknowledged by the other instance:
            for _ in range(3):
                outcome, page = await read()
                outcomes.add(outcome)
                assert page["data_version"] >= acked, (i, outcome)
                assert page["items"][i % 5]["category"] == new
        assert "HIT" in outcomes  # the reader did answer from its L1 in between


async def test_a_write_on_another_instance_is_never_overtaken_among_concurrent_hits(
        two_instances: tuple[str, str]) -> None:
    """The same, while other clients keep the reading instance busy with L1 hits, so that
    its loop answers many hits a turn (the feed is drained once per turn)."""
    writer, reader = two_instances
    done = asyncio.Event()
    seen: list[str] = []

    async def hammer(s: aiohttp.ClientSession) -> None:
        for _ in range(3000):  # bounded; stops with the checks
            if done.is_set():
                return
            async with s.get(reader + PAGE) as r:
                await r.read()
                seen.append(r.headers["X-Cache"])

    async with aiohttp.ClientSession(headers=ALICE) as s, \
            aiohttp.ClientSession(headers=ALICE) as busy:
        async with s.get(reader + PAGE) as r:
            await r.read()
        load = [asyncio.create_task(hammer(busy)) for _ in range(8)]
        try:
            for i in range(25):
                async with s.get(reader + PAGE) as r:
                    txn = (await r.json())["items"][i % 5]
                new = "Bills" if txn["category"] != "Bills" else "Health"
                async with s.put(writer + f"/transactions/{txn['id']}",
                                 json={"category": new}) as w:
                    assert w.status == 200
                    acked = (await w.json())["versions"]["session"]
                async with s.get(reader + PAGE) as r:
                    page = await r.json()
                assert page["data_version"] >= acked, (i, r.headers["X-Cache"])
                assert page["items"][i % 5]["category"] == new
        finally:
            done.set()
            await asyncio.gather(*load)
    assert seen.count("HIT") > 100  # the reader did answer from its L1 meanwhile


class Heard:
    """A feed listener that keeps the purges it is told of."""

    def __init__(self) -> None:
        self.purged: list[str] = []

    def on_fill(self, primary: str) -> None:
        pass

    def on_purge(self, shard: Shard, tags: Sequence[str]) -> None:
        self.purged += tags

    def on_flush(self) -> None:
        pass

    def on_state(self, up: bool) -> None:
        pass


async def test_the_feed_is_drained_once_per_turn_of_the_event_loop(
        shipped: TestClient[Any, Any], redis_server: RedisServer) -> None:
    assert shipped.app is not None
    flow = shipped.app[FLOW]
    feed, shard = flow.feed, flow.store.layout.shards[0]
    heard = Heard()
    feed.listeners.append(heard)
    [fd] = [c.sock.fileno() for c in feed._conns]
    r = redis_server.client()

    def announce(tag: str) -> None:
        """A purge announcement, and wait (bounded) until its bytes reach the feed."""
        command(r, flow.store.publish, shard.channel, f"i {tag}")
        assert select.select([fd], [], [], 5)[0], "the announcement did not arrive"

    await asyncio.sleep(0)
    assert feed.drain()
    announce("a")
    # No await since the drain: the same turn of the loop, whose drain is done.
    assert feed.drain()
    assert heard.purged == []
    # Unless asked to drain now (a hit answered in the callback that read its bytes).
    assert feed.drain(now=True)
    assert heard.purged == ["a"]
    await asyncio.sleep(0)  # the next turn: its first drain reads what is waiting
    announce("b")
    assert feed.drain()
    assert "b" in heard.purged


# -- the L1's own bookkeeping, as a table ---------------------------------------------------------

LAYOUT = Layout("jcache", 16)
ENTRY = Entry(status=200, headers=(("Content-Type", "application/json"),), body=b"{}",
              request_time=0.0, response_time=0.0, initial_age=0.0, lifetime=60.0,
              stale_while_revalidate=0.0, stale_if_error=0.0, no_cache=False,
              forbid_stale=False, url="/x", route="r", tags=("a", "b"))
PRIMARY = "0" * 32  # shard 0


@pytest.mark.parametrize(("event", "kept"), [
    (None, True),
    (("purge", 0, ["a"]), False),  # a tag of the entry, in its shard
    (("purge", 1, ["a"]), True),  # another shard's purge
    (("purge", 0, ["z"]), True),  # tags the entry does not carry
    (("drop", None, ["b"]), False),  # this instance's own write
    (("flush", None, []), False),
    (("down", None, []), False),
])
def test_a_read_overtaken_by_an_invalidation_is_not_kept(event: Any, kept: bool) -> None:
    l1 = L1(LAYOUT, 1 << 20)
    l1.on_state(True)
    since = l1.seq  # the lookup is issued
    if event is not None:  # ... an invalidation arrives before its answer
        kind, shard, tags = event
        if kind == "purge":
            l1.on_purge(LAYOUT.shards[shard], tags)
        elif kind == "drop":
            l1.drop_tags(tags)
        elif kind == "flush":
            l1.on_flush()
        else:
            l1.on_state(False)
            l1.on_state(True)
    l1.put(PRIMARY, ENTRY, since)
    assert (l1.get(PRIMARY, lambda _: None) is not None) is kept


def test_held_entries_go_with_their_tags() -> None:
    l1 = L1(LAYOUT, 1 << 20)
    l1.on_state(True)
    l1.put(PRIMARY, ENTRY, l1.seq)
    other = "f" * 32
    l1.put(other, replace(ENTRY, tags=("c",)), l1.seq)
    l1.on_purge(LAYOUT.shards[0], ["b"])
    assert l1.get(PRIMARY, lambda _: None) is None
    assert l1.get(other, lambda _: None) is not None
    l1.on_state(False)
    assert l1.get(other, lambda _: None) is None
    assert l1.bytes == 0


def test_the_urls_it_may_hold_follow_what_it_holds() -> None:
    # The fast path skips a request for a URL the L1 holds nothing for: it must say yes for
    # every URL of a held entry (variants, other users), and no once none is held.
    l1 = L1(LAYOUT, 1 << 20)
    l1.on_state(True)
    assert not l1.may_hold("/x")
    l1.put(PRIMARY, ENTRY, l1.seq)
    alice = "1" * 32  # the same URL for another user: another entry
    l1.put(alice, replace(ENTRY, tags=("c",)), l1.seq)
    l1.put(alice, replace(ENTRY, tags=("c",)), l1.seq)  # replaced: still one
    l1.put("2" * 32, replace(ENTRY, url="/y", tags=("d",)), l1.seq)
    assert l1.may_hold("/x")
    assert not l1.may_hold("/x?")
    l1.on_purge(LAYOUT.shards[0], ["b"])
    assert l1.may_hold("/x")  # alice's is still held
    l1.drop_tags(["c"])
    assert not l1.may_hold("/x")
    assert l1.may_hold("/y")
    small = L1(LAYOUT, 4096)  # room for a dozen: the least recently used go
    small.on_state(True)
    for i in range(50):
        small.put(f"{i:032x}", replace(ENTRY, url=f"/z{i}"), small.seq)
    assert not small.may_hold("/z0")
    assert small.may_hold("/z49")
    assert sum(small.may_hold(f"/z{i}") for i in range(50)) == len(small._held)
    l1.on_state(False)
    assert not l1.may_hold("/y")
