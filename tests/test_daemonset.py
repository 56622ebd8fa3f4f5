"""The agent DaemonSet built from the operator's settings."""

from __future__ import annotations

import copy

from xdplb.dataplane.config import Timeouts
from xdplb.k8s.daemonset import CAPABILITIES, AgentSettings, agent_daemonset, covers, drift_patch

OWNER = {"metadata": {"name": "xdplb-operator", "uid": "1234"}}


def container(ds: dict) -> dict:
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return c


def test_settings_reach_the_agent_command_line() -> None:
    s = AgentSettings(image="r/x:1", xdp_mode="generic", conntrack_capacity=5000,
                      timeouts=Timeouts(tcp_established=600, udp=5), metrics_port=9100,
                      log_format="json")
    c = container(agent_daemonset(s))
    assert c["image"] == "r/x:1"
    args = c["args"]
    assert args[:2] == ["agent", "--kubernetes"]
    pairs = dict(zip(args[2::2], args[3::2], strict=True))
    assert pairs["--xdp-mode"] == "generic"
    assert pairs["--conntrack-capacity"] == "5000"
    assert pairs["--tcp-established-timeout"] == "600"
    assert pairs["--udp-timeout"] == "5"
    assert pairs["--metrics-port"] == "9100"
    assert pairs["--log-format"] == "json"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]


def test_node_placement_host_network_and_bpffs() -> None:
    s = AgentSettings(node_selector={"kubernetes.io/os": "linux", "role": "lb"},
                      tolerations=[{"key": "lb", "operator": "Exists", "effect": "NoSchedule"}])
    pod = agent_daemonset(s)["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "role": "lb"}
    assert pod["tolerations"] == [{"key": "lb", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}
            } in pod["volumes"]
    mounts = {m["name"]: m for m in container(agent_daemonset(s))["volumeMounts"]}
    assert mounts["bpffs"]["mountPath"] == "/sys/fs/bpf"
    assert container(agent_daemonset(s))["env"] == [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]


def test_least_capabilities_each_with_a_reason() -> None:
    sec = container(agent_daemonset(AgentSettings()))["securityContext"]
    assert sec["privileged"] is False and sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"]["drop"] == ["ALL"]
    assert sec["capabilities"]["add"] == ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"]
    assert all(CAPABILITIES[c] for c in ("BPF", "NET_ADMIN", "NET_RAW", "PERFMON"))


def test_owner_reference_only_in_a_cluster() -> None:
    assert "ownerReferences" not in agent_daemonset(AgentSettings())["metadata"]
    (ref,) = agent_daemonset(AgentSettings(), OWNER)["metadata"]["ownerReferences"]
    assert ref == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "xdplb-operator",
                   "uid": "1234", "controller": True, "blockOwnerDeletion": True}


def test_drift_patch_ignores_server_defaults_and_restores_our_fields() -> None:
    desired = agent_daemonset(AgentSettings(), OWNER)
    current = copy.deepcopy(desired)
    # What an API server adds is not drift.
    current["metadata"]["uid"] = "abc"
    container(current)["terminationMessagePath"] = "/dev/termination-log"
    current["spec"]["template"]["spec"]["schedulerName"] = "default-scheduler"
    assert covers(current, desired)
    assert drift_patch(current, desired) is None
    # A changed image is.
    container(current)["image"] = "someone/else:0"
    patch = drift_patch(current, desired)
    assert patch == {"spec": {"template": desired["spec"]["template"],
                              "updateStrategy": desired["spec"]["updateStrategy"]}}
    # So is a lost owner reference.
    del current["metadata"]["ownerReferences"]
    assert drift_patch(current, desired)["metadata"]["ownerReferences"] == (  # type: ignore[index]
        desired["metadata"]["ownerReferences"])
