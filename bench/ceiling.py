"""The ceiling for ``make bench``: aiohttp's low-level server on uvloop (what the proxy runs
on) answering every request with one constant response, as fast as aiohttp can answer at
all. ``python -m bench.ceiling --port 0 --body FILE --headers JSON`` prints
``LISTENING http://...`` once ready; loopback only."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

import uvloop
from aiohttp import web


async def serve(port: int, body: bytes, headers: dict[str, str]) -> None:
    async def answer(request: web.BaseRequest) -> web.Response:
        return web.Response(body=body, headers=headers)

    runner = web.ServerRunner(web.Server(answer, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=2048)
    await site.start()
    print(f"LISTENING http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--body", required=True, help="a file with the body to answer")
    ap.add_argument("--headers", default="{}", help="a JSON object of response headers")
    a = ap.parse_args()
    uvloop.run(serve(a.port, Path(a.body).read_bytes(), json.loads(a.headers)))


if __name__ == "__main__":
    main()
