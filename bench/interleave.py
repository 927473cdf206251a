"""Sequential misses to several servers, interleaved request by request, so that the drifts of
a shared machine fall on all of them alike (the side-by-side benchmark measures one target
after the other). ``python -m bench.interleave NAME=URL ... [--count N]``: for i in 0..N-1,
one ``curl`` to each URL with ``&miss=<run>-<i>`` appended (a URL of its own, a new connection
each, as the side-by-side benchmark's misses), then the median per server and its overhead
over the first one. Loopback URLs only; bounded in count.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit


def curl_ms(url: str, headers: Mapping[str, str] | None = None,
            prefix: Sequence[str] = ()) -> float:
    """One ``curl`` (a connection of its own) to ``url`` with ``headers``, run under
    ``prefix`` (``taskset -c N``, say): the total time of a 200, in milliseconds."""
    fields = [a for k, v in (headers or {}).items() for a in ("-H", f"{k}: {v}")]
    out = subprocess.run([*prefix, "curl", "-s", "-o", "/dev/null", "-w",
                          "%{http_code} %{time_total}", *fields, url],
                         capture_output=True, text=True, timeout=30, check=True)
    code, seconds = out.stdout.split()
    if code != "200":
        raise SystemExit(f"{url}: HTTP {code}")
    return float(seconds) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="+", metavar="NAME=URL")
    ap.add_argument("--count", type=int, default=200)
    a = ap.parse_args()
    targets = dict(t.split("=", 1) for t in a.targets)
    for url in targets.values():
        if urlsplit(url).hostname not in ("127.0.0.1", "::1", "localhost"):
            raise SystemExit(f"loopback only: {url}")
    run = f"{time.time():.0f}"
    times: dict[str, list[float]] = {name: [] for name in targets}
    for i in range(min(a.count, 10_000)):
        for name, url in targets.items():
            sep = "&" if "?" in url else "?"
            times[name].append(curl_ms(f"{url}{sep}miss={run}-{i}"))
    first = statistics.median(next(iter(times.values())))
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:12s} {m:7.3f} ms  {m - first:+.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
