"""Load generation for benchmarks: wrk when installed, else a bounded asyncio client.

Every run is bounded in time and in requests, and only ever targets loopback addresses.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class Result:
    tool: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int

    def row(self) -> str:
        return (f"{self.rps:10.0f} req/s   p50 {self.p50_ms:8.2f} ms   p99 {self.p99_ms:8.2f} ms"
                f"   ({self.requests} requests, {self.errors} errors, {self.tool})")


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load {host!r}: benchmarks only target loopback")


def run(url: str, headers: dict[str, str], *, seconds: float, connections: int,
        max_requests: int, prefer_wrk: bool = True, unique: bool = False) -> Result:
    """Load ``url``; ``unique``: every request with a query parameter of its own (misses)."""
    _check_loopback(url)
    if prefer_wrk and shutil.which("wrk"):
        return _wrk(url, headers, seconds, connections, unique)
    return asyncio.run(_python(url, headers, seconds, connections, max_requests, unique))


# Each request its own URL: "<path>&n=<counter>" (wrk runs it per thread: counters differ).
_UNIQUE_LUA = """
local counter = 0
local thread_id = 0
function setup(thread) thread_id = thread_id + 1; thread:set("tid", thread_id) end
function request()
  counter = counter + 1
  return wrk.format(nil, wrk.path .. "&n=" .. tid .. "-" .. counter)
end
"""


_DURATION = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk duration {text!r}")
    return float(m.group(1)) * _DURATION[m.group(2)]


def _wrk(url: str, headers: dict[str, str], seconds: float, connections: int,
         unique: bool) -> Result:
    args = ["wrk", "--latency", "-t", "2", "-c", str(connections), "-d", f"{seconds:.0f}s",
            "--timeout", "5s"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if unique:
            script.write(_UNIQUE_LUA)
            script.flush()
            args += ["-s", script.name]
        out = subprocess.run([*args, url], capture_output=True, text=True,
                             timeout=seconds + 30, check=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return Result("wrk", total, seconds, rps, p50, p99, errors)


async def _python(url: str, headers: dict[str, str], seconds: float, connections: int,
                  max_requests: int, unique: bool) -> Result:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    issued = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal issued, errors
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                t = time.perf_counter()
                try:
                    async with session.get(url + f"&n={issued}" if unique else url) as resp:
                        await resp.read()
                        if resp.status >= 400:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Result("python-aiohttp", len(latencies), elapsed, len(latencies) / elapsed,
                  q[49] * 1000, q[98] * 1000, errors)
