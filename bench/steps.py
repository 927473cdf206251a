"""``make bench-steps``: where the time of a sequential miss goes, step by step.

Starts a private redis-server, the stub (no latency) and the proxy with ``config.yaml`` under
``bench/steps_proxy.py`` (the proxy unchanged, with timestamps at the steps of a fill). On
two or more cores it lays them out as the side-by-side benchmark does: the proxy and Redis on
core 0, the stub and the client on core 1. Then COUNT rounds, each a ``curl`` straight to the
stub and one through the proxy (URLs of their own, a new connection each, as the side-by-side
benchmark's misses), with Redis's SLOWLOG recording every command's own time. Prints the
median of each step inside the proxy, the miss overhead over the direct request, what the
lookup and save scripts cost inside Redis, and, for comparison, what a GET, a script that
only returns 1 and the lookup script cost there after a 10 ms idle gap each; writes
``bench/results/steps.json``.
Loopback only; bounded in count.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis as redis_py

from proxy import scripts
from proxy.layout import Layout
from proxy.store import MARKER_TTL_MS
from tests.procs import ROOT, RedisServer, stop

from . import pinned
from .interleave import curl_ms
from .run import HEADERS, PAGE

COUNT = min(int(os.environ.get("BENCH_STEPS_COUNT", "200")), 5000)  # bounded
WARM = 30
PAUSED = 100  # calls per command in the cold-script comparison
PAUSE_S = 0.01  # the idle gap before each of them, as between sequential misses

# (from, to, what happens in between); the stamps are set by bench/steps_proxy.py.
STEPS = [
    ("start", "lookup_asked", "plan, L1 miss, the lookup asked for"),
    ("lookup_asked", "lookup_sent", "the lookup batched (a turn of the loop) and written"),
    ("lookup_sent", "lookup_answered", "the lookup's round trip to Redis"),
    ("lookup_answered", "upstream_asked", "decision, coalescing lead, the upstream request's head"),
    ("upstream_asked", "upstream_answered", "the upstream's answer (its header section)"),
    ("upstream_answered", "verdict_done", "the verdict: storable, freshness, tags, the entry"),
    ("verdict_done", "answer_start", "the body, the compression decision, the answer's fields"),
    ("answer_start", "write_start", "the answer built"),
    ("write_start", "written", "the answer written"),
]


def _curl_ms(url: str) -> float:
    return curl_ms(url, HEADERS, pinned.CLIENT)


def cold_costs(client: redis_py.Redis) -> dict[str, float]:
    """Median time inside Redis (SLOWLOG) of a GET, of a script that only returns 1 and of
    the lookup script on a key with nothing stored, each called after an idle gap."""
    lookup = client.script_load(scripts.LOOKUP)
    trivial = client.script_load("return 1")
    shard = Layout("bench-steps", 1).shards[0]  # the store's key names, as Store._lookup
    calls: dict[str, Callable[[int], Any]] = {
        "GET": lambda i: client.get(shard.entry(str(i))),
        "a script that returns 1": lambda i: client.evalsha(trivial, 0),
        "the lookup script, nothing stored": lambda i: client.evalsha(
            lookup, 3, shard.entry(str(i)), shard.marker, shard.lock(str(i)), shard.prefix,
            "token", 1000, MARKER_TTL_MS, 0),
    }
    out = {}
    for name, call in calls.items():
        client.slowlog_reset()
        for i in range(PAUSED):
            time.sleep(PAUSE_S)
            call(i)
        spans = [int(e["duration"]) for e in client.slowlog_get(PAUSED * 2)
                 if e["command"].split()[0].upper() in (b"GET", b"EVALSHA")]
        out[name] = statistics.median(spans)
    return out


def main() -> int:
    if shutil.which("curl") is None:
        print("make bench-steps needs curl", file=sys.stderr)
        return 2
    redis = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="jsoncache-bench-steps-"))
    out = tmp / "stamps.json"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        stub_url, proxy_url = pinned.start(redis, procs, "bench.steps_proxy",
                                           {"JSONCACHE_STEPS_OUT": str(out)})
        proxy = procs[-1]
        for i in range(WARM):
            _curl_ms(f"{proxy_url}{PAGE}&warm={i}")
        client = redis.client()
        client.config_set("slowlog-max-len", COUNT * 8)
        client.slowlog_reset()
        client.config_set("slowlog-log-slower-than", 0)
        direct, through = [], []
        for i in range(COUNT):
            direct.append(_curl_ms(f"{stub_url}{PAGE}&direct={i}"))
            through.append(_curl_ms(f"{proxy_url}{PAGE}&miss={i}"))
        by_keys: dict[int, list[int]] = {}
        for e in client.slowlog_get(COUNT * 8):
            words = e["command"].split()
            if words and words[0].upper() == b"EVALSHA":
                by_keys.setdefault(int(words[2]), []).append(int(e["duration"]))
        cold = cold_costs(client)
        client.config_set("slowlog-log-slower-than", 10000)
        client.close()
        stop(proxy)
        procs.remove(proxy)
        stamps = json.loads(out.read_text())[-COUNT:]
    finally:
        for p in procs:
            stop(p)
        redis.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for a, b, what in STEPS:
        spans = [(s[b] - s[a]) / 1000 for s in stamps if a in s and b in s]
        rows.append((what, statistics.median(spans) if spans else float("nan"), len(spans)))
    inside = statistics.median((s["written"] - s["start"]) / 1000 for s in stamps)
    d, t = statistics.median(direct), statistics.median(through)
    # The lookup script takes 3 keys, the save 4 (scripts.py).
    lookup_us = statistics.median(by_keys[3]) if by_keys.get(3) else float("nan")
    save_us = statistics.median(by_keys[4]) if by_keys.get(4) else float("nan")
    print(f"{COUNT} sequential misses, a connection each (medians): through the proxy "
          f"{t:.3f} ms, direct {d:.3f} ms, overhead {t - d:+.3f} ms")
    print("| step inside the proxy | µs |\n|---|---|")
    for what, us, _ in rows:
        print(f"| {what} | {us:.0f} |")
    print(f"| from the request's handler to its answer written | {inside:.0f} |")
    print(f"inside Redis (SLOWLOG): the lookup script {lookup_us:.0f} µs, "
          f"the save script {save_us:.0f} µs")
    print(f"after a {PAUSE_S * 1000:.0f} ms pause each, inside Redis: " + ", ".join(
        f"{name} {us:.0f} µs" for name, us in cold.items()))
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "steps.json").write_text(json.dumps({
        "count": COUNT, "direct_ms": d, "proxy_ms": t, "overhead_ms": t - d,
        "steps_us": {what: us for what, us, _ in rows}, "inside_us": inside,
        "lookup_script_us": lookup_us, "save_script_us": save_us,
        "after_a_pause_us": cold}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
