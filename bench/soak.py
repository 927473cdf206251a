"""``make soak``: minutes of the model-based workload with Redis faults, through two proxy
processes, with a report.

Starts a private redis-server, the stub (latency scaled to 1%: a few milliseconds per
request) and two proxies with config.yaml; runs tests/workload.py (users reading and writing,
every answer checked against the stub's ground truth) for SOAK_SECONDS (180), injecting a
short Redis fault (freeze, DEBUG SLEEP, kill and restart, CLIENT PAUSE) every SOAK_FAULT_S
(5) seconds. Bounded in time and in requests (SOAK_MAX_REQUESTS, 2,000,000); loopback only.

Memory-pressure mode (``make soak-memory``, or SOAK_MAXMEMORY=2mb): Redis gets that small
a maxmemory with SOAK_POLICY (allkeys-lru), and the users read over many pages and page
sizes, so Redis evicts all the time (any of the proxy's keys: entries, generations, indexes,
markers); the report adds how many keys Redis evicted.

Reports requests, errors, stale reads, cross-user reads, cache outcomes, and the memory of
the proxies and of Redis before and after; writes bench/results/soak.json (soak-memory.json).
Exit status 1 when any request failed or any read was stale or crossed users.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from tests import workload
from tests.procs import ROOT, RedisServer, start_python, stop


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Evictions:
    """Keys Redis evicted, summed across the restarts the faults cause (each restart
    starts its counter again)."""

    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.base = 0
        self.last = 0

    @property
    def total(self) -> int:
        return self.base + self.last

    def sample(self) -> None:
        try:
            now = int(self.redis.client().info("stats")["evicted_keys"])
        except Exception:  # down, frozen or paused right now: try again later
            return
        if now < self.last:
            self.base += self.last
        self.last = now

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


async def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "180"))
    fault_every = float(os.environ.get("SOAK_FAULT_S", "5"))
    max_requests = int(os.environ.get("SOAK_MAX_REQUESTS", "2000000"))
    maxmemory = os.environ.get("SOAK_MAXMEMORY", "")
    policy = os.environ.get("SOAK_POLICY", "allkeys-lru")
    pressure = ["--maxmemory", maxmemory, "--maxmemory-policy", policy] if maxmemory else []
    redis = RedisServer(pressure).start()
    procs = []
    try:
        stub, stub_url = start_python("upstream_stub", ["--port", "0",
                                                        "--latency-scale", "0.01"])
        procs.append(stub)
        env = {"UPSTREAM_URL": stub_url, "REDIS_CACHE_URL": redis.url(),
               "CACHE_KEY_SECRET": "soak-only-secret-0123456789", "LOG_LEVEL": "warning"}
        proxies = []
        for _ in range(2):
            p, url = start_python("proxy", ["--config", str(ROOT / "config.yaml"),
                                            "--port", "0"], env=env)
            procs.append(p)
            proxies.append((p, url))
        before = {"proxy_rss_mib": [round(rss_mib(p.pid), 1) for p, _ in proxies],
                  "redis_used_memory": int(redis.client().info("memory")["used_memory"])}
        print(f"soak: {seconds:.0f} s, a Redis fault every {fault_every:.0f} s, two proxies, "
              f"four users" + (f", maxmemory {maxmemory} {policy}" if maxmemory else "") + "\n")
        stop_faults = asyncio.Event()
        fault_report = workload.Report()
        faults = asyncio.ensure_future(workload.inject_faults(
            redis, fault_report, stop_faults, every_s=fault_every, seed=11))
        evictions = Evictions(redis)
        counting = asyncio.ensure_future(evictions.follow(stop_faults))
        started = time.monotonic()
        try:
            result = await workload.run([u for _, u in proxies], stub_url, ops=max_requests,
                                        seconds=seconds, workers_per_user=4, seed=5,
                                        spread=bool(maxmemory))
        finally:
            stop_faults.set()
            await faults
            await counting
        elapsed = time.monotonic() - started
        if redis.proc is None:
            redis.start(redis.port)
        after = {"proxy_rss_mib": [round(rss_mib(p.pid), 1) for p, _ in proxies],
                 "redis_used_memory": int(redis.client().info("memory")["used_memory"])}
        report = {
            "seconds": round(elapsed, 1), "requests": result.requests,
            "requests_per_s": round(result.requests / elapsed, 1), "reads": result.reads,
            "writes": result.writes, "errors": result.errors,
            "stale_reads": result.stale_reads, "cross_user_reads": result.cross_user_reads,
            "outcomes": dict(result.outcomes), "faults": dict(fault_report.faults),
            "memory_before": before, "memory_after": after, "problems": result.problems,
        }
        if maxmemory:
            evictions.sample()
            report["memory_pressure"] = {"maxmemory": maxmemory, "policy": policy,
                                         "evicted_keys": evictions.total}
        for k, v in report.items():
            print(f"{k:>18}: {v}")
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        name = "soak-memory.json" if maxmemory else "soak.json"
        (out / name).write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {out / name}")
        bad = result.errors or result.stale_reads or result.cross_user_reads
        return 1 if bad else 0
    finally:
        for p in procs:
            stop(p)
        redis.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
