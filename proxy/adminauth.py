"""Admin authentication: ``Authorization: Bearer <token>`` (or the password of HTTP Basic, what
a browser sends after its login prompt); each configured token has a role, ``read`` <
``purge`` < ``superuser``. Tokens are compared in constant time; every admin action is logged
with the token's name, never its value. 401 without a valid token, 403 with too little role."""

from __future__ import annotations

import base64
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from .config import AdminToken, Role
from .log import get as get_logger

log = get_logger("admin")

_RANK: dict[Role, int] = {"read": 0, "purge": 1, "superuser": 2}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNLOGGED_ACTIONS = frozenset({"health", "metrics"})  # probes and scrapes


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload, indent=1),
                        content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return json_response({"error": code, "message": message, **extra}, status)


class Auth:
    def __init__(self, tokens: Sequence[AdminToken]) -> None:
        self.tokens = tuple(tokens)

    def token(self, request: web.Request) -> AdminToken | None:
        """The token presented as ``Bearer <token>`` or as the password of HTTP Basic."""
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        presented = presented.strip()
        if scheme.lower() == "basic":
            try:
                presented = base64.b64decode(presented, validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return None
        elif scheme.lower() != "bearer":
            return None
        if not presented:
            return None
        given = presented.encode()
        found = None
        for token in self.tokens:  # no early exit: the time taken does not tell which matched
            if hmac.compare_digest(token.value.encode(), given):
                found = token
        return found

    def has_role(self, request: web.Request, role: Role) -> bool:
        token = self.token(request)
        return token is not None and _RANK[token.role] >= _RANK[role]

    def guard(self, role: Role | None, action: str, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            token = None
            if role is not None:
                token = self.token(request)
                if token is None:
                    refused = error(401, "unauthorized", "an admin Bearer token is required")
                    refused.headers["WWW-Authenticate"] = \
                        'Bearer realm="jsoncache-admin", Basic realm="jsoncache-admin"'
                    return refused
                if _RANK[token.role] < _RANK[role]:
                    log.warning("admin action refused", action=action, token=token.name,
                                role=token.role, needed=role)
                    return error(403, "forbidden", f"this needs the {role} role")
            started = time.perf_counter()
            resp = await handler(request)
            if action not in UNLOGGED_ACTIONS:
                log.info("admin action", action=action, token=token.name if token else None,
                         status=resp.status, path=request.path,
                         duration_ms=round((time.perf_counter() - started) * 1000, 3))
            return resp

        return guarded
