"""The LoadBalancer and AddressPool status writes, and the Events that say what changed.

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
from xdplb.k8s.poolstatus import pool_status
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
    for etype, reason, message in announcer_events(old.get("addresses"), status["addresses"]):
        event(body, etype, reason, message)


def announcer_events(old: list[dict[str, str]] | None, new: list[dict[str, str]]
                     ) -> list[tuple[str, str, str]]:
    """A Normal Event for each address whose L2 announcer changed to a node."""
    before = {a["address"]: a.get("announcedBy", "") for a in old or []}
    return [("Normal", "Announced", f"{a['address']} is announced by node {a['announcedBy']}"
             " (L2: it answers ARP or NS for it)")
            for a in new if a.get("announcedBy") and before.get(a["address"]) != a["announcedBy"]]


def pool_used(state: State, name: str) -> int:
    return len({a for adm in state.admissions.values() if adm.admitted
                for a, pool in adm.pools.items() if pool == name})


async def write_pool_status(state: State, kube: Kube, name: str) -> None:
    state.pools_dirty.discard(name)
    body = state.pools.bodies.get(name)
    if body is None:
        return
    now = datetime.datetime.now(datetime.UTC)
    generation = int(body["metadata"].get("generation") or 1)
    status = pool_status(name, generation, {g.name: g for g in state.pools.grants},
                         state.pools.problems.get(name), pool_used(state, name))
    old = state.pool_written.get(name, body.get("status") or {})
    if same_status(old, status):
        return
    status["conditions"] = with_transition_times(status["conditions"], old.get("conditions"), now)
    state.pool_last_write[name] = time.monotonic()
    try:
        await asyncio.to_thread(kube.patch, f"/apis/{GROUP}/{VERSION}/addresspools/{name}/status",
                                {"status": status})
    except Exception as e:
        if not is_missing(e):
            log.warning("status of AddressPool %s not written: %s", name, e)
            state.pools_dirty.add(name)
        return
    state.pool_written[name] = status
    before = {c["type"]: c for c in old.get("conditions") or []}
    for c in status["conditions"]:
        was = before.get(c["type"], {})
        if c["type"] == "Overlapping" and c["status"] == "True" and (
                was.get("status") != "True" or was.get("message") != c["message"]):
            event(body, "Warning", "Overlapping", c["message"])
        if c["type"] == "Accepted" and c["status"] == "False" and (
                was.get("message") != c["message"]):
            event(body, "Warning", "Invalid", c["message"])


async def status_loop(state: State, kube: Kube) -> None:
    while True:
        await asyncio.sleep(TICK)
        state.find_silent(datetime.datetime.now(datetime.UTC))
        clock, gap = time.monotonic(), state.settings.status_interval
        for name in [n for n in state.pools_dirty
                     if clock - state.pool_last_write.get(n, -gap) >= gap]:
            try:
                await write_pool_status(state, kube, name)
            except Exception as e:  # never let one pool stop the loop
                log.error("status of AddressPool %s: %r", name, e)
                state.pools_dirty.add(name)
        due = state.due(time.monotonic())
        results = await asyncio.gather(*(write_status(state, kube, r) for r in due),
                                       return_exceptions=True)
        for ref, result in zip(due, results, strict=True):
            if isinstance(result, Exception):  # never let one object stop the loop
                log.error("status of %s/%s: %r", *ref, result)
                state.dirty.add(ref)
