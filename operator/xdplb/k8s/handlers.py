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

    @kopf.on.event(GROUP, VERSION, "loadbalancers", when=ours, registry=registry)
    async def lb_event(type: str | None, body: Any, **_: Any) -> None:
        nonlocal writer
        if writer is None:
            # Started here rather than at startup: kopf.event posts from resource
            # handlers and the tasks they start only.
            writer = start(status_loop(state, kube))
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

    # Coroutines, though they do no I/O: kopf runs plain functions in a thread pool, and
    # State (its asyncio.Event too) belongs to the event loop.
    @kopf.on.event(GROUP, VERSION, "nodestates", registry=registry)
    async def nodestate_event(type: str | None, body: Any, **_: Any) -> None:
        state.on_nodestate(type, _body(body))

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(type: str | None, body: Any, **_: Any) -> None:
        state.on_node(type, _body(body))

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
        state.on_service(ref_of(body))

    @kopf.on.event("discovery.k8s.io", "v1", "endpointslices",
                   labels={SERVICE_NAME_LABEL: kopf.PRESENT}, registry=registry)
    async def slice_event(body: Any, **_: Any) -> None:
        if service := service_of_slice(body):
            state.on_service(service)

    return registry
