"""What the operator knows of the cluster, and which LoadBalancers need a status.

LoadBalancers (with their validation verdict and conflicts), Nodes and NodeStates
are indexed here by hand rather than with ``@kopf.index``: each change is compared
with what was there before, so that it marks exactly the LoadBalancers it touches
(a heartbeat that changes nothing but its time wakes nobody), and kopf's indexes
keep no previous value to compare with. Services and EndpointSlices are only read,
to count the backends of Service groups: those are kopf's indexes (handlers.py).
"""

from __future__ import annotations

import asyncio
import datetime
from collections import defaultdict
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import ValidationError

from xdplb.k8s.conditions import NodeInfo, NodeReport, Verdict, lb_status
from xdplb.k8s.conflicts import Claim, Conflict, claim_of, resolve
from xdplb.k8s.settings import OperatorSettings
from xdplb.plan.endpoints import SERVICE_NAME_LABEL, service_port_name, slice_backends
from xdplb.spec.api import Ref, ref_of
from xdplb.spec.errors import format_errors
from xdplb.spec.model import LoadBalancer

SHOWN_ERRORS = 20  # validation errors in a condition message; `xdplb validate` shows all


def validate(body: dict[str, Any]) -> Verdict:
    meta = body.get("metadata", {})
    doc = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
           "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
           "spec": body.get("spec")}
    try:
        lb = LoadBalancer.model_validate(doc)
    except ValidationError as e:
        lines = format_errors(e)
        more = f"; and {len(lines) - SHOWN_ERRORS} more" if len(lines) > SHOWN_ERRORS else ""
        return Verdict(False, "Invalid", "; ".join(lines[:SHOWN_ERRORS]) + more)
    n = len(lb.spec.listeners)
    return Verdict(True, "Accepted", f"valid: {n} listener{'s' * (n != 1)}")


def services_of(body: dict[str, Any]) -> set[Ref]:
    """The Services a LoadBalancer's groups name (same namespace)."""
    ns = body.get("metadata", {}).get("namespace", "")
    return {(ns, g["service"].get("name", ""))
            for ln in (body.get("spec") or {}).get("listeners") or []
            for g in [ln, *(r for k in ("sourceRoutes", "sniRoutes") for r in ln.get(k) or [])]
            if isinstance(g.get("service"), dict)}


def service_of_slice(body: Mapping[str, Any]) -> Ref | None:
    """The Service an EndpointSlice belongs to (by its label), if it names one."""
    meta = body["metadata"]
    service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    return (meta.get("namespace", ""), service) if service else None


class State:
    """What the operator knows of the cluster, and which LoadBalancers need a status."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.lbs: dict[Ref, dict[str, Any]] = {}
        self.checked: dict[Ref, tuple[Any, Any, Verdict]] = {}  # uid, generation, verdict
        self.conflicts: dict[Ref, Conflict] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.reports: dict[str, NodeReport] = {}
        self.silent: set[str] = set()
        self.written: dict[Ref, dict[str, Any]] = {}
        self.last_write: dict[Ref, float] = {}
        self.dirty: set[Ref] = set()
        # Services and EndpointSlices by Service, for the backend counts of Service groups:
        # kopf's live indexes once the operator runs.
        self.services: Mapping[Ref, Collection[dict[str, Any]]] = {}
        self.slices: Mapping[Ref, Collection[dict[str, Any]]] = {}
        self.users: dict[Ref, set[Ref]] = defaultdict(set)  # Service -> LoadBalancers
        self.changed = asyncio.Event()  # set on every NodeState change (deletion waits)

    # events in

    def on_lb(self, kind: str | None, body: dict[str, Any]) -> None:
        ref = ref_of(body)
        for users in self.users.values():
            users.discard(ref)
        if kind != "DELETED":
            for svc in services_of(body):
                self.users[svc].add(ref)
        if kind == "DELETED":
            self.lbs.pop(ref, None)
            for d in (self.checked, self.written, self.last_write):
                d.pop(ref, None)
            self.dirty.discard(ref)
            self._resolve()
            return
        before = self.lbs.get(ref)
        self.lbs[ref] = body
        if before is None:
            self.written[ref] = body.get("status") or {}
        meta = body.get("metadata", {})
        key = (meta.get("uid"), meta.get("generation"))
        if self.checked.get(ref, (None, None, None))[:2] != key:
            self.checked[ref] = (*key, validate(body))
            self._resolve()
        self.dirty.add(ref)

    def on_node(self, kind: str | None, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        info = None if kind == "DELETED" else NodeInfo.from_node(body)
        if self.nodes.get(name) != info:
            if info is None:
                self.nodes.pop(name, None)
            else:
                self.nodes[name] = info
            self.dirty.update(self.lbs)  # the set of selected nodes may change for any

    def on_nodestate(self, kind: str | None, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        old = self.reports.get(name)
        new = None if kind == "DELETED" else NodeReport.from_status(body.get("status"))
        if new is None:
            self.reports.pop(name, None)
        else:
            self.reports[name] = new
        if old is None or new is None or old.errors != new.errors or name in self.silent:
            self.dirty.update(self.lbs)
        else:  # only the LoadBalancers whose entry changed
            refs = set(old.entries) | set(new.entries)
            self.dirty.update(r for r in refs
                              if old.entries.get(r) != new.entries.get(r) and r in self.lbs)
        self.silent.discard(name)
        self.changed.set()

    def on_service(self, service: Ref) -> None:
        """A Service or one of its EndpointSlices changed (kopf's index has it already)."""
        self.dirty.update(self.users.get(service, ()))

    def endpoints(self, namespace: str, service: Mapping[str, Any], protocol: str
                  ) -> list[tuple[str, int]]:
        key = (namespace, service.get("name", ""))
        found = next(iter(self.services.get(key, ())), None)
        port = service_port_name(found, service.get("port", ""), protocol)
        if port is None:
            return []
        slices = self.slices.get(key, ())
        return [(b.address, b.port) for b in slice_backends(slices, port, protocol)]

    def _resolve(self) -> None:
        claims: list[Claim] = []
        for ref, (_, _, verdict) in self.checked.items():
            body = self.lbs.get(ref)
            if body is not None and verdict.accepted:
                created = body["metadata"].get("creationTimestamp") or ""
                claims.append(claim_of(ref, created, body.get("spec") or {}))
        conflicts = resolve(claims)
        changed = {r for r in set(conflicts) | set(self.conflicts)
                   if conflicts.get(r) != self.conflicts.get(r)}
        self.conflicts = conflicts
        self.dirty.update(changed & set(self.lbs))

    # decisions

    def verdict(self, ref: Ref) -> Verdict:
        verdict = self.checked[ref][2]
        if verdict.accepted and ref in self.conflicts:
            return Verdict(False, "Conflicted", self.conflicts[ref].message())
        return verdict

    def status(self, ref: Ref, now: datetime.datetime) -> dict[str, Any]:
        return lb_status(self.lbs[ref], self.verdict(ref), self.nodes.values(), self.reports,
                         now, self.settings.agent.node_selector, self.settings.silence,
                         self.endpoints)

    def find_silent(self, now: datetime.datetime) -> None:
        """Mark every LoadBalancer for a status when a node has just fallen silent."""
        for name, report in self.reports.items():
            if (name not in self.silent and report.heartbeat is not None
                    and (now - report.heartbeat).total_seconds() > self.settings.silence):
                self.silent.add(name)
                self.dirty.update(self.lbs)

    def due(self, clock: float) -> list[Ref]:
        gap = self.settings.status_interval
        return [r for r in self.dirty if clock - self.last_write.get(r, -gap) >= gap]

    def applied_on(self, ref: Ref, uid: str | None) -> list[str]:
        """Nodes whose agent still reports the LoadBalancer as applied."""
        return sorted(n for n, rep in self.reports.items()
                      if (e := rep.entries.get(ref)) is not None and e.get("phase") == "Applied"
                      and (not uid or not e.get("uid") or e["uid"] == uid))
