"""``make bench-client``: the miss overhead with the lean upstream client and with aiohttp's,
interleaved in one run.

Starts a private redis-server, the stub (no latency) and two proxies with config.yaml in
front of it, one with ``upstream.lean_client`` on, one with it off. Then, for ROUNDS rounds,
sends PER_ROUND sequential misses (URLs of their own, a new connection each) to the stub
directly and to each proxy in turn, so that the machine's drifts fall on all three alike.
Prints the medians, each proxy's overhead over the direct request and the CPU time each
proxy's event loop spent per miss (from /proc: less noisy than latency on a shared machine).
Loopback only; every loop is bounded in count.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.procs import ROOT, RedisServer, start_python, stop

from .run import PAGE, _get, proxy_env

ROUNDS = 10
PER_ROUND = 25


def _cpu_ms(pid: int | None) -> float:
    """CPU time the process has run so far (the scheduler's nanoseconds), 0 without one."""
    if pid is None:
        return 0.0
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e6


def main() -> int:
    redis = RedisServer().start()
    procs = []
    tmp = Path(tempfile.mkdtemp(prefix="jsoncache-bench-client-"))
    try:
        stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
        procs.append(stub)
        env = proxy_env(redis.url(), stub_url)
        targets = {"direct": stub_url}
        pids = {}
        for name, lean in (("lean client", True), ("aiohttp client", False)):
            cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
            cfg.setdefault("upstream", {})["lean_client"] = lean
            path = tmp / f"lean-{lean}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            proc, url = start_python("proxy", ["--config", str(path), "--port", "0"], env=env)
            procs.append(proc)
            targets[name] = url
            pids[name] = proc.pid
        times: dict[str, list[float]] = {name: [] for name in targets}
        cpu = dict.fromkeys(targets, 0.0)
        for r in range(ROUNDS):
            for name, base in targets.items():
                before = _cpu_ms(pids.get(name))
                for i in range(PER_ROUND):
                    t = time.perf_counter()
                    status, headers, _ = _get(f"{base}{PAGE}&ab={name[0]}{r}-{i}")
                    times[name].append((time.perf_counter() - t) * 1000)
                    assert status == 200
                    assert name == "direct" or headers["X-Cache"] == "MISS", headers
                cpu[name] += _cpu_ms(pids.get(name)) - before
        direct = statistics.median(times["direct"])
        print(f"{ROUNDS} rounds x {PER_ROUND} sequential misses each, a connection each, "
              "medians:")
        for name, samples in times.items():
            med = statistics.median(samples)
            extra = "" if name == "direct" else (
                f"   +{med - direct:.2f} ms over direct, "
                f"{cpu[name] / (ROUNDS * PER_ROUND):.2f} ms of the proxy's CPU a miss")
            print(f"  {name:16s} {med:6.2f} ms{extra}")
    finally:
        for p in procs:
            stop(p)
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
