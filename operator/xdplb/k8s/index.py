"""What the operator knows of the cluster, and which LoadBalancers need a status.

LoadBalancers (with their validation verdict, admission and conflicts), Nodes and
NodeStates are indexed here by hand rather than with ``@kopf.index``: each change is
compared with what was there before, so that it marks exactly the LoadBalancers it
touches (a heartbeat that changes nothing but its time wakes nobody), and kopf's
indexes keep no previous value to compare with. AddressPools and Namespaces are kept
here too: a change of either judges every LoadBalancer it may concern again. Services
and EndpointSlices are only read, to count the backends of Service groups: those are
kopf's indexes (handlers.py).
"""

from __future__ import annotations

import asyncio
import datetime
from collections import defaultdict
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import ValidationError

from xdplb.k8s.admission import NOT_ALLOWED, Admission, Grant, admit, grants_of
from xdplb.k8s.conditions import (
    NodeInfo,
    NodeReport,
    Verdict,
    address_status,
    announcers,
    lb_status,
)
from xdplb.k8s.conflicts import Claim, Conflict, claim_of, resolve
from xdplb.k8s.crd import parse_pool
from xdplb.k8s.settings import OperatorSettings
from xdplb.plan.endpoints import SERVICE_NAME_LABEL, service_port_name, slice_backends
from xdplb.spec.api import Ref, ref_of
from xdplb.spec.errors import format_errors
from xdplb.spec.model import LoadBalancer
from xdplb.spec.pool import AddressPool

SHOWN_ERRORS = 20  # validation errors in a condition message; `xdplb validate` shows all


def parse(body: dict[str, Any]) -> tuple[Verdict, LoadBalancer | None]:
    meta = body.get("metadata", {})
    doc = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
           "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
           "spec": body.get("spec")}
    try:
        lb = LoadBalancer.model_validate(doc)
    except ValidationError as e:
        lines = format_errors(e)
        more = f"; and {len(lines) - SHOWN_ERRORS} more" if len(lines) > SHOWN_ERRORS else ""
        return Verdict(False, "Invalid", "; ".join(lines[:SHOWN_ERRORS]) + more), None
    n = len(lb.spec.listeners)
    return Verdict(True, "Accepted", f"valid: {n} listener{'s' * (n != 1)}"), lb


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


class Pools:
    """The AddressPools as the operator last saw them: the valid ones' grants, and what is
    wrong with the others."""

    def __init__(self) -> None:
        self.bodies: dict[str, dict[str, Any]] = {}
        self.models: dict[str, AddressPool] = {}
        self.problems: dict[str, list[str]] = {}
        self.grants: tuple[Grant, ...] = ()

    def update(self, kind: str | None, body: dict[str, Any]) -> bool:
        """Take a watch-event; whether the grants changed."""
        name = body["metadata"]["name"]
        before = self.grants
        if kind == "DELETED":
            self.bodies.pop(name, None)
            self.models.pop(name, None)
            self.problems.pop(name, None)
        else:
            self.bodies[name] = body
            model, problems = parse_pool(body)
            if model is None:
                self.models.pop(name, None)
                self.problems[name] = problems
            else:
                self.models[name] = model
                self.problems.pop(name, None)
        self.grants = grants_of((m, self.bodies[n]["metadata"].get("uid", ""))
                                for n, m in self.models.items())
        return self.grants != before


class State:
    """What the operator knows of the cluster, and which LoadBalancers need a status."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.lbs: dict[Ref, dict[str, Any]] = {}
        # uid, generation, verdict, the model when valid
        self.checked: dict[Ref, tuple[Any, Any, Verdict, LoadBalancer | None]] = {}
        self.admissions: dict[Ref, Admission] = {}
        self.conflicts: dict[Ref, Conflict] = {}
        self.pools = Pools()
        self.namespaces: dict[str, dict[str, str]] = {}  # name -> labels
        self.pools_dirty: set[str] = set()  # pools whose status may have changed
        self.pool_written: dict[str, dict[str, Any]] = {}
        self.pool_last_write: dict[str, float] = {}
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
            for d in (self.checked, self.written, self.last_write, self.admissions):
                d.pop(ref, None)
            self.dirty.discard(ref)
            self._resolve()
            self.pools_dirty.update(self.pools.bodies)
            return
        before = self.lbs.get(ref)
        self.lbs[ref] = body
        if before is None:
            self.written[ref] = body.get("status") or {}
        meta = body.get("metadata", {})
        key = (meta.get("uid"), meta.get("generation"))
        if self.checked.get(ref, (None, None, None, None))[:2] != key:
            self.checked[ref] = (*key, *parse(body))
            self._admit(ref)
            self._resolve()
            self.pools_dirty.update(self.pools.bodies)
        self.dirty.add(ref)

    def on_node(self, kind: str | None, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        info = None if kind == "DELETED" else NodeInfo.from_node(body)
        before = self.nodes.get(name)
        if before != info:
            if info is None:
                self.nodes.pop(name, None)
            else:
                self.nodes[name] = info
            self.dirty.update(self.lbs)  # the set of selected nodes may change for any
            if (before.addresses if before else ()) != (info.addresses if info else ()):
                self._admit_all()  # a node's addresses are never backends

    def on_pool(self, kind: str | None, body: dict[str, Any]) -> None:
        """An AddressPool changed: every LoadBalancer is judged again."""
        name = body["metadata"]["name"]
        if self.pools.update(kind, body):
            self._admit_all()
        self.pools_dirty.update(self.pools.bodies)
        if kind == "DELETED":
            self.pool_written.pop(name, None)
            self.pools_dirty.discard(name)

    def on_namespace(self, kind: str | None, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        labels = None if kind == "DELETED" else dict(body["metadata"].get("labels") or {})
        if self.namespaces.get(name) == labels:
            return
        if labels is None:
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = labels
        for ref in [r for r in self.checked if r[0] == name]:
            self._admit(ref)
        self._resolve()

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
            if moved := set(old.announced.items()) ^ set(new.announced.items()):
                moved_addresses = {a for a, _ in moved}  # the L2 announcer of an address
                self.dirty.update(r for r, a in self.admissions.items()
                                  if moved_addresses & a.pools.keys() and r in self.lbs)
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

    def node_addresses(self) -> frozenset[str]:
        return frozenset(a for n in self.nodes.values() for a in n.addresses)

    def _admit(self, ref: Ref, nodes: frozenset[str] | None = None) -> None:
        """Judge one LoadBalancer against the pools again (the caller resolves conflicts)."""
        lb = self.checked[ref][3]
        if lb is None:
            self.admissions.pop(ref, None)
            return
        old = self.admissions.get(ref)
        new = admit(lb, self.namespaces.get(ref[0]), self.pools.grants,
                    self.node_addresses() if nodes is None else nodes)
        self.admissions[ref] = new
        if old != new:
            self.dirty.add(ref)
            self.pools_dirty.update(self.pools.bodies)

    def _admit_all(self) -> None:
        nodes = self.node_addresses()
        for ref in list(self.checked):
            self._admit(ref, nodes)
        self._resolve()

    def _resolve(self) -> None:
        claims: list[Claim] = []
        for ref, (_, _, verdict, _) in self.checked.items():
            body = self.lbs.get(ref)
            admission = self.admissions.get(ref)
            if body is not None and verdict.accepted and admission and admission.admitted:
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
        admission = self.admissions.get(ref)
        if verdict.accepted and admission is not None and admission.refusal is not None:
            return Verdict(False, NOT_ALLOWED, admission.refusal)
        if verdict.accepted and ref in self.conflicts:
            return Verdict(False, "Conflicted", self.conflicts[ref].message())
        return verdict

    def status(self, ref: Ref, now: datetime.datetime) -> dict[str, Any]:
        admission = self.admissions.get(ref)
        pools = admission.pools if admission is not None and admission.admitted else {}
        addresses = address_status(pools, announcers(self.reports, now, self.settings.silence))
        return lb_status(self.lbs[ref], self.verdict(ref), self.nodes.values(), self.reports,
                         now, self.settings.agent.node_selector, self.settings.silence,
                         self.endpoints, addresses)

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
