"""The node's interfaces, addresses and networks (IPv4, and IPv6 of global scope), read
with pyroute2, and whether they have changed since they were last read."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xdplb.dataplane.entries import Inventory


def read_inventory() -> Inventory:
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        addrs: dict[str, list[str]] = {}
        nets: dict[str, set[str]] = {}
        for a in ipr.get_addr():
            name = names.get(a["index"])
            # IPv6: global scope only (link-local addresses are no listener's).
            if not name or a["family"] not in (socket.AF_INET, socket.AF_INET6) or (
                    a["family"] == socket.AF_INET6 and a["scope"] != RT_SCOPE_UNIVERSE):
                continue
            addr = str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")))
            addrs.setdefault(name, []).append(addr)
            nets.setdefault(name, set()).add(
                str(ipaddress.ip_network(f"{addr}/{a['prefixlen']}", strict=False)))
        default = ""
        for family in (socket.AF_INET, socket.AF_INET6):  # IPv4's default route first
            for r in ipr.get_default_routes(family=family):
                oif = r.get_attr("RTA_OIF")
                if oif in names and not default:
                    default = names[oif]
    return Inventory(ifindex={n: i for i, n in names.items()},
                     addresses={n: tuple(sorted(a)) for n, a in addrs.items()},
                     default_interface=default,
                     networks={n: tuple(sorted(s)) for n, s in nets.items()})


RT_SCOPE_UNIVERSE = 0
# rtnetlink multicast groups (linux/rtnetlink.h).
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400


class NodeChanges:
    """Links, addresses and routes changed since the last call? An rtnetlink
    subscription: an idle agent polls with one non-blocking recv instead of dumping
    every link and address of the node (a node with many pods has hundreds)."""

    def __init__(self) -> None:
        # Subscribed before the first read_inventory(), so no change falls between.
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
                        | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE))

    def changed(self) -> bool:
        """Drains the events; true if there were any."""
        seen = False
        while True:
            try:
                self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return seen
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    return True  # cannot tell: read the node again
                # ENOBUFS: events were lost, so anything may have changed
            seen = True

    def close(self) -> None:
        self.sock.close()


def backend_routes(addresses: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Backend address -> (the node's source address toward it, outgoing interface),
    as the kernel would route a packet from this node; unroutable ones are absent."""
    out: dict[str, tuple[str, str]] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in sorted(set(addresses)):
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            try:
                routes = ipr.route("get", dst=addr, family=family)
            except NetlinkError:
                continue
            for r in routes:
                src, oif = r.get_attr("RTA_PREFSRC"), r.get_attr("RTA_OIF")
                if src and oif in names:
                    out[addr] = (src, names[oif])
                    break
    return out
