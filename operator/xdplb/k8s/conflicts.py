"""Listener conflicts between LoadBalancers: the oldest claim wins (pure).

Two listeners conflict when they share port and protocol and either has the
same address or one of them is a wildcard (no address: every local address).
LoadBalancers are considered oldest first (creationTimestamp, then
namespace/name); one that overlaps a listener of an already accepted
LoadBalancer loses, so a loser never blocks anyone else.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from xdplb.spec.api import Ref


@dataclass(frozen=True)
class Endpoint:
    listener: str  # listener name
    address: str | None  # None = every local address
    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{self.address or '*'}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Claim:
    ref: Ref
    created: str  # RFC 3339 creationTimestamp: sorts chronologically as text
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class Conflict:
    winner: Ref
    mine: Endpoint
    theirs: Endpoint

    def message(self) -> str:
        ns, name = self.winner
        return (f"listener {self.mine.listener!r} ({self.mine}) overlaps listener"
                f" {self.theirs.listener!r} ({self.theirs}) of LoadBalancer {ns}/{name},"
                f" which is older")


def claim_of(ref: Ref, created: str, spec: Mapping[str, Any]) -> Claim:
    """The endpoints a LoadBalancer spec (raw dict, already validated) claims."""
    return Claim(ref, created, tuple(
        Endpoint(ln["name"], ln.get("address"), int(ln["port"]), ln["protocol"])
        for ln in spec.get("listeners", [])))


def _overlap(a: Endpoint, b: Endpoint) -> bool:
    return a.address is None or b.address is None or a.address == b.address


def resolve(claims: Iterable[Claim]) -> dict[Ref, Conflict]:
    """Every losing LoadBalancer with the first conflict that makes it lose."""
    by_port: dict[tuple[int, str], list[tuple[Endpoint, Ref]]] = defaultdict(list)
    losers: dict[Ref, Conflict] = {}
    for claim in sorted(claims, key=lambda c: (c.created, c.ref)):
        conflict = next((Conflict(owner, mine, theirs)
                         for mine in claim.endpoints
                         for theirs, owner in by_port[(mine.port, mine.protocol)]
                         if _overlap(mine, theirs)), None)
        if conflict:
            losers[claim.ref] = conflict
            continue
        for ep in claim.endpoints:
            by_port[(ep.port, ep.protocol)].append((ep, claim.ref))
    return losers
