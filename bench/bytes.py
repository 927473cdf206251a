"""``make bench-bytes``: what Redis holds per raw JSON byte as the cache grows, by kind of key.

Starts a private redis-server, the stub (no latency) and a proxy with config.yaml, then stores
distinct 100-item pages through the proxy in steps (``BENCH_BYTES_STEPS``, default
300,300,400,1000,2000,4000,8000: 16,000 pages in all, about a minute) and prints, for each
step, the bytes Redis gained per raw JSON byte of the pages stored in it: in all, and for
entries (``e``), tag indexes (``t``) and tag generations (``g``). The figure is not one
number: every page's entry costs the same, but the indexes of the tags that many entries
share (``~all``, ``~route:``, ``~scope:``, ``~path:``, the session's and the user's views)
change encoding as they grow (a sorted set past 128 members leaves Redis's compact
listpack), so their cost per member rises with the population. Writes
bench/results/bytes.json. Loopback only; bounded.
"""

from __future__ import annotations

import json
import os
import subprocess

from tests.procs import ROOT, RedisServer, start_python, stop

from .run import held_by_kind, proxy_env, store_pages

KINDS = ("e", "t", "g")


def main() -> int:
    steps = [int(s) for s in
             os.environ.get("BENCH_BYTES_STEPS", "300,300,400,1000,2000,4000,8000").split(",")]
    redis = RedisServer().start()
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, float]] = []
    try:
        stub, stub_url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
        procs.append(stub)
        proxy, url = start_python("proxy", ["--config", str(ROOT / "config.yaml"), "--port",
                                            "0"], env=proxy_env(redis.url(), stub_url))
        procs.append(proxy)
        r = redis.client()
        before = held_by_kind(r)
        stored = 0
        print("| pages stored | bytes per raw byte | entries | tag indexes | generations |")
        print("|---|---|---|---|---|")
        for step in steps:
            raw = store_pages(url, step, f"b{stored}")
            now = held_by_kind(r)
            gained = {k: (now[k] - before[k]) / raw for k in KINDS}
            total = (now.total() - before.total()) / raw
            rows.append({"from": stored, "to": stored + step, "per_raw_byte": round(total, 3),
                         **{k: round(v, 3) for k, v in gained.items()}})
            print(f"| {stored:,} to {stored + step:,} | {total:.3f} | {gained['e']:.3f} | "
                  f"{gained['t']:.3f} | {gained['g']:.3f} |")
            stored += step
            before = now
    finally:
        for p in procs:
            stop(p)
        redis.stop()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "bytes.json").write_text(json.dumps({"steps": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
