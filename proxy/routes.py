"""Matching a request to a configured route, and expanding tag templates. Pure: no I/O.

A match is written ``"METHODS /path"``: ``"GET /transactions"``, ``"GET,HEAD /x/{id}"``,
``"* /*"`` (every method, every path), ``"PUT /transactions/{id}"``, ``"GET /api/*"``.
``{name}`` captures one path segment; a trailing ``*`` matches any rest (including nothing).

A template is text with placeholders: ``session:{query.session_id}``, ``txn:{path.id}``,
``user:{user}``, ``s:{request.json.session_id}``, ``s:{response.json.items.0.session_id}``,
``v:{header.x-api-version}``. A placeholder that resolves to a list yields one value per item;
``{query.session_id|all}`` gives ``all`` when the parameter is missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

_METHOD_RE = re.compile(r"^[A-Z][A-Z0-9_-]*$")
_PARAM_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_DEFAULT_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")

TEMPLATE_SOURCES = ("query", "path", "user", "request.json", "response.json", "header")
# Keeps one write from fanning out into an unbounded number of tags.
MAX_EXPANSIONS = 1000


@dataclass(frozen=True, slots=True)
class Param:
    name: str


Segment = str | Param


@dataclass(frozen=True, slots=True)
class MatchSpec:
    """A parsed ``"METHODS /path"`` pattern."""

    raw: str
    methods: frozenset[str] | None  # None: any method
    segments: tuple[Segment, ...]
    wildcard: bool  # a trailing "*" matches the rest of the path

    def allows(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def match_path(self, path: str) -> dict[str, str] | None:
        parts = _split(path)
        n = len(self.segments)
        if len(parts) < n or (len(parts) > n and not self.wildcard):
            return None
        params: dict[str, str] = {}
        for seg, part in zip(self.segments, parts, strict=False):
            if isinstance(seg, Param):
                if part == "":
                    return None
                params[seg.name] = part
            elif seg != part:
                return None
        return params

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if not self.allows(method):
            return None
        return self.match_path(path)


def _split(path: str) -> list[str]:
    if not path.startswith("/"):
        return [path]
    return path[1:].split("/") if path != "/" else []


def parse_match(text: str) -> MatchSpec:
    """Parse ``"GET /transactions/{id}"``; raises ValueError with a reason."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError('must look like "GET /path"')
    pieces = text.split()
    if len(pieces) == 1:
        method_part, path = "*", pieces[0]
    elif len(pieces) == 2:
        method_part, path = pieces
    else:
        raise ValueError('must look like "GET /path" (one space between methods and path)')
    methods: frozenset[str] | None
    if method_part == "*":
        methods = None
    else:
        names = [m.strip().upper() for m in method_part.split(",")]
        for m in names:
            if not _METHOD_RE.match(m):
                raise ValueError(f"invalid method {m!r}")
        methods = frozenset(names)
    if not path.startswith("/"):
        raise ValueError("path must start with '/'")
    parts = _split(path)
    wildcard = False
    if parts and parts[-1] == "*":
        wildcard = True
        parts = parts[:-1]
    segments: list[Segment] = []
    seen: set[str] = set()
    for part in parts:
        if "*" in part:
            raise ValueError("'*' is only allowed as the last segment")
        param = _PARAM_RE.match(part)
        if param:
            if param.group(1) in seen:
                raise ValueError(f"path parameter {param.group(1)!r} appears twice")
            seen.add(param.group(1))
            segments.append(Param(param.group(1)))
        elif "{" in part or "}" in part:
            raise ValueError(f"invalid path segment {part!r}; use {{name}} for a whole segment")
        else:
            segments.append(part)
    return MatchSpec(raw=text, methods=methods, segments=tuple(segments), wildcard=wildcard)


# ---------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True, slots=True)
class Placeholder:
    source: str  # one of TEMPLATE_SOURCES
    path: tuple[str, ...]  # field names below the source; empty for {user}
    default: str | None = None  # used when the value is missing


@dataclass(frozen=True, slots=True)
class Template:
    raw: str
    parts: tuple[str | Placeholder, ...]

    @property
    def sources(self) -> frozenset[str]:
        return frozenset(p.source for p in self.parts if isinstance(p, Placeholder))


def parse_template(text: str, allowed: Sequence[str] = TEMPLATE_SOURCES) -> Template:
    """Parse ``"session:{query.session_id}"``; raises ValueError with a reason."""
    if not isinstance(text, str) or not text:
        raise ValueError("must be a non-empty string")
    parts: list[str | Placeholder] = []
    pos = 0
    for m in _PLACEHOLDER_RE.finditer(text):
        literal = text[pos : m.start()]
        if "{" in literal or "}" in literal:
            raise ValueError("unbalanced braces")
        if literal:
            parts.append(literal)
        parts.append(_parse_placeholder(m.group(1), allowed))
        pos = m.end()
    rest = text[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError("unbalanced braces")
    if rest:
        parts.append(rest)
    if any(c.isspace() for c in text):
        raise ValueError("must not contain whitespace")
    return Template(raw=text, parts=tuple(parts))


def _parse_placeholder(text: str, allowed: Sequence[str]) -> Placeholder:
    body, bar, default = text.partition("|")
    if bar and not _DEFAULT_RE.match(default):
        raise ValueError(f"invalid default in {{{text}}}; use letters, digits, '_.:-'")
    p = _parse_source(body, allowed)
    return Placeholder(p.source, p.path, default if bar else None)


def _parse_source(body: str, allowed: Sequence[str]) -> Placeholder:
    if body == "user":
        if "user" not in allowed:
            raise ValueError("{user} is not available here")
        return Placeholder("user", ())
    for source in ("request.json", "response.json", "query", "path", "header"):
        if body.startswith(source + "."):
            if source not in allowed:
                raise ValueError(f"{{{source}.…}} is not available here")
            rest = body[len(source) + 1 :]
            names = _json_path(rest) if source.endswith("json") else (rest,)
            if not all(n == EACH or (n and _NAME_RE.match(n)) for n in names):
                raise ValueError(f"invalid placeholder {{{body}}}")
            if source == "header":
                names = (names[0].lower(),)
            return Placeholder(source, names)
    raise ValueError(
        f"unknown placeholder {{{body}}}; use one of "
        "{query.X}, {path.X}, {user}, {header.X}, {request.json.X}, {response.json.X}"
    )


EACH = "[*]"  # a JSON path step over every item of a list: {response.json.sessions[*].id}


def _json_path(text: str) -> tuple[str, ...]:
    """``sessions[*].id`` -> ("sessions", "[*]", "id"); ``[*]`` only at the end of a name."""
    names: list[str] = []
    for name in text.split("."):
        if name.endswith(EACH):
            names += [name[: -len(EACH)], EACH]
        else:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True, slots=True)
class TemplateContext:
    """What placeholders resolve against; the caller parses JSON bodies only when needed."""

    query: Mapping[str, str] = field(default_factory=dict)
    path: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-cased names
    request_json: Any = None
    response_json: Any = None


def expand(template: Template, ctx: TemplateContext,
           encode: Callable[[str], str] | None = None) -> list[str] | None:
    """All values of ``template`` in ``ctx`` (every combination when placeholders have several
    values); None when any placeholder cannot be resolved. ``encode`` is applied to each
    placeholder's value (URL templates percent-encode them), never to the literal parts."""
    results = [""]
    for part in template.parts:
        if isinstance(part, str):
            results = [r + part for r in results]
            continue
        values = _resolve(part, ctx)
        if not values and part.default is not None:
            values = [part.default]
        if not values:
            return None
        if encode is not None:
            values = [encode(v) for v in values]
        results = [r + v for r in results for v in values]
        if len(results) > MAX_EXPANSIONS:
            return None
    return results


def _resolve(p: Placeholder, ctx: TemplateContext) -> list[str]:
    if p.source == "user":
        return [ctx.user] if ctx.user else []
    if p.source == "query":
        return _scalar(ctx.query.get(p.path[0]))
    if p.source == "path":
        return _scalar(ctx.path.get(p.path[0]))
    if p.source == "header":
        return _scalar(ctx.headers.get(p.path[0]))
    doc = ctx.request_json if p.source == "request.json" else ctx.response_json
    return _scalar(_walk(doc, p.path))


_MISSING = object()


def _walk(doc: Any, path: tuple[str, ...]) -> Any:
    cur = doc
    for name in path:
        if name == EACH:
            if not isinstance(cur, list):
                return _MISSING
            continue  # the next name is collected from each item, as below
        if isinstance(cur, Mapping):
            cur = cur.get(name, _MISSING)
        elif isinstance(cur, list) and name.isdigit() and int(name) < len(cur):
            cur = cur[int(name)]
        elif isinstance(cur, list) and not name.isdigit():
            # Walking into a list of objects collects the field from each item.
            collected = [_walk(item, (name,)) for item in cur]
            cur = [c for c in collected if c is not _MISSING]
        else:
            return _MISSING
        if cur is _MISSING:
            return _MISSING
    return cur


def _scalar(value: Any) -> list[str]:
    if value is None or value is _MISSING or value == "":
        return []
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, str | int | float):
        return [str(value)]
    if isinstance(value, list):
        out: list[str] = []
        for v in value:
            out.extend(_scalar(v))
        return list(dict.fromkeys(out))
    return []


# ---------------------------------------------------------------------------------------------
# A generic first-match router over anything that carries a MatchSpec.

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Matched(Generic[T]):
    item: T
    params: dict[str, str]


class Router(Generic[T]):
    """First match wins, in configuration order."""

    def __init__(self, items: Sequence[tuple[MatchSpec, T]]) -> None:
        self._items = tuple(items)

    def match(self, method: str, path: str) -> Matched[T] | None:
        for spec, item in self._items:
            params = spec.match(method, path)
            if params is not None:
                return Matched(item, params)
        return None

    def match_all(self, method: str, path: str) -> list[Matched[T]]:
        out = []
        for spec, item in self._items:
            params = spec.match(method, path)
            if params is not None:
                out.append(Matched(item, params))
        return out
