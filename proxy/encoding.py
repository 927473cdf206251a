"""Bodies stored compressed: gzip, at the speed of ISA-L (``isal``), chosen by measurement
(``make bench-codecs``: on the stub's JSON, level 1 keeps 0.15 of a 12 KB page in 16 µs and
reads it back in 13 µs; zstd is a little smaller but fewer clients accept it, and gzip is
sent as it is stored to nearly every client). Pure.

A body the proxy compressed is sent as it is to clients that accept gzip (with
``Content-Encoding: gzip``, ``Vary: Accept-Encoding`` and a weakened ETag, as nginx's gzip
does: the compressed bytes are another representation) and decompressed for the others.
A body the upstream encoded itself is stored and sent as it came.
"""

from __future__ import annotations

import functools

from isal import igzip

from .policy import Headers, get_first, split_list

GZIP = "gzip"
LEVEL = 1
_COMPRESSIBLE = ("json", "text/", "xml", "javascript", "csv", "yaml", "graphql")


def worth_compressing(headers: Headers, body: bytes, min_bytes: int) -> bool:
    """Not encoded already, large enough, and of a textual type."""
    if min_bytes <= 0 or len(body) < min_bytes:
        return False
    encoding = get_first(headers, "content-encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        return False
    ctype = (get_first(headers, "content-type") or "").lower()
    return any(t in ctype for t in _COMPRESSIBLE)


def compress(body: bytes) -> bytes:
    # mtime=0: the same body always gives the same bytes.
    return igzip.compress(body, LEVEL, mtime=0)


def decompress(body: bytes) -> bytes:
    plain: bytes = igzip.decompress(body)  # type: ignore[no-untyped-call]
    return plain


@functools.lru_cache(maxsize=512)  # clients send a handful of different values
def accepts_gzip(accept_encoding: str | None) -> bool:
    """RFC 9110 §12.5.3: gzip (or ``*``) listed with a q-value above 0."""
    if not accept_encoding:
        return False
    star = False
    for member in split_list([accept_encoding]):
        coding, _, params = member.partition(";")
        coding = coding.strip().lower()
        q = params.replace(" ", "").lower()
        refused = q.startswith("q=") and q[2:].rstrip("0").rstrip(".") in ("", "0")
        if coding in ("gzip", "x-gzip"):
            return not refused
        if coding == "*":
            star = not refused
    return star


def weakened(etag: str) -> str:
    return etag if etag.startswith("W/") else "W/" + etag


def with_vary(headers: Headers, name: str) -> str:
    """The Vary value of ``headers`` with ``name`` added (once)."""
    names = split_list([v for k, v in headers if k.lower() == "vary"])
    if any(n.lower() == name.lower() for n in names) or "*" in names:
        return ", ".join(names)
    return ", ".join([*names, name])

