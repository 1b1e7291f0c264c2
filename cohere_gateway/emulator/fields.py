"""Typed reads of request-body fields; each failure is a 400 saying which field and what to send."""

from __future__ import annotations

from typing import Any

from cohere_gateway.emulator.errors import bad_request

_MISSING = object()


def require_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        raise bad_request(f"{name} is required: send a non-empty string in '{name}'")
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{name} must be a non-empty string, got {_kind(value)}")
    return value


def optional_str(body: dict[str, Any], name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string, got {_kind(value)}")
    return value


def require_list(body: dict[str, Any], name: str, *, min_items: int = 1) -> list[Any]:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        raise bad_request(f"{name} is required: send a list in '{name}'")
    if not isinstance(value, list):
        raise bad_request(f"{name} must be a list, got {_kind(value)}")
    if len(value) < min_items:
        raise bad_request(f"{name} must contain at least {min_items} item(s)")
    return value


def optional_list(body: dict[str, Any], name: str) -> list[Any]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request(f"{name} must be a list, got {_kind(value)}")
    return value


def str_items(items: list[Any], name: str) -> list[str]:
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise bad_request(f"{name}[{i}] must be a string, got {_kind(item)}")
    return items


def optional_int(body: dict[str, Any], name: str, *, minimum: int = 0) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_request(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def optional_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {_kind(value)}")
    return value


_JSON_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


def _kind(value: Any) -> str:
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)
