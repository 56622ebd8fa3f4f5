"""`xdplb operator`: validates LoadBalancers, owns the agent DaemonSet, writes status.

kopf delivers the events; the decisions live in pure modules (conditions,
conflicts, daemonset). An in-memory index of LoadBalancers, Nodes and
NodeStates decides which LoadBalancers a change touches: a heartbeat that
changes nothing but its time wakes nobody, and a node that falls silent is
found by a cheap scan of heartbeat ages. Status writes are coalesced to at
most one per LoadBalancer per ``status_interval``, and only when they change.

With leader election on, a replica runs kopf only while it holds the Lease
(see lease.py) and exits non-zero when it loses it; /healthz and /readyz
answer for the leader and the standbys alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kopf
import kubernetes
from pydantic import ValidationError

from xdplb.k8s.client import Kube, is_missing
from xdplb.k8s.conditions import (
    NodeInfo,
    NodeReport,
    Verdict,
    lb_status,
    parse_time,
    same_status,
    status_events,
    with_transition_times,
)
from xdplb.k8s.conflicts import Claim, Conflict, claim_of, resolve
from xdplb.k8s.daemonset import agent_daemonset, drift_patch
from xdplb.k8s.lease import LeaderElector, LeaseLost
from xdplb.k8s.settings import OperatorSettings
from xdplb.plan.endpoints import SERVICE_NAME_LABEL, service_port_name, slice_backends
from xdplb.spec.api import GROUP, VERSION, Ref, ref_of
from xdplb.spec.errors import format_errors
from xdplb.spec.model import LoadBalancer

FINALIZER = "xdplb.io/release"
TICK = 0.1  # seconds between scans for due status writes and silent nodes
SHOWN_ERRORS = 20  # validation errors in a condition message; `xdplb validate` shows all
log = logging.getLogger("xdplb.operator")


def post_event(kube: Kube, body: dict[str, Any], etype: str, reason: str, message: str) -> None:
    """A core/v1 Event about ``body``, as `kubectl describe` and `kubectl get events` show."""
    meta = body["metadata"]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    kube.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", {
        "metadata": {"generateName": f"{meta['name']}."},
        "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                           "name": meta["name"], "namespace": meta["namespace"],
                           "uid": meta.get("uid")},
        "type": etype, "reason": reason, "message": message[:1024], "count": 1,
        "firstTimestamp": now[:19] + "Z", "lastTimestamp": now[:19] + "Z", "eventTime": now,
        "source": {"component": "xdplb-operator"}, "reportingComponent": "xdplb-operator",
        "reportingInstance": os.environ.get("POD_NAME", "xdplb-operator"), "action": reason})


async def emit(kube: Kube, body: dict[str, Any], etype: str, reason: str, message: str) -> None:
    try:
        await asyncio.to_thread(post_event, kube, body, etype, reason, message)
    except Exception as e:
        log.warning("event %s for %s not posted: %s", reason, body["metadata"]["name"], e)


# --- the agent DaemonSet -------------------------------------------------------------


def find_owner(kube: Kube, pod_name: str | None, namespace: str | None) -> dict | None:
    """Our Deployment (Pod -> ReplicaSet -> Deployment), or None outside a cluster."""
    if not pod_name or not namespace:
        return None
    pod = kube.get(f"/api/v1/namespaces/{namespace}/pods/{pod_name}")
    rs = next((o for o in pod["metadata"].get("ownerReferences") or []
               if o["kind"] == "ReplicaSet"), None)
    if rs is None:
        return None
    rs = kube.get(f"/apis/apps/v1/namespaces/{namespace}/replicasets/{rs['name']}")
    dep = next((o for o in rs["metadata"].get("ownerReferences") or []
                if o["kind"] == "Deployment"), None)
    return {"metadata": {"name": dep["name"], "uid": dep["uid"]}} if dep else None


def ensure_daemonset(kube: Kube, settings: OperatorSettings) -> str:
    """Create the agent DaemonSet or patch it in place; never delete and recreate it."""
    owner = find_owner(kube, settings.pod_name, settings.pod_namespace)
    desired = agent_daemonset(settings.agent, owner)
    base = f"/apis/apps/v1/namespaces/{settings.agent.namespace}/daemonsets"
    try:
        current = kube.get(f"{base}/{settings.agent.name}")
    except kubernetes.client.ApiException as e:
        if not is_missing(e):
            raise
        kube.request("POST", base, desired)
        return "created"
    patch = drift_patch(current, desired)
    if patch is None:
        return "unchanged"
    kube.patch(f"{base}/{settings.agent.name}", patch)
    return "patched"


# --- the index -----------------------------------------------------------------------


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
        # Services and EndpointSlices, for the backend counts of Service groups.
        self.services: dict[Ref, dict[str, Any]] = {}
        self.slices: dict[Ref, dict[str, dict[str, Any]]] = defaultdict(dict)
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

    def on_service(self, kind: str | None, body: dict[str, Any]) -> None:
        key = ref_of(body)
        if kind == "DELETED":
            self.services.pop(key, None)
        else:
            self.services[key] = body
        self.dirty.update(self.users.get(key, ()))

    def on_slice(self, kind: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            return
        key = (meta.get("namespace", ""), service)
        if kind == "DELETED":
            self.slices[key].pop(meta["name"], None)
        else:
            self.slices[key][meta["name"]] = body
        self.dirty.update(self.users.get(key, ()))

    def endpoints(self, namespace: str, service: Mapping[str, Any], protocol: str
                  ) -> list[tuple[str, int]]:
        key = (namespace, service.get("name", ""))
        port = service_port_name(self.services.get(key), service.get("port", ""), protocol)
        if port is None:
            return []
        slices = self.slices.get(key, {}).values()
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


# --- kopf wiring ----------------------------------------------------------------------


def _body(body: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dict(body)))  # kopf's views into plain JSON


async def write_status(state: State, kube: Kube, ref: Ref) -> None:
    body = state.lbs.get(ref)
    state.dirty.discard(ref)
    if body is None:
        return
    now = datetime.datetime.now(datetime.UTC)
    status = state.status(ref, now)
    old = state.written.get(ref) or {}
    if same_status(old, status):
        return
    status["conditions"] = with_transition_times(status["conditions"], old.get("conditions"), now)
    ns, name = ref
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/loadbalancers/{name}/status"
    state.last_write[ref] = time.monotonic()
    try:
        await asyncio.to_thread(kube.patch, path, {"status": status})
    except Exception as e:
        if not is_missing(e):
            log.warning("status of %s/%s not written: %s", ns, name, e)
            state.dirty.add(ref)
        return
    state.written[ref] = status
    log.info("status %s/%s: generation %s, %s nodes programmed, %s", ns, name,
             status["observedGeneration"], status["nodes"]["summary"],
             ", ".join(f"{c['type']}={c['status']}" for c in status["conditions"]))
    for etype, reason, message in status_events(old.get("conditions"), status["conditions"]):
        await emit(kube, body, etype, reason, message)


async def status_loop(state: State, kube: Kube) -> None:
    while True:
        await asyncio.sleep(TICK)
        state.find_silent(datetime.datetime.now(datetime.UTC))
        due = state.due(time.monotonic())
        results = await asyncio.gather(*(write_status(state, kube, r) for r in due),
                                       return_exceptions=True)
        for ref, result in zip(due, results, strict=True):
            if isinstance(result, Exception):  # never let one object stop the loop
                log.error("status of %s/%s: %r", *ref, result)
                state.dirty.add(ref)


async def daemonset_loop(settings: OperatorSettings, kube: Kube) -> None:
    while True:
        try:
            outcome = await asyncio.to_thread(ensure_daemonset, kube, settings)
            if outcome != "unchanged":
                log.info("agent DaemonSet %s/%s %s", settings.agent.namespace,
                         settings.agent.name, outcome)
        except Exception as e:
            log.error("agent DaemonSet not ensured: %s", e)
        await asyncio.sleep(settings.resync_interval)


def _lb_path(meta: dict[str, Any]) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{meta['namespace']}/loadbalancers/{meta['name']}"


def set_finalizer(kube: Kube, body: dict[str, Any], present: bool) -> bool:
    """Add or remove our finalizer with a JSON patch guarded by the resourceVersion, so a
    concurrent change of the list is never lost. False on a conflict: ``body`` was not
    the latest version, and the event of the change that won brings a newer one."""
    meta = body["metadata"]
    finalizers = meta.get("finalizers") or []
    if (FINALIZER in finalizers) == present:
        return True
    version = {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]}
    if not present:
        change = {"op": "remove", "path": f"/metadata/finalizers/{finalizers.index(FINALIZER)}"}
    elif finalizers:
        change = {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}
    else:
        change = {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
    try:
        kube.request("PATCH", _lb_path(meta), [version, change], "application/json-patch+json")
    except kubernetes.client.ApiException as e:
        if is_missing(e):
            return True
        if e.status in (409, 422):
            return False
        raise
    return True


async def release(opts: OperatorSettings, state: State, kube: Kube, body: dict[str, Any]
                  ) -> None:
    """Hold a deleted LoadBalancer until no agent reports it applied (bounded wait)."""
    meta = body["metadata"]
    ref = ref_of(body)
    started = parse_time(meta.get("deletionTimestamp")) or datetime.datetime.now(datetime.UTC)
    deadline = started + datetime.timedelta(seconds=opts.release_timeout)
    while holders := state.applied_on(ref, meta.get("uid")):
        left = (deadline - datetime.datetime.now(datetime.UTC)).total_seconds()
        if left <= 0:
            await emit(kube, body, "Warning", "ReleaseTimeout",
                       f"released after {opts.release_timeout:g}s while still applied on"
                       f" {len(holders)} node(s): {', '.join(holders[:10])}")
            break
        state.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.changed.wait(), timeout=min(left, 1.0))
    # This task is the one to try again, until the finalizer is gone: no other event of
    # the object may come to start another.
    current = state.lbs.get(ref, body)
    for attempt in itertools.count():
        if attempt > 1:  # a first failure is retried at once, later ones back off
            delay = min(0.5 * 2 ** (attempt - 2), 30.0)
            log.warning("finalizer of %s/%s not removed after %d attempts: again in %g s",
                        *ref, attempt, delay)
            await asyncio.sleep(delay)
        try:
            if await asyncio.to_thread(set_finalizer, kube, current, False):
                break
            # A conflict (a status write, another finalizer changed meanwhile): again,
            # with the object as it is now, unless it is another object by now (deleted
            # and created again under the same name).
            current = await asyncio.to_thread(kube.get, _lb_path(meta))
            if current["metadata"].get("uid") != meta.get("uid"):
                return
        except Exception as e:  # the API failed or timed out
            if is_missing(e):
                return
            log.warning("finalizer of %s/%s not removed yet: %s", *ref, e)
    log.info("released %s/%s", *ref)


def build_registry(opts: OperatorSettings, state: State, kube: Kube,
                   probes: Probes | None = None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    tasks: list[asyncio.Task[None]] = []
    # By uid: a release still waiting for an object deleted earlier under the same name
    # must not keep this one's from starting.
    releasing: dict[str, asyncio.Task[None]] = {}

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kube.connection()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.standalone = True  # our Lease, not kopf's peering, picks the replica
        settings.posting.level = logging.ERROR  # Events are ours, not kopf's log lines
        state.changed = asyncio.Event()
        tasks.append(asyncio.create_task(status_loop(state, kube)))
        tasks.append(asyncio.create_task(daemonset_loop(opts, kube)))
        if probes is not None:
            probes.loops.extend(tasks)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for t in [*tasks, *releasing.values()]:
            t.cancel()
        await asyncio.gather(*tasks, *releasing.values(), return_exceptions=True)

    # kopf serves cluster-scoped kinds (Nodes, NodeStates) only cluster-wide, so
    # --namespace is a filter on LoadBalancers rather than a namespaced watch.
    def ours(namespace: str | None, **_: Any) -> bool:
        return opts.namespace is None or namespace == opts.namespace

    # Event handlers only: kopf's change handlers would keep a copy of each spec in an
    # annotation (its diff base), which a LoadBalancer with many routes cannot afford.
    @kopf.on.event(GROUP, VERSION, "loadbalancers", when=ours, registry=registry)
    async def lb_event(type: str | None, body: Any, **_: Any) -> None:
        doc = _body(body)
        state.on_lb(type, doc)
        meta = doc["metadata"]
        if type == "DELETED":
            return
        if not meta.get("deletionTimestamp"):
            await asyncio.to_thread(set_finalizer, kube, doc, True)
        elif FINALIZER in (meta.get("finalizers") or []) and (uid := meta["uid"]) not in releasing:
            releasing[uid] = asyncio.create_task(release(opts, state, kube, doc))
            releasing[uid].add_done_callback(lambda _: releasing.pop(uid, None))

    @kopf.on.event(GROUP, VERSION, "nodestates", registry=registry)
    def nodestate_event(type: str | None, body: Any, **_: Any) -> None:
        state.on_nodestate(type, _body(body))

    @kopf.on.event("", "v1", "nodes", registry=registry)
    def node_event(type: str | None, body: Any, **_: Any) -> None:
        state.on_node(type, _body(body))

    @kopf.on.event("", "v1", "services", registry=registry)
    def service_event(type: str | None, body: Any, **_: Any) -> None:
        state.on_service(type, _body(body))

    @kopf.on.event("discovery.k8s.io", "v1", "endpointslices",
                   labels={SERVICE_NAME_LABEL: kopf.PRESENT}, registry=registry)
    def slice_event(type: str | None, body: Any, **_: Any) -> None:
        state.on_slice(type, _body(body))

    return registry


# --- probes and the run -------------------------------------------------------------


class Probes:
    """What /healthz and /readyz answer, read by the probe server's thread.

    Alive while every loop of this replica's role runs: the Lease loop of a standby;
    kopf, the Lease renewal, the status and DaemonSet loops of the leader. Ready once the
    API server has answered: a standby is ready too, or a rolling update with
    maxUnavailable 0 would wait forever for a replica that only stands by.
    """

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.role = "starting"
        self.loops: list[asyncio.Future[Any]] = []

    def alive(self) -> bool:
        return not any(t.done() for t in self.loops)

    def ready(self) -> bool:
        return self.kube.answered


class _DualStackServer(ThreadingHTTPServer):
    daemon_threads = True
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        with contextlib.suppress(OSError):  # IPv4 too: the pod may have either address
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve_probes(port: int, probes: Probes) -> ThreadingHTTPServer:
    """/healthz and /readyz on ``port``, from a thread: kopf counts every task started
    on its loop as its own. A loop that hangs without ending a task goes unnoticed."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            check = {"/healthz": probes.alive, "/readyz": probes.ready}.get(
                self.path.split("?")[0])
            ok = check is not None and check()
            code = 404 if check is None else 200 if ok else 503
            text = f"{'ok' if ok else 'not ok'}: {probes.role}\n".encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # kubelet probes every few seconds: no log line each

    try:
        server: ThreadingHTTPServer = _DualStackServer(("::", port), Handler)
    except OSError:  # no IPv6 in this network namespace
        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server


async def _flag(stop: threading.Event | None) -> None:
    """Return once ``stop`` is set (never when None)."""
    while stop is None or not stop.is_set():
        await asyncio.sleep(0.1 if stop else 3600)


async def operate(settings: OperatorSettings, kube: Kube, registry: kopf.OperatorRegistry,
                  probes: Probes, stop: threading.Event | None,
                  ready: threading.Event | None) -> str | None:
    """Stand by for the Lease (when electing), then run kopf until stopped; return why the
    Lease was lost, if it was."""
    stopped = asyncio.create_task(_flag(stop))
    elector: LeaderElector | None = None
    holding: asyncio.Task[str] | None = None
    try:
        if settings.leader_election.enabled:
            elector = LeaderElector(kube, settings.leader_election)
            acquiring = asyncio.create_task(elector.acquire())
            probes.role, probes.loops = "standby", [acquiring]
            await asyncio.wait({acquiring, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not acquiring.done():
                acquiring.cancel()
                return None
            # Started before kopf: kopf, when it stops, ends every task started after it.
            holding = asyncio.create_task(elector.hold())
        kopf_stop = asyncio.Event()
        running = asyncio.create_task(kopf.operator(
            registry=registry, standalone=True, clusterwide=True, stop_flag=kopf_stop,
            ready_flag=ready))
        probes.role, probes.loops = "leader", [running, *([holding] if holding else [])]
        await asyncio.wait({running, stopped, *([holding] if holding else [])},
                           return_when=asyncio.FIRST_COMPLETED)
        lost = holding.result() if holding is not None and holding.done() else None
        if lost:
            log.error("%s; stopping", lost)
        kopf_stop.set()
        try:
            await running
        finally:
            if holding is not None:
                holding.cancel()
            if elector is not None and not lost:
                await asyncio.to_thread(elector.release)
        return lost
    finally:
        stopped.cancel()


def run(settings: OperatorSettings, stop: threading.Event | None = None,
        ready: threading.Event | None = None, state: State | None = None) -> None:
    """Run until ``stop`` is set (or forever); ``state`` lets a caller watch the index.

    Raises LeaseLost (a SystemExit: the process ends non-zero) when the Lease is lost.
    """
    kube = Kube(settings.kubeconfig)
    state = state or State(settings)
    # kopf logs every handled event at INFO: at 1,000 nodes that is the heartbeat rate.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    probes = Probes(kube)
    registry = build_registry(settings, state, kube, probes)
    server = serve_probes(settings.health_port, probes) if settings.health_port else None
    try:
        lost = asyncio.run(operate(settings, kube, registry, probes, stop, ready))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    if lost:
        raise LeaseLost(f"xdplb operator: {lost}")
