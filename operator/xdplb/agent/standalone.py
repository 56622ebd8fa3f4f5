"""The node agent, standalone: a YAML file of LoadBalancers -> the data plane.

Loads and attaches once, then re-applies within a second of any change to
the file or to the node's addresses. A bad file is logged with field paths
and the last good state keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from xdplb.agent import metrics
from xdplb.agent.health import HealthChecker
from xdplb.agent.inventory import NodeChanges, backend_routes, read_inventory
from xdplb.agent.sysctl import allow_local_sources
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
from xdplb.plan.model import Plan, all_backends, snat_backends
from xdplb.plan.planner import PlanMemo, build_plan
from xdplb.sni.service import SniService
from xdplb.spec.load import DocumentCache, Limits, SpecError, parse_manifests
from xdplb.spec.model import LoadBalancer

log = logging.getLogger("xdplb.agent")

@dataclass
class AgentOptions:
    config: str
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


# Drops worth a log line besides their counter, with what to do about them.
DROP_HINTS = {
    Stat.SNAT_EXHAUSTED: "new source-NAT flows dropped: every port toward a backend was "
                         "taken (widen --snat-port-min/--snat-port-max or add backends)",
    Stat.SNAT_NO_SOURCE: "new source-NAT flows dropped: no route from this node to their "
                         "backend",
    Stat.CT_FULL: "new flows dropped: conntrack is full (--conntrack-capacity)",
}


def limits_of(caps: Capacities) -> Limits:
    return Limits(max_listeners=caps.listener_keys, max_source_routes=caps.source_routes)


class Agent:
    def __init__(self, opts: AgentOptions, dp: DataPlane | None = None) -> None:
        """`dp`: the data plane, maybe already loading (DataPlane.load_async)."""
        self.opts = opts
        self.dp = dp or DataPlane(opts.pin_root, opts.caps, opts.timeouts)
        self.writer: MapWriter | None = None
        self.sni: SniService | None = None    # SNI acceptor and splice
        self.attached: dict[str, str] = {}   # interface -> XDP mode in effect
        self.backend_side: set[str] = set()  # interfaces with only TC ingress (source NAT)
        # The interfaces an earlier agent attached to, until the first apply: None after.
        self._inherited: set[str] | None = None
        self.stop = threading.Event()
        self._file_digest = ""
        self._file_stat: tuple[int, ...] = ()
        self._inventory: Inventory | None = None  # the node as last read with the file
        self._node = NodeChanges()
        self._node_now: Inventory | None = None  # see node_inventory()
        self.plan = Plan()
        self._health_changed = threading.Event()
        self.health = HealthChecker(on_change=self._health_changed.set)
        # The last good specs, kept only when health checks may need a new plan.
        self._lbs: list[LoadBalancer] | None = None
        self._documents = DocumentCache()  # unchanged documents are not parsed again
        self._plans = PlanMemo()  # nor planned again
        self._applied_inventory: Inventory | None = None
        self._drops: dict[Stat, int] = {}  # drop counters at the last sweep
        self.last_error = ""

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        # The compiler runs in a child process: read and plan the file meanwhile.
        if self.dp.loading is None:
            self.dp.load_async()
        staged = self.read(force=True)
        self.dp.wait_loaded()
        self.writer = MapWriter(self.dp.maps, self.dp.caps)
        self.sni = SniService(self.dp.maps, self.dp.pin_dir, self.opts.timeouts.sni_hello)
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
        if staged is not None:
            self.apply(*staged)
        log.info("started in %.0f ms", (time.monotonic() - t0) * 1000)
        if self.opts.metrics_port:
            from prometheus_client import start_http_server
            metrics.register(metrics.DataPlaneCollector(self.dp.maps, self._labels))
            metrics.register(metrics.HealthCollector(self.health.states))
            metrics.register(metrics.SniCollector(self._sni_stats))
            start_http_server(self.opts.metrics_port)

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        self.start()
        next_sweep = time.monotonic() + self.opts.sweep_seconds
        while not self.stop.wait(self.opts.poll_seconds):
            self.reload()
            if self._health_changed.is_set():
                self._health_changed.clear()
                self.replan()
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + self.opts.sweep_seconds
        self.shutdown()

    def shutdown(self) -> None:
        self.health.stop()
        self._node.close()
        if self.sni is not None:
            self.sni.stop()   # spliced connections belong to this process: they end with it
        if self.opts.detach_on_exit:
            for ifname in [*self.attached, *self.backend_side]:
                detach(ifname, self.opts.pin_root)
            self.dp.close()
            import shutil
            shutil.rmtree(self.opts.pin_root, ignore_errors=True)
            log.info("stopped: detached from %s and removed %s",
                     ", ".join([*self.attached, *sorted(self.backend_side)]) or "nothing",
                     self.opts.pin_root)
        else:
            self.dp.close()
            log.info("stopped: programs and pins left in place for the next agent")

    # -- configuration ------------------------------------------------------------------
    def reload(self, force: bool = False) -> None:
        if (staged := self.read(force)) is not None:
            self.apply(*staged)

    def read(self, force: bool = False) -> tuple[Plan, Inventory] | None:
        """The plan of the file and the node now; None if neither changed or the
        file is bad (logged)."""
        path = Path(self.opts.config)
        inv = self.node_inventory()
        try:
            st = path.stat()
            stat = (st.st_ino, st.st_size, st.st_mtime_ns)
            # A write in the same clock tick as the last read leaves the same mtime:
            # a file modified in the last seconds is read again whatever its stat.
            recent = time.time_ns() - st.st_mtime_ns < 2 * 10**9
            if not (force or inv != self._inventory or recent or stat != self._file_stat):
                return None
            text = path.read_text()
        except OSError as e:
            if force or self._file_digest != "unreadable":
                log.error("cannot read %s: %s; keeping the last good state", path, e)
                self._file_digest = "unreadable"
            return None
        self._file_stat = stat
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not force and digest == self._file_digest and inv == self._inventory:
            return None
        self._file_digest, self._inventory = digest, inv
        try:
            lbs = parse_manifests(text, str(path), limits_of(self.opts.caps), self._documents)
        except SpecError as e:
            metrics.ERRORS.labels("config").inc()
            self.last_error = str(e)
            for line in e.errors:
                log.error("invalid configuration: %s", line)
            log.error("keeping the last good state (%d listeners)", len(self.plan.listeners))
            return None
        with gc_paused():
            plan = build_plan(lbs, down=self.health.down(), memo=self._plans)
        self._plans.keep_only(lbs)
        self._lbs = lbs if plan.health_targets() else None
        return plan, inv

    def node_inventory(self) -> Inventory:
        """The node's interfaces and addresses, dumped again only after rtnetlink has
        reported a change."""
        if self._node.changed() or self._node_now is None:
            self._node_now = read_inventory()
        return self._node_now

    def replan(self) -> None:
        """A backend's health changed: the same specs, other effective weights."""
        if self._lbs is not None and self._applied_inventory is not None:
            self.apply(build_plan(self._lbs, down=self.health.down(), memo=self._plans),
                       self._applied_inventory)

    def apply(self, plan: Plan, inv: Inventory) -> None:
        assert self.writer is not None
        if plan.listeners:  # the node's way to each backend: source NAT and hairpin
            inv = replace(inv, routes=backend_routes(all_backends(plan)))
        self._applied_inventory = inv
        try:
            with metrics.APPLY_SECONDS.time(), gc_paused():
                res = self.writer.apply(plan, inv)
        except CapacityError as e:
            metrics.ERRORS.labels("capacity").inc()
            self.last_error = str(e)
            log.error("cannot apply: %s; keeping the last good state", e)
            return
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
        log.info("applied %s: %s", self.opts.config, res.summary())
        self._write_state()

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
            log.info("attached to %s: XDP %s mode, TC egress (%.0f ms)", ifname,
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

    def sweep(self) -> None:
        inv = self._applied_inventory
        if inv and inv.routes and backend_routes(all_backends(self.plan)) != inv.routes:
            log.info("routes toward source-NAT backends changed: applying again")
            self.apply(self.plan, inv)
        swept = conntrack.sweep(self.dp.maps["ct"], self.opts.timeouts)
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
        backends = {i: f"{a}:{p}" for (a, p), i in self.writer.backend_ids.items()}
        return listeners, backends

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "config": self.opts.config,
            "pin_dir": self.dp.pin_dir,
            "interfaces": self.attached,
            "programs": {"xdp": self.dp.xdp_fn.name.decode() if self.dp.xdp_fn else "",
                         "tc": self.dp.tc_fn.name.decode() if self.dp.tc_fn else ""},
            "listeners": [{"name": lst.label, "address": lst.address or "*",
                           "port": lst.port, "protocol": lst.protocol,
                           "backends": len(lst.default.backends),
                           "sourceRoutes": len(lst.source_routes)}
                          for lst in self.plan.listeners],
            "health": [{"backend": f"{t.address}:{t.port}", "check": t.check.protocol,
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
