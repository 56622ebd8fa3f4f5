"""The node's interfaces and IPv4 addresses, read with pyroute2."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xdplb.dataplane.entries import Inventory


def read_inventory() -> Inventory:
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        addrs: dict[str, list[str]] = {}
        for a in ipr.get_addr(family=socket.AF_INET):
            name = names.get(a["index"])
            if name:
                addrs.setdefault(name, []).append(a.get_attr("IFA_ADDRESS"))
        default = ""
        for r in ipr.get_default_routes(family=socket.AF_INET):
            oif = r.get_attr("RTA_OIF")
            if oif in names:
                default = names[oif]
                break
    return Inventory(ifindex={n: i for i, n in names.items()},
                     addresses={n: tuple(sorted(a)) for n, a in addrs.items()},
                     default_interface=default)


def backend_routes(addresses: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Backend address -> (the node's source address toward it, outgoing interface),
    as the kernel would route a packet from this node; unroutable ones are absent."""
    out: dict[str, tuple[str, str]] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in sorted(set(addresses)):
            try:
                routes = ipr.route("get", dst=addr)
            except NetlinkError:
                continue
            for r in routes:
                src, oif = r.get_attr("RTA_PREFSRC"), r.get_attr("RTA_OIF")
                if src and oif in names:
                    out[addr] = (src, names[oif])
                    break
    return out
