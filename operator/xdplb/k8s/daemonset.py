"""The agent DaemonSet, built from the operator's settings (pure; no API calls).

LoadBalancers never appear here: every agent watches them itself, so a
LoadBalancer change never rolls the DaemonSet.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from xdplb.dataplane.config import Capacities, Timeouts
from xdplb.defaults import PIN_ROOT

AGENT_LABELS = {"app.kubernetes.io/name": "xdplb", "app.kubernetes.io/component": "agent"}

# Each capability the agent keeps, and why; everything else is dropped. Measured with
# `setpriv --bounding-set=-all,+bpf,+net_admin[,+perfmon]` on kernel 6.18: without
# PERFMON the verifier rejects the ingress program ("pointer arithmetic prohibited
# for !root"); without NET_ADMIN loading fails with EPERM; without NET_RAW a packet
# socket cannot be opened. tests/test_privileges.py starts, kills and restarts the
# agent with exactly these, and announces an address with them. No SYS_ADMIN: the agent
# creates and pins its maps itself and reopens them by path, never by id, and it
# recognises its own attached program by the id in its pin's name. The host's bpffs
# is mounted into the pod, so the agent never mounts one.
CAPABILITIES: dict[str, str] = {
    "BPF": "load programs, create, pin and reopen maps (bpf() without SYS_ADMIN)",
    "NET_ADMIN": "attach XDP and TC programs to interfaces; set accept_local for source NAT",
    "PERFMON": "privileged verification: the packet parser's pointer arithmetic is refused"
               " to a loader without it",
    "NET_RAW": "gratuitous ARP from a packet socket, unsolicited Neighbour Advertisements"
               " from a raw ICMPv6 socket, when the node takes an announced address over"
               " (pools with announce: L2)",
}


@dataclass(frozen=True)
class AgentSettings:
    """What the operator puts into the agent DaemonSet (Helm values later)."""

    namespace: str = "xdplb-system"
    name: str = "xdplb-agent"
    image: str = "xdplb/xdplb:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    service_account: str = "xdplb-agent"
    node_selector: dict[str, str] = field(
        default_factory=lambda: {"kubernetes.io/os": "linux"})
    # Load balancer nodes are often tainted; agents run wherever they are scheduled.
    tolerations: list[dict[str, Any]] = field(default_factory=lambda: [{"operator": "Exists"}])
    xdp_mode: str = "native"
    conntrack_capacity: int = Capacities.conntrack
    timeouts: Timeouts = field(default_factory=Timeouts)
    metrics_port: int = 9090
    log_format: str = "text"
    l2_lease_seconds: int = 3
    pin_dir: str = PIN_ROOT
    resources: dict[str, Any] = field(default_factory=lambda: {
        "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})

    @property
    def capabilities(self) -> list[str]:
        return sorted(CAPABILITIES)


def agent_args(s: AgentSettings) -> list[str]:
    args = ["agent", "--kubernetes", "--xdp-mode", s.xdp_mode,
            "--conntrack-capacity", str(s.conntrack_capacity),
            "--metrics-port", str(s.metrics_port), "--log-format", s.log_format,
            "--pin-dir", s.pin_dir, "--daemonset", f"{s.namespace}/{s.name}",
            "--l2-lease-seconds", str(s.l2_lease_seconds)]
    for f in fields(Timeouts):
        args += [f"--{f.name.replace('_', '-')}-timeout", str(getattr(s.timeouts, f.name))]
    return args


def agent_daemonset(s: AgentSettings, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DaemonSet; ``owner`` (the operator's Deployment) makes it go with the install."""
    meta: dict[str, Any] = {"name": s.name, "namespace": s.namespace, "labels": dict(AGENT_LABELS)}
    if owner:
        meta["ownerReferences"] = [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    container = {
        "name": "agent",
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "args": agent_args(s),
        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "ports": [{"name": "metrics", "containerPort": s.metrics_port, "protocol": "TCP"}],
        "resources": s.resources,
        "securityContext": {
            # Root with the three capabilities only: the image's default user is the
            # operator's, and capabilities are not effective for a non-root process.
            "runAsUser": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": s.capabilities},
        },
        "volumeMounts": [
            # The host's bpffs: pins outlive the pod, so a restarted agent adopts its maps.
            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
            {"name": "run", "mountPath": "/run/xdplb"},
            {"name": "tmp", "mountPath": "/tmp"},  # the root filesystem is read-only
            # The entrypoint links the image's kernel headers here for this node's kernel.
            {"name": "modules", "mountPath": "/lib/modules"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": dict(AGENT_LABELS)},
            # One node at a time, so an upgrade never takes every load balancer node at once.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": dict(AGENT_LABELS)},
                "spec": {
                    "serviceAccountName": s.service_account,
                    "hostNetwork": True,  # XDP attaches to the node's own interfaces
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "nodeSelector": dict(s.node_selector),
                    "tolerations": [dict(t) for t in s.tolerations],
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        {"name": "bpffs",
                         "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}},
                        {"name": "run", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "modules", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def covers(actual: Any, wanted: Any) -> bool:
    """Whether ``actual`` holds everything in ``wanted`` (the API server adds defaults)."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(covers(actual.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (isinstance(actual, list) and len(actual) == len(wanted)
                and all(covers(a, w) for a, w in zip(actual, wanted, strict=True)))
    return bool(actual == wanted)


def drift_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any] | None:
    """A merge patch bringing ``current`` to ``desired`` in the parts the operator owns."""
    patch: dict[str, Any] = {}
    if not covers(current.get("spec", {}).get("template"), desired["spec"]["template"]):
        patch["spec"] = {"template": desired["spec"]["template"],
                         "updateStrategy": desired["spec"]["updateStrategy"]}
    meta, want = current.get("metadata", {}), desired["metadata"]
    labels = {k: v for k, v in want["labels"].items() if (meta.get("labels") or {}).get(k) != v}
    if labels:
        patch["metadata"] = {"labels": labels}
    if want.get("ownerReferences") and meta.get("ownerReferences") != want["ownerReferences"]:
        patch.setdefault("metadata", {})["ownerReferences"] = want["ownerReferences"]
    return patch or None
