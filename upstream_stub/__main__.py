"""Run the stub: ``python -m upstream_stub --host 127.0.0.1 --port 8001 [--latency-scale 1]``.

Prints ``LISTENING http://HOST:PORT`` on stdout once it accepts connections (``--port 0``
picks a free port), so that scripts and tests can wait for that line instead of sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from .app import create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upstream_stub", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency-scale", type=float, default=1.0,
                        help="multiplies the emulated database latency; 0 turns it off")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.latency_scale < 0:
        parser.error("--latency-scale must be >= 0")
    asyncio.run(_serve(args.host, args.port, args.latency_scale, args.seed))
    return 0


async def _serve(host: str, port: int, scale: float, seed: int) -> None:
    runner = web.AppRunner(create_app(scale, seed), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before LISTENING: a signal right after it
        loop.add_signal_handler(sig, stop.set)   # stops cleanly
    print(f"LISTENING http://{host}:{bound}", flush=True)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
