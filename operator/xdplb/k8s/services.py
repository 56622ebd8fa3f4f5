"""Services of type LoadBalancer: which are ours, which address each gets, and the
LoadBalancer derived from each (pure; servicewriter.py does the requests).

A Service is ours when its ``spec.loadBalancerClass`` is the operator's class, or when it
names no class and the operator is the default implementation. Ours get:

- an address per family of ``spec.ipFamilies`` (IPv4 when absent; the first only unless
  ``ipFamilyPolicy`` is PreferDualStack or RequireDualStack): ``spec.loadBalancerIP`` or
  the annotation ``xdplb.io/loadBalancerIPs`` (one per family) when a pool admitting the
  namespace holds it; otherwise the lowest free address of that family in the first pool
  (by name) that admits the namespace and hands addresses out (``autoAssign``), or in the
  pool the annotation ``xdplb.io/address-pool`` names. Every port of the Service must be
  allowed by that pool. PreferDualStack is served with the primary family alone when the
  other has no address (an Event says so); RequireDualStack, and the primary family, are
  all or nothing: no partial service.
- one LoadBalancer in the Service's namespace, named after it and owned by it: a
  listener per port and family (TCP and UDP; SCTP is not served) with the Service's
  endpoints of that family as backends, ``externalTrafficPolicy`` as ``trafficPolicy``,
  ``sessionAffinity`` as is.

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
    "FAMILIES",
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
DEGRADED = "DualStackDegraded"  # PreferDualStack served with the primary family only
FAMILIES = ("IPv4", "IPv6")


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
    requested: tuple[tuple[str, str], ...]  # (family, address) asked for, if any
    pool: str | None  # the pool asked for, if any
    sharing: str | None
    ports: tuple[Port, ...]
    problems: tuple[str, ...] = ()  # ports that cannot be served (SCTP)
    ignored: tuple[str, ...] = ()  # addresses asked for that cannot be had, and why
    families: tuple[str, ...] = ("IPv4",)  # primary first
    required: int = 1  # the first ``required`` families must all be served, or none is
    refused: str = ""  # why no family can be served (bad spec.ipFamilies), if so

    @property
    def keys(self) -> frozenset[PortKey]:
        return frozenset(p.key for p in self.ports)

    def wants(self, family: str) -> str | None:
        return dict(self.requested).get(family)


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
    families, required, refused = _families(spec)
    asked: list[tuple[str, str]] = []  # (field, address), the annotation's first
    if (listed := notes.get(IPS_ANNOTATION)) is not None:
        asked += [(IPS_ANNOTATION, a.strip()) for a in str(listed).split(",") if a.strip()]
    if spec.get("loadBalancerIP"):
        asked.append(("spec.loadBalancerIP", str(spec["loadBalancerIP"])))
    requested: dict[str, str] = {}
    ignored: list[str] = []
    for where, address in asked:
        family = _family(address)
        if family is None:
            ignored.append(f"{where}: {address!r} is not an IP address")
        elif family not in families:
            ignored.append(f"{where}: {address} is {family}, not a family the Service is"
                            f" served in ({', '.join(families) or 'none'}; spec.ipFamilies)")
        elif family in requested:
            if where == IPS_ANNOTATION:
                ignored.append(f"{where}: one address per family ({requested[family]} and"
                                f" {address} are both {family})")
        else:
            requested[family] = address
    return Claimant((meta.get("namespace", ""), meta.get("name", "")), meta.get("uid", ""),
                    meta.get("creationTimestamp") or "", tuple(sorted(requested.items())),
                    notes.get(POOL_ANNOTATION) or None, notes.get(SHARING_ANNOTATION) or None,
                    tuple(ports), tuple(problems), tuple(ignored), families, required, refused)


def _families(spec: Mapping[str, Any]) -> tuple[tuple[str, ...], int, str]:
    """The families a Service is served in (primary first), how many must be, and why
    none can be, from ``spec.ipFamilies`` and ``spec.ipFamilyPolicy``."""
    listed = spec.get("ipFamilies") or ["IPv4"]
    policy = spec.get("ipFamilyPolicy") or "SingleStack"
    bad = [f for f in listed if f not in FAMILIES]
    if bad or not isinstance(listed, list):
        return (), 1, (f"spec.ipFamilies: {bad[0] if bad else listed!r} is not a family"
                       " (IPv4 or IPv6)")
    families = tuple(dict.fromkeys(listed))
    if policy == "SingleStack":
        return families[:1], 1, ""
    if policy == "RequireDualStack":
        if len(families) < 2:
            return families, 2, ("spec.ipFamilyPolicy: RequireDualStack, and spec.ipFamilies"
                                 f" lists {families[0]} only")
        return families, 2, ""
    if policy == "PreferDualStack":
        return families, 1, ""
    return (), 1, f"spec.ipFamilyPolicy: {policy!r} is not a policy"


def _family(text: str) -> str | None:
    version = _version(text)
    return None if version is None else f"IPv{version}"


def _version(text: str) -> int | None:
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None


@dataclass(frozen=True)
class Allocation:
    """The addresses of a Service (one per family served, primary first), or why there
    is none (an Event reason and message); ``degraded``: why a PreferDualStack Service is
    served in fewer families than it lists."""

    addresses: tuple[str, ...]
    reason: str
    message: str
    degraded: str = ""

    @property
    def address(self) -> str | None:
        return self.addresses[0] if self.addresses else None


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

    def drop(self, c: Claimant, address: str) -> None:
        left = [o for o in self.claims.get(address, []) if o is not c]
        if left:
            self.claims[address] = left
        else:
            self.claims.pop(address, None)


def _fits(g: Grant, c: Claimant) -> bool:
    return all(g.allows_port(p.port, p.protocol) for p in c.ports)


def _free(g: Grant, c: Claimant, family: str, book: _Book) -> Iterator[str]:
    """Addresses of ``family`` in ``g`` that ``c`` may have, lowest first."""
    for r in g.ranges:
        if f"IPv{r.version}" != family:
            continue
        for addr in r.addresses():
            text = str(addr)
            if special_kind(addr) is None and book.conflict(c, text) is None:
                yield text


def allocate(claimants: Iterable[Claimant], evidence: Mapping[str, Mapping[str, str]],
             held: Mapping[str, str], grants: Sequence[Grant],
             labels: Mapping[str, Mapping[str, str]]) -> dict[Ref, Allocation]:
    """The addresses of each Service of ours.

    ``evidence``: uid -> family -> the address a Service has now (kept while admitted,
    and before anyone gets a new one); ``held``: addresses LoadBalancers not derived from
    a Service use; ``labels``: namespace -> its labels.
    """
    order = sorted(claimants, key=lambda c: (c.created, c.ref))
    book = _Book(held)
    out: dict[Ref, Allocation] = {}
    got: dict[Ref, dict[str, tuple[str, str]]] = {}  # family -> (address, pool)
    why: dict[Ref, dict[str, tuple[str, str]]] = {}  # family -> (reason, message)
    later: dict[Ref, list[str]] = {}  # families still to allocate

    def admitting(c: Claimant) -> list[Grant]:
        seen = namespace_labels(c.ref[0], labels.get(c.ref[0]))
        return [g for g in grants if g.admits(seen)]

    def settle(c: Claimant) -> None:
        """All families allocated (or failed): served, or every address let go."""
        mine, failed = got.get(c.ref, {}), why.get(c.ref, {})
        label = len(c.families) > 1
        if all(f in mine for f in c.families[:c.required]):
            served = [f for f in c.families if f in mine]
            degraded = "; ".join(
                f"served in {', '.join(served)} only: {f}: {failed[f][1]}"
                for f in c.families if f not in mine)
            out[c.ref] = Allocation(
                tuple(mine[f][0] for f in served), ALLOCATED,
                ", ".join(f"{mine[f][0]} from pool {mine[f][1]}" for f in served), degraded)
            return
        for address, _ in mine.values():
            book.drop(c, address)
        family = next(f for f in c.families[:c.required] if f not in mine)
        reason, message = failed[family]
        if label:
            message = f"{family}: {message}"
            if c.required > 1:
                message += " (ipFamilyPolicy RequireDualStack: no family is served)"
        out[c.ref] = Allocation((), reason, message)

    for c in order:  # what was asked for, and what each already has
        if not c.ports or c.refused:
            out[c.ref] = Allocation((), "NoPorts" if not c.ports else "IPFamilyNotServed",
                                    "; ".join(c.problems) if not c.ports and c.problems
                                    else c.refused or "the Service has no TCP or UDP port")
            continue
        for family in c.families:
            requested = c.wants(family)
            mine = requested or evidence.get(c.uid, {}).get(family)
            if mine is None:
                later.setdefault(c.ref, []).append(family)
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
                got.setdefault(c.ref, {})[family] = (mine, fitting[0].name)
            elif requested:
                reason = "AddressInUse" if pools and fitting else "AddressNotAllowed"
                why.setdefault(c.ref, {})[family] = (reason, problem)
            else:
                later.setdefault(c.ref, []).append(family)  # no longer its own: a new one
        if c.ref not in later:
            settle(c)
    for c in order:
        for family in later.get(c.ref, ()):
            found = _new(c, family, admitting(c), book)
            if isinstance(found, _Miss):
                why.setdefault(c.ref, {})[family] = (found.reason, found.message)
            else:
                book.take(c, found[0])
                got.setdefault(c.ref, {})[family] = found
        if c.ref in later:
            settle(c)
    return out


@dataclass(frozen=True)
class _Miss:
    reason: str
    message: str


def _new(c: Claimant, family: str, admitting: Sequence[Grant], book: _Book
         ) -> tuple[str, str] | _Miss:
    """A new address of ``family`` for ``c``: (address, pool), or why there is none."""
    candidates = [g for g in admitting if (g.name == c.pool if c.pool else g.auto_assign)]
    fitting = [g for g in candidates if _fits(g, c)]
    found = next(((a, g) for g in fitting for a in _shared(c, family, g, book)), None) \
        or next(((a, g) for g in fitting for a in _free(g, c, family, book)), None)
    if found is not None:
        return found[0], found[1].name
    of_family = [g for g in fitting if any(f"IPv{r.version}" == family for r in g.ranges)]
    if of_family:
        return _Miss("PoolExhausted", "no free address in "
                     + ", ".join(g.name for g in of_family))
    if fitting:
        return _Miss("NoAddressPool", f"no {family} addresses in "
                     + ", ".join(g.summary() for g in fitting))
    if candidates:
        return _Miss("NoAddressPool", "a port of the Service is not allowed by "
                     + ", ".join(g.summary() for g in candidates))
    what = f"pool {c.pool!r} (it may not exist or not admit the namespace)" if c.pool \
        else "no AddressPool with autoAssign: true"
    return _Miss("NoAddressPool", f"{what} admits namespace {c.ref[0]!r}")


def _shared(c: Claimant, family: str, g: Grant, book: _Book) -> Iterator[str]:
    """Addresses of ``family`` in ``g`` that Services with ``c``'s sharing key hold and
    ``c`` may join."""
    if c.sharing is None:
        return
    for address, others in sorted(book.claims.items()):
        if any(o.sharing == c.sharing for o in others) and _family(address) == family \
                and g.holds(address) \
                and book.conflict(c, address) is None:
            yield address


def derived_lb(svc: Mapping[str, Any], addresses: Sequence[str]) -> Json:
    """The LoadBalancer a Service of ours becomes, at ``addresses`` (one per family,
    primary first): a listener per port per address."""
    meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
    affinity = "ClientIP" if spec.get("sessionAffinity") == "ClientIP" else "None"
    ports = claimant_of(svc).ports
    listeners = [{"name": name, "protocol": p.protocol, "port": p.port,
                  "address": address, "service": {"name": meta["name"],
                                                  "port": p.name or p.port},
                  "sessionAffinity": affinity}
                 for (p, address), name in zip(
                     [(p, a) for a in addresses for p in ports],
                     listener_names(ports, [_family(a) or "" for a in addresses]),
                     strict=True)]
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


def listener_names(ports: Sequence[Port], families: Sequence[str]) -> list[str]:
    """A unique name (at most 63 characters) per port per family, families outer: the
    primary family's are the ports' own (what a single-stack Service has always had),
    the other's end in ``-ipv6`` (or ``-ipv4``); a clash takes a number."""
    names: list[str] = []
    taken: set[str] = set()
    for i, family in enumerate(families):
        suffix = "" if i == 0 else "-" + family.lower()
        for p in ports:
            name = _fit(p.listener, suffix)
            n = 2
            while name in taken:
                name, n = _fit(p.listener, f"{suffix}-{n}"), n + 1
            taken.add(name)
            names.append(name)
    return names


def _fit(base: str, suffix: str) -> str:
    return (base[:63 - len(suffix)].rstrip("-") + suffix) if suffix or len(base) > 63 \
        else base


def owner_uid(lb: Mapping[str, Any]) -> str | None:
    """The uid of the Service that owns a derived LoadBalancer, or None."""
    for o in (lb.get("metadata") or {}).get("ownerReferences") or []:
        if o.get("kind") == "Service" and o.get("apiVersion") == "v1" and o.get("controller"):
            return str(o.get("uid", ""))
    return None


def ingress_ips(svc: Mapping[str, Any]) -> list[str]:
    return [i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get(
        "ingress") or [] if i.get("ip")]
