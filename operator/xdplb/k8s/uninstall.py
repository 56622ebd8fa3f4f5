"""`xdplb uninstall`: what `helm uninstall` runs before it deletes anything (pre-delete hook).

Helm deletes a release's objects all at once. An operator still running would put
back the finalizer the uninstall removes, and once it is gone a LoadBalancer that
keeps the finalizer can never be deleted. So, in order:

1. delete the operator's Deployment in the foreground and wait until its pods are
   gone; its ReplicaSet and the agent DaemonSet it owns go with it, and each agent,
   seeing its DaemonSet going, removes its programs, filters, pins and NodeState;
2. remove our finalizer from every LoadBalancer (the objects themselves stay: they
   are the user's);
3. delete the NodeStates no agent could remove (nodes that were down), and the
   operator's leader-election Lease.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kubernetes

from xdplb.k8s.operator import FINALIZER, GROUP, VERSION, Kube, is_missing

log = logging.getLogger("xdplb.uninstall")

# The hook's ClusterRole and the Role in the release namespace: exactly what it uses.
UNINSTALL_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": ["loadbalancers"], "verbs": ["list", "patch"]},
    {"apiGroups": [GROUP], "resources": ["nodestates"], "verbs": ["list", "delete"]},
]
UNINSTALL_NAMESPACE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["delete"]},
]


def _selector(deployment: dict[str, Any]) -> str:
    labels = (deployment.get("spec") or {}).get("selector", {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def stop_operator(kube: Kube, namespace: str, name: str, timeout: float) -> bool:
    """Delete the Deployment (foreground) and wait for its pods; False on timeout."""
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"
    try:
        selector = _selector(kube.get(path))
        kube.request("DELETE", path, {"propagationPolicy": "Foreground"})
        log.info("deleting deployment %s/%s and what it owns (the agent DaemonSet)",
                 namespace, name)
    except kubernetes.client.ApiException as e:
        if not is_missing(e):
            raise
        selector = ""
        log.info("deployment %s/%s is gone already", namespace, name)
    if not selector:
        return True
    pods = f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}"
    deadline = time.monotonic() + timeout
    while left := [p["metadata"]["name"] for p in kube.get(pods).get("items", [])]:
        if time.monotonic() >= deadline:
            log.error("operator pods still running after %gs: %s", timeout, ", ".join(left))
            return False
        time.sleep(1.0)
    return True


def release_all(kube: Kube) -> int:
    """Remove our finalizer from every LoadBalancer; returns how many had it."""
    released = 0
    for lb in kube.get(f"/apis/{GROUP}/{VERSION}/loadbalancers").get("items", []):
        meta = lb["metadata"]
        finalizers = meta.get("finalizers") or []
        if FINALIZER not in finalizers:
            continue
        try:  # guarded by the position, so a finalizer added meanwhile is not removed
            kube.request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{meta['namespace']}"
                         f"/loadbalancers/{meta['name']}", [
                             {"op": "test", "path": f"/metadata/finalizers/"
                              f"{finalizers.index(FINALIZER)}", "value": FINALIZER},
                             {"op": "remove", "path": f"/metadata/finalizers/"
                              f"{finalizers.index(FINALIZER)}"}],
                         "application/json-patch+json")
            released += 1
        except kubernetes.client.ApiException as e:
            if not is_missing(e):
                raise
    return released


def delete_nodestates(kube: Kube) -> int:
    deleted = 0
    for ns in kube.get(f"/apis/{GROUP}/{VERSION}/nodestates").get("items", []):
        try:
            kube.request("DELETE", f"/apis/{GROUP}/{VERSION}/nodestates/"
                         f"{ns['metadata']['name']}")
            deleted += 1
        except kubernetes.client.ApiException as e:
            if not is_missing(e):  # its agent removed it meanwhile
                raise
    return deleted


def delete_lease(kube: Kube, namespace: str, name: str) -> None:
    try:
        kube.request("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/"
                     f"{name}")
    except kubernetes.client.ApiException as e:
        if not is_missing(e):  # a single replica without leader election has none
            raise


def uninstall(kube: Kube, namespace: str, deployment: str, timeout: float) -> bool:
    """The steps above; the Lease is named after the Deployment (as the chart sets it)."""
    if not stop_operator(kube, namespace, deployment, timeout):
        return False  # releasing now would race an operator that adds the finalizer back
    log.info("released %d LoadBalancer(s); deleted %d NodeState(s)", release_all(kube),
             delete_nodestates(kube))
    delete_lease(kube, namespace, deployment)
    return True
