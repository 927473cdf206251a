"""``make bench-gaps``: the miss overhead as a function of the idle gap before each miss.

The side-by-side benchmark's misses are sequential ``curl``s, so each arrives after an idle
gap (curl's own start-up). On a virtual machine, an idle virtual CPU halts, unless the
guest's halt polling keeps it polling for a while, and waking it takes an exit to the host;
meanwhile its core's caches may have served other work. That cost falls on every process of
the path, and more on a Python one, whose path touches more memory than nginx's. This
benchmark separates it from the proxy's own cost.

Starts a private redis-server, the stub (no latency) and the proxy with ``config.yaml``, laid
out as the side-by-side benchmark (proxy and Redis on core 0, stub and client on core 1, when
there are two cores). For each gap in ``GAPS_MS``: ROUNDS rounds of one request straight to
the stub and one through the proxy (URLs of their own, a new connection each, from one
Python client: no process start-up in between), sleeping the gap before each request. Then,
once more with the largest gap, with a spinner at the lowest priority on each core, which
keeps the virtual CPUs from halting (and yields to the benchmark's processes).
Prints the medians and the overhead per gap; writes ``bench/results/gaps.json``.
Loopback only; bounded in count and time.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from tests.procs import ROOT, RedisServer, stop

from . import pinned
from .run import HEADERS, PAGE

ROUNDS = min(int(os.environ.get("BENCH_GAPS_ROUNDS", "200")), 2000)  # bounded
GAPS_MS = (0, 1, 5, 20)
WARM = 30
SPIN_S = 60  # the spinners' own bound (they are stopped when the run ends)

# A KVM guest's haltpoll governor polls this long before halting an idle virtual CPU (the
# kernel's default is 200,000 ns; 0 halts at once).
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def _ms(base: str, target: str) -> float:
    """One GET on a connection of its own: its time to the last byte of a 200."""
    url = urllib.parse.urlsplit(base)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        conn.request("GET", target, headers=HEADERS)
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 200, (base, target, resp.status)
    return (time.perf_counter() - started) * 1000


def _rounds(stub: str, proxy: str, gap_ms: float, tag: str) -> tuple[float, float]:
    """Medians (direct, through the proxy) of ROUNDS interleaved misses after ``gap_ms``."""
    direct, through = [], []
    for i in range(ROUNDS):
        time.sleep(gap_ms / 1000)
        direct.append(_ms(stub, f"{PAGE}&gap={tag}-{i}"))
        time.sleep(gap_ms / 1000)
        through.append(_ms(proxy, f"{PAGE}&gap={tag}-{i}"))
    return statistics.median(direct), statistics.median(through)


def _spinners() -> list[subprocess.Popen[bytes]]:
    """A busy loop at nice 19 on each core, bounded by ``timeout``."""
    cores = range(os.cpu_count() or 1) if pinned.PINNED else [None]
    return [subprocess.Popen(
        [*(("taskset", "-c", str(c)) if c is not None else ()), "timeout", str(SPIN_S),
         "nice", "-n", "19", "sh", "-c", "while :; do :; done"]) for c in cores]


def main() -> int:
    if pinned.PINNED:
        os.sched_setaffinity(0, {1})  # the client, beside the stub
    redis = RedisServer().start()
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[tuple[str, float, float]] = []
    run = f"{time.time():.0f}"
    try:
        stub_url, proxy_url = pinned.start(redis, procs)
        for i in range(WARM):
            _ms(proxy_url, f"{PAGE}&warm={run}-{i}")
        for gap in GAPS_MS:
            rows.append((f"{gap} ms", *_rounds(stub_url, proxy_url, gap, f"{run}-{gap}")))
        spinners = _spinners()
        try:
            gap = GAPS_MS[-1]
            rows.append((f"{gap} ms, CPUs kept from halting",
                         *_rounds(stub_url, proxy_url, gap, f"{run}-spin")))
        finally:
            for s in spinners:
                stop(s)
    finally:
        for p in procs:
            stop(p)
        redis.stop()
    halt_poll = HALT_POLL.read_text().strip() if HALT_POLL.exists() else None
    print(f"sequential misses, a connection each, {ROUNDS} rounds per gap "
          "(medians; the stub and the proxy interleaved); guest halt polling: "
          + (f"{halt_poll} ns" if halt_poll is not None else "not on this machine"))
    print("| idle gap before each request | direct | through the proxy | overhead |")
    print("|---|---|---|---|")
    for name, d, t in rows:
        print(f"| {name} | {d:.3f} ms | {t:.3f} ms | {t - d:+.3f} ms |")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "gaps.json").write_text(json.dumps(
        {"rounds": ROUNDS, "guest_halt_poll_ns": halt_poll,
         "rows": [{"gap": n, "direct_ms": d, "proxy_ms": t, "overhead_ms": t - d}
                  for n, d, t in rows]},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
