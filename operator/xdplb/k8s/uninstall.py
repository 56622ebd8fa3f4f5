"""`xdplb uninstall`: what `helm uninstall` runs before it deletes anything (pre-delete hook).

Helm deletes a release's objects all at once. An operator still running would put
back the finalizer the uninstall removes, and once it is gone a LoadBalancer that
keeps the finalizer can never be deleted. So, in order:

1. delete the operator's Deployment in the foreground and wait until its pods are
   gone; its ReplicaSet and the agent DaemonSet it owns go with it, and each agent,
   seeing its DaemonSet going, removes its programs, filters, pins and NodeState;
2. remove our finalizer from every LoadBalancer (the objects themselves stay: they
   are the user's);
3. delete the NodeStates no agent could remove (nodes that were down), the operator's
   leader-election Lease and the agents' L2 announcement Leases.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kubernetes

from xdplb.k8s.client import Kube, is_missing
from xdplb.k8s.finalizer import FINALIZER, set_finalizer
from xdplb.k8s.lease import L2_LABEL
from xdplb.spec.api import GROUP, VERSION

log = logging.getLogger("xdplb.uninstall")

# The hook's ClusterRole and the Role in the release namespace: exactly what it uses.
UNINSTALL_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": ["loadbalancers"], "verbs": ["list", "patch"]},
    {"apiGroups": [GROUP], "resources": ["nodestates"], "verbs": ["list", "delete"]},
]
UNINSTALL_NAMESPACE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["list", "delete"]},
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


def release_all(kube: Kube, attempts: int = 5) -> int:
    """Remove our finalizer from every LoadBalancer; returns how many had it.

    The operator's own guarded patch does it; one that lost to a concurrent change
    (a user's edit) is read again and retried."""
    released: set[tuple[str, str]] = set()
    for _ in range(attempts):
        holding = [lb for lb in kube.get(f"/apis/{GROUP}/{VERSION}/loadbalancers")["items"]
                   if FINALIZER in (lb["metadata"].get("finalizers") or [])]
        if not holding:
            return len(released)
        for lb in holding:
            set_finalizer(kube, lb, False)
            released.add((lb["metadata"]["namespace"], lb["metadata"]["name"]))
    raise RuntimeError(f"the finalizer {FINALIZER} stays on {len(holding)} LoadBalancer(s)"
                       f" after {attempts} attempts")


def _delete(kube: Kube, path: str) -> bool:
    """DELETE ``path``; False when it is gone already."""
    try:
        kube.request("DELETE", path)
    except kubernetes.client.ApiException as e:
        if is_missing(e):
            return False
        raise
    return True


def delete_nodestates(kube: Kube) -> int:
    # An agent may delete its own meanwhile.
    return sum(_delete(kube, f"/apis/{GROUP}/{VERSION}/nodestates/{ns['metadata']['name']}")
               for ns in kube.get(f"/apis/{GROUP}/{VERSION}/nodestates")["items"])


def uninstall(kube: Kube, namespace: str, deployment: str, timeout: float) -> bool:
    """The steps above; the Lease is named after the Deployment (as the chart sets it)."""
    if not stop_operator(kube, namespace, deployment, timeout):
        return False  # releasing now would race an operator that adds the finalizer back
    log.info("released %d LoadBalancer(s); deleted %d NodeState(s)", release_all(kube),
             delete_nodestates(kube))
    # A single replica without leader election has no Lease.
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    _delete(kube, f"{leases}/{deployment}")
    l2 = [le["metadata"]["name"] for le in kube.get(f"{leases}?labelSelector={L2_LABEL}")["items"]]
    gone = sum(_delete(kube, f"{leases}/{name}") for name in l2)
    if gone:
        log.info("deleted %d L2 announcement Lease(s)", gone)
    return True
