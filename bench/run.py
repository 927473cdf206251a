"""``make bench``: cached responses through the proxy against the stub reached directly.

Starts a private redis-server, the stub (twice: with its realistic latency, and with none)
and a proxy in front of each, warms one key, then loads (bounded in time and requests):

* the stub directly, and the proxy's hit for the same URL, with the stub's latency on:
  what a client gains from the cache;
* the same with the stub's latency off: what the proxy costs per request compared with
  a bare aiohttp server returning the same JSON (the baseline for the proxy's overhead).

Reports throughput, p50 and p99, and ratios against the baseline measured in the same run.
Options through the environment: BENCH_SECONDS (5), BENCH_CONNECTIONS (32), BENCH_TOOL
(wrk or python; wrk when installed).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

from tests.procs import RedisServer, start_python, stop

from . import load

ROOT = Path(__file__).resolve().parent.parent
URL_PATH = "/transactions?session_id=alice-s1&page_size=100"
HEADERS = {"Authorization": "Bearer alice-token"}  # example token of the stub's demo user


def _get(url: str) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, headers=HEADERS)
    with urllib.request.urlopen(req, timeout=10) as resp:  # loopback only
        resp.read()
        return resp.status, dict(resp.headers)


def main() -> int:
    seconds = float(os.environ.get("BENCH_SECONDS", "5"))
    conns = int(os.environ.get("BENCH_CONNECTIONS", "32"))
    tool = os.environ.get("BENCH_TOOL", "wrk")
    max_requests = 2_000_000
    procs = []
    redis = RedisServer().start()
    results: dict[str, dict[str, float | str]] = {}
    try:
        env = {"REDIS_CACHE_URL": redis.url(), "LOG_LEVEL": "warning", "LOG_FORMAT": "json",
               "CACHE_KEY_SECRET": "bench-only-secret-0123456789"}
        urls = {}
        for scale in ("1", "0"):
            stub, stub_url = start_python("upstream_stub", ["--port", "0",
                                                            "--latency-scale", scale])
            procs.append(stub)
            proxy, proxy_url = start_python(
                "proxy", ["--config", str(ROOT / "config.yaml"), "--port", "0"],
                env={**env, "UPSTREAM_URL": stub_url})
            procs.append(proxy)
            urls[scale] = (stub_url, proxy_url)
            _get(proxy_url + URL_PATH)  # warm: the benchmark measures hits
            status, headers = _get(proxy_url + URL_PATH)
            assert status == 200
            assert headers.get("X-Cache") == "HIT", headers
        print(f"load: {tool if tool == 'python' else 'wrk if installed'}, {conns} connections, "
              f"{seconds:.0f} s per run, URL {URL_PATH}\n")
        runs = [
            ("stub, realistic latency (direct)", urls["1"][0]),
            ("proxy hit, same stub", urls["1"][1]),
            ("stub, no latency (direct) [baseline]", urls["0"][0]),
            ("proxy hit, same stub", urls["0"][1]),
        ]
        measured = []
        for name, base in runs:
            r = load.run(base + URL_PATH, HEADERS, seconds=seconds, connections=conns,
                         max_requests=max_requests, prefer_wrk=tool != "python")
            measured.append(r)
            print(f"{name:40s} {r.row()}")
            results[name + (" " + base if name.startswith("proxy") else "")] = {
                "rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors,
                "tool": r.tool}
        slow_direct, slow_hit, base_direct, base_hit = measured
        print()
        print(f"cache benefit (realistic upstream): {slow_hit.rps / slow_direct.rps:8.1f}x "
              f"throughput, p50 {slow_direct.p50_ms / max(slow_hit.p50_ms, 1e-6):8.1f}x faster")
        print(f"proxy hit vs bare stub (baseline):  {base_hit.rps / base_direct.rps:8.2f}x "
              f"throughput, p50 {base_hit.p50_ms / max(base_direct.p50_ms, 1e-6):8.2f}x the "
              "latency")
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "hits.json").write_text(json.dumps({
            "seconds": seconds, "connections": conns, "runs": results,
            "ratios": {"benefit_rps": slow_hit.rps / slow_direct.rps,
                       "hit_vs_baseline_rps": base_hit.rps / base_direct.rps,
                       "hit_vs_baseline_p50": base_hit.p50_ms / max(base_direct.p50_ms, 1e-6)},
        }, indent=2))
        print(f"\nwritten to {out / 'hits.json'}")
    finally:
        for p in procs:
            stop(p)
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
