"""The one base of xdplb's own errors: catch XdplbError to catch any of them."""

from __future__ import annotations


class XdplbError(Exception):
    """An error xdplb raises itself (not one of a library it calls)."""
