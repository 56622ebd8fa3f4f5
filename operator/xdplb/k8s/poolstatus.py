"""An AddressPool's status: valid or not, overlapping other pools or not, addresses used
and in all (pure).

Overlapping pools are not merged: each admits its own namespaces to its own addresses,
and the overlap is reported on both (condition ``Overlapping`` and a Warning Event), so
that the admin sees that two grants reach the same addresses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from xdplb.k8s.admission import Grant
from xdplb.k8s.conditions import condition
from xdplb.spec.addresses import count

SHOWN = 10


def overlaps(me: Grant, others: Iterable[Grant]) -> list[str]:
    """'<shared range> with pool <name>' for every other pool that shares addresses."""
    found = []
    for other in sorted(others, key=lambda g: g.name):
        if other.name == me.name:
            continue
        for mine in me.ranges:
            for theirs in other.ranges:
                if (both := mine.overlap(theirs)) is not None:
                    found.append(f"{both.text} with pool {other.name}")
    return found


def pool_status(name: str, generation: int, grants: Mapping[str, Grant],
                problems: list[str] | None, used: int) -> dict[str, Any]:
    """The status of pool ``name``: ``problems`` when invalid, else its grant is in
    ``grants``; ``used``: its addresses that admitted listeners use."""
    if problems:
        shown = "; ".join(problems[:SHOWN])
        return {"observedGeneration": generation, "total": "0", "used": 0, "conditions": [
            condition("Accepted", False, "Invalid", shown, generation),
            condition("Overlapping", False, "Invalid", "not accepted", generation)]}
    me = grants[name]
    shared = overlaps(me, grants.values())
    overlap = (condition("Overlapping", True, "Overlap",
                         "shares " + "; ".join(shared[:SHOWN])
                         + (f"; and {len(shared) - SHOWN} more" if len(shared) > SHOWN else "")
                         + ": each pool admits its own namespaces to these addresses",
                         generation)
               if shared else condition("Overlapping", False, "NoOverlap",
                                        "no other pool holds these addresses", generation))
    return {"observedGeneration": generation, "total": str(count(me.ranges)), "used": used,
            "conditions": [condition("Accepted", True, "Accepted", "valid", generation),
                           overlap]}
