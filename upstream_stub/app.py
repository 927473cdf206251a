"""A realistic stand-in for the transactions backend, plus test hooks.

API (Bearer-token auth, JSON, ETags, per-endpoint latency emulating database work):
    GET  /transactions?session_id=&category=&page=&page_size=
    GET  /summary?session_id=            GET /category-summary?session_id=
    GET  /sessions                       GET /rules
    PUT  /transactions/{id}              POST /bulk-categorise

Test hooks (no auth, never behind the proxy in production):
    X-Stub-Answer-Late-Ms: N             on a write: commit it, then wait N ms before
                                         answering (a backend that commits after the
                                         proxy gave up)
    GET  /__stats, POST /__stats/reset   request counters per endpoint
    PUT  /__program/{name}               choose status, headers, body, delay of /p/{name}
                                         ("held": answer only once an in-process test
                                         releases it)
    GET  /__program/{name}               what /p/{name} received
    *    /p/{name}[/...]                 the programmed response
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .data import CATEGORIES, Dataset, Session, User

# Seconds of emulated database work per endpoint (the seed measured 380-850 ms uncached).
DEFAULT_LATENCY = {
    "GET /transactions": 0.45,
    "GET /summary": 0.85,
    "GET /category-summary": 0.70,
    "GET /sessions": 0.38,
    "GET /rules": 0.40,
    "PUT /transactions/{id}": 0.50,
    "POST /bulk-categorise": 0.80,
}

MAX_PAGE_SIZE = 1000


@dataclass
class Program:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""
    delay_ms: int = 0
    answer_304: bool = True  # answer If-None-Match / If-Modified-Since with 304 when they match
    close_mid_body: bool = False
    # "close": the connection closed before any response byte; "reset": reset (RST) instead
    cut_before_response: str = ""
    reflect: list[str] = field(default_factory=list)  # request headers echoed into the body
    count: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    # Set when a request arrives: in-process tests await it instead of polling.
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # held: each request waits (after its delay) until an in-process test sets ``release``,
    # so that a test decides when the upstream answers instead of guessing a delay.
    held: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)


STATS = web.AppKey("stats", Counter)
DATA = web.AppKey("data", Dataset)
SCALE = web.AppKey("latency_scale", float)
PROGRAMS = web.AppKey("programs", dict)
LOCK = web.AppKey("lock", asyncio.Lock)


def create_app(latency_scale: float = 1.0, seed: int = 7) -> web.Application:
    app = web.Application()
    app[STATS] = Counter()
    app[DATA] = Dataset(seed=seed)
    app[SCALE] = latency_scale
    app[PROGRAMS] = {}
    app[LOCK] = asyncio.Lock()
    app.router.add_get("/transactions", _transactions)
    app.router.add_get("/summary", _summary)
    app.router.add_get("/category-summary", _category_summary)
    app.router.add_get("/sessions", _sessions)
    app.router.add_get("/rules", _rules)
    app.router.add_put("/transactions/{id}", _update_transaction)
    app.router.add_post("/bulk-categorise", _bulk_categorise)
    app.router.add_get("/__stats", _stats)
    app.router.add_post("/__stats/reset", _stats_reset)
    app.router.add_get("/__health", _health)
    app.router.add_put("/__program/{name}", _program_set)
    app.router.add_get("/__program/{name}", _program_get)
    app.router.add_route("*", "/p/{name}", _programmed)
    app.router.add_route("*", "/p/{name}/{rest:.*}", _programmed)
    return app


# ---------------------------------------------------------------------------------------------
# helpers


async def _enter(request: web.Request, endpoint: str) -> User:
    """Count the request, authenticate it, and spend the endpoint's emulated latency."""
    request.app[STATS][endpoint] += 1
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    user = request.app[DATA].user_for(token.strip()) if scheme.lower() == "bearer" else None
    if user is None:
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": "unauthorized",
                             "message": "a valid Bearer token is required"}),
            content_type="application/json", headers={"WWW-Authenticate": 'Bearer realm="api"'})
    delay = DEFAULT_LATENCY.get(endpoint, 0.0) * request.app[SCALE]
    if delay > 0:
        await asyncio.sleep(delay)
    return user


def _json(request: web.Request, payload: Any, status: int = 200,
          cacheable: bool = True) -> web.Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"}
    if cacheable:
        etag = '"' + hashlib.sha1(body).hexdigest()[:20] + '"'
        headers["ETag"] = etag
        headers["Cache-Control"] = "private"
        inm = request.headers.get("If-None-Match")
        if inm and etag in [t.strip() for t in inm.split(",")]:
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "private"})
    return web.Response(status=status, body=body, headers=headers)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        text=json.dumps({"error": code, "message": message}))


def _session_arg(request: web.Request, user: User) -> tuple[list[Session], str | None]:
    sid = request.query.get("session_id")
    if sid is None:
        return request.app[DATA].visible_sessions(user), None
    session = request.app[DATA].session(user, sid)
    if session is None:
        raise web.HTTPNotFound(content_type="application/json",
                               text=json.dumps({"error": "not_found",
                                                "message": f"no session {sid}"}))
    return [session], sid


def _version(request: web.Request, user: User, sid: str | None,
             sessions: list[Session]) -> int:
    """The version that covers a view: its session's, else the user's (all users' for the
    superuser)."""
    if sid is not None:
        return sessions[0].version
    data = request.app[DATA]
    if user.superuser:
        return sum(u.data_version for u in data.users.values())
    return user.data_version


# ---------------------------------------------------------------------------------------------
# the API


async def _transactions(request: web.Request) -> web.Response:
    user = await _enter(request, "GET /transactions")
    sessions, sid = _session_arg(request, user)
    category = request.query.get("category")
    try:
        page = int(request.query.get("page", "1"))
        page_size = int(request.query.get("page_size", "100"))
    except ValueError:
        return _error(400, "bad_request", "page and page_size must be integers")
    if page < 1 or not 1 <= page_size <= MAX_PAGE_SIZE:
        return _error(400, "bad_request", f"page >= 1, 1 <= page_size <= {MAX_PAGE_SIZE}")
    txns = [t for s in sessions for t in s.transactions
            if category is None or t.category == category]
    start = (page - 1) * page_size
    return _json(request, {
        "session_id": sid, "category": category, "page": page, "page_size": page_size,
        "total": len(txns), "data_version": _version(request, user, sid, sessions),
        "items": [t.as_json() for t in txns[start:start + page_size]],
    })


async def _summary(request: web.Request) -> web.Response:
    user = await _enter(request, "GET /summary")
    sessions, sid = _session_arg(request, user)
    txns = [t for s in sessions for t in s.transactions]
    income = round(sum(t.amount for t in txns if t.amount > 0), 2)
    expenses = round(sum(t.amount for t in txns if t.amount < 0), 2)
    return _json(request, {
        "session_id": sid, "count": len(txns), "income": income, "expenses": expenses,
        "net": round(income + expenses, 2),
        "uncategorised": sum(1 for t in txns if t.category == "Uncategorised"),
        "first_date": min((t.date for t in txns), default=None),
        "last_date": max((t.date for t in txns), default=None),
        "data_version": _version(request, user, sid, sessions),
    })


async def _category_summary(request: web.Request) -> web.Response:
    user = await _enter(request, "GET /category-summary")
    sessions, sid = _session_arg(request, user)
    totals: dict[str, list[float]] = {}
    for s in sessions:
        for t in s.transactions:
            acc = totals.setdefault(t.category, [0, 0.0])
            acc[0] += 1
            acc[1] += t.amount
    return _json(request, {
        "session_id": sid, "data_version": _version(request, user, sid, sessions),
        "categories": [{"category": c, "count": int(v[0]), "total": round(v[1], 2)}
                       for c, v in sorted(totals.items())],
    })


async def _sessions(request: web.Request) -> web.Response:
    user = await _enter(request, "GET /sessions")
    sessions = request.app[DATA].visible_sessions(user)
    return _json(request, {
        "data_version": _version(request, user, None, sessions),
        "sessions": [{
            "id": s.id, "owner": s.owner, "filename": s.filename, "uploaded_at": s.uploaded_at,
            "transaction_count": len(s.transactions),
            "categorised_count": sum(1 for t in s.transactions if t.category != "Uncategorised"),
        } for s in sessions],
    })


async def _rules(request: web.Request) -> web.Response:
    user = await _enter(request, "GET /rules")
    return _json(request, {"data_version": user.rules_version, "rules": user.rules})


async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(content_type="application/json",
                                 text=json.dumps({"error": "bad_request",
                                                  "message": "body must be JSON"})) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(content_type="application/json",
                                 text=json.dumps({"error": "bad_request",
                                                  "message": "body must be a JSON object"}))
    return body


async def _update_transaction(request: web.Request) -> web.Response:
    user = await _enter(request, "PUT /transactions/{id}")
    body = await _read_json(request)
    category = body.get("category")
    if category not in CATEGORIES:
        return _error(400, "bad_request", f"category must be one of {', '.join(CATEGORIES)}")
    data = request.app[DATA]
    try:
        txn = data.transactions.get(int(request.match_info["id"]))
    except ValueError:
        txn = None
    if txn is None or data.session(user, txn.session_id) is None:
        return _error(404, "not_found", "no such transaction")
    async with request.app[LOCK]:
        txn.category = category
        session = data.session(user, txn.session_id)
        assert session is not None
        owner = data.owner_of(session)
        owner.data_version += 1
        session.version += 1
        versions = {"session": session.version, "user": owner.data_version,
                    "rules": owner.rules_version}
    await _answer_late(request)
    return _json(request, {**txn.as_json(), "data_version": session.version,
                           "versions": versions}, cacheable=False)


async def _bulk_categorise(request: web.Request) -> web.Response:
    user = await _enter(request, "POST /bulk-categorise")
    body = await _read_json(request)
    sid = body.get("session_id")
    rules = body.get("rules")
    if not isinstance(sid, str) or not isinstance(rules, list) or not all(
            isinstance(r, dict) and isinstance(r.get("match"), str) and r["match"]
            and r.get("category") in CATEGORIES for r in rules):
        return _error(400, "bad_request", 'expected {"session_id": "...", '
                      '"rules": [{"match": "...", "category": "..."}]}')
    data = request.app[DATA]
    session = data.session(user, sid)
    if session is None:
        return _error(404, "not_found", f"no session {sid}")
    changed: list[int] = []
    async with request.app[LOCK]:
        for t in session.transactions:
            for r in rules:
                if r["match"].upper() in t.description.upper():
                    if t.category != r["category"]:
                        t.category = r["category"]
                        changed.append(t.id)
                    break
        owner = data.owner_of(session)
        for r in rules:
            rule = {"match": r["match"], "category": r["category"]}
            if rule not in owner.rules:
                owner.rules.append(rule)
        owner.data_version += 1
        owner.rules_version += 1
        session.version += 1
        versions = {"session": session.version, "user": owner.data_version,
                    "rules": owner.rules_version}
    await _answer_late(request)
    return _json(request, {"session_id": sid, "changed": len(changed), "ids": changed,
                           "data_version": session.version, "versions": versions},
                 cacheable=False)


async def _answer_late(request: web.Request) -> None:
    """The write is committed; a test may have asked for the answer to come late."""
    late = request.headers.get("X-Stub-Answer-Late-Ms", "")
    if late.isdigit():
        await asyncio.sleep(int(late) / 1000)


# ---------------------------------------------------------------------------------------------
# test hooks


async def _stats(request: web.Request) -> web.Response:
    counts = request.app[STATS]
    return web.json_response({"total": sum(counts.values()), "by_endpoint": dict(counts)})


async def _stats_reset(request: web.Request) -> web.Response:
    request.app[STATS].clear()
    return web.json_response({"ok": True})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def _cut(request: web.Request, *, reset: bool) -> None:
    """Drop the connection without answering; ``reset``: with an RST (SO_LINGER 0)."""
    transport = request.transport
    assert transport is not None
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.close()


async def _program_set(request: web.Request) -> web.Response:
    spec = await _read_json(request)
    name = request.match_info["name"]
    old = request.app[PROGRAMS].get(name)
    prog = Program(
        status=int(spec.get("status", 200)),
        headers=[(str(k), str(v)) for k, v in spec.get("headers", [])],
        body=str(spec.get("body", "")),
        delay_ms=int(spec.get("delay_ms", 0)),
        held=bool(spec.get("held", False)),
        answer_304=bool(spec.get("answer_304", True)),
        close_mid_body=bool(spec.get("close_mid_body", False)),
        cut_before_response=str(spec.get("cut_before_response", "")),
        reflect=[str(h) for h in spec.get("reflect", [])],
        count=old.count if old else 0,
        received=old.received if old else [],
    )
    request.app[PROGRAMS][name] = prog
    return web.json_response({"ok": True})


async def _program_get(request: web.Request) -> web.Response:
    prog = request.app[PROGRAMS].get(request.match_info["name"])
    if prog is None:
        return web.json_response({"count": 0, "received": []})
    return web.json_response({"count": prog.count, "received": prog.received})


async def _programmed(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    prog: Program | None = request.app[PROGRAMS].get(name)
    request.app[STATS][f"{request.method} /p/{{name}}"] += 1
    if prog is None:
        return _error(404, "not_programmed", f"PUT /__program/{name} first")
    body_in = await request.read()
    prog.arrived.set()
    prog.count += 1
    prog.received.append({"method": request.method, "path_qs": request.raw_path,
                          "headers": [[k, v] for k, v in request.headers.items()],
                          "body": body_in.decode("utf-8", "replace")})
    del prog.received[:-50]
    if prog.delay_ms:
        await asyncio.sleep(prog.delay_ms / 1000)
    if prog.held:
        await prog.release.wait()
    headers = list(prog.headers)
    etag = next((v for k, v in headers if k.lower() == "etag"), None)
    lm = next((v for k, v in headers if k.lower() == "last-modified"), None)
    inm = request.headers.get("If-None-Match")
    ims = request.headers.get("If-Modified-Since")
    if prog.answer_304 and prog.status == 200 and (
            (inm is not None and etag is not None and etag in [t.strip() for t in inm.split(",")])
            or (inm is None and ims is not None and lm is not None and ims == lm)):
        resp304 = web.StreamResponse(status=304)
        for k, v in headers:
            if k.lower() not in ("content-length", "content-type"):
                resp304.headers.add(k, v)
        await resp304.prepare(request)
        await resp304.write_eof()
        return resp304
    if prog.cut_before_response:
        _cut(request, reset=prog.cut_before_response == "reset")
        return web.Response()  # never sent: the connection is gone
    body = prog.body.encode()
    for name in prog.reflect:  # what a careless backend does with forwarded headers
        body += f"\n{name}: {request.headers.get(name, '')}".encode()
    resp = web.StreamResponse(status=prog.status)
    for k, v in headers:
        resp.headers.add(k, v)
    resp.content_length = len(body)
    await resp.prepare(request)
    if prog.close_mid_body:
        await resp.write(body[: len(body) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp
    await resp.write(body)
    await resp.write_eof()
    return resp
