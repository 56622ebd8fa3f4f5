"""Events on the objects the operator handles, posted by kopf (its posting queue, in the
background, with its retries). Only kopf's resource handlers and the tasks they start
have that queue: see handlers.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import kopf


def event(body: Mapping[str, Any], etype: str, reason: str, message: str) -> None:
    """A core/v1 Event about ``body``, as `kubectl describe` and `kubectl get events` show."""
    # kopf types its bodies as its own TypedDict; a plain object from the API is one.
    kopf.event(kopf.Body(cast(kopf.RawBody, body)), type=etype, reason=reason, message=message)
