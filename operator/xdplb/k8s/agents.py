"""The agent DaemonSet on the API: created once, then kept as daemonset.py builds it.

daemonset.py stays pure (the manifest and the drift patch); this module finds the
owner, creates or patches the DaemonSet, and does so again every resync interval.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kubernetes

from xdplb.k8s.client import Kube, is_missing
from xdplb.k8s.daemonset import agent_daemonset, drift_patch
from xdplb.k8s.settings import OperatorSettings

log = logging.getLogger("xdplb.operator")


def find_owner(kube: Kube, pod_name: str | None, namespace: str | None
               ) -> dict[str, Any] | None:
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
