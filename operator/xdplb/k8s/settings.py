"""Settings of `xdplb operator`: flags with $XDPLB_<FLAG> defaults (no kopf import here)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from xdplb.dataplane.config import Timeouts
from xdplb.k8s.conditions import SILENCE_LIMIT
from xdplb.k8s.daemonset import AgentSettings


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


def _env(name: str, default: Any, convert: Callable[[str], Any] = str) -> Any:
    value = os.environ.get(f"XDPLB_{name.upper().replace('-', '_')}")
    return default if value is None else convert(value)


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
    flag("agent-service-account", a.service_account)
    flag("agent-node-selector", a.node_selector, _labels, help="nodes for agents: k=v,...")
    flag("agent-tolerations", a.tolerations, json.loads, help="JSON list of tolerations")
    flag("agent-resources", a.resources, json.loads, help="JSON container resources")
    flag("xdp-mode", a.xdp_mode, choices=["native", "generic", "offload"])
    flag("conntrack-capacity", a.conntrack_capacity, int, help="flows per node")
    for f in fields(Timeouts):
        flag(f"{f.name.replace('_', '-')}-timeout", f.default, int, help="seconds")
    flag("metrics-port", a.metrics_port, int, help="agent Prometheus port")
    flag("log-format", "text", choices=["text", "json"], help="operator and agent log format")
    flag("node-silence", o.silence, float,
         help="seconds without a heartbeat after which a node is not programmed")
    flag("release-timeout", o.release_timeout, float,
         help="longest wait for agents to remove a deleted LoadBalancer")
    flag("status-interval", o.status_interval, float,
         help="minimum seconds between status writes of one LoadBalancer")


def settings_from_args(a: argparse.Namespace) -> OperatorSettings:
    timeouts = Timeouts(**{f.name: getattr(a, f"{f.name}_timeout") for f in fields(Timeouts)})
    agent = replace(
        AgentSettings(), namespace=a.agent_namespace, name=a.agent_name, image=a.agent_image,
        service_account=a.agent_service_account, node_selector=a.agent_node_selector,
        tolerations=a.agent_tolerations, resources=a.agent_resources, xdp_mode=a.xdp_mode,
        conntrack_capacity=a.conntrack_capacity, timeouts=timeouts,
        metrics_port=a.metrics_port, log_format=a.log_format)
    return OperatorSettings(
        namespace=a.namespace, agent=agent, silence=a.node_silence,
        release_timeout=a.release_timeout, status_interval=a.status_interval,
        pod_name=os.environ.get("POD_NAME"), pod_namespace=os.environ.get("POD_NAMESPACE"))
