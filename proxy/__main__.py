"""The command line: ``python -m proxy --config config.yaml [--host H] [--port P]``.

Exit status 2 with one line naming the key and the value when the configuration is bad.
Prints ``LISTENING http://HOST:PORT`` on stdout once it accepts connections (``--port 0``
picks a free port), so scripts and tests wait for that line instead of sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from . import __version__
from . import log as logsetup
from .app import ProxyRunner, create_admin_app, create_app
from .config import Config, ConfigError, load_config, redacted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy",
                                     description="A caching reverse proxy for JSON APIs.")
    parser.add_argument("--config", default=os.environ.get("PROXY_CONFIG", "config.yaml"),
                        help="YAML configuration file (default: $PROXY_CONFIG or config.yaml)")
    parser.add_argument("--host", help="address to listen on (overrides server.host)")
    parser.add_argument("--port", type=int, help="port to listen on; 0 picks a free one")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("PROXY_WORKERS", "1")),
                        help="worker processes sharing the port (SO_REUSEPORT); default 1")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (secrets redacted) and exit")
    parser.add_argument("--print-schema", action="store_true",
                        help="print the JSON Schema of the configuration file and exit")
    parser.add_argument("--version", action="version", version=f"jsoncache {__version__}")
    args = parser.parse_args(argv)
    if args.print_schema:
        from .schema import config_schema

        print(json.dumps(config_schema(), indent=2))
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"config OK: {config.source}: {len(config.routes)} routes, "
              f"{len(config.invalidate)} invalidation rules, {len(config.prewarm)} prewarm rules")
        return 0
    if args.print_config:
        print(json.dumps(redacted(config), indent=2))
        return 0
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    logsetup.setup(config.log)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1:
        if config.admin.port is not None:
            print("config error: admin.port cannot be used with --workers (use the proxy "
                  "port for admin routes)", file=sys.stderr)
            return 2
        from .workers import supervise

        return supervise(args.workers, host, port, ["--config", args.config])
    loop_factory = None
    if os.environ.get("JSONCACHE_LOOP", "uvloop") == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(config, host, port, args.reuse_port))
    return 0


async def _serve(config: Config, host: str, port: int, reuse_port: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # First: whoever reads LISTENING (make run, a supervisor, a test) may signal at once,
        # and asyncio's own SIGINT handler would end the run with a traceback.
        loop.add_signal_handler(sig, stop.set)
    app = create_app(config)
    # What exists now (modules, the config, the application) lives as long as the process:
    # out of the cyclic collector's sight, a full collection walks only what requests made
    # (its pauses had set the p99 of misses under load). Frozen before any connection opens,
    # as a connection dropped on a reconnect can be a cycle the collector must still free.
    gc.collect()
    gc.freeze()
    runner = ProxyRunner(app, access_log=None, handle_signals=False,
                         shutdown_timeout=config.server.shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048, reuse_port=reuse_port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    admin_runner = None
    if config.admin.port is not None:
        admin_runner = web.AppRunner(create_admin_app(app), access_log=None,
                                     handle_signals=False)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, host, config.admin.port).start()
        admin_port = admin_runner.addresses[0][1] if admin_runner.addresses else 0
        print(f"LISTENING-ADMIN http://{host}:{admin_port}", flush=True)
    print(f"LISTENING http://{host}:{bound}", flush=True)
    await stop.wait()
    # Stop accepting, let in-flight requests finish (up to shutdown_timeout_s), then close
    # Redis and the upstream session (cleanup_ctx).
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
