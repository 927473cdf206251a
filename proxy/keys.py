"""The cache key: method, path, normalised query, identity scope and Vary values, hashed. Pure.

Knows nothing of Redis key prefixes: the store places these hashes under its own schema.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

PUBLIC_SCOPE = "public"


def scope_id(secret: bytes, credential: str) -> str:
    """An HMAC of the caller's credential: stable across instances sharing the secret, and
    useless to anyone who reads the store without the secret."""
    return hmac.new(secret, credential.encode("utf-8", "surrogateescape"),
                    hashlib.sha256).hexdigest()[:32]


def normalise_query(raw_query: str) -> str:
    """Parameters sorted by name so that their order does not matter.

    Each ``name=value`` pair is kept byte for byte (no percent-decoding), and repeated names
    keep their relative order, since ``a=1&a=2`` and ``a=2&a=1`` may mean different lists.
    """
    if not raw_query:
        return ""
    pairs = [p for p in raw_query.split("&") if p]
    pairs.sort(key=lambda p: p.partition("=")[0])  # stable: repeated names keep their order
    return "&".join(pairs)


def _digest(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\x00")
    return h.hexdigest()


def primary_key(path: str, query: str, scope: str) -> str:
    """One key per (URL, identity scope); GET and HEAD share it."""
    return _digest("GET", path, normalise_query(query), scope)


def url_tag(path: str, query: str) -> str:
    """A tag on every entry of a URL, whatever its scope and variant (RFC 9111 §4.4)."""
    return "url:" + _digest(path, normalise_query(query))


VaryValues = tuple[tuple[str, str | None], ...]


def variant_key(primary: str, names: Sequence[str],
                value_of: Callable[[str], str | None]) -> tuple[str, VaryValues]:
    """The secondary key for the request's values of the ``Vary`` names, and those values."""
    values = tuple((n, value_of(n)) for n in names)
    parts = []
    for n, v in values:
        parts.append(n)
        parts.append("\x01" if v is None else v)  # absent differs from empty
    return primary + ":" + _digest(*parts), values
