"""How many items each list of a manifest may hold.

The models declare these bounds in the schema; the error messages state both
ends of a list's range, which a pydantic error alone does not carry.
"""

from __future__ import annotations

__all__ = [
    "MAX_BACKENDS_PER_GROUP",
    "MAX_INTERFACES",
    "MAX_LISTENERS",
    "MAX_NODE_SELECTOR_LABELS",
    "MAX_ROUTES_PER_LISTENER",
]

MAX_LISTENERS = 64
MAX_BACKENDS_PER_GROUP = 1024
MAX_ROUTES_PER_LISTENER = 10_000
MAX_INTERFACES = 64
MAX_NODE_SELECTOR_LABELS = 64
