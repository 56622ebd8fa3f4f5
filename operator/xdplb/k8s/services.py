"""Services of type LoadBalancer: which are ours, which address each gets, and the
LoadBalancer derived from each (pure; servicewriter.py does the requests).

A Service is ours when its ``spec.loadBalancerClass`` is the operator's class, or when it
names no class and the operator is the default implementation. Ours get:

- an address: ``spec.loadBalancerIP`` or the annotation ``xdplb.io/loadBalancerIPs`` when
  a pool admitting the namespace holds it; otherwise the lowest free address of the first
  pool (by name) that admits the namespace and hands addresses out (``autoAssign``), or
  of the pool the annotation ``xdplb.io/address-pool`` names. Every port of the Service
  must be allowed by that pool.
- one LoadBalancer in the Service's namespace, named after it and owned by it: a
  listener per port (TCP and UDP; SCTP is not served) with the Service's endpoints as
  backends, ``externalTrafficPolicy`` as ``trafficPolicy``, ``sessionAffinity`` as is.

Allocation is stable across operator restarts and never hands one address to two
Services: an address a Service already has (its derived LoadBalancer's, or the one in
its status) stays its own while a pool still admits it, and is kept before any Service
gets a new one. Two Services share an address only when both carry the same
``xdplb.io/allow-shared-ip`` key and their ports are disjoint.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xdplb.k8s.admission import Grant, namespace_labels
from xdplb.spec.addresses import special_kind
from xdplb.spec.api import API_VERSION, Ref

__all__ = [
    "DEFAULT_CLASS",
    "IPS_ANNOTATION",
    "POOL_ANNOTATION",
    "SERVICE_LABEL",
    "SHARING_ANNOTATION",
    "Allocation",
    "Claimant",
    "allocate",
    "claimant_of",
    "derived_lb",
    "is_ours",
]

DEFAULT_CLASS = "xdplb.io/xdplb"
IPS_ANNOTATION = "xdplb.io/loadBalancerIPs"
POOL_ANNOTATION = "xdplb.io/address-pool"
SHARING_ANNOTATION = "xdplb.io/allow-shared-ip"
SERVICE_LABEL = "xdplb.io/service"  # on a derived LoadBalancer: the Service's name
MANAGED_BY = {"app.kubernetes.io/managed-by": "xdplb-operator"}

Json = dict[str, Any]
PortKey = tuple[int, str]  # (port, protocol)

ALLOCATED = "AddressAllocated"


def is_ours(svc: Mapping[str, Any], class_name: str, default_class: bool) -> bool:
    spec = svc.get("spec") or {}
    if spec.get("type") != "LoadBalancer" or (svc.get("metadata") or {}).get(
            "deletionTimestamp"):
        return False
    cls = spec.get("loadBalancerClass")
    return cls == class_name if cls else default_class


@dataclass(frozen=True)
class Port:
    name: str
    port: int
    protocol: str

    @property
    def key(self) -> PortKey:
        return (self.port, self.protocol)

    @property
    def listener(self) -> str:
        return self.name or f"{self.protocol.lower()}-{self.port}"


@dataclass(frozen=True)
class Claimant:
    """A Service of ours, as the allocation reads it."""

    ref: Ref
    uid: str
    created: str
    requested: str | None  # the address asked for, if any
    pool: str | None  # the pool asked for, if any
    sharing: str | None
    ports: tuple[Port, ...]
    problems: tuple[str, ...] = ()  # what cannot be served (an SCTP port, a bad address)

    @property
    def keys(self) -> frozenset[PortKey]:
        return frozenset(p.key for p in self.ports)


def claimant_of(svc: Mapping[str, Any]) -> Claimant:
    meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
    notes = meta.get("annotations") or {}
    ports, problems = [], []
    for p in spec.get("ports") or []:
        protocol = p.get("protocol") or "TCP"
        if protocol not in ("TCP", "UDP"):
            problems.append(f"port {p.get('name') or p.get('port')}: {protocol} is not served"
                            " (TCP and UDP only)")
            continue
        ports.append(Port(p.get("name") or "", int(p.get("port") or 0), protocol))
    requested = spec.get("loadBalancerIP") or None
    if (listed := notes.get(IPS_ANNOTATION)) is not None:
        # One address per family; the data plane serves IPv4 only for now.
        ips = [a.strip() for a in str(listed).split(",") if a.strip()]
        fours = [a for a in ips if _version(a) == 4]
        bad = [a for a in ips if _version(a) is None]
        if bad:
            problems.append(f"{IPS_ANNOTATION}: {bad[0]!r} is not an IP address")
        elif not fours:
            problems.append(f"{IPS_ANNOTATION}: no IPv4 address (IPv6 is not served yet)")
        requested = fours[0] if fours else requested
    if requested is not None and _version(requested) is None:
        problems.append(f"{requested!r} is not an IP address")
        requested = None
    return Claimant((meta.get("namespace", ""), meta.get("name", "")), meta.get("uid", ""),
                    meta.get("creationTimestamp") or "", requested,
                    notes.get(POOL_ANNOTATION) or None, notes.get(SHARING_ANNOTATION) or None,
                    tuple(ports), tuple(problems))


def _version(text: str) -> int | None:
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None


@dataclass(frozen=True)
class Allocation:
    """An address and its pool, or why there is none (an Event reason and message)."""

    address: str | None
    pool: str
    reason: str
    message: str


@dataclass
class _Book:
    """Addresses handed out so far in one allocation run."""

    held: Mapping[str, str]  # address -> what uses it outside the Services (described)
    claims: dict[str, list[Claimant]] = field(default_factory=dict)

    def conflict(self, c: Claimant, address: str) -> str | None:
        """Why ``c`` may not have ``address``, or None."""
        if address in self.held:
            return f"{address} is used by {self.held[address]}"
        for other in self.claims.get(address, ()):
            if c.sharing is None or other.sharing != c.sharing:
                return (f"{address} is allocated to Service {other.ref[0]}/{other.ref[1]}"
                        f" (share it: the same {SHARING_ANNOTATION} key on both, ports"
                        " disjoint)")
            if c.keys & other.keys:
                ports = ", ".join(f"{p}/{pr}" for p, pr in sorted(c.keys & other.keys))
                return (f"{address} is shared with Service {other.ref[0]}/{other.ref[1]},"
                        f" which serves {ports} too")
        return None

    def take(self, c: Claimant, address: str) -> None:
        self.claims.setdefault(address, []).append(c)


def _fits(g: Grant, c: Claimant) -> bool:
    return all(g.allows_port(p.port, p.protocol) for p in c.ports)


def _free(g: Grant, c: Claimant, book: _Book) -> Iterator[str]:
    """Addresses of ``g`` that ``c`` may have, lowest first (IPv4 only for now)."""
    for r in g.ranges:
        if r.version != 4:
            continue
        for addr in r.addresses():
            text = str(addr)
            if special_kind(addr) is None and book.conflict(c, text) is None:
                yield text


def allocate(claimants: Iterable[Claimant], evidence: Mapping[str, str],
             held: Mapping[str, str], grants: Sequence[Grant],
             labels: Mapping[str, Mapping[str, str]]) -> dict[Ref, Allocation]:
    """The address of each Service of ours.

    ``evidence``: uid -> the address a Service has now (kept while admitted, and before
    anyone gets a new one); ``held``: addresses LoadBalancers not derived from a Service
    use; ``labels``: namespace -> its labels.
    """
    order = sorted(claimants, key=lambda c: (c.created, c.ref))
    book = _Book(held)
    out: dict[Ref, Allocation] = {}
    later: list[Claimant] = []

    def admitting(c: Claimant) -> list[Grant]:
        seen = namespace_labels(c.ref[0], labels.get(c.ref[0]))
        return [g for g in grants if g.admits(seen)]

    for c in order:  # what was asked for, and what each already has
        if not c.ports:
            out[c.ref] = Allocation(None, "", "NoPorts", "; ".join(c.problems) or
                                    "the Service has no TCP or UDP port")
            continue
        mine = c.requested or evidence.get(c.uid)
        if mine is None:
            later.append(c)
            continue
        pools = [g for g in admitting(c) if g.holds(mine) and (c.pool in (None, g.name))]
        fitting = [g for g in pools if _fits(g, c)]
        problem = None
        if not pools:
            problem = (f"{mine} is in no AddressPool that admits namespace {c.ref[0]!r}"
                       + (f" (asked for pool {c.pool})" if c.pool else ""))
        elif not fitting:
            problem = f"a port of the Service is not allowed by pool {pools[0].summary()}"
        else:
            problem = book.conflict(c, mine)
        if problem is None:
            book.take(c, mine)
            out[c.ref] = Allocation(mine, fitting[0].name, ALLOCATED,
                                    f"{mine} from pool {fitting[0].name}")
        elif c.requested:
            reason = "AddressInUse" if pools and fitting else "AddressNotAllowed"
            out[c.ref] = Allocation(None, "", reason, problem)
        else:
            later.append(c)  # what it had is no longer its own: a new one
    for c in later:
        candidates = [g for g in admitting(c)
                      if (g.name == c.pool if c.pool else g.auto_assign)]
        fitting = [g for g in candidates if _fits(g, c)]
        found = next(((a, g) for g in fitting for a in _shared(c, g, book)), None) \
            or next(((a, g) for g in fitting for a in _free(g, c, book)), None)
        if found is not None:
            address, g = found
            book.take(c, address)
            out[c.ref] = Allocation(address, g.name, ALLOCATED, f"{address} from pool {g.name}")
        elif fitting:
            out[c.ref] = Allocation(None, "", "PoolExhausted",
                                    "no free address in " + ", ".join(g.name for g in fitting))
        elif candidates:
            out[c.ref] = Allocation(None, "", "NoAddressPool",
                                    "a port of the Service is not allowed by "
                                    + ", ".join(g.summary() for g in candidates))
        else:
            what = f"pool {c.pool!r} (it may not exist or not admit the namespace)" if c.pool \
                else "no AddressPool with autoAssign: true"
            out[c.ref] = Allocation(None, "", "NoAddressPool",
                                    f"{what} admits namespace {c.ref[0]!r}")
    return out


def _shared(c: Claimant, g: Grant, book: _Book) -> Iterator[str]:
    """Addresses of ``g`` that Services with ``c``'s sharing key hold and ``c`` may join."""
    if c.sharing is None:
        return
    for address, others in sorted(book.claims.items()):
        if any(o.sharing == c.sharing for o in others) and g.holds(address) \
                and book.conflict(c, address) is None:
            yield address


def derived_lb(svc: Mapping[str, Any], address: str) -> Json:
    """The LoadBalancer a Service of ours becomes, at ``address``."""
    meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
    affinity = "ClientIP" if spec.get("sessionAffinity") == "ClientIP" else "None"
    listeners = [{"name": p.listener, "protocol": p.protocol, "port": p.port,
                  "address": address, "service": {"name": meta["name"],
                                                  "port": p.name or p.port},
                  "sessionAffinity": affinity}
                 for p in claimant_of(svc).ports]
    return {
        "apiVersion": API_VERSION, "kind": "LoadBalancer",
        "metadata": {
            "name": meta["name"], "namespace": meta["namespace"],
            "labels": {SERVICE_LABEL: meta["name"], **MANAGED_BY},
            # No blockOwnerDeletion: that would need the right to set finalizers on Services.
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                                 "uid": meta.get("uid", ""), "controller": True}]},
        "spec": {
            "trafficPolicy": "Local" if spec.get("externalTrafficPolicy") == "Local"
            else "Cluster",
            "listeners": listeners,
        },
    }


def owner_uid(lb: Mapping[str, Any]) -> str | None:
    """The uid of the Service that owns a derived LoadBalancer, or None."""
    for o in (lb.get("metadata") or {}).get("ownerReferences") or []:
        if o.get("kind") == "Service" and o.get("apiVersion") == "v1" and o.get("controller"):
            return str(o.get("uid", ""))
    return None


def ingress_ips(svc: Mapping[str, Any]) -> list[str]:
    return [i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get(
        "ingress") or [] if i.get("ip")]
