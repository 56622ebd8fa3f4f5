"""The data-plane plan: pure, hashable data computed from validated specs.

No kernel, no API: the operator, the cluster agent and the standalone agent
compute the same plan from the same manifests, and `xdplb explain` answers
from it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from functools import cached_property

from xdplb.plan import maglev


def hostport(address: str, port: int) -> str:
    """address:port, an IPv6 address in brackets ([2001:db8::1]:80)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True, order=True)
class Backend:
    address: str
    port: int
    weight: int = 1
    healthy: bool = True  # False: failing its health checks (weight 0 then)


V4_MAPPED = b"\0" * 10 + b"\xff\xff"  # the prefix of an IPv4-mapped IPv6 address


def address_key(address: str) -> bytes:
    """Sorts addresses in numeric order, IPv4 (as ::ffff:a.b.c.d) before IPv6 from
    2000::/3 (an IPv4 address without building an ipaddress object)."""
    if ":" in address:
        return ipaddress.IPv6Address(address).packed
    return V4_MAPPED + socket.inet_aton(address)


@dataclass(frozen=True)
class Group:
    """A set of weighted backends in canonical order; identical groups are
    equal, so they share one table in the data plane."""

    backends: tuple[Backend, ...]

    @staticmethod
    def of(backends: list[Backend] | tuple[Backend, ...]) -> Group:
        if len(backends) > 1:
            backends = sorted(backends, key=lambda b: (address_key(b.address), b.port, b.weight))
        return Group(tuple(backends))

    @cached_property
    def _hash(self) -> int:
        return hash(self.backends)

    def __hash__(self) -> int:  # groups are dictionary keys all along the writer
        return self._hash

    @cached_property
    def table(self) -> tuple[int, ...]:
        return maglev.build_table(self.backends)


@dataclass(frozen=True, order=True)
class HealthCheck:
    """How a group's backends are probed (spec `healthCheck`)."""

    protocol: str             # TCP (connect) | UDP (send payload, expect any answer)
    port: int | None          # None: each backend's own port
    interval: float           # seconds between probes of one backend
    timeout: float
    healthy_threshold: int    # passes in a row to come back
    unhealthy_threshold: int  # failures in a row to stop getting new flows
    payload: bytes = b""


@dataclass(frozen=True, order=True)
class Target:
    """One probed endpoint; backends of several groups with the same check share it."""

    address: str
    port: int
    check: HealthCheck


@dataclass(frozen=True)
class SourceRoute:
    cidr: str
    group: Group

    @cached_property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.cidr)

    def sort_key(self) -> tuple[bytes, int]:
        """The order of `network`, without building it."""
        address, _, length = self.cidr.partition("/")
        return address_key(address), int(length)


@dataclass(frozen=True)
class SniRoute:
    hostname: str
    group: Group


@dataclass(frozen=True)
class Listener:
    owner: str                    # namespace/name of the LoadBalancer
    name: str
    address: str | None           # None: every address of the interfaces
    port: int
    protocol: str                 # TCP | UDP
    interfaces: tuple[str, ...]   # empty: the interface of the default route
    default: Group
    source_routes: tuple[SourceRoute, ...] = ()
    sni_routes: tuple[SniRoute, ...] = ()
    client_ip_affinity: bool = False
    proxy_protocol: bool = False      # PROXY v2 header on connections of the SNI acceptor
    source_nat: bool = False          # new flows leave from the node's address (sourceNAT: Node)
    health_targets: tuple[Target, ...] = ()  # what the agent probes for these groups
    family: int = 4                   # 4 or 6: of its address, clients and backends

    @property
    def identity(self) -> tuple[str | None, int, str]:
        """Unique among a plan's listeners. Without an address, a listener takes every
        address of its family: None stands for IPv4's, "::" for IPv6's."""
        return (self.address or (None if self.family == 4 else "::"), self.port, self.protocol)

    @property
    def sni(self) -> bool:
        return bool(self.sni_routes)

    @property
    def label(self) -> str:
        return f"{self.owner}/{self.name}"

    @cached_property
    def groups(self) -> tuple[Group, ...]:
        """Its distinct groups: the default, then the routes' (mostly a few shared ones)."""
        return tuple(dict.fromkeys((self.default, *(r.group for r in self.source_routes),
                                    *(r.group for r in self.sni_routes))))

    def backends(self) -> set[Backend]:
        return {b for g in self.groups for b in g.backends}


def all_backends(plan: Plan) -> set[str]:
    return {b.address for lst in plan.listeners for b in lst.backends()}


def snat_backends(plan: Plan) -> set[str]:
    """Addresses of the backends that source-NAT listeners send to."""
    return {b.address for lst in plan.listeners if lst.source_nat for b in lst.backends()}


@dataclass(frozen=True)
class Plan:
    listeners: tuple[Listener, ...] = field(default_factory=tuple)
    # Listeners left out on purpose (trafficPolicy Local, no endpoint on this node).
    untouched: tuple[str, ...] = ()

    def health_targets(self) -> frozenset[Target]:
        return frozenset(t for lst in self.listeners for t in lst.health_targets)

    def interfaces(self, default: str) -> tuple[str, ...]:
        """Every interface the data plane attaches to, in a stable order."""
        names = {name for lst in self.listeners for name in (lst.interfaces or (default,))}
        return tuple(sorted(names))
