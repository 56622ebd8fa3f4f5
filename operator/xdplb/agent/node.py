"""What an agent does on its node, whatever its configuration comes from (a file, or the
cluster): load and attach the data path, write plans into the maps, run the SNI acceptor
and the health checks, sweep conntrack, serve metrics and keep the state file.

A configuration source hands it a plan and the node's inventory (``apply``); it keeps
serving the last plan that applied when a later one cannot be.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace

from xdplb.agent import metrics
from xdplb.agent.health import HealthChecker
from xdplb.agent.inventory import NodeChanges, backend_routes, read_inventory
from xdplb.agent.sysctl import allow_local_sources, reserve_snat_ports
from xdplb.dataplane import conntrack
from xdplb.dataplane import layout as L
from xdplb.dataplane.alloc import CapacityError
from xdplb.dataplane.config import Capacities, Timeouts
from xdplb.dataplane.entries import Inventory, listener_interfaces, translated_listeners
from xdplb.dataplane.layout import Stat
from xdplb.dataplane.loader import (
    TC_INGRESS_PARENT,
    AttachError,
    DataPlane,
    attached_interfaces,
    detach,
)
from xdplb.dataplane.writer import MapWriter
from xdplb.defaults import PIN_ROOT, STATE_FILE
from xdplb.memory import gc_paused, settle
from xdplb.plan.model import Plan, all_backends, hostport, snat_backends
from xdplb.sni.service import SniService
from xdplb.sni.settings import SniSettings

log = logging.getLogger("xdplb.agent")


@dataclass
class NodeOptions:
    xdp_mode: str = "native"
    pin_root: str = PIN_ROOT
    caps: Capacities = field(default_factory=Capacities)
    timeouts: Timeouts = field(default_factory=Timeouts)
    detach_on_exit: bool = True
    force: bool = False
    metrics_port: int | None = None
    state_file: str = STATE_FILE
    poll_seconds: float = 0.2
    sweep_seconds: float = 10.0
    sni: SniSettings = field(default_factory=SniSettings)  # timeouts: from `timeouts`
    log_format: str = "text"


# Drops worth a log line besides their counter, with what to do about them.
DROP_HINTS = {
    Stat.SNAT_EXHAUSTED: "new source-NAT flows dropped: every port toward a backend was "
                         "taken (widen --snat-port-min/--snat-port-max or add backends)",
    Stat.SNAT_NO_SOURCE: "new source-NAT flows dropped: no route from this node to their "
                         "backend",
    Stat.CT_FULL: "new flows dropped: conntrack is full (--conntrack-capacity)",
}


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT end the agent's loop (it then shuts down cleanly)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


class NodeApplier:
    def __init__(self, opts: NodeOptions, source: str, dp: DataPlane | None = None) -> None:
        """``source``: where plans come from (a file's path, or "kubernetes"), for the logs
        and the state file. ``dp``: the data plane, maybe already loading."""
        self.opts = opts
        self.source = source
        self.dp = dp or DataPlane(opts.pin_root, opts.caps, opts.timeouts)
        self.writer: MapWriter | None = None
        self.sni: SniService | None = None    # SNI acceptor and splice
        self.attached: dict[str, str] = {}   # interface -> XDP mode in effect
        self.backend_side: set[str] = set()  # interfaces with only TC ingress (source NAT)
        # The interfaces an earlier agent attached to, until the first apply: None after.
        self._inherited: set[str] | None = None
        self._changes = NodeChanges()
        self._inventory: Inventory | None = None  # see inventory()
        self.plan = Plan()   # the plan in the maps
        self.applied_inventory: Inventory | None = None
        self._health_changed = threading.Event()
        self.health = HealthChecker(on_change=self._health_changed.set)
        self._drops: dict[Stat, int] = {}  # drop counters at the last sweep
        self._next_sweep = 0.0
        self.last_error = ""

    # -- lifecycle ----------------------------------------------------------------------
    def load_async(self) -> None:
        """Start compiling (a child process), unless the caller already has."""
        if self.dp.loading is None:
            self.dp.load_async()

    @property
    def loading(self) -> bool:
        return self.dp.loading is not None and self.dp.loading.is_alive()

    def start(self) -> None:
        """Once the programs are loaded: take over pinned maps, start the health checks
        and the metrics server. The first apply attaches. First, keeps the kernel from
        giving the node's own connections source-NAT ports (SnatPortsError when it
        cannot keep enough ephemeral ports for them)."""
        reserve_snat_ports((self.opts.caps.snat_port_min, self.opts.caps.snat_port_max))
        self.load_async()
        self.dp.wait_loaded()
        self.writer = MapWriter(self.dp.maps, self.dp.caps)
        self.sni = SniService(self.dp.pin_dir, self.opts.sni, self.opts.log_format)
        self._inherited = set(attached_interfaces(self.opts.pin_root))
        if self.dp.adopted:
            n = self.writer.adopt()
            log.info("adopted pinned maps in %s (%d listener entries): established flows "
                     "keep their backends", self.dp.pin_dir, n)
        if self.dp.reused:
            log.info("reused the programs pinned in %s (compiled from the same code): "
                     "loaded in %.0f ms", self.dp.code_dir, self.dp.load_seconds * 1000)
        else:
            log.info("compiled and loaded in %.0f ms", self.dp.load_seconds * 1000)
        self.health.start()
        self._next_sweep = time.monotonic() + self.opts.sweep_seconds
        if self.opts.metrics_port:
            from prometheus_client import start_http_server
            metrics.register(metrics.DataPlaneCollector(self.dp.maps, self._labels))
            metrics.register(metrics.HealthCollector(self.health.states))
            metrics.register(metrics.SniCollector(self._sni_stats))
            start_http_server(self.opts.metrics_port)

    def shutdown(self) -> None:
        self.health.stop()
        self._changes.close()
        if self.sni is not None:
            self.sni.stop()   # spliced connections belong to this process: they end with it
        if self.opts.detach_on_exit:
            for ifname in [*self.attached, *self.backend_side]:
                detach(ifname, self.opts.pin_root)
            self.dp.close()
            shutil.rmtree(self.opts.pin_root, ignore_errors=True)
            log.info("stopped: detached from %s and removed %s",
                     ", ".join([*self.attached, *sorted(self.backend_side)]) or "nothing",
                     self.opts.pin_root)
        else:
            self.dp.close()
            log.info("stopped: programs and pins left in place for the next agent")

    # -- the node -----------------------------------------------------------------------
    def inventory(self) -> Inventory:
        """The node's interfaces and addresses, dumped again only after rtnetlink has
        reported a change."""
        if self._changes.changed() or self._inventory is None:
            self._inventory = read_inventory()
        return self._inventory

    def health_changed(self) -> bool:
        """Whether a backend's health changed since the last call."""
        if not self._health_changed.is_set():
            return False
        self._health_changed.clear()
        return True

    # -- apply --------------------------------------------------------------------------
    def apply(self, plan: Plan, inv: Inventory) -> bool:
        """Write the plan, attach, hand the SNI listeners and health targets over;
        False (logged, the last good plan kept) when it cannot be written."""
        assert self.writer is not None, "start() first"
        if plan.listeners:  # the node's way to each backend: source NAT and hairpin
            inv = replace(inv, routes=backend_routes(all_backends(plan)))
        self.applied_inventory = inv
        try:
            with metrics.APPLY_SECONDS.time(), gc_paused():
                res = self.writer.apply(plan, inv)
        except CapacityError as e:
            metrics.ERRORS.labels("capacity").inc()
            self.last_error = str(e)
            log.error("cannot apply: %s; keeping the last good state", e)
            return False
        metrics.MAP_WRITES.inc(res.written + res.deleted)
        self.plan = plan
        for p in res.problems:
            log.warning("%s", p)
        self._attach(plan, inv)
        self.health.set_targets(plan.health_targets())
        if self.sni is not None:
            for p in self.sni.apply(plan, inv, self.writer.listener_ids):
                log.warning("%s", p)
                res.problems.append(p)
        self.last_error = "; ".join(res.problems)
        settle()  # what reading and planning left behind
        log.info("applied %s: %s", self.source, res.summary())
        self._write_state()
        return True

    def _attach(self, plan: Plan, inv: Inventory) -> None:
        wanted = sorted({n for lst in plan.listeners for n in listener_interfaces(lst, inv)
                         if n in inv.ifindex})
        # Source-NAT replies arrive on the interfaces toward those backends: where no
        # listener needs XDP, a TC ingress filter takes them.
        snat = snat_backends(plan)
        backend_side = {oif for addr, (_src, oif) in inv.routes.items()
                        if addr in snat and oif in inv.ifindex} - set(wanted)
        if translated_listeners(plan, inv):
            for problem in allow_local_sources(sorted({*wanted, *backend_side})):
                log.warning("%s", problem)
        for ifname in [n for n in self.attached if n not in wanted]:
            detach(ifname, self.opts.pin_root)
            del self.attached[ifname]
            log.info("detached from %s: no listener uses it", ifname)
        for ifname in sorted(self.backend_side - backend_side):
            detach(ifname, self.opts.pin_root)
            self.backend_side.discard(ifname)
            log.info("detached from %s: no source-NAT backend behind it", ifname)
        for ifname in sorted((self._inherited or set()) - set(wanted)):
            # A backend-side interface keeps its TC ingress, replaced in place below.
            keep = (TC_INGRESS_PARENT,) if ifname in backend_side else ()
            if detach(ifname, self.opts.pin_root, keep=keep):
                log.info("detached from %s: attached by an earlier agent, unused now", ifname)
        for ifname in wanted:
            if ifname in self.attached:
                continue
            t0 = time.monotonic()
            try:
                self.attached[ifname] = self.dp.attach(ifname, self.opts.xdp_mode,
                                                       self.opts.force)
            except AttachError as e:
                metrics.ERRORS.labels("attach").inc()
                log.error("%s", e)
                continue
            log.info("attached to %s: XDP %s mode, TC egress and ingress (%.0f ms)", ifname,
                     self.attached[ifname], (time.monotonic() - t0) * 1000)
        for ifname in sorted(backend_side - self.backend_side):
            try:
                self.dp.attach_backend_side(ifname)
            except Exception as e:  # netlink errors: the interface went away, or no clsact
                metrics.ERRORS.labels("attach").inc()
                log.error("%s: cannot attach TC ingress for source-NAT replies: %s", ifname, e)
                continue
            self.backend_side.add(ifname)
            log.info("attached to %s: TC ingress for source-NAT replies", ifname)
        if self._inherited is not None:
            # Until now, the earlier agent's pins were what named its programs ours.
            self._inherited = None
            self.dp.remove_stale_pins()

    # -- housekeeping -------------------------------------------------------------------
    def tick(self) -> None:
        """The periodic work, when due: sweep conntrack; replace a dead SNI acceptor."""
        if self.sni is not None:
            self.sni.check()
        if time.monotonic() >= self._next_sweep:
            self.sweep()
            self._next_sweep = time.monotonic() + self.opts.sweep_seconds

    def sweep(self) -> None:
        inv = self.applied_inventory
        if inv and inv.routes and backend_routes(all_backends(self.plan)) != inv.routes:
            log.info("routes toward source-NAT backends changed: applying again")
            self.apply(self.plan, inv)
        maps = self.dp.maps
        swept = conntrack.sweep(maps["ct"], maps["ct_reply"], self.opts.timeouts)
        metrics.CT_ENTRIES.set(swept.left)
        if swept.deleted:
            log.info("conntrack sweep: %d expired entries deleted, %d left", swept.deleted,
                     swept.left)
        if self.writer is not None:
            self.writer.release_rev_nat(swept.relied)
        self._log_drops()

    def _log_drops(self) -> None:
        raw = self.dp.maps["stats"]
        for st, hint in DROP_HINTS.items():
            value = raw.lookup(L.encode_u32(st))
            n = metrics.percpu_sum(value, 1)[0] if value else 0
            if n > self._drops.get(st, n):
                log.warning("%d %s", n - self._drops[st], hint)
            self._drops[st] = n

    def _sni_stats(self) -> tuple[dict[str, int], int]:
        return self.sni.stats() if self.sni is not None else ({}, 0)

    def _labels(self) -> tuple[dict[int, str], dict[int, str]]:
        assert self.writer is not None
        names = {lst.identity: lst.label for lst in self.plan.listeners}
        listeners = {i: names.get(ident, str(ident))
                     for ident, i in self.writer.listener_ids.items()}
        backends = {i: hostport(a, p) for (a, p), i in self.writer.backend_ids.items()}
        return listeners, backends

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "config": self.source,
            "pin_dir": self.dp.pin_dir,
            "interfaces": self.attached,
            "programs": {"xdp": self.dp.xdp_fn.name.decode() if self.dp.xdp_fn else "",
                         "tc": self.dp.tc_fn.name.decode() if self.dp.tc_fn else ""},
            "listeners": [{"name": lst.label,
                           "address": lst.address or ("*" if lst.family == 4 else "::"),
                           "port": lst.port, "protocol": lst.protocol,
                           "backends": len(lst.default.backends),
                           "sourceRoutes": len(lst.source_routes)}
                          for lst in self.plan.listeners],
            "health": [{"backend": hostport(t.address, t.port), "check": t.check.protocol,
                        "up": s.up, "error": s.last_error}
                       for t, s in sorted(self.health.states().items())],
            "lastError": self.last_error,
            "appliedAt": time.time(),
        }
        try:
            os.makedirs(os.path.dirname(self.opts.state_file), exist_ok=True)
            tmp = self.opts.state_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f, indent=2)
            os.replace(tmp, self.opts.state_file)
        except OSError as e:
            log.warning("cannot write %s: %s", self.opts.state_file, e)
