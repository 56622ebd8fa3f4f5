"""The agent's SNI path: one acceptor process for every SNI listener of the plan, the
local routes that make their VIPs deliver SYNs to it, and the routing snapshot it gets
after every apply.

XDP leaves new flows of an SNI listener that no source route claims to the kernel
(XDP_PASS). A VIP is not an address of the node, so a `local` route in the local
table (on lo, protocol RTPROT_XDPLB so ours are found again after a crash) makes the
kernel deliver them to the acceptor's socket, bound with FREEBIND. A wildcard SNI
listener binds each address of its interfaces, never the wildcard address.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping

from pyroute2 import IPRoute

from xdplb.dataplane.entries import Inventory, listener_interfaces
from xdplb.plan.model import Plan
from xdplb.sni.routes import Address, Route, RoutingSender, sni_listeners
from xdplb.sni.settings import SniSettings
from xdplb.sni.worker import Worker, WorkerError

log = logging.getLogger("xdplb.sni")

RETRY_FIRST, RETRY_MAX = 1.0, 60.0   # seconds between attempts to start an acceptor
RTPROT_XDPLB = 0xB5          # marks the local routes this agent added
RT_TABLE_LOCAL = 255
RT_SCOPE_HOST = 254

ListenerIds = Mapping[tuple[str | None, int, str], int]


def bindings(plan: Plan, inv: Inventory, listener_ids: ListenerIds) -> dict[Address, Route]:
    """(address, port) -> route for every SNI listener; an exact address beats a
    wildcard listener on the same port (as in the listener map)."""
    out: dict[Address, Route] = {}
    for lst in sorted(sni_listeners(plan), key=lambda lst: lst.address is None):
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


def _family(address: str) -> tuple[int, int]:
    return (socket.AF_INET6, 128) if ":" in address else (socket.AF_INET, 32)


class SniService:
    def __init__(self, pin_dir: str, settings: SniSettings | None = None,
                 log_format: str = "text") -> None:
        self.pin_dir = pin_dir  # where the sockmap splice's map passes from its compiler
        self.settings = settings or SniSettings()
        self.log_format = log_format
        self.worker: Worker | None = None
        self._sender = RoutingSender()
        self._last: tuple[Plan, ListenerIds, dict[Address, Route]] | None = None
        self._routes: set[str] = set()
        self._retry_at = 0.0                 # no acceptor: when check() tries again
        self._retry_delay = RETRY_FIRST
        self._remove_routes(set())           # leftovers of an agent that died

    @property
    def acceptor_pid(self) -> int | None:
        return self.worker.pid if self.worker is not None else None

    def apply(self, plan: Plan, inv: Inventory, listener_ids: ListenerIds) -> list[str]:
        """Bring listeners, routing and local routes in line with the plan; returns
        problems."""
        want = bindings(plan, inv, listener_ids)
        if not want and self.worker is None:
            self._last = None
            return []
        routes = local_routes_needed(want, inv)
        self._add_routes(routes - self._routes)
        self._last = (plan, dict(listener_ids), want)
        try:
            problems = self._send(plan, listener_ids, want)
        except WorkerError as e:
            log.error("SNI: %s; starting a new acceptor", e)
            self._discard_worker()
            try:
                problems = self._send(plan, listener_ids, want)
            except WorkerError as e2:
                self._start_failed()
                problems = [f"SNI listeners not served: {e2}"]
        self._remove_routes(routes)
        return problems

    def _send(self, plan: Plan, listener_ids: ListenerIds,
              want: dict[Address, Route]) -> list[str]:
        if self.worker is None:
            self.worker = Worker(self.settings, self.pin_dir, self.log_format)
        # The routing first: a connection accepted on a new listener finds its table.
        self.worker.ask("routes", self._sender.update(plan, listener_ids))
        problems: list[str] = self.worker.ask("listen", want)
        return problems

    def _discard_worker(self) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker = None
        self._sender.forget()

    def _start_failed(self) -> None:
        """No acceptor now: check() tries again later, less often each time."""
        self._discard_worker()
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def check(self) -> None:
        """A dead acceptor process is replaced (its pairs are gone with it), and one that
        could not be started is tried again while there are listeners to serve."""
        if self.worker is not None:
            if self.worker.alive():
                return
            log.error("SNI: the acceptor process exited (%s); starting a new one",
                      self.worker.proc.returncode)
            self._discard_worker()
        elif time.monotonic() < self._retry_at:
            return
        if self._last is None or not self._last[2]:
            return
        plan, ids, want = self._last
        try:
            for p in self._send(plan, ids, want):
                log.warning("%s", p)
        except WorkerError as e:
            self._start_failed()
            log.error("SNI: %s; trying again in %.0f s", e, self._retry_at - time.monotonic())
            return
        self._retry_delay = RETRY_FIRST

    def stats(self) -> tuple[dict[str, int], int]:
        """The acceptor's counters (OUTCOMES) and the pairs it splices now."""
        if self.worker is None:
            return {}, 0
        try:
            counts, pairs = self.worker.ask("stats")
        except WorkerError as e:
            log.warning("SNI: %s", e)
            return {}, 0
        return counts, pairs

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self._remove_routes(set())

    # -- local routes -------------------------------------------------------------------
    def _add_routes(self, addrs: set[str]) -> None:
        if not addrs:
            return
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for a in sorted(addrs):
                family, length = _family(a)
                ipr.route("replace", family=family, dst=a, dst_len=length, type="local",
                          table=RT_TABLE_LOCAL, proto=RTPROT_XDPLB, scope=RT_SCOPE_HOST,
                          oif=lo)
                self._routes.add(a)
                log.info("SNI: %s made local (route in table local on lo)", a)

    def _remove_routes(self, keep: set[str]) -> None:
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                ours = [r for r in ipr.get_routes(family=family, table=RT_TABLE_LOCAL)
                        if r["proto"] == RTPROT_XDPLB]
                for r in ours:
                    a = r.get_attr("RTA_DST")
                    if a in keep:
                        continue
                    ipr.route("del", family=family, dst=a, dst_len=_family(a)[1],
                              type="local", table=RT_TABLE_LOCAL, proto=RTPROT_XDPLB,
                              scope=RT_SCOPE_HOST, oif=r.get_attr("RTA_OIF"))
                    self._routes.discard(a)
                    log.info("SNI: local route for %s removed", a)
