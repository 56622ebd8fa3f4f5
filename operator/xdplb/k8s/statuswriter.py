"""The LoadBalancer status writes, and the Events that say what changed.

Writes are coalesced to at most one per LoadBalancer per ``status_interval``,
and made only when the status changed. The loop runs as a task started from a
kopf resource handler (handlers.py): kopf.event posts only in such a context.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

from xdplb.k8s.client import Kube, is_missing
from xdplb.k8s.conditions import same_status, status_events, with_transition_times
from xdplb.k8s.events import event
from xdplb.k8s.index import State
from xdplb.spec.api import GROUP, VERSION, Ref

TICK = 0.1  # seconds between scans for due status writes and silent nodes
log = logging.getLogger("xdplb.operator")


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
        event(body, etype, reason, message)


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
