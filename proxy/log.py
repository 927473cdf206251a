"""structlog set-up: JSON lines, or readable console output when attached to a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from .config import LogConfig

# Field names whose values must never reach a log line, whatever a caller passes.
_SECRET_FIELDS = frozenset({"authorization", "cookie", "token", "credential", "password",
                            "secret", "set-cookie"})


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for k in list(event):
        if k.lower() in _SECRET_FIELDS:
            event[k] = "<redacted>"
    return event


def setup(cfg: LogConfig, stream: Any = None) -> None:
    stream = stream if stream is not None else sys.stderr
    level = getattr(logging, cfg.level.upper())
    console = cfg.format == "console" or (cfg.format == "auto" and stream.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    else:
        processors += [structlog.processors.format_exc_info,
                       structlog.processors.JSONRenderer(sort_keys=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through the standard library: route them to the same stream.
    logging.basicConfig(level=max(level, logging.WARNING), stream=stream,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("aiohttp.server").addFilter(_client_errors_are_not_server_errors)


def _client_errors_are_not_server_errors(record: logging.LogRecord) -> bool:
    """aiohttp logs every malformed request (answered 400 by its parser) at ERROR with a
    traceback; that is the client's error, and a flood of them must not flood the logs."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, HttpProcessingError)


def get(name: str) -> Any:
    return structlog.get_logger(name)
