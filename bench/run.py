"""``make bench``: hits and misses through the proxy against aiohttp's ceiling, in one run.

Starts a private redis-server and a 3-primary Redis Cluster, the stub (no latency), three
proxies with config.yaml in front of it (the second with its L1 off, the third the same on
the cluster), and the ceiling (``bench/ceiling.py``: the proxy's
cached response as a constant body). Then measures, each run bounded in time and requests,
with wrk when installed (else a bounded asyncio client), loopback only:

* the ceiling, and the proxy's hit for the same page: from the L1, from Redis, and from the
  cluster (all on this one machine: the cost per request, not the cluster's capacity);
* misses under load: every request a URL of its own, through the proxy and to the stub;
* the miss overhead: sequential requests with URLs of their own, a new connection each,
  through the proxy and to the stub directly (medians, milliseconds);
* what Redis holds per raw JSON byte once 300 distinct 100-item pages are stored.

Prints a table with ratios to the ceiling and writes bench/results/bench.json. Options:
BENCH_SECONDS (5), BENCH_CONNECTIONS (50), BENCH_TOOL (wrk or python).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import redis
import yaml

from tests.procs import ROOT, RedisCluster, RedisServer, start_python, stop

from . import load

PAGE = "/transactions?session_id=alice-s1&page_size=100"
HEADERS = {"Authorization": "Bearer alice-token"}  # example token of the stub's demo user
STORED_PAGES = 300
SEQUENTIAL = 60


def proxy_env(redis_url: str, stub_url: str) -> dict[str, str]:
    """The environment of a benchmarked proxy: its Redis, the stub, quiet logs."""
    return {"REDIS_CACHE_URL": redis_url, "UPSTREAM_URL": stub_url, "LOG_LEVEL": "warning",
            "CACHE_KEY_SECRET": "bench-only-secret-0123456789"}


def ceiling_headers(headers: dict[str, str]) -> dict[str, str]:
    """The proxy's answer's headers for the ceiling to send, less those aiohttp sets itself."""
    return {k: v for k, v in headers.items()
            if k.lower() not in ("content-length", "date", "server")}


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=HEADERS)
    with urllib.request.urlopen(req, timeout=10) as resp:  # loopback only
        return resp.status, dict(resp.headers), resp.read()


def _sequential_ms(base: str, tag: str) -> float:
    """Median latency of sequential requests with URLs of their own, a connection each."""
    times = []
    for i in range(SEQUENTIAL):
        t = time.perf_counter()
        _get(f"{base}{PAGE}&seq={tag}-{i}")
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def held_by_kind(r: redis.Redis) -> Counter[str]:
    """What Redis holds, by kind of key (``e`` entries, ``t`` tag indexes, ``g`` generations,
    ``M`` markers, ...): ``MEMORY USAGE`` of every key, once the stores in flight have landed.
    ``used_memory`` is not used: it also counts the clients' query buffers, which grow with
    the first large saves and are not data."""
    # A fill is stored after its answer: wait (bounded) until the stores in flight, those of
    # the runs before included, have landed.
    deadline = time.monotonic() + 10
    size = r.dbsize()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        size, last = r.dbsize(), size
        if size == last:
            break
    held: Counter[str] = Counter()
    for key in r.scan_iter(count=1000):
        name = key.decode("latin-1")
        kind = name.split("}:", 1)[1].split(":", 1)[0] if "}:" in name else name
        held[kind] += r.memory_usage(key, samples=0) or 0
    return held


def store_pages(proxy: str, count: int, tag: str) -> int:
    """``count`` distinct pages stored through the proxy; their raw JSON bytes."""
    raw = 0
    for i in range(count):
        _, headers, body = _get(f"{proxy}{PAGE}&stored={tag}-{i}")
        assert headers["X-Cache"] == "MISS"
        raw += len(body)
    return raw


def _bytes_per_raw_byte(redis: RedisServer, proxy: str) -> float:
    """What Redis holds (entries, index records, generations) per raw JSON byte, once
    ``STORED_PAGES`` distinct pages are stored."""
    r = redis.client()
    before = held_by_kind(r).total()
    raw = store_pages(proxy, STORED_PAGES, "run")
    return (held_by_kind(r).total() - before) / raw


Procs = list[subprocess.Popen[bytes]]


def _start(redis: RedisServer, cluster: RedisCluster, stub_url: str, tmp: Path,
           ) -> tuple[Procs, list[str]]:
    """Three proxies: the shipped config; the same with the L1 off; and that on a
    3-primary cluster."""
    env = proxy_env(redis.url(), stub_url)
    on_cluster = {**env, "REDIS_CACHE_URL": cluster.url(), "REDIS_MODE": "cluster"}
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg.setdefault("cache", {})["l1"] = {"max_mb": 0}
    no_l1 = tmp / "no-l1.yaml"
    no_l1.write_text(yaml.safe_dump(cfg))
    procs: Procs = []
    urls = []
    for config, environment in ((ROOT / "config.yaml", env), (no_l1, env),
                                (no_l1, on_cluster)):
        proc, url = start_python("proxy", ["--config", str(config), "--port", "0"],
                                 env=environment)
        procs.append(proc)
        urls.append(url)
    return procs, urls


def main() -> int:
    seconds = float(os.environ.get("BENCH_SECONDS", "5"))
    conns = int(os.environ.get("BENCH_CONNECTIONS", "50"))
    wrk = os.environ.get("BENCH_TOOL", "wrk") != "python"
    procs: Procs = []
    redis = RedisServer().start()
    cluster = RedisCluster(primaries=3).start()
    tmp = Path(tempfile.mkdtemp(prefix="jsoncache-bench-"))
    try:
        stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
        procs.append(stub)
        started, (proxy, proxy_no_l1, on_cluster) = _start(redis, cluster, stub_url, tmp)
        procs += started
        for base in (proxy, proxy_no_l1, on_cluster):
            _get(base + PAGE)
            status, headers, body = _get(base + PAGE)
            assert (status, headers.get("X-Cache")) == (200, "HIT"), headers
        (tmp / "body").write_bytes(body)
        kept = ceiling_headers(headers)
        ceiling, ceiling_url = start_python("bench.ceiling", [
            "--body", str(tmp / "body"), "--headers", json.dumps(kept)])
        procs.append(ceiling)
        print(f"load: {'wrk' if wrk else 'python'}, {conns} connections, {seconds:.0f} s a run,"
              f" {len(body):,}-byte page {PAGE}\n")
        runs = [("ceiling: constant body, aiohttp low-level server, uvloop", ceiling_url, False),
                ("proxy hit (L1)", proxy, False),
                ("proxy hit, L1 off (a Redis lookup each)", proxy_no_l1, False),
                ("proxy hit, L1 off, on a 3-primary cluster", on_cluster, False),
                ("stub direct, every URL its own", stub_url, True),
                ("proxy miss, every URL its own", proxy, True),
                ("proxy miss, on a 3-primary cluster", on_cluster, True)]
        results: dict[str, dict[str, float]] = {}
        base_rps = 0.0
        for name, url, unique in runs:
            r = load.run(url + PAGE, HEADERS, seconds=seconds, connections=conns,
                         max_requests=2_000_000, prefer_wrk=wrk, unique=unique)
            base_rps = base_rps or r.rps
            results[name] = {"rps": round(r.rps), "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                             "errors": r.errors, "vs_ceiling": round(r.rps / base_rps, 3)}
            print(f"{name:58s} {r.row()}   {r.rps / base_rps:5.2f}x ceiling")
        direct = _sequential_ms(stub_url, "d")
        through = _sequential_ms(proxy, "p")
        per_byte = _bytes_per_raw_byte(redis, proxy)
        print(f"\nmiss overhead (sequential, a connection each, medians): {through:.2f} ms "
              f"through the proxy, {direct:.2f} ms direct: +{through - direct:.2f} ms")
        print(f"Redis bytes per raw JSON byte ({STORED_PAGES} pages stored): {per_byte:.3f}")
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "bench.json").write_text(json.dumps({
            "seconds": seconds, "connections": conns, "page_bytes": len(body), "runs": results,
            "miss_overhead_ms": round(through - direct, 3),
            "redis_bytes_per_raw_byte": round(per_byte, 3)}, indent=2))
        print(f"\nwritten to {out / 'bench.json'}")
    finally:
        for p in procs:
            stop(p)
        redis.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
