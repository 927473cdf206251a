"""The proxy's own small error tree.

Every layer that talks to the outside world translates foreign exceptions (redis-py, aiohttp,
yaml) into one of these, so that `flow` decides on a fallback by kind, never by library.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(ProxyError):
    """A configuration file or value is invalid; the message names the key and the value."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        # One line, whatever the file contains: a key with control characters is quoted.
        shown = key if key.isprintable() else repr(key)
        super().__init__(f"{shown} = {value!r}: {reason}")


class StoreError(ProxyError):
    """The cache store failed; callers fall back to the upstream."""

    kind = "error"


class StoreUnavailable(StoreError):
    """Redis could not be reached, timed out, or the circuit breaker is open."""

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind
        super().__init__(f"redis {kind}: {detail}" if detail else f"redis {kind}")


class EntryCorrupt(StoreError):
    """A stored value could not be decoded; it is treated as a miss and removed."""

    kind = "corrupt"


class UpstreamError(ProxyError):
    """The upstream failed; the client gets a short JSON error (or a stale entry)."""

    status = 502
    kind = "error"


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "timeout"


class UpstreamUnavailable(UpstreamError):
    """Connection refused, DNS failure, or the connection pool is exhausted."""

    status = 502
    kind = "unavailable"


class UpstreamBusy(UpstreamError):
    """Every upstream connection the proxy may open is in use and none freed up in time."""

    status = 503
    kind = "busy"


class UpstreamBroken(UpstreamError):
    """The upstream reset the connection or sent something that is not HTTP."""

    status = 502
    kind = "broken"


class BadRequest(ProxyError):
    """The client's request cannot be handled; answered with a 4xx."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)
