"""The node's interfaces and IPv4 addresses, read with pyroute2."""

from __future__ import annotations

import socket

from pyroute2 import IPRoute

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
