"""Our finalizer on LoadBalancers: added and removed with a guarded patch, and the
release of a deleted LoadBalancer once no agent reports it applied (bounded wait).

`xdplb uninstall` removes it with the same patch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
from typing import Any

import kubernetes

from xdplb.k8s.client import Kube, is_missing
from xdplb.k8s.conditions import parse_time
from xdplb.k8s.events import event
from xdplb.k8s.index import State
from xdplb.k8s.settings import OperatorSettings
from xdplb.spec.api import GROUP, VERSION, ref_of

FINALIZER = "xdplb.io/release"
log = logging.getLogger("xdplb.operator")


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
    change: dict[str, Any]
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
    """Hold a deleted LoadBalancer until no agent reports it applied (bounded wait).

    Runs as a task started from a kopf resource handler, where kopf.event posts."""
    meta = body["metadata"]
    ref = ref_of(body)
    started = parse_time(meta.get("deletionTimestamp")) or datetime.datetime.now(datetime.UTC)
    deadline = started + datetime.timedelta(seconds=opts.release_timeout)
    while holders := state.applied_on(ref, meta.get("uid")):
        left = (deadline - datetime.datetime.now(datetime.UTC)).total_seconds()
        if left <= 0:
            event(body, "Warning", "ReleaseTimeout",
                  f"released after {opts.release_timeout:g}s while still applied"
                  f" on {len(holders)} node(s): {', '.join(holders[:10])}")
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
