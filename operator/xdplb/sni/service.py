"""The agent's SNI path: one acceptor for every SNI listener of the plan, the local
routes that make their VIPs deliver SYNs to it, and the in-kernel splice.

XDP leaves new flows of an SNI listener that no source route claims to the kernel
(XDP_PASS). A VIP is not an address of the node, so a `local` route in the local
table (on lo, protocol RTPROT_XDPLB so ours are found again after a crash) makes the
kernel deliver them to the acceptor's socket, bound with IP_FREEBIND. A wildcard SNI
listener binds each address of its interfaces, never 0.0.0.0.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from functools import partial

from pyroute2 import IPRoute

from xdplb.dataplane.bpfsys import BpfMap
from xdplb.dataplane.entries import Inventory, listener_interfaces
from xdplb.plan.model import Plan
from xdplb.sni.acceptor import HELLO_TIMEOUT, Acceptor, Address
from xdplb.sni.routes import Route, pick_backend
from xdplb.sni.splice import Splicer

log = logging.getLogger("xdplb.sni")

RTPROT_XDPLB = 0xB5          # marks the local routes this agent added
RT_TABLE_LOCAL = 255
RT_SCOPE_HOST = 254
LOOKUP_MAPS = ("sni_routes", "groups", "pool", "backends")


def bindings(plan: Plan, inv: Inventory,
             listener_ids: Mapping[tuple[str | None, int, str], int]) -> dict[Address, Route]:
    """(address, port) -> route for every SNI listener; an exact address beats a
    wildcard listener on the same port (as in the listener map)."""
    out: dict[Address, Route] = {}
    sni = [lst for lst in plan.listeners if lst.sni]
    for lst in sorted(sni, key=lambda lst: lst.address is None):
        route = Route(listener_ids[lst.identity], lst.label, lst.client_ip_affinity,
                      lst.proxy_protocol)
        if lst.address:
            addrs = [lst.address]
        else:
            addrs = sorted({a for n in listener_interfaces(lst, inv)
                            for a in inv.addresses.get(n, ()) if (":" in a) == (lst.family == 6)})
        for a in addrs:
            out.setdefault((a, lst.port), route)
    return out


def local_routes_needed(want: Mapping[Address, Route], inv: Inventory) -> set[str]:
    """VIPs that are no address of the node."""
    own = {a for addrs in inv.addresses.values() for a in addrs}
    return {addr for addr, _port in want if addr not in own}


class SniService:
    def __init__(self, maps: Mapping[str, BpfMap], pin_dir: str,
                 hello_timeout: float = HELLO_TIMEOUT) -> None:
        self.pin_dir = pin_dir  # where the splice's maps pass from its compiler
        # Own descriptors: lookups from the acceptor's thread stay out of the writer's counts.
        self.maps = {n: BpfMap(os.dup(maps[n].fd), n) for n in LOOKUP_MAPS}
        self.hello_timeout = hello_timeout
        self.splicer: Splicer | None = None
        self.acceptor: Acceptor | None = None
        self._routes: set[str] = set()
        self._remove_routes(set())           # leftovers of an agent that died

    def apply(self, plan: Plan, inv: Inventory,
              listener_ids: Mapping[tuple[str | None, int, str], int]) -> list[str]:
        """Bring listeners and local routes in line with the plan; returns problems."""
        want = bindings(plan, inv, listener_ids)
        if want and self.acceptor is None:
            self.splicer = Splicer(self.pin_dir)
            self.acceptor = Acceptor(partial(pick_backend, self.maps), self.splicer,
                                     self.hello_timeout)
            self.acceptor.start()
        if self.acceptor is None:
            return []
        routes = local_routes_needed(want, inv)
        self._add_routes(routes - self._routes)
        problems = self.acceptor.set_listeners(want)
        self._remove_routes(routes)
        return problems

    def stats(self) -> tuple[dict[str, int], int]:
        """The acceptor's counters (OUTCOMES) and the pairs it splices now."""
        if self.acceptor is None:
            return {}, 0
        return dict(self.acceptor.stats), self.acceptor.open_pairs

    def stop(self) -> None:
        if self.acceptor is not None:
            self.acceptor.stop()
            self.acceptor = None
        self._remove_routes(set())
        if self.splicer is not None:
            self.splicer.close()
            self.splicer = None
        for m in self.maps.values():
            m.close()

    # -- local routes -------------------------------------------------------------------
    def _add_routes(self, addrs: set[str]) -> None:
        if not addrs:
            return
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for a in sorted(addrs):
                ipr.route("replace", dst=a, dst_len=32, type="local", table=RT_TABLE_LOCAL,
                          proto=RTPROT_XDPLB, scope=RT_SCOPE_HOST, oif=lo)
                self._routes.add(a)
                log.info("SNI: %s made local (route in table local on lo)", a)

    def _remove_routes(self, keep: set[str]) -> None:
        with IPRoute() as ipr:
            ours = [r for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_LOCAL)
                    if r["proto"] == RTPROT_XDPLB]
            for r in ours:
                a = r.get_attr("RTA_DST")
                if a in keep:
                    continue
                ipr.route("del", dst=a, dst_len=32, type="local", table=RT_TABLE_LOCAL,
                          proto=RTPROT_XDPLB, scope=RT_SCOPE_HOST, oif=r.get_attr("RTA_OIF"))
                self._routes.discard(a)
                log.info("SNI: local route for %s removed", a)
