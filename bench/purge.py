"""``make bench-purge``: the cost of purging one tag as unrelated entries grow 1k -> 1M.

Runs on a private redis-server and then on a 3-primary Redis Cluster (BENCH_PURGE_TARGETS:
single,cluster). Fills each through the proxy's own Store (the real save script, with the
real tag generations and indexes, over the virtual shards: ~all, the route, path prefixes, a
URL tag and a group tag per entry), then for each size stores 100 entries under one tag and
times purging that tag (every shard), several rounds.
The ratio against the smallest size should stay near 1: a purge costs what it deletes, not
the size of the keyspace. For contrast, each size also times the seed's way, a pattern SCAN
over the keyspace (only finding the keys, not deleting them).
BENCH_PURGE_MAX (1000000) and BENCH_PURGE_ROUNDS (15) tune it.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from proxy import keys, scripts
from proxy.config import RedisConfig
from proxy.entry import Entry
from proxy.feed import Node
from proxy.keyspace import Keyspace
from proxy.layout import Layout
from proxy.redisconn import RedisConn
from proxy.store import Store
from tests.procs import RedisCluster, RedisServer

ROOT = Path(__file__).resolve().parent.parent
VICTIMS = 100
BATCH = 2000


def _entry(i: int, tags: tuple[str, ...]) -> Entry:
    return Entry(status=200, headers=(("Content-Type", "application/json"),), body=b'{"n": %d}' % i,
                 request_time=0.0, response_time=time.time(), initial_age=0.0, lifetime=3600.0,
                 stale_while_revalidate=0.0, stale_if_error=0.0, no_cache=False,
                 forbid_stale=False, url=f"/bench/{i}", route="bench", tags=tags)


def _tags(i: int, extra: str | None = None) -> tuple[str, ...]:
    base = (keys.url_tag(f"/bench/{i}", ""), "~route:bench", "~path:/bench",
            f"~path:/bench/{i}", f"group:{i % 1000}")
    return (*base, extra) if extra else base


async def _epoch(store: Store) -> int:
    seconds, micros = await store.data.client(store.conn.primaries[0]).call("TIME")
    return int(seconds) * 1_000_000 + int(micros)


def _primary(name: str) -> str:
    return keys.primary_key("/bench/" + name, "", keys.PUBLIC_SCOPE)


async def _fill(store: Store, start: int, stop: int) -> None:
    """Store entries start..stop-1, pipelined (the same script the proxy runs per fill)."""
    for s in store.layout.shards:  # the first lookup in a shard makes its marker
        await store.lookup(f"{s.index:08x}" + "0" * 24, lambda _: None)
    epoch = await _epoch(store)
    for lo in range(start, stop, BATCH):
        calls = [store.save_call(_primary(f"b{i}"), _entry(i, _tags(i)), 3600.0, epoch)
                 for i in range(lo, min(lo + BATCH, stop))]
        by_node: dict[Node, list[tuple[list[str], list[Any]]]] = {}
        for call in calls:
            by_node.setdefault(store.conn.node_for(call[0][0]), []).append(call)
        await asyncio.gather(*(store._eval_many(scripts.SAVE, c, node)
                               for node, c in by_node.items()))


async def _round(store: Store, round_no: int) -> float:
    tag = f"victim-{round_no}"
    for v in range(VICTIMS):
        i = 10_000_000 + round_no * VICTIMS + v
        primary = _primary(f"v{i}")
        lookup = await store.lookup(primary, lambda _: None)
        ok = await store.save(lookup, primary, _entry(i, _tags(i, tag)), 3600.0)
        assert ok
    started = time.perf_counter()
    deleted = await store.purge_tags([tag])
    elapsed = time.perf_counter() - started
    assert deleted == VICTIMS, deleted
    return elapsed


async def _scan_once(store: Store) -> float:
    """The seed's way: a pattern SCAN over the whole keyspace (every primary)."""
    started = time.perf_counter()
    for node in store.conn.primaries:
        cursor: Any = b"0"
        while True:
            cursor, _ = await store.data.client(node).call(
                "SCAN", cursor, "MATCH", "*victim-seed*", "COUNT", 1000)
            if cursor in (b"0", 0):
                break
    return time.perf_counter() - started


async def _measure(name: str, cfg: RedisConfig, sizes: list[int], rounds: int,
                   ) -> list[dict[str, Any]]:
    conn = RedisConn(cfg)
    store = Store(conn, Layout(cfg.prefix, cfg.shards), lock_ms=1000)
    await conn.start()
    await store.start()
    results: list[dict[str, Any]] = []
    try:
        have = 0
        print(f"\n{name}: {len(conn.primaries)} primar{'y' if len(conn.primaries) == 1 else 'ies'}")
        print(f"{'unrelated entries':>18} {'median':>10} {'p90':>10} {'vs 1k':>8} "
              f"{'seed SCAN':>11}  fill time")
        for size in sizes:
            t0 = time.perf_counter()
            await _fill(store, have, size)
            have = size
            fill_s = time.perf_counter() - t0
            times = sorted([await _round(store, r + size) for r in range(rounds)])
            median = statistics.median(times) * 1000
            p90 = times[int(0.9 * (len(times) - 1))] * 1000
            base = results[0]["median_ms"] if results else median
            scan_ms = await _scan_once(store) * 1000
            results.append({"target": name, "unrelated": size, "median_ms": median,
                            "p90_ms": p90, "ratio": median / base, "seed_scan_ms": scan_ms})
            print(f"{size:>18,} {median:>8.2f}ms {p90:>8.2f}ms {median / base:>7.2f}x "
                  f"{scan_ms:>9.1f}ms  {fill_s:.1f} s")
        info = await Keyspace(store).memory()
        print(f"Redis used_memory at the end (all primaries): "
              f"{info['used_memory'] / 2**20:.0f} MiB")
    finally:
        await conn.close()
    return results


async def main() -> int:
    top = int(os.environ.get("BENCH_PURGE_MAX", "1000000"))
    rounds = int(os.environ.get("BENCH_PURGE_ROUNDS", "15"))
    targets = os.environ.get("BENCH_PURGE_TARGETS", "single,cluster").split(",")
    sizes = [s for s in (1_000, 10_000, 100_000, 1_000_000) if s <= top]
    print(f"purging one tag of {VICTIMS} entries, {rounds} rounds per size")
    results: list[dict[str, Any]] = []
    for target in targets:
        if target == "single":
            server = RedisServer().start()
            try:
                results += await _measure("one server", RedisConfig(
                    url=server.url(), timeout_ms=30_000, connect_timeout_ms=5_000),
                    sizes, rounds)
            finally:
                server.stop()
        elif target == "cluster":
            cluster = RedisCluster(primaries=3).start()
            try:
                results += await _measure("3-primary cluster", RedisConfig(
                    url=cluster.url(), mode="cluster", timeout_ms=30_000,
                    connect_timeout_ms=5_000), sizes, rounds)
            finally:
                cluster.stop()
        else:
            raise SystemExit(f"BENCH_PURGE_TARGETS: unknown target {target!r}")
    by = {(r["target"], r["unrelated"]): r for r in results}
    if len(targets) == 2:
        print("\ncluster / one server (median purge time):")
        for size in sizes:
            a, b = by[("one server", size)], by[("3-primary cluster", size)]
            print(f"{size:>18,} {b['median_ms'] / a['median_ms']:>7.2f}x")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "purge.json").write_text(json.dumps(results, indent=2))
    print(f"written to {out / 'purge.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
