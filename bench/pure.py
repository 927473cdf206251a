"""``make bench-pure``: the pure steps of a fill in a loop, in microseconds.

What the proxy computes for a miss without any I/O (``plan``, ``verdict``, ``policy``): the read
plan of a request (route, key), the verdict on the upstream's response (storable, freshness,
tags, the entry), the body attached (gzip-compressed for storage) and the fields its client is
sent. The response is the stub's 12.5 KB page, fetched once. Warm caches, one process: it
shows what a change to the pure cores costs or saves, not what a miss costs on a cold machine
(``make bench-steps``). Three rounds of COUNT iterations, the median of the three; loopback
only, bounded.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import NamedTuple
from urllib.parse import parse_qsl

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import policy, verdict
from proxy.config import load_config
from proxy.plan import Keyed, Planner
from tests.procs import ROOT, start_python, stop

from .run import HEADERS, PAGE, _get

COUNT = min(int(os.environ.get("BENCH_PURE_COUNT", "20000")), 1_000_000)
ROUNDS = 3


class Head(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    content_length: int | None
    request_time: float
    response_time: float


def fetch_page() -> tuple[list[tuple[str, str]], bytes]:
    stub, url = start_python("upstream_stub", ["--port", "0", "--latency-scale", "0"])
    try:
        status, headers, body = _get(url + PAGE)
        assert status == 200, status
        return list(headers.items()), body
    finally:
        stop(stub)


def main() -> int:
    fields, body = fetch_page()
    config = load_config(ROOT / "config.yaml", env={})
    planner = Planner(config)
    path, _, query = PAGE.partition("?")
    request_headers = CIMultiDictProxy(CIMultiDict(
        {"Host": "127.0.0.1", "User-Agent": "curl/8", "Accept": "*/*", **HEADERS}))

    def one(i: int) -> None:
        q = f"{query}&miss={i}"
        plan = planner.read(path=path, raw_path=path, query=q,
                            query_args=lambda: dict(parse_qsl(q)), headers=request_headers,
                            cookie=None, has_body=False)
        assert isinstance(plan, Keyed)
        now = time.time()
        v = verdict.on_response(plan, Head(200, fields, len(body), now, now), None,
                                validate=False, cfg=config.cache, now=now)
        assert isinstance(v, verdict.Store), v
        kept = verdict.on_body(v, body, True,
                               compress_min_bytes=config.cache.compress_min_bytes)
        assert isinstance(kept, verdict.Store)
        policy.fetched_fields(fields, now)

    one(-1)
    rounds = []
    for r in range(ROUNDS):
        t = time.perf_counter()
        for i in range(COUNT):
            one(r * COUNT + i)
        rounds.append((time.perf_counter() - t) / COUNT * 1e6)
    print(f"the pure steps of a fill (plan, verdict, body gzipped, the client's fields), "
          f"{COUNT} iterations, {ROUNDS} rounds: "
          + ", ".join(f"{x:.1f}" for x in rounds)
          + f" µs; median {statistics.median(rounds):.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
