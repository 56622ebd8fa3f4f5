"""Listener conflicts between LoadBalancers: the oldest claim wins (pure).

Two listeners conflict when they share port, protocol and address family and
either has the same address or one of them is a wildcard (no address: every
local address of its family).
LoadBalancers are considered oldest first (creationTimestamp, then
namespace/name); one that overlaps a listener of an already accepted
LoadBalancer loses, so a loser never blocks anyone else.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from xdplb.spec.api import Ref


@dataclass(frozen=True)
class Endpoint:
    listener: str  # listener name
    address: str | None  # None = every local address of its family
    port: int
    protocol: str
    family: str = "IPv4"

    def __str__(self) -> str:
        if self.address is None:
            host = "*" if self.family == "IPv4" else "[::]"
        else:
            host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}/{self.protocol}"


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
        Endpoint(ln["name"], _canonical(ln.get("address")), int(ln["port"]), ln["protocol"],
                 _family(ln))
        for ln in spec.get("listeners", [])))


def _canonical(address: str | None) -> str | None:
    """One spelling per address (2001:DB8::0:1 is 2001:db8::1), as the spec gives it."""
    return str(ipaddress.ip_address(address)) if address else None


def _family(ln: Mapping[str, Any]) -> str:
    """A raw listener's family, as spec.model.Listener.family decides it."""
    if ln.get("address"):
        return "IPv6" if ":" in ln["address"] else "IPv4"
    if ln.get("ipFamily"):
        return str(ln["ipFamily"])
    backends = ln.get("backends") or []
    return "IPv6" if backends and ":" in backends[0].get("address", "") else "IPv4"


def _overlap(a: Endpoint, b: Endpoint) -> bool:
    return a.family == b.family and (a.address is None or b.address is None
                                     or a.address == b.address)


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
