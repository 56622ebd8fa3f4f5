"""The API's names: its group and version, and how objects are referred to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

ApiVersion = Literal["xdplb.io/v1alpha1"]
API_VERSION: ApiVersion = get_args(ApiVersion)[0]
GROUP, VERSION = API_VERSION.split("/")

Ref = tuple[str, str]  # (namespace, name) of a namespaced object


def ref_of(obj: Mapping[str, Any]) -> Ref:
    """The (namespace, name) of an object as the API serves it."""
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")
