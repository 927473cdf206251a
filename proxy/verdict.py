"""The fetch verdict: what a fill does with the upstream's answer. Pure.

    on_response(keyed, head, stale, validate, ...) -> Store | Uncacheable | Revalidated
                                                      | Stale | Refetch
    on_body(store, body, complete)                 -> Store (with its body) | Uncacheable
    tagged(store, keyed, headers)                  -> Store (with its tags) | Uncacheable
    on_error(keyed, stale, error, now)             -> Stale | Error

``Store`` and ``Revalidated`` carry the entry as it will be kept; ``Uncacheable`` is streamed
to the client as it comes; ``Stale`` answers from the stored entry instead (stale-if-error);
``Refetch`` asks again without validators (a 304 that does not select the stored response).
A ``Store`` whose tags are sure to fit (``entry_tags_bound``) leaves them for ``tagged``, after
the answer: expanding them is several percent of a miss's own time on a cold machine (README,
"Performance").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from . import encoding, policy
from .config import CacheConfig
from .entry import Entry
from .errors import UpstreamError
from .invalidation import MAX_TAGS_PER_ENTRY, SURROGATE_HEADERS, entry_tags, entry_tags_bound
from .outcome import CacheStatus, Outcome
from .plan import Keyed, template_context
from .routes import TemplateContext

# Reasons that belong to one request (its credentials, its no-store), not to the URL: they
# do not make later requests skip coalescing (hit-for-miss).
_REQUEST_REASONS = frozenset({"authorization", "request-no-store"})
_NO_TEMPLATE = TemplateContext()  # a route without tag templates reads nothing of it


class ResponseHead(Protocol):
    """What the verdict reads of an upstream response before its body."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def request_time(self) -> float: ...
    @property
    def response_time(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Store:
    """Keep it: read the body (up to the size limit), save, answer from it."""

    entry: Entry
    ttl: float  # seconds in the store
    tagged: bool = True  # False: entry.tags is empty until ``tagged``; never saved so


@dataclass(frozen=True, slots=True)
class Uncacheable:
    """Stream it through; nothing is stored."""

    reason: str

    @property
    def remembered(self) -> bool:
        """Worth a hit-for-miss marker: later requests for the key skip the queue."""
        return self.reason not in _REQUEST_REASONS


@dataclass(frozen=True, slots=True)
class Revalidated:
    """A 304 confirmed the stored response: keep it with the 304's fields, answer from it."""

    entry: Entry
    ttl: float  # <= 0: confirmed, but not worth storing again


@dataclass(frozen=True, slots=True)
class Stale:
    """Answer from the stored (stale) entry instead of the upstream's failure."""

    entry: Entry
    age: float
    status: CacheStatus


@dataclass(frozen=True, slots=True)
class Refetch:
    """A 304 whose validator does not select the stored response: fetch without validators."""


@dataclass(frozen=True, slots=True)
class Error:
    """The upstream failed and nothing stored may stand in."""

    error: UpstreamError


Verdict = Store | Uncacheable | Revalidated | Stale | Refetch


def on_response(keyed: Keyed, head: ResponseHead, stale: Entry | None, *, validate: bool,
                cfg: CacheConfig, now: float) -> Verdict:
    if head.status == 304 and validate and stale is not None:
        if not policy.validator_matches(stale.headers, head.headers):
            return Refetch()
        merged = policy.merge_304(stale.headers, head.headers)
        fresh = make_entry(keyed, stale.status, merged, head, cfg, body=stale.body)
        # The variant and the body's encoding stay the stored ones; tags come from the
        # merged headers.
        fresh = replace(fresh, vary=stale.vary, encoded=stale.encoded)
        return Revalidated(fresh, _storage_ttl(fresh, keyed, cfg))
    if head.status >= 500 and stale is not None and \
            policy.may_serve_stale_on_error(stale.facts(), keyed.directives, now):
        return _stale(stale, now, head.status)
    ok = policy.storable(status=head.status, request_headers=list(keyed.headers.items()),
                         response_headers=head.headers, route=keyed.route,
                         user_scope=keyed.route.scope == "user",
                         credential_header=cfg.identity.header)
    if not ok.storable:
        return Uncacheable(ok.reason)
    now_tagged = entry_tags_bound(keyed.route, keyed.path, head.headers) > MAX_TAGS_PER_ENTRY
    entry = make_entry(keyed, head.status, head.headers, head, cfg, tagged=now_tagged)
    if len(entry.tags) > MAX_TAGS_PER_ENTRY:
        return Uncacheable("too-many-tags")
    ttl = _storage_ttl(entry, keyed, cfg)
    if ttl <= 0:
        return Uncacheable("stale-on-arrival")
    if head.content_length is not None and head.content_length > cfg.max_body_bytes:
        return Uncacheable("too-large")
    return Store(entry, ttl, now_tagged)


def on_body(store: Store, body: bytes, complete: bool, *,
            compress_min_bytes: int = 0) -> Store | Uncacheable:
    """The whole body arrived (or did not fit): it is stored compressed when that is worth
    it (``encoding``)."""
    if not complete:
        return Uncacheable("too-large")
    entry = store.entry
    if encoding.worth_compressing(entry.headers, body, compress_min_bytes):
        packed = entry.with_body(encoding.compress(body), encoding.GZIP)
        packed.remember_plain(body)
        return Store(packed, store.ttl, store.tagged)
    return Store(entry.with_body(body, entry.encoded), store.ttl, store.tagged)


def tagged(store: Store, keyed: Keyed, headers: list[tuple[str, str]]) -> Store | Uncacheable:
    """The entry with its tags, when ``on_response`` left them for later (``headers``: the
    upstream's response fields). Their bound said they fit; they are counted again anyway."""
    if store.tagged:
        return store
    tags = _tags(keyed, headers)
    if len(tags) > MAX_TAGS_PER_ENTRY:
        return Uncacheable("too-many-tags")
    return Store(store.entry.with_tags(tags), store.ttl)


def on_error(keyed: Keyed, stale: Entry | None, error: UpstreamError,
             now: float) -> Stale | Error:
    if stale is not None and \
            policy.may_serve_stale_on_error(stale.facts(), keyed.directives, now):
        return _stale(stale, now, None)
    return Error(error)


def stored_status(entry: Entry, outcome: Outcome, *, now: float, stored: bool, why: str,
                  fwd_status: int, fwd: str | None = None) -> CacheStatus:
    """The cache status of an answer made from what was just fetched (and maybe stored)."""
    return CacheStatus(outcome, why, ttl=entry.lifetime - entry.age(now), stored=stored,
                       fwd_status=fwd_status, fwd=fwd)


def make_entry(keyed: Keyed, status: int, headers: list[tuple[str, str]], head: ResponseHead,
               cfg: CacheConfig, body: bytes = b"", *, tagged: bool = True) -> Entry:
    """The entry a response becomes: its storable fields, freshness, tags (unless not
    ``tagged``: none yet) and variant."""
    route = keyed.route
    fr = policy.freshness(status=status, response_headers=headers, route=route,
                          default_ttl_s=cfg.default_ttl_s, response_time=head.response_time)
    tags = _tags(keyed, headers) if tagged else ()
    return Entry(
        status=status,
        # Stored ready to send: Surrogate-Key and Cache-Tag are read (tags) and dropped, and
        # so is the targeted field aimed at this proxy alone (RFC 9213).
        headers=tuple(policy.stored_fields(
            headers, head.response_time,
            drop=(cfg.targeted_field,
                  *(() if cfg.keep_surrogate_headers else SURROGATE_HEADERS)))),
        body=body,
        request_time=head.request_time,
        response_time=head.response_time,
        initial_age=policy.corrected_initial_age(headers, head.request_time,
                                                 head.response_time),
        lifetime=fr.lifetime,
        stale_while_revalidate=fr.stale_while_revalidate,
        stale_if_error=fr.stale_if_error,
        no_cache=fr.no_cache,
        forbid_stale=fr.forbid_stale,
        url=keyed.path + ("?" + keyed.query if keyed.query else ""),
        route=route.name,
        tags=tags,
        vary=tuple((n, keyed.value_of(n)) for n in policy.vary_names(headers)),
    )


def _tags(keyed: Keyed, headers: list[tuple[str, str]]) -> tuple[str, ...]:
    route = keyed.route
    template = template_context(keyed.query_args(), keyed.headers.items(), keyed.params,
                                keyed.user) if route.tags else _NO_TEMPLATE
    return entry_tags(route=route, path=keyed.path, query=keyed.query, scope=keyed.scope,
                      ctx=template, response_headers=headers)


def _storage_ttl(entry: Entry, keyed: Keyed, cfg: CacheConfig) -> float:
    return policy.storage_ttl(entry.facts(), keyed.route.keep_s, cfg.max_entry_ttl_s)


def _stale(entry: Entry, now: float, fwd_status: int | None) -> Stale:
    age = entry.age(now)
    return Stale(entry, age, CacheStatus(Outcome.STALE, "stale-if-error",
                                         ttl=entry.lifetime - age, fwd_status=fwd_status))
