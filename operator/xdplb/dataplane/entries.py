"""Plan + interface inventory -> the listener entries the data path needs (pure)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from xdplb.plan.model import Listener, Plan

ListenerKeyTuple = tuple[int, str, int, str]  # (ifindex, address, port, protocol)


@dataclass(frozen=True)
class Inventory:
    """What the node has: interface indexes and their addresses (IPv4, and IPv6 global
    ones), as the listeners without an address take them."""

    ifindex: dict[str, int]
    addresses: dict[str, tuple[str, ...]]
    default_interface: str = ""
    # Interface -> the networks of its addresses (CIDRs, e.g. "10.20.1.0/24").
    networks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Backend address -> (the node's source address toward it, outgoing interface),
    # from the routing table: what source NAT rewrites to, and where replies arrive.
    routes: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Expansion:
    keys: dict[ListenerKeyTuple, Listener] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def listener_interfaces(lst: Listener, inv: Inventory) -> tuple[str, ...]:
    return lst.interfaces or ((inv.default_interface,) if inv.default_interface else ())


def hairpin_listeners(plan: Plan, inv: Inventory) -> list[Listener]:
    """Listeners with a backend behind one of their own interfaces: that backend may
    connect to its own listener, and such flows need source NAT."""
    out = []
    for lst in plan.listeners:
        ifs = set(listener_interfaces(lst, inv))
        if any(inv.routes.get(b.address, ("", ""))[1] in ifs for b in lst.backends()):
            out.append(lst)
    return out


def backend_networks(plan: Plan, inv: Inventory) -> dict[str, int]:
    """The networks of the node's interfaces that backends of hairpin listeners lie on,
    numbered from 1: a client on one of them would get its backend's answer directly,
    so its flows to a backend there are source-NATed (LF_HAIRPIN)."""
    nets: set[str] = set()
    for lst in hairpin_listeners(plan, inv):
        for b in lst.backends():
            route = inv.routes.get(b.address)
            if route is None:
                continue
            addr = ipaddress.ip_address(b.address)
            nets.update(n for n in inv.networks.get(route[1], ())
                        if addr in ipaddress.ip_network(n))
    ordered = sorted(nets, key=lambda n: (ipaddress.ip_network(n).version,
                                          ipaddress.ip_network(n)))
    return {n: i for i, n in enumerate(ordered, 1)}


def translated_listeners(plan: Plan, inv: Inventory) -> list[Listener]:
    """Listeners some of whose flows leave from the node's address."""
    hairpin = hairpin_listeners(plan, inv)
    return [lst for lst in plan.listeners if lst.source_nat or lst in hairpin]


def expand(plan: Plan, inv: Inventory) -> Expansion:
    """One key per (ingress interface, destination address). A wildcard
    listener takes every address of its family on its interfaces; an exact
    address beats the wildcard for the same port."""
    out = Expansion()
    exact: set[ListenerKeyTuple] = set()
    for lst in plan.listeners:
        names = listener_interfaces(lst, inv)
        if not names:
            out.problems.append(f"{lst.label}: no interface (no default route)")
        missing = [n for n in names if n not in inv.ifindex]
        for n in missing:
            out.problems.append(f"{lst.label}: interface {n} does not exist")
        present = [n for n in names if n in inv.ifindex]
        if lst.address:
            addrs: list[str] = [lst.address]
        else:
            addrs = sorted({a for n in present for a in inv.addresses.get(n, ())
                            if (":" in a) == (lst.family == 6)})
        for n in present:
            for a in addrs:
                key = (inv.ifindex[n], a, lst.port, lst.protocol)
                if lst.address:
                    exact.add(key)
                    out.keys[key] = lst
                elif key not in exact:
                    out.keys.setdefault(key, lst)
    return out
