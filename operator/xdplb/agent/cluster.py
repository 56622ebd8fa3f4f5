"""The node agent in a cluster: LoadBalancers from the API -> the data plane.

It watches LoadBalancers in every namespace, its own Node (for its labels), the
AddressPools and the Namespaces (their labels), and the EndpointSlices of the
Services its LoadBalancers name (one watch per namespace, selected by
``kubernetes.io/service-name in (...)``). The LoadBalancers whose ``nodeSelector``
matches the Node, and that the pools admit (k8s/admission.py: judged here too, so
that the node never programs what no pool admits, whatever the operator does), go
through the same apply step as in standalone mode (plan -> MapWriter -> attach);
what this node did is reported in its NodeState (``nodestates/<node>``, owned by the
Node): one small object per node, written at most once a second and at least every
heartbeat. Addresses of pools with ``announce: L2`` are announced by one elected node
each (announcer.py). The agent never writes to LoadBalancer objects.

It uses the official ``kubernetes`` client rather than kopf: kopf keeps its
progress in annotations and finalizers of the objects it handles, which would
make every agent write to every LoadBalancer.
"""

from __future__ import annotations

import datetime
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge

from xdplb.agent.announcer import Announcer, Candidate
from xdplb.agent.l2 import Kernel, interfaces_for
from xdplb.agent.node import NodeApplier, NodeOptions, stop_on_signals
from xdplb.dataplane.entries import Inventory, listener_interfaces
from xdplb.dataplane.loader import DataPlane
from xdplb.k8s.admission import NOT_ALLOWED, Grant, PoolView, grants_of
from xdplb.k8s.client import Kube, api_client
from xdplb.k8s.conflicts import claim_of, resolve
from xdplb.k8s.crd import parse_object, parse_pool
from xdplb.k8s.nodestate import (
    MAX_MESSAGE,
    InterfaceState,
    LoadBalancerState,
    NodeStateStatus,
    Phase,
    rfc3339,
)
from xdplb.memory import gc_paused
from xdplb.plan.endpoints import SERVICE_NAME_LABEL, EndpointIndex
from xdplb.plan.model import Plan, Target
from xdplb.plan.planner import PlanMemo, build_plan
from xdplb.spec.api import GROUP, VERSION, Ref, ref_of
from xdplb.spec.model import LoadBalancer
from xdplb.spec.pool import AddressPool

log = logging.getLogger("xdplb.agent")

Json = dict[str, Any]

# Per-LoadBalancer apply results, beside the standalone agent's metrics.
LB_RESULTS = Counter("xdplb_loadbalancer_results_total",
                     "Changes of a LoadBalancer's state on this node, by resulting phase",
                     ["namespace", "name", "phase"])
LB_GENERATION = Gauge("xdplb_loadbalancer_applied_generation",
                      "Generation of the LoadBalancer in the maps (0: not applied)",
                      ["namespace", "name"])


# The API access the agent needs, and nothing else (its ClusterRole). No write verb on
# LoadBalancers: the operator owns their status.
AGENT_RULES: list[Json] = [
    {"apiGroups": [GROUP], "resources": ["loadbalancers"], "verbs": ["list", "watch"]},
    # Its own NodeState: created at start, deleted when xdplb is uninstalled.
    {"apiGroups": [GROUP], "resources": ["nodestates"], "verbs": ["create", "delete"]},
    {"apiGroups": [GROUP], "resources": ["nodestates/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["list", "watch"]},
    # Who may claim which address, by namespace label: judged here too.
    {"apiGroups": [GROUP], "resources": ["addresspools"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]

# A Role in the agents' namespace: whether this stop is an uninstall (see uninstalling);
# the L2 announcement Leases, one per address (read, created once, renewed by PUT).
AGENT_NAMESPACE_RULES: list[Json] = [
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "create", "update"]},
]


@dataclass
class ClusterOptions(NodeOptions):
    node_name: str = ""
    daemonset: str = ""  # namespace/name of the agents' DaemonSet ("": never uninstall)
    heartbeat_seconds: float = 10.0
    min_write_seconds: float = 1.0  # NodeState writes are coalesced to at most one per this
    # The L2 announcement Leases: their namespace ("": the DaemonSet's; none: no L2) and
    # duration (a stopped announcer is replaced within it).
    lease_namespace: str = ""
    l2_lease_seconds: int = 3

    @property
    def leases(self) -> str:
        return self.lease_namespace or self.daemonset.partition("/")[0]


def uninstalling(api: kubernetes.client.ApiClient, daemonset: str) -> bool:
    """Whether the agents' DaemonSet is gone or going: this stop ends the install.

    A rolling update, a node drain or a crash keeps the DaemonSet, and the next agent
    adopts the programs and pins; an uninstall deletes it, and nothing may stay
    behind. 401 means our ServiceAccount is gone, which only an uninstall does. Any
    other doubt keeps the data plane: a leftover program is better than an outage.
    """
    if not daemonset:
        return False
    namespace, name = daemonset.split("/", 1)
    try:
        ds = kubernetes.client.AppsV1Api(api).read_namespaced_daemon_set(
            name, namespace, _request_timeout=5)
    except ApiException as e:
        if e.status in (401, 404):
            return True
        log.warning("cannot tell whether xdplb is being uninstalled (%s %s): keeping programs"
                    " and pins", e.status, e.reason)
        return False
    except Exception as e:  # unreachable API: the node is more likely restarting
        log.warning("cannot tell whether xdplb is being uninstalled (%s): keeping programs"
                    " and pins", e)
        return False
    return ds.metadata.deletion_timestamp is not None


# --- what this node should do (pure) ---------------------------------------------------------


def selects(lb: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether the LoadBalancer wants this node: every nodeSelector label matches."""
    selector = (lb.get("spec") or {}).get("nodeSelector") or {}
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class Desired:
    plan: Plan
    entries: dict[Ref, LoadBalancerState]  # Applied (if the plan applies) or Failed
    services: frozenset[Ref]  # Services whose EndpointSlices the plan needs
    # announce: L2: address -> its pool and the interfaces of its listeners on this node
    l2: dict[str, tuple[Grant, tuple[str, ...]]] = field(default_factory=dict)


def pool_view(pools: Mapping[Ref, Json], namespaces: Mapping[Ref, Json],
              nodes: frozenset[str], cache: dict[tuple[str, int], AddressPool | None]
              ) -> PoolView:
    """The valid pools (invalid ones admit nothing; the operator reports why), the
    namespaces' labels and the node's own addresses."""
    valid: list[tuple[AddressPool, str]] = []
    live = set()
    for raw in pools.values():
        meta = raw.get("metadata") or {}
        key = (str(meta.get("uid", "")), int(meta.get("generation") or 0))
        live.add(key)
        if key not in cache:
            cache[key] = parse_pool(raw)[0]
        if (model := cache[key]) is not None:
            valid.append((model, key[0]))
    for key in set(cache) - live:
        del cache[key]
    labels = {ref[1]: dict((ns.get("metadata") or {}).get("labels") or {})
              for ref, ns in namespaces.items()}
    return PoolView(grants_of(valid), labels, nodes)


def _message(lines: Iterable[str]) -> str:
    text = "; ".join(lines)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


class ParseCache:
    """Validated LoadBalancers by (uid, generation): a change re-validates one object,
    not every object of the cluster (a spec change always bumps the generation)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], tuple[LoadBalancer | None, list[str]]] = {}
        self.planned = PlanMemo()

    def parse(self, raw: Json) -> tuple[LoadBalancer | None, list[str]]:
        """The model of ``raw``. Once it is valid, the routes are dropped from ``raw``
        (a watch store's object, which a status update replaces with a whole one):
        only the model reads them, and 100,000 routes held twice would cost ~70 MB."""
        meta = raw.get("metadata") or {}
        key = (str(meta.get("uid", "")), int(meta.get("generation") or 0))
        if not key[0]:
            return parse_object(raw)
        if key not in self.entries:
            self.entries[key] = parse_object(raw)
        if self.entries[key][0] is not None:
            for listener in (raw.get("spec") or {}).get("listeners") or []:
                listener.pop("sourceRoutes", None)
                listener.pop("sniRoutes", None)
        return self.entries[key]

    def keep_only(self, lbs: Mapping[Ref, Json]) -> None:
        live = {(str((r.get("metadata") or {}).get("uid", "")),
                 int((r.get("metadata") or {}).get("generation") or 0)) for r in lbs.values()}
        self.entries = {k: v for k, v in self.entries.items() if k in live}
        self.planned.keep_only(lb for lb, _ in self.entries.values() if lb is not None)


@gc_paused()
def desire(lbs: Mapping[Ref, Json], labels: Mapping[str, str], index: EndpointIndex,
           pools: PoolView, down: frozenset[Target] = frozenset(),
           cache: ParseCache | None = None) -> Desired:
    """The plan for the LoadBalancers that select this node, and what to report for them
    (`down`: backends failing their health checks, given weight 0).

    Invalid objects, those the pools do not admit, and the younger side of a listener
    conflict (the operator's rule: the oldest wins) are left out and reported Failed.
    """
    entries: dict[Ref, LoadBalancerState] = {}
    valid: dict[Ref, tuple[Json, LoadBalancer]] = {}
    admitted: dict[Ref, Mapping[str, str]] = {}  # address -> pool, of each admitted object
    for ref, raw in lbs.items():
        meta = raw.get("metadata") or {}
        if meta.get("deletionTimestamp") or not selects(raw, labels):
            continue
        lb, problems = cache.parse(raw) if cache is not None else parse_object(raw)
        if lb is None:
            entries[ref] = _state(raw, "Failed", _message(problems))
            continue
        admission = pools.judge(lb)
        if admission.refusal is not None:
            entries[ref] = _state(raw, "Failed", _message([f"{NOT_ALLOWED}: {admission.refusal}"]))
        else:
            valid[ref] = (raw, lb)
            admitted[ref] = admission.pools
    losers = resolve(claim_of(ref, raw["metadata"].get("creationTimestamp", ""), raw["spec"])
                     for ref, (raw, _) in valid.items())
    for ref, conflict in losers.items():
        entries[ref] = _state(valid.pop(ref)[0], "Failed", f"Conflicted: {conflict.message()}")
    plan = build_plan((lb for _, lb in valid.values()), index.backends, down,
                      cache.planned if cache is not None else None)
    for ref, (raw, _) in valid.items():
        mine = [lst for lst in plan.listeners if lst.owner == f"{ref[0]}/{ref[1]}"]
        backends = {(b.address, b.port) for lst in mine for b in lst.backends()}
        untouched = [label.rsplit("/", 1)[1] for label in plan.untouched
                     if label.startswith(f"{ref[0]}/{ref[1]}/")]
        note = (f"no endpoint on this node (trafficPolicy Local): traffic of listener "
                f"{', '.join(untouched)} passes untouched") if untouched else ""
        entries[ref] = _state(raw, "Applied", note, len(mine), len(backends))
    l2: dict[str, tuple[Grant, tuple[str, ...]]] = {}
    for ref, by_address in admitted.items():
        owner = f"{ref[0]}/{ref[1]}"
        for address, pool in by_address.items():
            grant = pools.grant(pool)
            serving = [lst for lst in plan.listeners if lst.owner == owner
                       and lst.address == address]
            if grant is not None and grant.announce == "L2" and serving:
                # "": the interface of the default route, as the node sees it
                ifs = {i for lst in serving for i in (lst.interfaces or ("",))}
                known = l2.get(address, (grant, ()))[1]
                l2[address] = (grant, tuple(sorted(ifs | set(known))))
    services = frozenset(
        (lb.metadata.namespace, group.service.name)
        for _, lb in valid.values()
        for lst in lb.spec.listeners
        for group in lst.groups()
        if group.service is not None
    )
    return Desired(plan, entries, services, l2)


def _state(raw: Json, phase: Phase, message: str, listeners: int = 0,
           backends: int = 0) -> LoadBalancerState:
    meta = raw.get("metadata") or {}
    return LoadBalancerState(
        namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0), phase=phase,
        message=message, listeners=listeners, backends=backends)


# --- watches ---------------------------------------------------------------------------------


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class _Watch(threading.Thread):
    """List, then watch from the list's resourceVersion. A watch that times out is
    resumed from the last version seen (a list of 100,000 routes takes seconds,
    and changes would wait behind it); an expired version or an error lists again.

    Events go to ``sink`` as (key, type, object) with objects as plain JSON
    dicts; type "SYNC" carries the full list, replacing what ``key`` held.
    """

    def __init__(self, key: str, call: Callable[..., Any], kwargs: Json,
                 sink: queue.Queue[tuple[str, str, Any]], api: kubernetes.client.ApiClient,
                 timeout: int = 30) -> None:
        super().__init__(name=f"watch-{key}", daemon=True)
        self.key, self.call, self.kwargs, self.sink, self.api = key, call, kwargs, sink, api
        self.timeout = timeout
        self.stopped = threading.Event()
        self.error = ""  # why the last list or watch failed; "" once a list succeeds
        self._watch: kubernetes.watch.Watch | None = None

    def stop(self) -> None:
        self.stopped.set()
        if self._watch is not None:
            self._watch.stop()

    def _json(self, obj: Any) -> Any:
        # Custom objects arrive as JSON already; copying 1,000 routes again costs ~7 ms.
        return obj if isinstance(obj, dict) else self.api.sanitize_for_serialization(obj)

    @staticmethod
    def _trim(obj: Json) -> Json:
        """Drop what the agent never reads and what can be as large as the object
        itself: managedFields, and the copy client-side `kubectl apply` keeps."""
        meta = obj.get("metadata") or {}
        meta.pop("managedFields", None)
        (meta.get("annotations") or {}).pop(LAST_APPLIED, None)
        return obj

    def run(self) -> None:
        version: str | None = None  # None: list first
        while not self.stopped.is_set():
            try:
                if version is None:
                    listing = self._json(self.call(**self.kwargs))
                    self.error = ""
                    self.sink.put((self.key, "SYNC",
                                   [self._trim(o) for o in listing.get("items") or []]))
                    version = (listing.get("metadata") or {}).get("resourceVersion") or ""
                self._watch = kubernetes.watch.Watch()
                for event in self._watch.stream(self.call, resource_version=version,
                                                timeout_seconds=self.timeout, **self.kwargs):
                    if self.stopped.is_set():
                        return
                    if event["type"] == "ERROR":
                        version = None  # e.g. 410 Gone: list again
                        break
                    obj = self._trim(self._json(event["object"]))
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    self.sink.put((self.key, event["type"], obj))
            except Exception as e:  # the API may be away for a while: keep trying
                version = None
                if self.stopped.is_set():
                    return
                reason = f"{e.status} {e.reason}" if isinstance(e, ApiException) else str(e)
                self.error = f"cannot watch {self.key.split('/')[-1]} ({reason})"
                log.warning("watch %s: %s; retrying", self.key, reason)
                self.stopped.wait(1.0)


# --- the agent -------------------------------------------------------------------------------


@dataclass
class _Stores:
    """What the watches delivered, by watch key, then by (namespace, name)."""

    by_key: dict[str, dict[Ref, Json]] = field(default_factory=dict)

    def apply(self, key: str, kind: str, payload: Any) -> None:
        store = self.by_key.setdefault(key, {})
        if kind == "SYNC":
            store.clear()
            store.update((ref_of(obj), obj) for obj in payload)
        elif kind == "DELETED":
            store.pop(ref_of(payload), None)
        else:
            store[ref_of(payload)] = payload

    def values(self, prefix: str) -> list[Json]:
        return [obj for key, store in self.by_key.items() if key.startswith(prefix)
                for obj in store.values()]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class ClusterAgent:
    def __init__(self, opts: ClusterOptions, api: kubernetes.client.ApiClient | None = None,
                 dp: DataPlane | None = None) -> None:
        self.opts = opts
        self.node = NodeApplier(opts, "kubernetes", dp)
        self.stop = threading.Event()
        self.api = api or api_client()
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.discovery = kubernetes.client.DiscoveryV1Api(self.api)
        self.events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self.stores = _Stores()
        self.watches: dict[str, _Watch] = {}
        self.slice_watches: dict[str, tuple[str, frozenset[str]]] = {}  # ns -> (key, Services)
        self.services: dict[Ref, Json | None] = {}  # Service objects read on demand
        self.wanted_services: frozenset[Ref] = frozenset()
        self.reported: dict[Ref, LoadBalancerState] = {}
        self.status: NodeStateStatus | None = None
        self._written: Json | None = None
        self._written_at = 0.0
        self._nodestate_ready = False
        self._dirty = True
        self._parsed = ParseCache()
        self._pools: dict[tuple[str, int], AddressPool | None] = {}
        self._watch_seq = 0
        self._inventory: Inventory | None = None  # the node as last applied
        self.announcer: Announcer | None = None
        if opts.leases:
            self.announcer = Announcer(Kube(client=self.api), opts.leases, opts.node_name,
                                       Kernel(), opts.l2_lease_seconds)

    @functools.cached_property
    def core(self) -> kubernetes.client.CoreV1Api:
        # Its module takes ~0.7 s to import: not before the LoadBalancers are being listed.
        return kubernetes.client.CoreV1Api(self.api)

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        return self.node.plan

    def run(self) -> None:
        stop_on_signals(self.stop)
        self.start()
        try:
            self.loop()
        finally:
            self.shutdown()

    def start(self) -> None:
        """Watch, compile meanwhile, then take over the pinned maps; the loop applies
        once the lists have arrived."""
        t0 = time.monotonic()
        self._start_watch("lb", self.custom.list_cluster_custom_object,
                          {"group": GROUP, "version": VERSION, "plural": "loadbalancers"})
        self._start_watch("node", self.core.list_node,
                          {"field_selector": f"metadata.name={self.opts.node_name}"})
        self._start_watch("pools", self.custom.list_cluster_custom_object,
                          {"group": GROUP, "version": VERSION, "plural": "addresspools"})
        self._start_watch("ns", self.core.list_namespace, {})
        self.node.load_async()
        self._plan_while_loading()
        self.node.start()
        if self.announcer is not None:
            self.announcer.start()
        log.info("started in %.0f ms", (time.monotonic() - t0) * 1000)

    def _plan_while_loading(self) -> None:
        """While the programs compile: take the first lists and validate and plan
        what they hold, so that the first reconcile finds it done (100 objects of
        1,000 routes take ~2 s). The maps are written by reconcile()."""
        while self.node.loading:
            try:
                self._take(self.events.get(timeout=0.05))
            except queue.Empty:
                pass
            if self._synced():
                t0 = time.monotonic()
                node = next(iter(self.stores.by_key.get("node", {}).values()), None)
                labels = ((node or {}).get("metadata") or {}).get("labels") or {}
                lbs = self.stores.by_key.get("lb", {})
                desire(lbs, labels, EndpointIndex.of([], [], self.opts.node_name),
                       self._pool_view(node), self.node.health.down(), self._parsed)
                log.info("validated and planned the %d LoadBalancers listed while compiling"
                         " (%.0f ms)", len(lbs), (time.monotonic() - t0) * 1000)
                break

    def loop(self) -> None:
        while not self.stop.is_set():
            self.step(self.opts.poll_seconds)
            self.node.tick()

    def step(self, wait: float) -> None:
        """Take the events that arrived within ``wait`` seconds, reconcile, report."""
        try:
            self._take(self.events.get(timeout=wait))
            while True:
                self._take(self.events.get_nowait())
        except queue.Empty:
            pass
        # Addresses, interfaces and backends' health change without an API event.
        self._dirty |= self.node.inventory() != self._inventory
        self._dirty |= self.node.health_changed()
        if self._dirty:
            self._dirty = False
            self.reconcile()
        if not self._synced():
            self._report_waiting()
        if self.announcer is not None and self.status is not None:
            self.status = self.status.model_copy(
                update={"announcements": self.announcer.announcements()})
        self.report()

    def shutdown(self) -> None:
        for w in self.watches.values():
            w.stop()
        if not self.opts.detach_on_exit and uninstalling(self.api, self.opts.daemonset):
            log.info("the agent DaemonSet %s is gone: removing programs, filters, pins and"
                     " NodeState %s", self.opts.daemonset, self.opts.node_name)
            self.opts.detach_on_exit = True
            try:
                self.custom.delete_cluster_custom_object(GROUP, VERSION, "nodestates",
                                                         self.opts.node_name)
            except ApiException as e:
                if e.status not in (401, 404):
                    log.warning("NodeState %s not deleted: %s", self.opts.node_name, e.reason)
        if self.announcer is not None:
            # The data plane stays for the next agent: so do the announcements it serves.
            self.announcer.stop(release=self.opts.detach_on_exit)
        self.node.shutdown()

    # -- events -------------------------------------------------------------------------------
    def _start_watch(self, key: str, call: Callable[..., Any], kwargs: Json) -> None:
        w = _Watch(key, call, kwargs, self.events, self.api)
        self.watches[key] = w
        w.start()

    def _take(self, event: tuple[str, str, Any]) -> None:
        key, kind, payload = event
        if key not in self.watches:
            return  # from a watch stopped since (its namespace no longer needed)
        self.stores.apply(key, kind, payload)
        if key.startswith("eps/"):
            objs = payload if kind == "SYNC" else [payload]
            for obj in objs:  # the Service's ports may have changed with its endpoints
                name = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
                self.services.pop((ref_of(obj)[0], name or ""), None)
        self._dirty = True

    def _want(self, services: frozenset[Ref]) -> None:
        """Watch the EndpointSlices of exactly these Services: one watch per namespace,
        replaced only in the namespaces whose set of Services changed."""
        self.wanted_services = services
        by_ns: dict[str, frozenset[str]] = {}
        for ns, name in services:
            by_ns[ns] = by_ns.get(ns, frozenset()) | {name}
        for ns in self.slice_watches.keys() - by_ns.keys():
            key, _ = self.slice_watches.pop(ns)
            self.watches.pop(key).stop()
            self.stores.by_key.pop(key, None)
        for ns, names in by_ns.items():
            old_key, old_names = self.slice_watches.get(ns, ("", frozenset()))
            if names == old_names:
                continue
            self._watch_seq += 1  # a stopped watch's late events carry a key no longer used
            key = f"eps/{self._watch_seq}/{ns}"
            self.slice_watches[ns] = (key, names)
            if old_key:
                self.watches.pop(old_key).stop()
                self.stores.by_key.pop(old_key, None)
            self._start_watch(key, self.discovery.list_namespaced_endpoint_slice, {
                "namespace": ns,
                "label_selector": f"{SERVICE_NAME_LABEL} in ({','.join(sorted(names))})"})

    def _synced(self) -> bool:
        """Whether every watch has delivered its first list: until then a plan would
        drop what the maps already hold (adopted after a restart, or a Service's group)."""
        return all(key in self.stores.by_key for key in self.watches)

    def _service(self, ref: Ref) -> Json | None:
        if ref not in self.services:
            try:
                svc = self.core.read_namespaced_service(ref[1], ref[0])
                self.services[ref] = self.api.sanitize_for_serialization(svc)
            except ApiException as e:
                if e.status != 404:
                    log.warning("cannot read Service %s/%s: %s", *ref, e.reason)
                self.services[ref] = None
        return self.services[ref]

    # -- reconcile ----------------------------------------------------------------------------
    def reconcile(self) -> None:
        if self.node.writer is None:
            return
        if not self._synced():
            return  # step() reports why, and the first lists make it run again
        nodes = self.stores.by_key.get("node", {})
        node = next(iter(nodes.values()), None)
        labels = ((node or {}).get("metadata") or {}).get("labels") or {}
        lbs = self.stores.by_key.get("lb", {})
        slices = self.stores.values("eps/")
        services = [s for ref in self.wanted_services if (s := self._service(ref))]
        self._parsed.keep_only(lbs)
        pools = self._pool_view(node)
        desired = desire(lbs, labels, EndpointIndex.of(services, slices, self.opts.node_name),
                         pools, self.node.health.down(), self._parsed)
        if desired.services != self.wanted_services:
            self._want(desired.services)
            if not self._synced():
                return  # again once the new EndpointSlice watches have listed
            services = [s for ref in self.wanted_services if (s := self._service(ref))]
            desired = desire(lbs, labels,
                             EndpointIndex.of(services, self.stores.values("eps/"),
                                              self.opts.node_name), pools,
                             self.node.health.down(), self._parsed)

        inv = self.node.inventory()
        t0 = time.monotonic()
        if desired.plan != self.plan or inv != self._inventory:
            self._inventory = inv
            self.node.apply(desired.plan, inv)
        ok = self.plan == desired.plan
        ms = (time.monotonic() - t0) * 1000
        entries = {
            ref: e if ok or e.phase != "Applied" else e.model_copy(
                update={"phase": "Failed", "message": _message([self.node.last_error])})
            for ref, e in desired.entries.items()
        }
        # Objects this node served and no longer does (deselected, or being deleted).
        for ref, old in self.reported.items():
            if ref not in entries and ref in lbs and old.phase != "Failed":
                entries[ref] = _state(lbs[ref], "Removed", "", 0, 0)
        for ref, e in sorted(entries.items()):
            was = self.reported.get(ref)
            if was is None or (was.phase, was.generation, was.listeners, was.backends,
                               was.message) != (e.phase, e.generation, e.listeners, e.backends,
                                                e.message):
                log.info("%s %s/%s generation %d: %d listeners, %d backends (%.0f ms)%s",
                         e.phase.lower(), e.namespace, e.name, e.generation, e.listeners,
                         e.backends, ms, f": {e.message}" if e.message else "")
                LB_RESULTS.labels(e.namespace, e.name, e.phase).inc()
                LB_GENERATION.labels(e.namespace, e.name).set(
                    e.generation if e.phase == "Applied" else 0)
        for ref in self.reported.keys() - entries.keys():
            LB_GENERATION.labels(*ref).set(0)
        self.reported = entries
        if self.announcer is not None and ok:
            self.announcer.want(self._candidates(desired, inv))
        self.status = self._node_status(desired.plan, inv)

    def _pool_view(self, node: Json | None) -> PoolView:
        """The pools and namespaces as listed, and this node's own addresses (its
        interfaces', and those its Node object shows): never a backend."""
        inv = self._inventory or self.node.inventory()
        own = {a for addrs in inv.addresses.values() for a in addrs}
        own |= {a.get("address", "") for a in ((node or {}).get("status") or {}).get(
            "addresses") or [] if a.get("type") in ("InternalIP", "ExternalIP")}
        return pool_view(self.stores.by_key.get("pools", {}), self.stores.by_key.get("ns", {}),
                         frozenset(own - {""}), self._pools)

    def _candidates(self, desired: Desired, inv: Inventory) -> dict[str, Candidate]:
        """The addresses this node may announce: those of listeners it serves, on an
        interface it is attached to (a node that cannot serve one must not draw its
        traffic)."""
        out = {}
        for address, (grant, ifs) in desired.l2.items():
            listeners = {i or inv.default_interface for i in ifs} & set(self.node.attached)
            if listeners:
                out[address] = Candidate(address, grant.name, grant.uid, interfaces_for(
                    address, inv, grant.l2_interfaces, listeners))
        return out

    def _report_waiting(self) -> None:
        """A watch cannot list (RBAC, the API away): the maps keep their last state, and
        the NodeState says why nothing changes."""
        errors = sorted({w.error for w in self.watches.values() if w.error})
        if not errors:
            return
        base = self.status or NodeStateStatus(heartbeat_time=_now())
        self.status = base.model_copy(update={"error": _message(errors)})

    def _node_status(self, plan: Plan, inv: Inventory) -> NodeStateStatus:
        wanted = sorted({n for lst in plan.listeners for n in listener_interfaces(lst, inv)})
        interfaces = []
        for name in wanted:
            error = ""
            if name not in inv.ifindex:
                error = "no such interface on this node"
            elif name not in self.node.attached:
                error = "not attached (see the agent log)"
            attached = self.node.attached
            interfaces.append(InterfaceState(name=name[:15], mode=attached.get(name, "none"),
                                             attached=name in attached, error=error))
        modes = sorted(set(self.node.attached.values()))
        problems = [self.node.last_error] if self.node.last_error else []
        if self.announcer is not None:
            problems += self.announcer.problems[:3]
        return NodeStateStatus(
            heartbeat_time=_now(),
            mode=modes[0] if len(modes) == 1 else ("generic" if modes else "none"),
            interfaces=interfaces,
            load_balancers=[self.reported[ref] for ref in sorted(self.reported)],
            announcements=self.announcer.announcements() if self.announcer else [],
            error=_message(problems) if problems else "",
        )

    # -- NodeState ----------------------------------------------------------------------------
    def report(self, force: bool = False) -> None:
        """Write the NodeState status when it changed (at most once per min_write_seconds)
        and at least every heartbeat."""
        if self.status is None:
            return
        body = self.status.to_json()
        content = {k: v for k, v in body.items() if k != "heartbeatTime"}
        since = time.monotonic() - self._written_at
        changed = content != self._written
        if not force and not (changed and since >= self.opts.min_write_seconds) \
                and since < self.opts.heartbeat_seconds:
            return
        body["heartbeatTime"] = rfc3339(_now())
        try:
            self._ensure_nodestate()
            self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, "nodestates", self.opts.node_name, {"status": body})
        except ApiException as e:
            if e.status == 404:
                self._nodestate_ready = False  # deleted under us: create it again next time
            log.warning("cannot write NodeState %s: %s", self.opts.node_name, e.reason)
            self._written_at = time.monotonic()  # retry at the write pace, not in a hot loop
            return
        self._written, self._written_at = content, time.monotonic()

    def _ensure_nodestate(self) -> None:
        if self._nodestate_ready:
            return
        node = next(iter(self.stores.by_key.get("node", {}).values()), None)
        owner = []
        if node:
            owner = [{"apiVersion": "v1", "kind": "Node", "name": self.opts.node_name,
                      "uid": node["metadata"].get("uid", "")}]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NodeState",
                "metadata": {"name": self.opts.node_name, "ownerReferences": owner}}
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, "nodestates", body)
        except ApiException as e:
            if e.status != 409:  # 409: it exists already (an earlier run of this agent)
                raise
        self._nodestate_ready = True
