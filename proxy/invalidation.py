"""Turning a response into the tags it is filed under, and a write or an admin call into the
tags to drop. Pure, except ``Pending``, which only keeps state in memory.

Tags an entry carries:

* ``url:<hash>``: its URL, whatever the identity scope or variant (RFC 9111 §4.4).
* ``~route:<name>``, ``~scope:<id>`` (user-scoped routes) and ``~path:<prefix>`` for each
  path prefix (``/a``, ``/a/b``): what admins purge by.
* the route's ``tags`` templates, expanded against the request;
* the members of the upstream's ``Surrogate-Key`` / ``Cache-Tag`` response headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .config import InvalidateRule, RouteConfig
from .keys import url_tag
from .policy import Headers, get_all
from .routes import Matched, TemplateContext, expand

SURROGATE_HEADERS = ("surrogate-key", "cache-tag")
MAX_TAGS_PER_ENTRY = 256
MAX_TAG_LENGTH = 200


# Whitespace (as str.isspace) and control characters: one regex search rather than a test
# per character (it was a fifth of a fill's verdict).
_NOT_IN_TAG = re.compile(r"[\s\x00-\x1f]")


def clean_tag(tag: str) -> str | None:
    tag = tag.strip()
    if not tag or len(tag) > MAX_TAG_LENGTH or _NOT_IN_TAG.search(tag):
        return None
    return tag


def surrogate_keys(headers: Headers) -> list[str]:
    out: list[str] = []
    for name in SURROGATE_HEADERS:
        for value in get_all(headers, name):
            for member in value.replace(",", " ").split():
                tag = clean_tag(member)
                if tag and not tag.startswith("~"):
                    out.append(tag)
    return out


def path_prefix_tags(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["~path:/" + "/".join(parts[: i + 1]) for i in range(min(len(parts), 8))]


def entry_tags(
    *,
    route: RouteConfig,
    path: str,
    query: str,
    scope: str | None,
    ctx: TemplateContext,
    response_headers: Headers,
) -> tuple[str, ...]:
    tags = [url_tag(path, query), "~route:" + route.name]
    if route.scope == "user" and scope:
        tags.append("~scope:" + scope)
    tags += path_prefix_tags(path)
    for template in route.tags:
        for value in expand(template, ctx) or ():
            tag = clean_tag(value)
            if tag:
                tags.append(tag)
    tags += surrogate_keys(response_headers)
    # Never truncated: an entry missing one of its tags would survive that tag's purge.
    # The caller refuses to store an entry with more than MAX_TAGS_PER_ENTRY.
    return tuple(dict.fromkeys(tags))


def entry_tags_bound(route: RouteConfig, path: str, response_headers: Headers) -> int:
    """At most how many tags ``entry_tags`` gives for this response, without expanding
    anything: a fill whose bound is within MAX_TAGS_PER_ENTRY computes its tags after its
    answer. A route's templates may only use single-valued sources (the config allows the
    query, path parameters, headers and the identity), so each gives one tag at most; were
    that ever not so, the count after the answer refuses to store (``verdict.tagged``)."""
    bound = 3 + min(path.count("/"), 8) + len(route.tags)  # url, route, scope; path prefixes
    for name in SURROGATE_HEADERS:
        for value in get_all(response_headers, name):
            bound += len(value.replace(",", " ").split())
    return bound


@dataclass(frozen=True, slots=True)
class WriteTags:
    tags: tuple[str, ...]
    unresolved: tuple[str, ...] = ()  # templates that could not be expanded


def same_origin_target(value: str | None, origins: Iterable[str]) -> tuple[str, str] | None:
    """(path, query) of a ``Location`` / ``Content-Location`` on this origin, else None."""
    if not value:
        return None
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return None
    if (parts.scheme or parts.netloc) and \
            (parts.scheme not in ("http", "https") or parts.netloc.lower() not in origins):
        return None
    if not parts.path.startswith("/"):
        return None
    return parts.path, parts.query


def write_tags(
    *,
    path: str,
    query: str,
    response_headers: Headers,
    origins: Iterable[str],
    rules: Sequence[Matched[InvalidateRule]],
    ctx: TemplateContext,
) -> WriteTags:
    """What a successful write makes stale: its own URL, same-origin ``Location`` and
    ``Content-Location`` (RFC 9111 §4.4), and the tags its matching rules name."""
    origin_set = {o.lower() for o in origins}
    tags = [url_tag(path, query)]
    for name in ("location", "content-location"):
        for value in get_all(response_headers, name):
            target = same_origin_target(value, origin_set)
            if target is not None:
                tags.append(url_tag(*target))
    unresolved: list[str] = []
    for matched in rules:
        rule_ctx = TemplateContext(query=ctx.query, path=matched.params, user=ctx.user,
                                   headers=ctx.headers, request_json=ctx.request_json,
                                   response_json=ctx.response_json)
        for template in matched.item.tags:
            values = expand(template, rule_ctx)
            if values is None:
                unresolved.append(template.raw)
                continue
            tags += [t for t in (clean_tag(v) for v in values) if t]
    return WriteTags(tuple(dict.fromkeys(tags)), tuple(unresolved))


# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Pending:
    """Invalidations that could not reach Redis, kept until they are replayed.

    Until then an entry that carries one of these tags and was fetched before the failed
    invalidation is not served: a client that was told its write succeeded never reads what
    that write made stale. Past ``limit`` tags, everything fetched before the oldest
    unreplayed invalidation is distrusted instead (``floor``).
    """

    limit: int = 10_000
    tags: dict[str, float] = field(default_factory=dict)  # tag -> time of the failed purge
    floor: float | None = None  # distrust every entry fetched before this time

    def __bool__(self) -> bool:
        return bool(self.tags) or self.floor is not None

    def __len__(self) -> int:
        return len(self.tags)

    def add(self, tags: Iterable[str], at: float) -> None:
        for tag in tags:
            self.tags[tag] = max(at, self.tags.get(tag, at))
        if len(self.tags) > self.limit:
            self.floor = max(self.floor or 0.0, max(self.tags.values()))
            self.tags.clear()

    def blocks(self, entry_tags: Iterable[str], fetched_at: float) -> bool:
        if self.floor is not None and fetched_at <= self.floor:
            return True
        if not self.tags:
            return False
        return any(fetched_at <= self.tags.get(t, -1.0) for t in entry_tags)

    def snapshot(self) -> Mapping[str, float]:
        return dict(self.tags)

    def done(self, tag: str, at: float) -> None:
        """``tag`` was purged; forget it unless a newer failed purge came in meanwhile."""
        if self.tags.get(tag, at + 1) <= at:
            del self.tags[tag]

    def floor_done(self, at: float) -> None:
        if self.floor is not None and self.floor <= at:
            self.floor = None
