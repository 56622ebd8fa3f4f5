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
some node answers ARP for it. The nodes forward, and their default route points at the
front bridge (so a LoadBalancer without interfaces attaches there). The traffic tools
and process handling are the namespace lab's (tests/lab.py).
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

from tests.lab import Lab, _ip, list_netns

FRONT, BACK = "10.70.0", "10.71.0"


class L2Lab(Lab):
    NODES = ("n1", "n2")
    client_addr = f"{FRONT}.2"

    def __init__(self, prefix: str) -> None:
        super().__init__(backends=2, prefix=prefix)

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

    def _remove_stale(self) -> None:
        stale = re.compile(rf"{re.escape(self.prefix)}-(br|cli|n\d|b\d+)")
        for name in list_netns():
            if stale.fullmatch(name):
                self._delete_ns(name)

    def _build(self) -> None:
        for name in self.namespaces:
            _ip("netns", "add", name)
            self._created.append(name)
            self._sysctl(name, {
                "net.ipv6.conf.all.disable_ipv6": "1",
                "net.ipv6.conf.default.disable_ipv6": "1",
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
            _ip("-n", self.ns(short), "link", "set", dev, "up")
        for node in self.NODES:
            self._sysctl(self.ns(node), {"net.ipv4.ip_forward": "1",
                                         "net.ipv4.conf.front.rp_filter": "0",
                                         "net.ipv4.conf.back.rp_filter": "0"})
            # An absent gateway: what matters is that the default route's interface is front.
            _ip("-n", self.ns(node), "route", "add", "default", "via", f"{FRONT}.1")

    # -- a node leaving the segment and coming back --------------------------------------

    def node_down(self, node: str) -> None:
        _ip("-n", self.ns(node), "link", "set", "front", "down")

    def node_up(self, node: str) -> None:
        """The link up again, and the default route the kernel dropped with it."""
        _ip("-n", self.ns(node), "link", "set", "front", "up")
        _ip("-n", self.ns(node), "route", "replace", "default", "via", f"{FRONT}.1")

    # -- what the client and the nodes see ------------------------------------------------

    def neighbour(self, ns: str, address: str, dev: str = "front") -> dict[str, Any] | None:
        import json

        out = _ip("-n", self.ns(ns), "-j", "neigh", "show", "to", address, "dev", dev).stdout
        entries = json.loads(out or "[]")
        return entries[0] if entries else None

    def local_routes(self, ns: str) -> dict[str, str]:
        """Address -> protocol of the host routes in the local table of namespace ``ns``
        that are no interface address's."""
        out = subprocess.run(["ip", "-n", self.ns(ns), "route", "show", "table", "local",
                              "type", "local"], capture_output=True, text=True,
                             check=True).stdout
        routes = {}
        for line in out.splitlines():
            parts = line.split()
            if "proto" in parts and parts[parts.index("proto") + 1] != "kernel":
                routes[parts[1]] = parts[parts.index("proto") + 1]
        return routes
