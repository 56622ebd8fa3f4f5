"""A flat-network lab for L2 announcement: two load balancer nodes and a client on one
bridge, the backends on another (root required; namespaces ``<prefix>-*``).

    cli [front 10.70.0.2/24] ──┐
    n1  [front 10.70.0.11]  ───┤ bridge "front"      (both bridges live in <prefix>-br)
    n2  [front 10.70.0.12]  ───┘
    n1  [back  10.71.0.11]  ───┐
    n2  [back  10.71.0.12]  ───┤ bridge "back"
    b1  [eth0  10.71.0.21]  ───┤
    b2  [eth0  10.71.0.22]  ───┘

The client has no route but its subnet's: it reaches an address of 10.70.0.0/24 only if
some node answers ARP for it. With ``ipv6=True`` each link has an IPv6 address too, of
fd70::/64 in front and fd71::/64 in back (the last part as in IPv4: fd70::11 is n1's),
DAD off; the client reaches fd70::/64 only if some node answers Neighbour Solicitations.
The nodes forward, and their default route points at the
front bridge (so a LoadBalancer without interfaces attaches there). The traffic tools
and process handling are the namespace lab's (tests/lab.py).
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

from tests.lab import Lab, _ip, list_netns

FRONT, BACK = "10.70.0", "10.71.0"
FRONT6, BACK6 = "fd70:", "fd71:"


class L2Lab(Lab):
    NODES = ("n1", "n2")
    client_addr = f"{FRONT}.2"

    client6_addr = f"{FRONT6}:2"

    def __init__(self, prefix: str, ipv6: bool = False) -> None:
        super().__init__(backends=2, prefix=prefix, ipv6=ipv6)

    def ns(self, name: str) -> str:
        if name in ("br", "cli", *self.NODES, *self.backends):
            return f"{self.prefix}-{name}"
        raise KeyError(f"no namespace {name!r} in this lab")

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(n) for n in ("br", "cli", *self.NODES, *self.backends)]

    @staticmethod
    def node_addr(node: str) -> str:
        return f"{FRONT}.1{node[1:]}"

    @staticmethod
    def node_back_addr(node: str) -> str:
        return f"{BACK}.1{node[1:]}"

    @staticmethod
    def backend_addr(k: int) -> str:
        return f"{BACK}.2{k}"

    @staticmethod
    def node6_addr(node: str) -> str:
        return f"{FRONT6}:1{node[1:]}"

    @staticmethod
    def backend6_addr(k: int) -> str:
        return f"{BACK6}:2{k}"

    @staticmethod
    def _v6(addr: str) -> str:
        """The IPv6 address of a link of the lab, from its IPv4 one."""
        net, last = addr.rsplit(".", 1)
        return f"{FRONT6 if net == FRONT else BACK6}:{last}"

    def _remove_stale(self) -> None:
        stale = re.compile(rf"{re.escape(self.prefix)}-(br|cli|n\d|b\d+)")
        for name in list_netns():
            if stale.fullmatch(name):
                self._delete_ns(name)

    def _build(self) -> None:
        for name in self.namespaces:
            _ip("netns", "add", name)
            self._created.append(name)
            v6 = "0" if self.ipv6 else "1"
            self._sysctl(name, {
                "net.ipv6.conf.all.disable_ipv6": v6,
                "net.ipv6.conf.default.disable_ipv6": v6,
                "net.ipv6.conf.all.accept_dad": "0",
                "net.ipv6.conf.default.accept_dad": "0",
                # node_down/node_up: the addresses stay, as IPv4's do
                "net.ipv6.conf.all.keep_addr_on_down": "1",
                "net.ipv6.conf.default.keep_addr_on_down": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
            })
            _ip("-n", name, "link", "set", "lo", "up")
        br = self.ns("br")
        for bridge in ("front", "back"):
            _ip("-n", br, "link", "add", bridge, "type", "bridge")
            _ip("-n", br, "link", "set", bridge, "up")
        ports = [("cli", "front", f"{FRONT}.2", "front")]
        for node in self.NODES:
            ports += [(node, "front", self.node_addr(node), "front"),
                      (node, "back", self.node_back_addr(node), "back")]
        ports += [(b, "eth0", self.backend_addr(k), "back")
                  for k, b in enumerate(self.backends, 1)]
        for short, dev, addr, bridge in ports:
            port = f"{short}-{bridge[0]}"
            _ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", dev,
                "netns", self.ns(short))
            _ip("-n", br, "link", "set", port, "master", bridge, "up")
            _ip("-n", self.ns(short), "addr", "add", f"{addr}/24", "dev", dev)
            if self.ipv6:
                _ip("-n", self.ns(short), "addr", "add", f"{self._v6(addr)}/64", "dev", dev,
                    "nodad")
            _ip("-n", self.ns(short), "link", "set", dev, "up")
        for node in self.NODES:
            self._sysctl(self.ns(node), {"net.ipv4.ip_forward": "1",
                                         "net.ipv4.conf.front.rp_filter": "0",
                                         "net.ipv4.conf.back.rp_filter": "0",
                                         "net.ipv6.conf.all.forwarding": "1"})
            # An absent gateway: what matters is that the default route's interface is front.
            _ip("-n", self.ns(node), "route", "add", "default", "via", f"{FRONT}.1")
            if self.ipv6:
                _ip("-n", self.ns(node), "-6", "route", "add", "default", "via", f"{FRONT6}:1")

    # -- a node leaving the segment and coming back --------------------------------------

    def node_down(self, node: str) -> None:
        _ip("-n", self.ns(node), "link", "set", "front", "down")

    def node_up(self, node: str) -> None:
        """The link up again, and the default route the kernel dropped with it."""
        _ip("-n", self.ns(node), "link", "set", "front", "up")
        _ip("-n", self.ns(node), "route", "replace", "default", "via", f"{FRONT}.1")
        if self.ipv6:
            _ip("-n", self.ns(node), "-6", "route", "replace", "default", "via", f"{FRONT6}:1")

    # -- what the client and the nodes see ------------------------------------------------

    def proxies(self, ns: str) -> list[str]:
        """``ip -6 neigh show proxy`` of namespace ``ns``: "address dev"."""
        out = _ip("-n", self.ns(ns), "-6", "neigh", "show", "proxy").stdout
        return [" ".join(line.split()[:3:2]) for line in out.splitlines() if line.strip()]

    def neighbour(self, ns: str, address: str, dev: str = "front") -> dict[str, Any] | None:
        import json

        out = _ip("-n", self.ns(ns), "-j", "neigh", "show", "to", address, "dev", dev).stdout
        entries = json.loads(out or "[]")
        return entries[0] if entries else None

    def local_routes(self, ns: str) -> dict[str, str]:
        """Address -> protocol of the host routes in the local table of namespace ``ns``
        that are no interface address's (both families)."""
        out = "".join(subprocess.run(["ip", "-n", self.ns(ns), family, "route", "show", "table",
                                      "local", "type", "local"], capture_output=True, text=True,
                                     check=True).stdout
                      for family in (("-4", "-6") if self.ipv6 else ("-4",)))
        routes = {}
        for line in out.splitlines():
            parts = line.split()
            if "proto" in parts and parts[parts.index("proto") + 1] != "kernel":
                routes[parts[1]] = parts[parts.index("proto") + 1]
        return routes
