"""Who may claim which address: a LoadBalancer judged against the AddressPools (pure).

The operator and every agent judge alike (the agents too, so that a node never programs
what no pool admits while the operator is down or lagging). In a cluster:

- a listener's address must lie in a pool that admits the object's namespace, and its
  port be among that pool's ``allowedPorts`` (if set);
- a listener without an address (every address of the node: ssh, kubelet) needs such a
  pool with ``nodeAddresses: true``;
- listed backends are never loopback, link-local (the cloud metadata service), multicast,
  broadcast or a node's own address, and lie in the admitting pool's
  ``allowedBackendCIDRs`` when it sets them. Service backends are the endpoints of a
  Service of the object's own namespace (the model has no other way to name one).

A refusal is reason ``AddressNotAllowed``, with every problem and the pools that admit
the namespace (what the user may use instead). A standalone file is the admin's own, and
is never judged here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from xdplb.k8s.conditions import selector_matches
from xdplb.spec.addresses import AddressRange, special_kind
from xdplb.spec.model import Backend, Listener, LoadBalancer
from xdplb.spec.pool import AddressPool, PortRange

__all__ = ["NOT_ALLOWED", "Admission", "Grant", "PoolView", "admit", "grants_of",
           "namespace_labels"]

NOT_ALLOWED = "AddressNotAllowed"
NAME_LABEL = "kubernetes.io/metadata.name"  # the API server sets it on every namespace
SHOWN = 10  # problems in one message; the rest are counted


@dataclass(frozen=True)
class Grant:
    """A valid AddressPool, as the judgement and the allocation read it."""

    name: str
    uid: str
    ranges: tuple[AddressRange, ...]
    selector: Mapping[str, object]
    ports: tuple[PortRange, ...] | None
    backend_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None
    auto_assign: bool
    node_addresses: bool
    announce: str
    l2_interfaces: tuple[str, ...]

    @classmethod
    def of(cls, pool: AddressPool, uid: str = "") -> Grant:
        spec = pool.spec
        return cls(
            pool.name, uid, spec.ranges(),
            spec.namespace_selector.model_dump(by_alias=True, exclude_none=True),
            tuple(spec.allowed_ports) if spec.allowed_ports else None,
            tuple(ipaddress.ip_network(c) for c in spec.allowed_backend_cidrs)
            if spec.allowed_backend_cidrs else None,
            spec.auto_assign, spec.node_addresses, spec.announce,
            tuple(spec.l2_interfaces or ()))

    def admits(self, labels: Mapping[str, str]) -> bool:
        return selector_matches(self.selector, labels)

    def holds(self, address: str) -> bool:
        return any(address in r for r in self.ranges)

    def allows_port(self, port: int, protocol: str) -> bool:
        return self.ports is None or any(p.allows(port, protocol) for p in self.ports)

    def allows_backend(self, address: str) -> bool:
        if self.backend_nets is None:
            return True
        addr = ipaddress.ip_address(address)
        return any(addr.version == n.version and addr in n for n in self.backend_nets)

    def summary(self) -> str:
        parts = [", ".join(r.text for r in self.ranges[:3])
                 + (f" and {len(self.ranges) - 3} more" if len(self.ranges) > 3 else "")]
        if self.node_addresses:
            parts.append("nodeAddresses")
        if self.ports is not None:
            parts.append("ports " + ", ".join(str(p) for p in self.ports))
        return f"{self.name} ({'; '.join(p for p in parts if p)})"


def grants_of(pools: Iterable[tuple[AddressPool, str]]) -> tuple[Grant, ...]:
    """The grants of valid pools (with their uids), by name."""
    return tuple(sorted((Grant.of(p, uid) for p, uid in pools), key=lambda g: g.name))


def namespace_labels(namespace: str, labels: Mapping[str, str] | None) -> dict[str, str]:
    """A namespace's labels as selectors see them: with its name label even before the
    Namespace object is known."""
    return {**(labels or {}), NAME_LABEL: namespace}


@dataclass(frozen=True)
class Admission:
    """The judgement: None or the refusal's message; the pool admitting each address."""

    refusal: str | None
    pools: Mapping[str, str]  # listener address -> the admitting pool's name

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def _backend_problems(where: str, backends: Sequence[Backend], nodes: frozenset[str]
                      ) -> Iterator[str]:
    for i, b in enumerate(backends):
        addr = ipaddress.ip_address(b.address)
        what = special_kind(addr)
        if what is None and b.address in nodes:
            what = "an address of a node"
        if what is not None:
            yield f"{where}.backends[{i}].address: {b.address} is {what}: never a backend"


def _listed_backends(listener: Listener, lp: str) -> Iterator[tuple[str, Sequence[Backend]]]:
    yield lp, listener.backends or ()
    for j, source in enumerate(listener.source_routes):
        if source.backends:
            yield f"{lp}.sourceRoutes[{j}]", source.backends
    for j, sni in enumerate(listener.sni_routes):
        if sni.backends:
            yield f"{lp}.sniRoutes[{j}]", sni.backends


def _judge_listener(lp: str, listener: Listener, ns: str, admitting: Sequence[Grant]
                    ) -> tuple[list[str], Grant | None]:
    addr, port, proto = listener.address, listener.port, listener.protocol
    if addr is None:
        holders = [g for g in admitting if g.node_addresses]
        if not holders:
            return [f"{lp}: a listener without an address serves every address of the node"
                    f" (port {port}/{proto}); it needs an AddressPool with nodeAddresses: true"
                    f" that admits namespace {ns!r}"], None
    else:
        holders = [g for g in admitting if g.holds(addr)]
        if not holders:
            return [f"{lp}.address: {addr} is in no AddressPool that admits namespace"
                    f" {ns!r}"], None
    ported = [g for g in holders if g.allows_port(port, proto)]
    if not ported:
        names = ", ".join(g.summary() for g in holders)
        return [f"{lp}.port: {port}/{proto} is not allowed by {names}"], None
    listed = [(where, b) for where, group in _listed_backends(listener, lp) for b in group]
    for g in ported:
        if all(g.allows_backend(b.address) for _, b in listed):
            return [], g
    g = ported[0]
    outside = [f"{where}: backend {b.address} lies outside allowedBackendCIDRs of pool"
               f" {g.name} ({', '.join(str(n) for n in g.backend_nets or ())})"
               for where, b in listed if not g.allows_backend(b.address)]
    return outside, None


def admit(lb: LoadBalancer, labels: Mapping[str, str] | None, grants: Sequence[Grant],
          nodes: frozenset[str] = frozenset()) -> Admission:
    """Judge ``lb`` (valid) of a namespace with ``labels`` against the pools' grants;
    ``nodes``: the nodes' own addresses."""
    ns = lb.metadata.namespace
    seen = namespace_labels(ns, labels)
    admitting = [g for g in grants if g.admits(seen)]
    problems: list[str] = []
    pools: dict[str, str] = {}
    for i, listener in enumerate(lb.spec.listeners):
        lp = f"spec.listeners[{i}]"
        for where, backends in _listed_backends(listener, lp):
            problems += _backend_problems(where, backends, nodes)
        found, grant = _judge_listener(lp, listener, ns, admitting)
        problems += found
        if grant is not None and listener.address is not None:
            pools.setdefault(listener.address, grant.name)
    if not problems:
        return Admission(None, pools)
    shown = "; ".join(problems[:SHOWN])
    if len(problems) > SHOWN:
        shown += f"; and {len(problems) - SHOWN} more"
    offer = (f"AddressPools admitting namespace {ns!r}: "
             + ", ".join(g.summary() for g in admitting)) if admitting else (
        f"no AddressPool admits namespace {ns!r}")
    return Admission(f"{shown}. {offer}", pools)


@dataclass(frozen=True)
class PoolView:
    """What a judgement needs besides the object: the pools, the namespaces' labels and
    the nodes' own addresses."""

    grants: tuple[Grant, ...] = ()
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    nodes: frozenset[str] = frozenset()

    def judge(self, lb: LoadBalancer) -> Admission:
        return admit(lb, self.namespaces.get(lb.metadata.namespace), self.grants, self.nodes)

    def grant(self, name: str) -> Grant | None:
        return next((g for g in self.grants if g.name == name), None)
