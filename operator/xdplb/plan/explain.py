"""Which listener, route and backend a new flow gets, from the plan alone."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from xdplb.plan.flowhash import client_hash, flow_hash
from xdplb.plan.model import Backend, Group, Listener, Plan, hostport


@dataclass(frozen=True)
class Explanation:
    listener: Listener | None
    route: str            # "source <cidr>", "default", "sni", "sni <name>" or "none"
    group: Group | None
    slot: int | None
    backend: Backend | None
    verdict: str          # dnat | pass | rst | drop

    def text(self) -> str:
        if self.listener is None:
            if self.verdict == "drop":
                return "a VIP, but no listener serves this port and protocol there: dropped"
            return "no listener: passed untouched"
        head = f"listener {self.listener.label} ({endpoint(self.listener)}), route {self.route}"
        if self.verdict == "pass":
            return (f"{head}: left to the SNI path (backend chosen from the ClientHello; "
                    "--sni NAME says which)")
        if self.backend is None:
            return f"{head}: no eligible backend: {self.verdict}"
        source = ("source NAT: it leaves from this node's address toward the backend"
                  if self.listener.source_nat else
                  "client address kept: the backend must route its replies via this node")
        if self.route.startswith("sni"):
            source = "the SNI acceptor connects to it"
        return (f"{head}: table slot {self.slot} of {len(self.group.table) if self.group else 0}"
                f" -> backend {hostport(self.backend.address, self.backend.port)} ({source})")


def endpoint(lst: Listener) -> str:
    """address:port/protocol; an IPv6 address in brackets, "*" or "[::]" for every
    address of its family."""
    if lst.address is None:
        return f"{'*' if lst.family == 4 else '[::]'}:{lst.port}/{lst.protocol}"
    return f"{hostport(lst.address, lst.port)}/{lst.protocol}"


def find_listener(plan: Plan, dst: str, dport: int, protocol: str,
                  local_addresses: set[str] | None = None) -> Listener | None:
    """An exact address beats the wildcard; a wildcard matches the node's own
    addresses (all of them when they are not given)."""
    family = 6 if ":" in dst else 4
    candidates = [lst for lst in plan.listeners if lst.port == dport
                  and lst.protocol == protocol and lst.family == family]
    for lst in candidates:
        if lst.address == dst:
            return lst
    for lst in candidates:
        if lst.address is None and (local_addresses is None or dst in local_addresses):
            return lst
    return None


def explain(plan: Plan, src: str, sport: int, dst: str, dport: int, protocol: str = "TCP",
            local_addresses: set[str] | None = None,
            server_name: str | None = None) -> Explanation:
    """What the data path does with a new flow. On an SNI listener, with `server_name`
    (the ClientHello's, "" for none): the backend the SNI acceptor picks."""
    lst = find_listener(plan, dst, dport, protocol, local_addresses)
    if lst is None:
        # A listener address that is no address of the node is a VIP: what no listener
        # serves there is dropped (bpf/xdplb.c not_ours).
        vips = {x.address for x in plan.listeners if x.address} - (local_addresses or set())
        return Explanation(None, "none", None, None, None, "drop" if dst in vips else "pass")
    client = ipaddress.ip_address(src)
    if client.version != lst.family:  # the data path passes such a packet untouched
        return Explanation(None, "none", None, None, None, "pass")
    hits = [r for r in lst.source_routes if client in r.network]
    if hits:
        best = max(hits, key=lambda r: r.network.prefixlen)
        group, route = best.group, f"source {best.cidr}"
    elif lst.sni and server_name is None:
        return Explanation(lst, "sni", None, None, None, "pass")
    elif lst.sni:
        name = (server_name or "").lower().rstrip(".")
        named = {r.hostname.lower(): r.group for r in lst.sni_routes}
        group = named.get(name, lst.default)
        route = f"sni {name}" if name in named else "sni default"
    else:
        group, route = lst.default, "default"
    table = group.table
    if not table:
        return Explanation(lst, route, group, None, None,
                           "rst" if protocol == "TCP" else "drop")
    h = client_hash(src) if lst.client_ip_affinity else flow_hash(src, dst, sport, dport,
                                                                  protocol)
    slot = h % len(table)
    return Explanation(lst, route, group, slot, group.backends[table[slot]], "dnat")
