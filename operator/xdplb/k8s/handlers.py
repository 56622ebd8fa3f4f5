"""The kopf wiring: which watch-events feed the index, and the loops and tasks they start.

Event handlers only: kopf's change handlers would keep a copy of each spec in an
annotation (its diff base), which a LoadBalancer with many routes cannot afford.
The decisions live elsewhere (index.py and the pure modules it calls).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Coroutine
from typing import Any

import kopf

from xdplb.k8s.agents import daemonset_loop
from xdplb.k8s.client import Kube
from xdplb.k8s.finalizer import FINALIZER, release, set_finalizer
from xdplb.k8s.index import State, service_of_slice
from xdplb.k8s.probes import Probes
from xdplb.k8s.services import SERVICE_LABEL
from xdplb.k8s.servicewriter import ServiceController, lb_summary
from xdplb.k8s.settings import OperatorSettings
from xdplb.k8s.statuswriter import status_loop
from xdplb.plan.endpoints import SERVICE_NAME_LABEL
from xdplb.spec.api import GROUP, VERSION, Ref, ref_of

Doc = dict[str, Any]


def _body(body: Any) -> Doc:
    doc: Doc = json.loads(json.dumps(dict(body)))  # kopf's views into plain JSON
    return doc


def build_registry(opts: OperatorSettings, state: State, kube: Kube,
                   probes: Probes | None = None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    loops: list[asyncio.Task[None]] = []
    writer: asyncio.Task[None] | None = None
    services = ServiceController(opts, state, kube)
    primers: list[tuple[Any, Any]] = []  # (kopf index, State method), until primed
    # By uid: a release still waiting for an object deleted earlier under the same name
    # must not keep this one's from starting.
    releasing: dict[str, asyncio.Task[None]] = {}

    def start(loop: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A loop of the leader: ended at cleanup, watched by /healthz."""
        task = asyncio.create_task(loop)
        loops.append(task)
        if probes is not None:
            probes.loops.append(task)
        return task

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kube.connection()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **indexes: Any) -> None:
        settings.peering.standalone = True  # our Lease, not kopf's peering, picks the replica
        settings.posting.level = logging.ERROR  # Events are ours, not kopf's log lines
        settings.posting.reporting_component = "xdplb-operator"
        settings.posting.reporting_instance = os.environ.get("POD_NAME", "xdplb-operator")
        state.changed = asyncio.Event()
        # The live indexes of the Services and EndpointSlices (index_service, index_slice).
        state.services, state.slices = indexes["services"], indexes["endpointslices"]
        services.services, services.lbs = indexes["services"], indexes["lbsummaries"]
        services.wake = asyncio.Event()  # of this event loop
        services.wake.set()
        primers[:] = [(indexes["nodes"], state.on_node),
                      (indexes["namespaces"], state.on_namespace),
                      (indexes["pools"], state.on_pool)]
        start(daemonset_loop(opts, kube))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for t in [*loops, *releasing.values()]:
            t.cancel()
        await asyncio.gather(*loops, *releasing.values(), return_exceptions=True)

    # kopf serves cluster-scoped kinds (Nodes, NodeStates) only cluster-wide, so
    # --namespace is a filter on LoadBalancers rather than a namespaced watch.
    def ours(namespace: str | None, **_: Any) -> bool:
        return opts.namespace is None or namespace == opts.namespace

    def prime() -> None:
        """Before the first object is judged: every Node, Namespace and AddressPool, from
        kopf's indexes (complete before any handler runs), so that no LoadBalancer is
        judged against a partial view (a refusal that a pool listed a moment later
        would lift) after a restart. Their own events keep the State current after."""
        while primers:
            index, take = primers.pop(0)
            for bodies in list(index.values()):
                for body in bodies:
                    take("ADDED", body)

    def writers() -> None:
        """The status writes and the Service controller, once: started from a resource
        handler rather than at startup, because kopf.event posts from resource handlers
        and the tasks they start only."""
        nonlocal writer
        if writer is None:
            writer = start(status_loop(state, kube))
            start(services.loop())

    @kopf.index(GROUP, VERSION, "loadbalancers", id="lbsummaries", when=ours, registry=registry)
    async def index_lb(body: Any, **_: Any) -> dict[Ref, Doc]:
        return {ref_of(body): lb_summary(body)}

    @kopf.on.event(GROUP, VERSION, "loadbalancers", when=ours, registry=registry)
    async def lb_event(type: str | None, body: Any, **_: Any) -> None:
        prime()
        writers()
        doc = _body(body)
        state.on_lb(type, doc)
        if (doc["metadata"].get("labels") or {}).get(SERVICE_LABEL) or type == "DELETED":
            services.poke()
        meta = doc["metadata"]
        if type == "DELETED":
            return
        if not meta.get("deletionTimestamp"):
            await asyncio.to_thread(set_finalizer, kube, doc, True)
        elif FINALIZER in (meta.get("finalizers") or []) and (uid := meta["uid"]) not in releasing:
            releasing[uid] = asyncio.create_task(release(opts, state, kube, doc))
            releasing[uid].add_done_callback(lambda _: releasing.pop(uid, None))

    # Coroutines, though they do no I/O: kopf runs plain functions in a thread pool, and
    # State (its asyncio.Event too) belongs to the event loop.
    @kopf.on.event(GROUP, VERSION, "nodestates", registry=registry)
    async def nodestate_event(type: str | None, body: Any, **_: Any) -> None:
        prime()
        state.on_nodestate(type, _body(body))

    # Nodes, AddressPools and Namespaces (their labels): a change may judge the
    # LoadBalancers again and move Services' addresses. Indexed too, for prime().
    @kopf.index("", "v1", "nodes", id="nodes", registry=registry)
    async def index_node(body: Any, **_: Any) -> dict[str, Doc]:
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        return {meta["name"]: {"metadata": {"name": meta["name"],
                                            "labels": dict(meta.get("labels") or {}),
                                            "deletionTimestamp": meta.get("deletionTimestamp")},
                               "status": {"addresses": list(status.get("addresses") or [])}}}

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(type: str | None, body: Any, **_: Any) -> None:
        prime()
        state.on_node(type, _body(body))

    @kopf.index(GROUP, VERSION, "addresspools", id="pools", registry=registry)
    async def index_pool(body: Any, **_: Any) -> dict[str, Doc]:
        return {body["metadata"]["name"]: _body(body)}

    @kopf.on.event(GROUP, VERSION, "addresspools", registry=registry)
    async def pool_event(type: str | None, body: Any, **_: Any) -> None:
        prime()
        writers()
        state.on_pool(type, _body(body))
        services.poke()

    @kopf.index("", "v1", "namespaces", id="namespaces", registry=registry)
    async def index_namespace(body: Any, **_: Any) -> dict[str, Doc]:
        meta = body.get("metadata") or {}
        return {meta["name"]: {"metadata": {"name": meta["name"],
                                            "labels": dict(meta.get("labels") or {})}}}

    @kopf.on.event("", "v1", "namespaces", registry=registry)
    async def namespace_event(type: str | None, body: Any, **_: Any) -> None:
        prime()
        state.on_namespace(type, _body(body))
        services.poke()

    # Services and EndpointSlices: kopf keeps them (its indexes, updated before the
    # handlers of the same watch-event run); the handlers wake the LoadBalancers
    # that name the Service.
    @kopf.index("", "v1", "services", id="services", registry=registry)
    async def index_service(body: Any, **_: Any) -> dict[Ref, Doc]:
        return {ref_of(body): _body(body)}

    @kopf.index("discovery.k8s.io", "v1", "endpointslices", id="endpointslices",
                labels={SERVICE_NAME_LABEL: kopf.PRESENT}, registry=registry)
    async def index_slice(body: Any, **_: Any) -> dict[Ref, Doc]:
        service = service_of_slice(body)
        return {service: _body(body)} if service else {}

    @kopf.on.event("", "v1", "services", registry=registry)
    async def service_event(body: Any, **_: Any) -> None:
        prime()
        writers()
        state.on_service(ref_of(body))
        services.poke()

    @kopf.on.event("discovery.k8s.io", "v1", "endpointslices",
                   labels={SERVICE_NAME_LABEL: kopf.PRESENT}, registry=registry)
    async def slice_event(body: Any, **_: Any) -> None:
        prime()
        if service := service_of_slice(body):
            state.on_service(service)

    return registry
