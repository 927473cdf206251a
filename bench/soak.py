"""``make soak``: minutes of the model-based workload with Redis faults, through two proxy
processes, with a report.

Starts a private redis-server, the stub (latency scaled to 1%: a few milliseconds per
request) and two proxies with config.yaml; runs tests/workload.py (users reading and writing,
every answer checked against the stub's ground truth) for SOAK_SECONDS (180), injecting a
short Redis fault (freeze, DEBUG SLEEP, kill and restart, CLIENT PAUSE) every SOAK_FAULT_S
(5) seconds. Bounded in time and in requests (SOAK_MAX_REQUESTS, 2,000,000); loopback only.

Reports requests, errors, stale reads, cross-user reads, cache outcomes, and the memory of
the proxies and of Redis before and after; writes bench/results/soak.json. Exit status 1 when
any request failed or any read was stale or crossed users.
"""

from __future__ import annotations

import asyncio
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


async def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "180"))
    fault_every = float(os.environ.get("SOAK_FAULT_S", "5"))
    max_requests = int(os.environ.get("SOAK_MAX_REQUESTS", "2000000"))
    redis = RedisServer().start()
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
              f"four users\n")
        stop_faults = asyncio.Event()
        fault_report = workload.Report()
        faults = asyncio.ensure_future(workload.inject_faults(
            redis, fault_report, stop_faults, every_s=fault_every, seed=11))
        started = time.monotonic()
        try:
            result = await workload.run([u for _, u in proxies], stub_url, ops=max_requests,
                                        seconds=seconds, workers_per_user=4, seed=5)
        finally:
            stop_faults.set()
            await faults
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
        for k, v in report.items():
            print(f"{k:>18}: {v}")
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "soak.json").write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {out / 'soak.json'}")
        bad = result.errors or result.stale_reads or result.cross_user_reads
        return 1 if bad else 0
    finally:
        for p in procs:
            stop(p)
        redis.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
