"""The node agent, standalone: a YAML file of LoadBalancers -> the node's data plane.

Loads and attaches once, then re-applies within a second of any change to the file or
to the node's addresses. A bad file is logged with field paths and the last good state
keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from xdplb.agent import metrics
from xdplb.agent.node import NodeApplier, NodeOptions, stop_on_signals
from xdplb.dataplane.config import Capacities
from xdplb.dataplane.entries import Inventory
from xdplb.dataplane.loader import DataPlane
from xdplb.defaults import CONFIG_FILE
from xdplb.memory import gc_paused
from xdplb.plan.model import Plan, Target
from xdplb.plan.planner import PlanMemo, build_plan
from xdplb.spec.load import DocumentCache, Limits, SpecError, parse_manifests
from xdplb.spec.model import LoadBalancer

log = logging.getLogger("xdplb.agent")

@dataclass
class AgentOptions(NodeOptions):
    config: str = CONFIG_FILE


def limits_of(caps: Capacities) -> Limits:
    return Limits(max_listeners=caps.listener_keys, max_source_routes=caps.source_routes)


class FileSource:
    """The plan a YAML file holds, read again when the file or the node changed."""

    def __init__(self, path: str, caps: Capacities) -> None:
        self.path = Path(path)
        self.limits = limits_of(caps)
        self._digest = ""
        self._stat: tuple[int, ...] = ()
        self._inventory: Inventory | None = None  # the node as last read with the file
        self._documents = DocumentCache()  # unchanged documents are not parsed again
        self._plans = PlanMemo()  # nor planned again
        # The last good specs, kept only when health checks may need a new plan.
        self._lbs: list[LoadBalancer] | None = None

    def read(self, inv: Inventory, down: frozenset[Target], force: bool = False) -> Plan | None:
        """The file's plan (``down``: backends failing their checks); None when neither
        the file nor the node changed, or it cannot be read (logged). Raises SpecError
        for a bad file."""
        try:
            st = self.path.stat()
            stat = (st.st_ino, st.st_size, st.st_mtime_ns)
            # A write in the same clock tick as the last read leaves the same mtime:
            # a file modified in the last seconds is read again whatever its stat.
            recent = time.time_ns() - st.st_mtime_ns < 2 * 10**9
            if not (force or inv != self._inventory or recent or stat != self._stat):
                return None
            text = self.path.read_text()
        except OSError as e:
            if force or self._digest != "unreadable":
                log.error("cannot read %s: %s; keeping the last good state", self.path, e)
                self._digest = "unreadable"
            return None
        self._stat = stat
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not force and digest == self._digest and inv == self._inventory:
            return None
        self._digest, self._inventory = digest, inv
        lbs = parse_manifests(text, str(self.path), self.limits, self._documents)
        with gc_paused():
            plan = build_plan(lbs, down=down, memo=self._plans)
        self._plans.keep_only(lbs)
        self._lbs = lbs if plan.health_targets() else None
        return plan

    def replan(self, down: frozenset[Target]) -> Plan | None:
        """The last good specs planned again for other health results; None without
        health checks."""
        if self._lbs is None:
            return None
        return build_plan(self._lbs, down=down, memo=self._plans)


class Agent:
    def __init__(self, opts: AgentOptions, dp: DataPlane | None = None) -> None:
        """`dp`: the data plane, maybe already loading (DataPlane.load_async)."""
        self.opts = opts
        self.node = NodeApplier(opts, opts.config, dp)
        self.file = FileSource(opts.config, opts.caps)
        self.stop = threading.Event()

    def start(self) -> None:
        t0 = time.monotonic()
        self.node.load_async()  # the compiler runs in a child process: read and plan meanwhile
        inv = self.node.inventory()
        plan = self.read(inv, force=True)
        self.node.start()
        if plan is not None:
            self.node.apply(plan, inv)
        log.info("started in %.0f ms", (time.monotonic() - t0) * 1000)

    def run(self) -> None:
        stop_on_signals(self.stop)
        self.start()
        while not self.stop.wait(self.opts.poll_seconds):
            self.step()
            self.node.tick()
        self.node.shutdown()

    def step(self) -> None:
        """Apply what changed: the file, the node's addresses, a backend's health."""
        node = self.node
        if (plan := self.read(node.inventory())) is not None:
            node.apply(plan, node.inventory())
        if node.health_changed() and node.applied_inventory is not None:
            if (plan := self.file.replan(node.health.down())) is not None:
                node.apply(plan, node.applied_inventory)

    def read(self, inv: Inventory, force: bool = False) -> Plan | None:
        try:
            return self.file.read(inv, self.node.health.down(), force)
        except SpecError as e:
            metrics.ERRORS.labels("config").inc()
            for line in e.errors:
                log.error("invalid configuration: %s", line)
            log.error("keeping the last good state (%d listeners)",
                      len(self.node.plan.listeners))
            return None
