"""Validation errors as ``<path>: <message>`` lines, paths and values as the user wrote them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from xdplb.spec.bounds import (
    MAX_BACKENDS_PER_GROUP,
    MAX_INTERFACES,
    MAX_LISTENERS,
    MAX_ROUTES_PER_LISTENER,
)

__all__ = ["RULES_ERROR", "error_path", "format_errors", "join_path", "show_value"]

# Error type of the check_rules report; format_errors expands it into lines.
RULES_ERROR = "xdplb_rules"

# Both ends of each list bound, for "must have N to M items".
_LIST_BOUNDS: dict[str, tuple[int, int]] = {
    "listeners": (1, MAX_LISTENERS),
    "backends": (1, MAX_BACKENDS_PER_GROUP),
    "sourceRoutes": (0, MAX_ROUTES_PER_LISTENER),
    "sniRoutes": (0, MAX_ROUTES_PER_LISTENER),
    "interfaces": (1, MAX_INTERFACES),
}

_RANGE_NAMES: dict[str, Callable[[Any], str]] = {
    "port": lambda v: f"{show_value(v)} is not a valid port",
    "weight": lambda v: f"{show_value(v)} is not a valid weight (0..65535)",
}

_COMPARISONS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def show_value(value: Any) -> str:
    """A value as the user wrote it in YAML, quoted if it is a string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return _kind(value)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return f"a string ({show_value(value)})"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value})"
    return "null" if value is None else type(value).__name__


def error_path(loc: Iterable[int | str]) -> str:
    """('spec', 'listeners', 0, 'port') -> 'spec.listeners[0].port'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def join_path(prefix: str, path: str) -> str:
    """``path`` below ``prefix``: 'spec' and 'listeners[0]' give 'spec.listeners[0]'."""
    if not prefix:
        return path
    return prefix + (path if path.startswith("[") else "." + path)


def _message(err: Any) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    field = next((p for p in reversed(err["loc"]) if isinstance(p, str)), "")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "invalid_key":
        return "field names must be strings"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        if len(options) == 1:
            return f"expected {options[0]}, got {show_value(value)}"
        return f"{show_value(value)} is not one of {', '.join(options)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{show_value(value)} is not an integer"
    if kind == "string_type":
        return f"{show_value(value)} is not a string"
    if kind == "list_type":
        return f"must be a list, got {_kind(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping, got {_kind(value)}"
    if kind in _COMPARISONS:
        key, op = _COMPARISONS[kind]
        if field in _RANGE_NAMES:
            return _RANGE_NAMES[field](value)
        return f"{show_value(value)} must be {op} {ctx.get(key)}"
    if kind in ("too_short", "too_long"):
        low, high = _LIST_BOUNDS.get(field, (ctx.get("min_length", 0), ctx.get("max_length")))
        if high is None:
            return f"must have at least {low} items"
        return f"must have at most {high} items" if low == 0 else f"must have {low} to {high} items"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else err["msg"]
    if kind == "string_too_long":
        return f"{show_value(value)} is longer than {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"{show_value(value)} does not match {ctx.get('pattern')}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return str(err["msg"])


def format_errors(exc: ValidationError) -> list[str]:
    """One `<path>: <message>` line per problem, paths in YAML (alias) names."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if loc[-1:] == ("[key]",):  # a bad mapping key: the message names it
            loc = loc[:-2]
        path = error_path(loc)
        if err["type"] == RULES_ERROR:
            lines += [f"{join_path(path, sub)}: {msg}" for sub, msg in err["ctx"]["problems"]]
        else:
            lines.append(f"{path or 'manifest'}: {_message(err)}")
    return lines
