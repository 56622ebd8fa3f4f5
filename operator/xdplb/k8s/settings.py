"""Settings of `xdplb operator`: flags with $XDPLB_<FLAG> defaults (no kopf import here)."""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from xdplb.dataplane.config import Timeouts
from xdplb.k8s.conditions import SILENCE_LIMIT
from xdplb.k8s.daemonset import AgentSettings
from xdplb.k8s.services import DEFAULT_CLASS


@dataclass(frozen=True)
class LeaderElectionSettings:
    """One active replica among several: a coordination.k8s.io/v1 Lease (client-go's rules)."""

    enabled: bool = False
    namespace: str = "xdplb-system"
    name: str = "xdplb-operator"
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    lease_duration: int = 15  # seconds a standby waits after the last renewal
    renew_deadline: float = 10.0  # the leader gives up (and exits) when not renewed this long
    retry_period: float = 2.0  # between renewals, and between a standby's attempts

    def __post_init__(self) -> None:
        # The leader must stop before a standby may take over: renewals end before expiry.
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError("leader election needs lease duration > renew deadline >"
                             f" retry period > 0; got {self.lease_duration}, "
                             f"{self.renew_deadline}, {self.retry_period}")


@dataclass(frozen=True)
class OperatorSettings:
    namespace: str | None = None  # None: every namespace
    agent: AgentSettings = field(default_factory=AgentSettings)
    silence: float = SILENCE_LIMIT  # a node without heartbeat this long is not programmed
    release_timeout: float = 60.0  # longest wait for agents to remove a deleted LoadBalancer
    status_interval: float = 1.0  # at most one status write per LoadBalancer per interval
    resync_interval: float = 60.0  # how often the DaemonSet is checked for drift
    pod_name: str | None = None  # in a cluster: the DaemonSet is owned by our Deployment
    pod_namespace: str | None = None
    kubeconfig: str | None = None  # None: in-cluster service account, else $KUBECONFIG
    leader_election: LeaderElectionSettings = field(default_factory=LeaderElectionSettings)
    health_port: int = 0  # /healthz and /readyz; 0: not served
    service_class: str = DEFAULT_CLASS  # spec.loadBalancerClass of the Services we answer
    default_service_class: bool = False  # also answer Services that name no class


def _env(name: str, default: Any, convert: Callable[[str], Any] = str) -> Any:
    value = os.environ.get(f"XDPLB_{name.upper().replace('-', '_')}")
    return default if value is None else convert(value)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return value in ("1", "true", "yes", "on")


def _labels(text: str) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value[,key=value...]")
    return {k.strip(): v.strip() for k, v in pairs}


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of `xdplb operator`; each defaults to $XDPLB_<FLAG> when set."""
    a = AgentSettings()
    o = OperatorSettings()

    def flag(name: str, default: Any, convert: Callable[[str], Any] = str, **kw: Any) -> None:
        p.add_argument(f"--{name}", type=convert, default=_env(name, default, convert),
                       help=f"{kw.pop('help', '')} (env XDPLB_{name.upper().replace('-', '_')};"
                            f" default %(default)s)", **kw)

    flag("namespace", None, help="watch LoadBalancers in this namespace only")
    flag("agent-namespace", os.environ.get("POD_NAMESPACE") or a.namespace,
         help="namespace of the agent DaemonSet")
    flag("agent-name", a.name, help="name of the agent DaemonSet")
    flag("agent-image", a.image, help="agent container image")
    flag("agent-image-pull-policy", a.image_pull_policy,
         choices=["Always", "IfNotPresent", "Never"])
    flag("agent-service-account", a.service_account)
    flag("agent-node-selector", a.node_selector, _labels, help="nodes for agents: k=v,...")
    flag("agent-tolerations", a.tolerations, json.loads, help="JSON list of tolerations")
    flag("agent-resources", a.resources, json.loads, help="JSON container resources")
    flag("xdp-mode", a.xdp_mode, choices=["native", "generic", "offload"])
    flag("conntrack-capacity", a.conntrack_capacity, int, help="flows per node")
    for f in fields(Timeouts):
        flag(f"{f.name.replace('_', '-')}-timeout", f.default, int, help="seconds")
    flag("metrics-port", a.metrics_port, int, help="agent Prometheus port")
    flag("l2-lease-seconds", a.l2_lease_seconds, int,
         help="announce: L2: an announcing agent that stops is replaced within this")
    flag("log-format", "text", choices=["text", "json"], help="operator and agent log format")
    flag("node-silence", o.silence, float,
         help="seconds without a heartbeat after which a node is not programmed")
    flag("release-timeout", o.release_timeout, float,
         help="longest wait for agents to remove a deleted LoadBalancer")
    flag("status-interval", o.status_interval, float,
         help="minimum seconds between status writes of one LoadBalancer")
    # In a pod (the Downward API sets POD_NAMESPACE) replicas may be several and kubelet
    # probes the pod; run elsewhere, one process needs neither a Lease nor a fixed port.
    in_pod = bool(os.environ.get("POD_NAMESPACE"))
    le = LeaderElectionSettings()
    p.add_argument("--leader-election", action=argparse.BooleanOptionalAction,
                   default=_env("leader-election", in_pod, _bool),
                   help="run only while holding the Lease, one active replica of several"
                        " (env XDPLB_LEADER_ELECTION; default: on in a pod)")
    flag("leader-election-namespace", os.environ.get("POD_NAMESPACE"),
         help="namespace of the Lease; unset: $POD_NAMESPACE, else --agent-namespace")
    flag("leader-election-name", le.name, help="name of the Lease")
    flag("leader-election-lease-duration", le.lease_duration, int,
         help="seconds a standby waits after the leader's last renewal")
    flag("leader-election-renew-deadline", le.renew_deadline, float,
         help="seconds the leader keeps running without a renewal")
    flag("leader-election-retry-period", le.retry_period, float,
         help="seconds between renewals and between a standby's attempts")
    flag("health-port", 8080 if in_pod else 0, int,
         help="port of /healthz and /readyz; 0: off (8080 in a pod, else 0)")
    flag("service-class", o.service_class,
         help="answer Services of type LoadBalancer with this spec.loadBalancerClass")
    p.add_argument("--default-service-class", action=argparse.BooleanOptionalAction,
                   default=_env("default-service-class", o.default_service_class, _bool),
                   help="also answer Services of type LoadBalancer that name no class (leave"
                        " off when another implementation answers those; env"
                        " XDPLB_DEFAULT_SERVICE_CLASS; default %(default)s)")


def settings_from_args(a: argparse.Namespace) -> OperatorSettings:
    timeouts = Timeouts(**{f.name: getattr(a, f"{f.name}_timeout") for f in fields(Timeouts)})
    agent = replace(
        AgentSettings(), namespace=a.agent_namespace, name=a.agent_name, image=a.agent_image,
        image_pull_policy=a.agent_image_pull_policy,
        service_account=a.agent_service_account, node_selector=a.agent_node_selector,
        tolerations=a.agent_tolerations, resources=a.agent_resources, xdp_mode=a.xdp_mode,
        conntrack_capacity=a.conntrack_capacity, timeouts=timeouts,
        metrics_port=a.metrics_port, log_format=a.log_format,
        l2_lease_seconds=a.l2_lease_seconds)
    pod_name = os.environ.get("POD_NAME")
    election = LeaderElectionSettings(
        enabled=a.leader_election, name=a.leader_election_name,
        namespace=a.leader_election_namespace or a.agent_namespace,
        lease_duration=a.leader_election_lease_duration,
        renew_deadline=a.leader_election_renew_deadline,
        retry_period=a.leader_election_retry_period,
        **({"identity": pod_name} if pod_name else {}))
    return OperatorSettings(
        namespace=a.namespace, agent=agent, silence=a.node_silence,
        release_timeout=a.release_timeout, status_interval=a.status_interval,
        pod_name=pod_name, pod_namespace=os.environ.get("POD_NAMESPACE"),
        leader_election=election, health_port=a.health_port,
        service_class=a.service_class, default_service_class=a.default_service_class)
