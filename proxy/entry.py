"""A stored response and its compact form in the store. Pure: no I/O.

An entry is kept in Redis as a hash with the fields ``m`` (metadata: JSON, deflated against a
preset dictionary, see ``pack_meta``), ``b`` (the body,
raw bytes, never re-encoded), ``g`` (its tags' generations, written and read by the store's
scripts only) and, after a soft purge, ``p`` (the purge time in milliseconds).
A primary key whose responses ``Vary`` holds a marker instead: a hash with the field ``v``
(the varying header names); a key whose last response was uncacheable holds ``h``
(hit-for-miss). Keeping the body out of the JSON spares a base64 round trip on every hit.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from isal import isal_zlib

from .encoding import decompress
from .errors import EntryCorrupt
from .policy import StoredFacts, current_age, fresh_until, get_first

FORMAT_VERSION = 1

# The metadata is stored deflated (raw deflate) against a preset dictionary of what nearly every
# entry's metadata repeats: its JSON keys in order, common header names and values, the
# implicit tags. For the stub's 100-item page that is 629 -> 238 bytes, a tenth of what the
# entry holds. The first byte names the dictionary; metadata that starts with "{" is plain JSON
# (what earlier versions stored) and is still read. Never edit a dictionary: entries deflated
# with it must stay readable; a better one gets a marker of its own.
META_DEFLATED_1 = b"\x01"
META_DICT_1 = (
    b'"Content-Language","Content-Location","Link","Access-Control-Allow-Origin","*"],'
    b'["Expires","Last-Modified","Vary","Accept, Accept-Encoding","Content-Encoding","gzip"],'
    b'["X-Request-ID","Age","0"],["Pragma","no-cache"],["Cache-Control","public, max-age=60'
    b', s-maxage=","stale-while-revalidate=","stale-if-error=","must-revalidate","no-cache",'
    b'"private, max-age=","Jan 20","Feb 20","Mar 20","Apr 20","May 20","Jun 20","Jul 20",'
    b'"Aug 20","Sep 20","Oct 20","Nov 20","Dec 20","Mon, ","Tue, ","Wed, ","Thu, ","Fri, ",'
    b'"Sat, ","Sun, ","nginx","Python/3 aiohttp/3","~scope:","~path:/","~route:","url:"'
    b'{"v":1,"s":200,"h":[["Content-Type","application/json; charset=utf-8"],["ETag","W/\\"'
    b'"],["Cache-Control","private"],["Date","'
    b' GMT"],["Server","'
    b'"]],"rq":1,"rs":1,"ia":0.0,"lt":300.0,"swr":0.0,"sie":0.0,"nc":false,"fs":false,"u":"/'
    b'","r":"","t":["url:","~route:","~scope:","~path:/","vy":[],"ce":"gzip"}'
)
_META_MAX = 1 << 20  # a metadata that inflates beyond this is corrupt, not read on


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    request_time: float
    response_time: float
    initial_age: float
    lifetime: float
    stale_while_revalidate: float
    stale_if_error: float
    no_cache: bool
    forbid_stale: bool
    url: str  # path and query as requested, for admin views and logs
    route: str
    tags: tuple[str, ...]
    vary: tuple[tuple[str, str | None], ...] = ()  # (name, normalised request value)
    purged_at: float | None = None
    encoded: str = ""  # "gzip": the proxy compressed the body (the headers do not say so)
    # Derived once (policy.fresh_until): the hit path compares a clock with it, nothing more.
    fresh_until: float = field(init=False, compare=False, repr=False)
    # The freshness facts, derived once: a fill asks for them three times before it answers.
    _facts: StoredFacts = field(init=False, compare=False, repr=False)
    # The decompressed body of an encoded entry, once some client needed it.
    plain_memo: bytes | None = field(default=None, init=False, compare=False, repr=False)
    # What delivery prepares once per entry (the header section ready to copy), by variant.
    ready: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        facts = StoredFacts(
            initial_age=self.initial_age,
            response_time=self.response_time,
            lifetime=self.lifetime,
            stale_while_revalidate=self.stale_while_revalidate,
            stale_if_error=self.stale_if_error,
            no_cache=self.no_cache,
            forbid_stale=self.forbid_stale,
            has_validators=get_first(self.headers, "etag") is not None or
            get_first(self.headers, "last-modified") is not None,
            purged_at=self.purged_at,
        )
        object.__setattr__(self, "_facts", facts)
        object.__setattr__(self, "fresh_until", fresh_until(facts))

    def plain(self) -> bytes:
        """The body as the upstream sent it."""
        if not self.encoded:
            return self.body
        if self.plain_memo is None:
            object.__setattr__(self, "plain_memo", decompress(self.body))
        assert self.plain_memo is not None
        return self.plain_memo

    def remember_plain(self, body: bytes) -> None:
        """The body before the proxy compressed it (spares decompressing it again)."""
        object.__setattr__(self, "plain_memo", body)

    @property
    def has_validators(self) -> bool:
        return self._facts.has_validators

    def facts(self) -> StoredFacts:
        return self._facts

    def with_body(self, body: bytes, encoded: str = "") -> Entry:
        """The same response with another body (``encoded``: how the proxy encoded it).
        Cheaper than ``dataclasses.replace``, which a fill would pay before its answer."""
        return Entry(status=self.status, headers=self.headers, body=body,
                     request_time=self.request_time, response_time=self.response_time,
                     initial_age=self.initial_age, lifetime=self.lifetime,
                     stale_while_revalidate=self.stale_while_revalidate,
                     stale_if_error=self.stale_if_error, no_cache=self.no_cache,
                     forbid_stale=self.forbid_stale, url=self.url, route=self.route,
                     tags=self.tags, vary=self.vary, purged_at=self.purged_at,
                     encoded=encoded)

    def with_tags(self, tags: tuple[str, ...]) -> Entry:
        """The same response filed under ``tags`` (a fill computes them after its answer).
        Tags derive nothing: the other fields are copied as they are, derived ones included,
        rather than derived again by ``__init__``."""
        other = object.__new__(Entry)
        for name in _KEPT_BY_TAGS:
            object.__setattr__(other, name, getattr(self, name))
        object.__setattr__(other, "tags", tags)
        object.__setattr__(other, "ready", {})
        return other

    def age(self, now: float) -> float:
        """Current age (RFC 9111 §4.2.3)."""
        return current_age(self.initial_age, self.response_time, now)

    def meta_bytes(self) -> bytes:
        """The metadata as stored: JSON, deflated (``pack_meta``)."""
        return pack_meta(self.meta_json())

    def meta_json(self) -> bytes:
        return json.dumps({
            "v": FORMAT_VERSION,
            "s": self.status,
            "h": self.headers,
            "rq": self.request_time,
            "rs": self.response_time,
            "ia": self.initial_age,
            "lt": self.lifetime,
            "swr": self.stale_while_revalidate,
            "sie": self.stale_if_error,
            "nc": self.no_cache,
            "fs": self.forbid_stale,
            "u": self.url,
            "r": self.route,
            "t": self.tags,
            "vy": self.vary,
            "ce": self.encoded,
        }, separators=(",", ":"), ensure_ascii=False).encode()


_KEPT_BY_TAGS = tuple(f.name for f in fields(Entry) if f.name not in ("tags", "ready"))


@dataclass(frozen=True, slots=True)
class VaryMarker:
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HitForMiss:
    """The last response for this key was uncacheable: go straight upstream for a while."""

    reason: str


Stored = Entry | VaryMarker | HitForMiss


def decode(fields: Mapping[bytes, bytes]) -> Stored | None:
    """The stored value from a hash's fields; None for an empty hash; EntryCorrupt otherwise."""
    if not fields:
        return None
    if b"v" in fields:
        text = fields[b"v"].decode("latin-1")
        return VaryMarker(tuple(n for n in text.split(",") if n))
    if b"h" in fields:
        return HitForMiss(fields[b"h"].decode("latin-1"))
    meta_raw = fields.get(b"m")
    body = fields.get(b"b")
    if meta_raw is None or body is None:
        raise EntryCorrupt("entry without metadata or body")
    purged = fields.get(b"p")
    return decode_entry(meta_raw, body, int(purged) / 1000.0 if purged else None)


def decode_entry(meta_raw: bytes, body: bytes, purged_at: float | None) -> Entry:
    """An entry from its metadata and body; EntryCorrupt when the metadata is unusable."""
    try:
        m = json.loads(unpack_meta(meta_raw))
        if m.get("v") != FORMAT_VERSION:
            raise EntryCorrupt(f"unknown entry format {m.get('v')!r}")
        return Entry(
            status=int(m["s"]),
            headers=tuple((str(k), str(v)) for k, v in m["h"]),
            body=body,
            request_time=float(m["rq"]),
            response_time=float(m["rs"]),
            initial_age=float(m["ia"]),
            lifetime=float(m["lt"]),
            stale_while_revalidate=float(m["swr"]),
            stale_if_error=float(m["sie"]),
            no_cache=bool(m["nc"]),
            forbid_stale=bool(m["fs"]),
            url=str(m["u"]),
            route=str(m["r"]),
            tags=tuple(str(t) for t in m["t"]),
            vary=tuple((str(n), None if v is None else str(v)) for n, v in m["vy"]),
            purged_at=purged_at,
            encoded=str(m.get("ce", "")),
        )
    except EntryCorrupt:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, zlib.error) as e:
        raise EntryCorrupt(f"undecodable entry: {type(e).__name__}") from None


def pack_meta(meta_json: bytes) -> bytes:
    # ISA-L at level 1, as for bodies: ~81k instructions a fill against 139k for zlib at
    # level 6 (238 against 231 bytes for the stub's page). Read back with zlib: plain raw
    # deflate either way.
    c = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15, zdict=META_DICT_1)
    return META_DEFLATED_1 + c.compress(meta_json) + c.flush()


def unpack_meta(meta_raw: bytes) -> bytes:
    """The metadata's JSON; EntryCorrupt for a marker this version does not know."""
    if meta_raw[:1] == b"{":
        return meta_raw
    if meta_raw[:1] != META_DEFLATED_1:
        raise EntryCorrupt("unknown metadata encoding")
    d = zlib.decompressobj(-15, zdict=META_DICT_1)  # the largest window reads any
    plain = d.decompress(memoryview(meta_raw)[1:], _META_MAX)
    if not d.eof or d.unconsumed_tail or d.unused_data:
        raise EntryCorrupt("truncated, oversized or trailing metadata")
    return plain
