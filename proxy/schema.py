"""A JSON Schema for config.yaml, generated from the config model (``config.py``'s frozen
dataclasses): field names, types, enums and defaults come from the dataclasses; the few keys
that exist only in YAML (``ttl_env``, ``key_secret_env``, token ``env``) are added here.
``python -m proxy --print-schema`` prints it; a test keeps config.schema.json in step."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

from . import config as c

SCHEMA_ID = "https://jsoncache.invalid/config.schema.json"

# Fields of the model that are not YAML keys (computed or secret), per dataclass.
_NOT_IN_YAML: dict[type, set[str]] = {
    c.CacheConfig: {"key_secret", "key_secret_is_default"},
    c.Config: {"source"},
}
_MATCH = {"type": "string", "minLength": 1,
          "description": 'METHODS /path, e.g. "GET /transactions", "PUT /x/{id}", "* /*"'}
_TEMPLATES = {"type": "array", "items": {"type": "string", "minLength": 1},
              "description": "tag templates, e.g. session:{query.session_id}"}
_ENV_NAME = {"type": "string", "pattern": "^[A-Z_][A-Z0-9_]*$"}


def _type_of(tp: Any) -> dict[str, Any]:
    origin = get_origin(tp)
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (types.UnionType, typing.Union):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = _type_of(args[0]) if len(args) == 1 else {"anyOf": [_type_of(a) for a in args]}
        if "enum" in inner:
            return {"enum": [*inner["enum"], None]}
        return {**inner, "type": [inner["type"], "null"]} if "type" in inner else inner
    if origin is tuple:
        return {"type": "array", "items": _type_of(get_args(tp)[0])}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _object(tp)
    raise TypeError(f"no schema for {tp!r}")


def _object(cls: type, overrides: dict[str, Any] | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, vars(c))
    props: dict[str, Any] = {}
    skip = _NOT_IN_YAML.get(cls, set())
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if overrides and f.name in overrides:
            props[f.name] = overrides[f.name]
            continue
        prop = _type_of(hints[f.name])
        if f.default is not dataclasses.MISSING and not dataclasses.is_dataclass(f.default):
            default = f.default
            if isinstance(default, frozenset):
                default = sorted(default)
            elif isinstance(default, tuple):
                default = list(default)
            prop["default"] = default
        props[f.name] = prop
    props.update(extra or {})
    return {"type": "object", "additionalProperties": False, "properties": props}


def config_schema() -> dict[str, Any]:
    route = _object(c.RouteConfig, overrides={
        "match": _MATCH,
        "tags": _TEMPLATES,
        "statuses": {"type": "array", "items": {"type": "integer", "minimum": 200,
                                                "maximum": 599},
                     "default": sorted(c.HEURISTIC_STATUSES)},
        "keep_s": {"type": "integer", "minimum": 0,
                   "description": f"default {c.DEFAULT_KEEP_S} in honor mode, 0 otherwise"},
        "scope": {"enum": ["user", "public"],
                  "description": "default public in honor mode, user otherwise"},
    }, extra={"ttl_env": _ENV_NAME})
    route["required"] = ["name", "match"]
    rule = _object(c.InvalidateRule, overrides={"match": _MATCH, "tags": _TEMPLATES})
    rule["required"] = ["match", "tags"]
    warm = _object(c.PrewarmRule, overrides={
        "after": {**_MATCH,
                  "description": 'the GET whose 2xx answer triggers, e.g. "GET /sessions"'},
        "fetch": {"type": "array", "items": {"type": "string", "minLength": 1},
                  "description": "URL templates, e.g. /summary?session_id="
                                 "{response.json.sessions[*].id}"},
        "name": {"type": "string", "description": "metric label; default: after"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000,
                  "default": c.DEFAULT_PREWARM_LIMIT}})
    warm["required"] = ["after", "fetch"]
    token = _object(c.AdminToken, overrides={"value": None}, extra={"env": _ENV_NAME})
    del token["properties"]["value"]
    token["required"] = ["name", "env"]
    cache = _object(c.CacheConfig, extra={
        "key_secret_env": {**_ENV_NAME, "default": c.SECRET_ENV}})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "jsoncache configuration (config.yaml)",
        **_object(c.Config, overrides={
            "cache": cache,
            "routes": {"type": "array", "items": route},
            "invalidate": {"type": "array", "items": rule},
            "prewarm": {"type": "array", "items": warm},
            "admin": _object(c.AdminConfig, overrides={
                "tokens": {"type": "array", "items": token}}),
        }),
    }
