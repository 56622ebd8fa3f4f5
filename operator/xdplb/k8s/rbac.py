"""The operator's RBAC rules: the chart grants exactly these (a test compares them).

The tests run the operator with exactly these grants (the API emulator answers
403 to anything else) and fail on a grant no request used.
"""

from __future__ import annotations

from typing import Any

from xdplb.spec.api import GROUP

OPERATOR_RULES: list[dict[str, Any]] = [
    # Watch LoadBalancers; add and remove the finalizer (a JSON patch: no get needed);
    # create, change and delete the ones derived from Services of type LoadBalancer.
    {"apiGroups": [GROUP], "resources": ["loadbalancers"],
     "verbs": ["list", "watch", "patch", "create", "delete"]},
    {"apiGroups": [GROUP], "resources": ["loadbalancers/status"], "verbs": ["patch"]},
    # Who may claim which address; their status (used, total, overlaps).
    {"apiGroups": [GROUP], "resources": ["addresspools"], "verbs": ["list", "watch"]},
    {"apiGroups": [GROUP], "resources": ["addresspools/status"], "verbs": ["patch"]},
    # Per-node reports of the agents, aggregated into the status.
    {"apiGroups": [GROUP], "resources": ["nodestates"], "verbs": ["list", "watch"]},
    # Which nodes are selected (labels, Linux, being deleted), and their addresses (never
    # a backend).
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
    # Namespace labels: what the pools' namespace selectors match.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # Backend counts of groups that name a Service; Services of type LoadBalancer get an
    # address in their status.
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["services/status"], "verbs": ["patch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["list", "watch"]},
    # kopf follows CRDs appearing while it runs.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["list", "watch"]},
]


# A Role in the operator's own namespace (where the agent DaemonSet lives too: an owner
# reference cannot cross namespaces).
OPERATOR_NAMESPACE_RULES: list[dict[str, Any]] = [
    # The single agent DaemonSet: created once, then patched in place.
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "create", "patch"]},
    # Our own Deployment (Pod -> ReplicaSet -> Deployment), the DaemonSet's owner.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get"]},
    # Leader election: one active replica holds the Lease (read, created once, renewed by PUT).
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "create", "update"]},
]
