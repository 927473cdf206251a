"""``make bench-parsers``: why hiredis is a dependency. Times an HGETALL of a stored entry
(400 bytes of metadata and a body of 10 kB, 100 kB and 1 MB) with redis-py's pure-Python
reply parser and with hiredis, against a private redis-server, in one run."""

from __future__ import annotations

import asyncio
import sys
import time

import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

from tests.procs import RedisServer

ROUNDS = {10_000: 2000, 100_000: 1000, 1_000_000: 200}


async def _time(url: str, parser: type, size: int) -> float:
    client = aioredis.Redis.from_url(url, parser_class=parser)
    try:
        await client.hset("bench", mapping={"m": b"m" * 400, "b": b"b" * size})
        n = ROUNDS[size]
        started = time.perf_counter()
        for _ in range(n):
            await client.hgetall("bench")
        return (time.perf_counter() - started) / n * 1e6
    finally:
        await client.aclose()


async def main() -> int:
    server = RedisServer().start()
    try:
        print(f"{'body':>10} {'python parser':>15} {'hiredis':>10} {'speed-up':>9}")
        for size in ROUNDS:
            plain = await _time(server.url(), _AsyncRESP2Parser, size)
            fast = await _time(server.url(), _AsyncHiredisParser, size)
            print(f"{size:>10,} {plain:>12.0f} us {fast:>7.0f} us {plain / fast:>8.1f}x")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
