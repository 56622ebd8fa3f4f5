"""`xdplb agent --kubernetes` against the API emulator, with a real data plane.

The agent runs in this process with its ClusterRole rules only (403 for
anything else), loads the real programs and maps (pinned in a directory of
its own) and is given interfaces that do not exist, so nothing is attached to
the machine's interfaces: the maps it writes are checked through the plan it
applied and the NodeState it reports.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from prometheus_client import REGISTRY

from tests.chart import chart_grants
from tests.k8s.cluster import KUBECTL, Cluster, crd_manifests, wait_for
from tests.lab import Lab, bytes_since
from tests.test_e2e import (
    MIB,
    SINK_PORT,
    TCP_PORT,
    VIP,
    VIP_SINK,
    VIP_TCP,
    check_ok,
    finish_stream,
    start_lab,
    start_stream_on,
)
from xdplb.agent.cluster import (
    LAST_APPLIED,
    ClusterAgent,
    ClusterOptions,
    _Watch,
    desire,
    uninstalling,
)
from xdplb.dataplane.loader import ensure_bpffs
from xdplb.k8s.admission import PoolView, grants_of
from xdplb.k8s.daemonset import AgentSettings, agent_daemonset
from xdplb.plan.endpoints import EndpointIndex
from xdplb.plan.model import Backend
from xdplb.spec.pool import AddressPool

pytestmark = pytest.mark.skipif(not KUBECTL.exists(), reason="run scripts/setup.sh for kubectl")

XDPLB = Path(__file__).resolve().parents[1] / ".venv/bin/xdplb"
L2_LEASE_RULES = {"get leases.coordination.k8s.io", "create leases.coordination.k8s.io",
                  "update leases.coordination.k8s.io"}
AGENT_TOKEN = "agent-token"
NODE = "n1"
PIN_ROOT = "/run/xdplb-k8s/bpf/cluster-agent"
MISSING_IF = "xkmissing0"


class Env:
    def __init__(self, cluster: Cluster, agent: ClusterAgent) -> None:
        self.cluster, self.agent = cluster, agent
        api = cluster.client()
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.discovery = kubernetes.client.DiscoveryV1Api(api)

    def apply(self, *docs: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-f", "-", stdin="\n".join(json.dumps(d) for d in docs))

    def nodestate(self) -> dict[str, Any]:
        try:
            return self.custom.get_cluster_custom_object("xdplb.io", "v1alpha1", "nodestates",
                                                         NODE)
        except kubernetes.client.ApiException:
            return {}

    def entry(self, name: str) -> dict[str, Any] | None:
        entries = (self.nodestate().get("status") or {}).get("loadBalancers") or []
        return next((e for e in entries if e["name"] == name), None)

    def wait_entry(self, name: str, **fields: Any) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            e = self.entry(name)
            return e if e and all(e.get(k) == v for k, v in fields.items()) else None
        return wait_for(f"NodeState entry {name} with {fields}", check)

    def group(self, lb: str, listener: str = "http") -> tuple[Backend, ...]:
        """The default group of a listener in the plan the agent applied."""
        lst = next(x for x in self.agent.plan.listeners if x.label == f"default/{lb}/{listener}")
        return lst.default.backends

    def owners(self) -> set[str]:
        return {lst.owner for lst in self.agent.plan.listeners}


def lb_doc(name: str, port: int, selector: dict[str, str] | None = None,
           **listener: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"interfaces": [MISSING_IF], "listeners": [{
        "name": "http", "protocol": "TCP", "port": port, "address": "192.0.2.10", **listener}]}
    if selector is not None:
        spec["nodeSelector"] = selector
    return {"apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def backends(*last: int) -> list[dict[str, Any]]:
    return [{"address": f"10.0.0.{i}", "port": 8080} for i in last]


# Admits every namespace to 192.0.2.0/24 (the tests' VIPs).
OPEN_POOL = {"apiVersion": "xdplb.io/v1alpha1", "kind": "AddressPool",
             "metadata": {"name": "open"},
             "spec": {"addresses": ["192.0.2.0/24"], "namespaceSelector": {}}}


def install(cluster: Cluster, tmp: Path, *pools: dict[str, Any]) -> None:
    """The CRDs, and the pools (by default OPEN_POOL), as an admin installs them."""
    cluster.kubectl("apply", *[a for f in crd_manifests(tmp) for a in ("-f", str(f))])
    cluster.kubectl("apply", "-f", "-",
                    stdin="\n".join(json.dumps(p) for p in pools or (OPEN_POOL,)))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("cluster-agent")
    with Cluster(tmp) as cluster:
        install(cluster, tmp)
        account = cluster.emulator.grant(AGENT_TOKEN, "system:serviceaccount:xdplb:agent",
                                         chart_grants("agent", "xdplb"))
        admin = kubernetes.client.CoreV1Api(cluster.client())
        admin.create_node({"metadata": {"name": NODE, "labels": {"role": "edge"}}})
        api = kubernetes.config.new_client_from_config(
            str(cluster.kubeconfig("agent", AGENT_TOKEN)))
        ensure_bpffs(str(Path(PIN_ROOT).parent))  # the pins go into a directory of it
        agent = ClusterAgent(ClusterOptions(
            node_name=NODE, pin_root=PIN_ROOT, detach_on_exit=True,
            state_file=str(Path(tmp) / "agent.json"), poll_seconds=0.05,
            min_write_seconds=0.2), api=api)
        agent.start()
        thread = threading.Thread(target=agent.loop, daemon=True)
        thread.start()
        try:
            e = Env(cluster, agent)
            e.account = account  # type: ignore[attr-defined]
            yield e
        finally:
            agent.stop.set()
            thread.join(10)
            agent.shutdown()


def test_selected_loadbalancer_is_applied_and_reported(env: Env) -> None:
    env.apply(lb_doc("web", 80, {"role": "edge"}, backends=backends(1, 2)))
    entry = env.wait_entry("web", phase="Applied", generation=1)
    assert (entry["listeners"], entry["backends"], entry["namespace"]) == (1, 2, "default")
    assert env.group("web") == (Backend("10.0.0.1", 8080), Backend("10.0.0.2", 8080))
    ns = env.nodestate()
    node = env.core.read_node(NODE)
    assert ns["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": node.metadata.uid}]
    status = ns["status"]
    # A missing interface is a reported error, not a crash.
    assert status["interfaces"] == [{"name": MISSING_IF, "mode": "none", "attached": False,
                                     "error": "no such interface on this node"}]
    assert status["mode"] == "none"
    assert MISSING_IF in status["error"]
    assert status["heartbeatTime"].endswith("Z")

    env.apply(lb_doc("web", 80, {"role": "edge"}, backends=backends(1, 2, 3)))
    env.wait_entry("web", phase="Applied", generation=2, backends=3)
    # kubectl's copy of the object is not kept: the agent never reads it.
    raw = env.cluster.kubectl("get", "loadbalancer", "web", "-o", "json").stdout
    assert LAST_APPLIED in json.loads(raw)["metadata"]["annotations"]
    kept = env.agent.stores.by_key["lb"][("default", "web")]["metadata"]
    assert LAST_APPLIED not in (kept.get("annotations") or {}) and "managedFields" not in kept
    assert env.group("web") == tuple(Backend(f"10.0.0.{i}", 8080) for i in (1, 2, 3))
    sample = REGISTRY.get_sample_value
    assert sample("xdplb_loadbalancer_applied_generation",
                  {"namespace": "default", "name": "web"}) == 2
    assert sample("xdplb_loadbalancer_results_total",
                  {"namespace": "default", "name": "web", "phase": "Applied"}) >= 2


def test_node_selector_decides_and_follows_node_labels(env: Env) -> None:
    env.apply(lb_doc("core", 81, {"role": "core"}, backends=backends(5)))
    env.apply(lb_doc("edge", 82, {"role": "edge"}, backends=backends(6)))
    env.wait_entry("edge", phase="Applied")  # applied after "core" was seen
    assert env.entry("core") is None
    assert "default/core" not in env.owners()

    env.core.patch_node(NODE, {"metadata": {"labels": {"role": "core"}}})
    env.wait_entry("core", phase="Applied", generation=1)
    env.wait_entry("edge", phase="Removed")  # still exists, no longer served here
    assert "default/edge" not in env.owners() and "default/core" in env.owners()
    env.core.patch_node(NODE, {"metadata": {"labels": {"role": "edge"}}})
    env.wait_entry("edge", phase="Applied")
    env.wait_entry("core", phase="Removed")


def endpoint(address: str, ready: bool = True, terminating: bool = False) -> dict[str, Any]:
    return {"addresses": [address],
            "conditions": {"ready": ready, "serving": ready or terminating,
                           "terminating": terminating}}


def test_service_backends_follow_endpoint_slices(env: Env) -> None:
    env.core.create_namespaced_service("default", {
        "metadata": {"name": "app"},
        "spec": {"ports": [{"name": "web", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
    slice_doc = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "app-1", "labels": {"kubernetes.io/service-name": "app"}},
        "ports": [{"name": "web", "port": 8080, "protocol": "TCP"}],
        "endpoints": [endpoint("10.1.0.1"), endpoint("10.1.0.2")],
    }
    env.discovery.create_namespaced_endpoint_slice("default", slice_doc)
    other = copy.deepcopy(slice_doc)
    other["metadata"] = {"name": "unrelated-1",
                         "labels": {"kubernetes.io/service-name": "unrelated"}}
    env.discovery.create_namespaced_endpoint_slice("default", other)

    # By Service port number: resolved through the Service to the port name "web".
    env.apply(lb_doc("svc", 90, service={"name": "app", "port": 80}))
    env.wait_entry("svc", phase="Applied", backends=2)
    assert env.group("svc") == (Backend("10.1.0.1", 8080, 1), Backend("10.1.0.2", 8080, 1))
    # Only the slices of the Services in use reach the agent (label selector).
    names = {o["metadata"]["name"] for o in env.agent.stores.values("eps/")}
    assert names == {"app-1"}

    def slice_endpoints(*eps: dict[str, Any]) -> None:
        env.discovery.patch_namespaced_endpoint_slice("app-1", "default", {"endpoints": list(eps)})

    # Terminating but serving: no new flows (weight 0), existing ones continue.
    slice_endpoints(endpoint("10.1.0.1"), endpoint("10.1.0.2", ready=False, terminating=True))
    wait_for("draining endpoint", lambda: env.group("svc") == (
        Backend("10.1.0.1", 8080, 1), Backend("10.1.0.2", 8080, 0)))
    slice_endpoints(endpoint("10.1.0.1"))
    wait_for("removed endpoint", lambda: env.group("svc") == (Backend("10.1.0.1", 8080, 1),))
    env.wait_entry("svc", backends=1)
    slice_endpoints()
    wait_for("no endpoint", lambda: env.group("svc") == ())
    slice_endpoints(endpoint("10.1.0.3"))
    wait_for("new endpoint", lambda: env.group("svc") == (Backend("10.1.0.3", 8080, 1),))


def test_invalid_and_conflicting_objects_are_reported_failed(env: Env) -> None:
    # Host bits in a CIDR pass the schema; the agent's validation (the model) refuses it.
    bad = lb_doc("bad", 91, backends=backends(1),
                 sourceRoutes=[{"cidr": "198.51.100.1/24", "backends": backends(2)}])
    env.apply(bad)
    entry = env.wait_entry("bad", phase="Failed")
    assert "spec.listeners[0].sourceRoutes[0].cidr: '198.51.100.1/24' has host bits set" in (
        entry["message"])
    assert "default/bad" not in env.owners()

    env.apply(lb_doc("first", 92, backends=backends(1)))
    env.wait_entry("first", phase="Applied")
    env.apply(lb_doc("second", 92, backends=backends(2)))
    entry = env.wait_entry("second", phase="Failed")
    assert entry["message"].startswith("Conflicted: ") and "default/first" in entry["message"]
    assert env.group("first") == (Backend("10.0.0.1", 8080),)


def tenant_lb(name: str, ns: str, port: int, address: str | None,
              backend: str = "10.0.0.1") -> dict[str, Any]:
    listener: dict[str, Any] = {"name": "l", "protocol": "TCP", "port": port,
                                "backends": [{"address": backend, "port": 8080}]}
    if address:
        listener["address"] = address
    return {"apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"interfaces": [MISSING_IF], "listeners": [listener]}}


def namespace_doc(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def written(env: Env) -> set[tuple[str | None, int, str]]:
    """The listener identities the agent's map writer holds ids for (what it wrote)."""
    writer = env.agent.node.writer
    assert writer is not None
    return set(writer.listener_ids)


def test_what_no_pool_admits_never_reaches_the_maps(env: Env) -> None:
    """The agent judges on its own: these are refused with no operator running at all."""
    env.apply(namespace_doc("tenant", team="t"))
    env.apply(tenant_lb("ssh", "tenant", 22, None),
              tenant_lb("outside", "tenant", 97, "203.0.113.7"),
              tenant_lb("metadata", "tenant", 98, "192.0.2.10", backend="169.254.169.254"),
              tenant_lb("fine", "tenant", 99, "192.0.2.10"))
    env.wait_entry("fine", phase="Applied")
    for name, text in (("ssh", "a listener without an address serves every address"),
                       ("outside", "203.0.113.7 is in no AddressPool that admits"),
                       ("metadata", "169.254.169.254 is link-local")):
        entry = env.wait_entry(name, phase="Failed")
        assert entry["message"].startswith("AddressNotAllowed: "), entry
        assert text in entry["message"], entry
        assert f"tenant/{name}" not in env.owners()
    assert {(None, 22, "TCP"), ("203.0.113.7", 97, "TCP"),
            ("192.0.2.10", 98, "TCP")}.isdisjoint(written(env))
    assert ("192.0.2.10", 99, "TCP") in written(env)


def test_a_pool_change_unprograms_and_programs_again(env: Env) -> None:
    pool = {"apiVersion": "xdplb.io/v1alpha1", "kind": "AddressPool",
            "metadata": {"name": "t2"},
            "spec": {"addresses": ["198.51.100.0/24"],
                     "namespaceSelector": {"matchLabels": {"team": "t2"}}}}
    env.apply(namespace_doc("t2", team="t2"), pool)
    env.apply(tenant_lb("kept", "t2", 100, "198.51.100.1"))
    env.wait_entry("kept", phase="Applied")
    assert "t2/kept" in env.owners()
    pool["spec"]["namespaceSelector"] = {"matchLabels": {"team": "nobody"}}
    env.apply(pool)
    entry = env.wait_entry("kept", phase="Failed")
    assert entry["message"].startswith("AddressNotAllowed: spec.listeners[0].address:"
                                       " 198.51.100.1 is in no AddressPool that admits"
                                       " namespace 't2'")
    assert "t2/kept" not in env.owners()
    pool["spec"]["namespaceSelector"] = {}
    env.apply(pool)
    env.wait_entry("kept", phase="Applied")
    assert "t2/kept" in env.owners()


def test_deleted_loadbalancer_leaves_maps_and_report(env: Env) -> None:
    env.apply(lb_doc("gone", 93, backends=backends(1)))
    env.wait_entry("gone", phase="Applied")
    env.custom.delete_namespaced_custom_object("xdplb.io", "v1alpha1", "default",
                                               "loadbalancers", "gone")
    wait_for("entry removed", lambda: env.entry("gone") is None)
    assert "default/gone" not in env.owners()


def test_reports_are_coalesced_and_rights_are_minimal(env: Env) -> None:
    env.apply(lb_doc("quiet", 94, backends=backends(1)))
    env.wait_entry("quiet", phase="Applied")
    time.sleep(0.5)
    before = env.nodestate()["metadata"]["resourceVersion"]
    time.sleep(1.5)  # nothing changes, and the heartbeat (10 s) is not due: no write
    assert env.nodestate()["metadata"]["resourceVersion"] == before
    # The heartbeat alone rewrites it (10 s by default; shortened here).
    beat = env.nodestate()["status"]["heartbeatTime"]
    env.agent.opts.heartbeat_seconds = 0.5
    try:
        wait_for("a heartbeat", lambda: env.nodestate()["status"]["heartbeatTime"] > beat,
                 timeout=5)
    finally:
        env.agent.opts.heartbeat_seconds = 10.0
    # Every write the agent made was allowed by its rules: none touches LoadBalancers.
    # With the uninstall test (which uses the two below) and the L2 test in test_l2.py
    # (the Leases), every granted rule is needed.
    unused = set(env.account.unused())  # type: ignore[attr-defined]
    assert unused <= {"delete nodestates.xdplb.io", "get daemonsets.apps",
                      *L2_LEASE_RULES}, unused
    used = {(res, verb) for _, _, res, verb in env.account.used}  # type: ignore[attr-defined]
    assert ("loadbalancers", "list") in used and ("nodestates/status", "patch") in used
    assert not {v for r, v in used if r == "loadbalancers"} - {"list", "watch"}


# --- end to end: kubectl apply -> the agent in the lab's lb namespace -> packets ------------

E2E_PIN_DIR = "/run/xdplb-k8s/bpf/e2e"
RELAY_PORT = 16443


class LabAgent:
    """`xdplb agent --kubernetes` running in the lab's lb namespace, logging to a file."""

    def __init__(self, lab: Any, kubeconfig: Path) -> None:
        self.lab, self.log = lab, lab.workdir / "cluster-agent.log"
        with open(self.log, "w") as out:
            self.proc = lab.popen(
                "lb", XDPLB, "agent", "--kubernetes", "--node-name", NODE,
                "--pin-dir", E2E_PIN_DIR, "--detach-on-exit",
                "--state-file", lab.workdir / "agent.json",
                env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=out,
                stderr=subprocess.STDOUT)

    def text(self, offset: int = 0) -> str:
        return self.log.read_text(errors="replace")[offset:]

    def tail(self, n: int = 40) -> str:
        return "---- agent log (tail) ----\n" + "\n".join(self.text().splitlines()[-n:])

    def wait_log(self, text: str, offset: int = 0, timeout: float = 30) -> float:
        def seen() -> bool:
            assert self.proc.poll() is None, f"agent exited\n{self.tail()}"
            return text in self.text(offset)
        wait_for(f"agent log {text!r}", seen, timeout=timeout, interval=0.01)
        return time.monotonic()


def api_relay(lab: Any, cluster: Cluster, workdir: Path,
              host: list[subprocess.Popen[bytes]]) -> Path:
    """Let the lb namespace reach the emulator (host loopback) through a Unix socket."""
    sock = workdir / "api.sock"
    port = cluster.url.rsplit(":", 1)[1]
    host.append(subprocess.Popen(["socat", f"UNIX-LISTEN:{sock},fork",
                                  f"TCP:127.0.0.1:{port}"]))
    wait_for("relay socket", sock.exists)
    lab.popen("lb", "socat", f"TCP-LISTEN:{RELAY_PORT},bind=127.0.0.1,fork,reuseaddr",
              f"UNIX-CONNECT:{sock}")
    config = workdir / "kubeconfig-lab-agent"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": f"http://127.0.0.1:{RELAY_PORT}"}}],
        "users": [{"name": "agent", "user": {"token": AGENT_TOKEN}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "agent"}}]}))
    return config


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("socat") is None,
                    reason="needs root for namespaces and XDP, and socat")
def test_end_to_end_apply_traffic_and_drain(tmp_path: Path) -> None:
    ensure_bpffs(str(Path(E2E_PIN_DIR).parent))
    lab = start_lab("xk")
    agent: LabAgent | None = None
    relays: list[subprocess.Popen[bytes]] = []
    try:
        with Cluster(tmp_path) as cluster:
            install(cluster, tmp_path, {**OPEN_POOL, "spec": {
                "addresses": [VIP], "namespaceSelector": {}}})
            cluster.emulator.grant(AGENT_TOKEN, "system:serviceaccount:xdplb:agent",
                                   chart_grants("agent", "xdplb"))
            api = cluster.client()
            core = kubernetes.client.CoreV1Api(api)
            discovery = kubernetes.client.DiscoveryV1Api(api)
            custom = kubernetes.client.CustomObjectsApi(api)
            core.create_node({"metadata": {"name": NODE}})
            agent = LabAgent(lab, api_relay(lab, cluster, tmp_path, relays))

            b1, b2 = Lab.backend_addr(1), Lab.backend_addr(2)
            core.create_namespaced_service("default", {"metadata": {"name": "web"}, "spec": {
                "ports": [{"name": "http", "port": 80, "targetPort": TCP_PORT},
                          {"name": "sink", "port": SINK_PORT, "targetPort": SINK_PORT}]}})

            def slice_doc(*eps: dict[str, Any]) -> dict[str, Any]:
                return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "addressType": "IPv4",
                        "metadata": {"name": "web-1",
                                     "labels": {"kubernetes.io/service-name": "web"}},
                        "ports": [{"name": "http", "port": TCP_PORT, "protocol": "TCP"},
                                  {"name": "sink", "port": SINK_PORT, "protocol": "TCP"}],
                        "endpoints": list(eps)}

            discovery.create_namespaced_endpoint_slice(
                "default", slice_doc(endpoint(b1), endpoint(b2)))
            lb = {"apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer",
                  "metadata": {"name": "web", "namespace": "default"},
                  "spec": {"interfaces": [Lab.lb_client_if], "listeners": [
                      {"name": "tcp", "protocol": "TCP", "port": VIP_TCP, "address": VIP,
                       "service": {"name": "web", "port": "http"}},
                      {"name": "sink", "protocol": "TCP", "port": VIP_SINK, "address": VIP,
                       "service": {"name": "web", "port": SINK_PORT}}]}}
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps(lb))
            agent.wait_log(f"attached to {Lab.lb_client_if}")
            agent.wait_log("applied default/web generation 1: 2 listeners, 4 backends")

            def entry() -> dict[str, Any] | None:
                try:
                    ns = custom.get_cluster_custom_object("xdplb.io", "v1alpha1", "nodestates",
                                                          NODE)
                except kubernetes.client.ApiException:
                    return None  # not written yet
                return next((e for e in ns.get("status", {}).get("loadBalancers", [])
                             if e["name"] == "web" and e["phase"] == "Applied"), None)
            wait_for("NodeState reports web Applied", entry)

            res = lab.tcp_clients("cli", VIP, VIP_TCP, count=40, concurrency=10,
                                  up=64 * 1024, down=64 * 1024)
            check_ok(res, "TCP through the Service's endpoints", agent)  # type: ignore[arg-type]
            assert set(res["tags"]) == {"b1", "b2"}, res["tags"]

            # b1 starts terminating: its open flow continues, new flows go to b2 only.
            stream, others = start_stream_on(lab, agent, "b1", seconds=5,  # type: ignore[arg-type]
                                             rate_mbit=200)
            time.sleep(0.5)
            offset = len(agent.text())
            t0 = time.monotonic()
            discovery.patch_namespaced_endpoint_slice("web-1", "default", {"endpoints": [
                endpoint(b1, ready=False, terminating=True), endpoint(b2)]})
            applied = agent.wait_log("applied kubernetes", offset) - t0
            t_applied = time.monotonic_ns()
            res = lab.tcp_clients("cli", VIP, VIP_TCP, count=60, concurrency=10,
                                  up=64 * 1024, down=64 * 1024)
            check_ok(res, "TCP after b1 started terminating", agent)  # type: ignore[arg-type]
            assert res["tags"] == {"b2": 60}, f"new flows still reach b1: {res['tags']}"
            stream_res = finish_stream(lab, stream, agent, "stream on b1")  # type: ignore[arg-type]
            assert stream.progress_path is not None
            moved = bytes_since(stream.progress_path, t_applied)
            assert moved >= 4 * MIB, f"stream on b1 stalled: {moved} B, {stream_res}"
            for p in others:
                finish_stream(lab, p, agent, "stream on b2")  # type: ignore[arg-type]
            print(f"EndpointSlice change to maps: {applied * 1000:.0f} ms")
            assert applied < 2.0

            agent.proc.send_signal(signal.SIGTERM)
            assert agent.proc.wait(20) == 0, agent.tail()
    finally:
        if agent is not None and agent.proc.poll() is None:
            lab.stop(agent.proc)
        for relay in relays:
            relay.terminate()
            relay.wait(10)
        lab.close()
        shutil.rmtree(E2E_PIN_DIR, ignore_errors=True)


def test_a_dual_stack_loadbalancer_from_both_families_slices(tmp_path: Path) -> None:
    # One Service, an EndpointSlice per family, a listener per family naming it: each
    # VIP is backed by its family's endpoints, and both carry traffic.
    ensure_bpffs(str(Path(E2E_PIN_DIR).parent))
    lab = start_lab("xk6", ipv6=True)
    agent: LabAgent | None = None
    relays: list[subprocess.Popen[bytes]] = []
    try:
        with Cluster(tmp_path) as cluster:
            install(cluster, tmp_path, {**OPEN_POOL, "spec": {
                "addresses": [VIP, Lab.VIP6], "namespaceSelector": {}}})
            cluster.emulator.grant(AGENT_TOKEN, "system:serviceaccount:xdplb:agent",
                                   chart_grants("agent", "xdplb"))
            api = cluster.client()
            core = kubernetes.client.CoreV1Api(api)
            discovery = kubernetes.client.DiscoveryV1Api(api)
            custom = kubernetes.client.CustomObjectsApi(api)
            core.create_node({"metadata": {"name": NODE}})
            agent = LabAgent(lab, api_relay(lab, cluster, tmp_path, relays))
            core.create_namespaced_service("default", {"metadata": {"name": "web"}, "spec": {
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                "ports": [{"name": "http", "port": 80, "targetPort": TCP_PORT}]}})
            for family, addrs in (("IPv4", [Lab.backend_addr(1), Lab.backend_addr(2)]),
                                  ("IPv6", [Lab.backend6_addr(1), Lab.backend6_addr(2)])):
                discovery.create_namespaced_endpoint_slice("default", {
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "addressType": family,
                    "metadata": {"name": f"web-{family.lower()}",
                                 "labels": {"kubernetes.io/service-name": "web"}},
                    "ports": [{"name": "http", "port": TCP_PORT, "protocol": "TCP"}],
                    "endpoints": [endpoint(a) for a in addrs]})
            lb = {"apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer",
                  "metadata": {"name": "web", "namespace": "default"},
                  "spec": {"interfaces": [Lab.lb_client_if], "listeners": [
                      {"name": "http", "protocol": "TCP", "port": VIP_TCP, "address": VIP,
                       "service": {"name": "web", "port": "http"}},
                      {"name": "http6", "protocol": "TCP", "port": VIP_TCP,
                       "address": Lab.VIP6, "service": {"name": "web", "port": "http"}}]}}
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps(lb))
            agent.wait_log("applied default/web generation 1: 2 listeners, 4 backends")

            def entry() -> dict[str, Any] | None:
                try:
                    ns = custom.get_cluster_custom_object("xdplb.io", "v1alpha1", "nodestates",
                                                          NODE)
                except kubernetes.client.ApiException:
                    return None
                return next((e for e in ns.get("status", {}).get("loadBalancers", [])
                             if e["name"] == "web" and e["phase"] == "Applied"), None)
            wait_for("NodeState reports web Applied", entry)
            for vip in (VIP, Lab.VIP6):
                res = lab.tcp_clients("cli", vip, VIP_TCP, count=30, concurrency=6)
                check_ok(res, f"TCP to {vip} through its family's endpoints",
                         agent)  # type: ignore[arg-type]
                assert set(res["tags"]) == {"b1", "b2"}, res["tags"]
    finally:
        if agent is not None and agent.proc.poll() is None:
            lab.stop(agent.proc)
        for relay in relays:
            relay.terminate()
            relay.wait(10)
        lab.close()
        shutil.rmtree(E2E_PIN_DIR, ignore_errors=True)


UNINSTALL_PINS = "/run/xdplb-k8s/bpf/uninstall"
UNINSTALL_IF = "xkun0"


def xdp_attached(ifname: str) -> bool:
    out = subprocess.run(["ip", "-j", "link", "show", ifname], capture_output=True, text=True,
                         check=True).stdout
    return "xdp" in json.loads(out)[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to attach XDP")
def test_uninstall_removes_programs_pins_and_nodestate(tmp_path: Path) -> None:
    """A stop with the DaemonSet in place keeps everything for the next agent; a stop
    while it is deleted (helm uninstall) leaves nothing behind."""
    subprocess.run(["ip", "link", "del", UNINSTALL_IF], capture_output=True)
    subprocess.run(["ip", "link", "add", UNINSTALL_IF, "type", "veth", "peer", "name", "xkun1"],
                   check=True)
    ensure_bpffs(str(Path(UNINSTALL_PINS).parent))
    try:
        with Cluster(tmp_path) as cluster:
            install(cluster, tmp_path)
            account = cluster.emulator.grant(AGENT_TOKEN, "system:serviceaccount:xdplb:agent",
                                             chart_grants("agent", "xdplb"))
            admin = cluster.client()
            kubernetes.client.CoreV1Api(admin).create_node({"metadata": {"name": NODE}})
            apps = kubernetes.client.AppsV1Api(admin)
            ds = agent_daemonset(AgentSettings(namespace="xdplb"))
            ds["metadata"]["finalizers"] = ["test.xdplb.io/hold"]  # deletion takes a while
            apps.create_namespaced_daemon_set("xdplb", ds)
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps({
                **lb_doc("web", 80, backends=backends(1)),
                "spec": {"interfaces": [UNINSTALL_IF], "listeners": [{
                    "name": "http", "protocol": "TCP", "port": 80, "address": "192.0.2.10",
                    "backends": backends(1)}]}}))
            api = kubernetes.config.new_client_from_config(
                str(cluster.kubeconfig("agent", AGENT_TOKEN)))
            custom = kubernetes.client.CustomObjectsApi(admin)

            def run_agent() -> ClusterAgent:
                agent = ClusterAgent(ClusterOptions(
                    node_name=NODE, pin_root=UNINSTALL_PINS,
                    detach_on_exit=False, daemonset="xdplb/xdplb-agent",
                    state_file=str(tmp_path / "agent.json"), poll_seconds=0.05,
                    min_write_seconds=0.2), api=api)
                agent.start()
                wait_for("web applied and attached", lambda: (
                    agent.step(0.05) or (agent.plan is not None and agent.plan.listeners
                                         and xdp_attached(UNINSTALL_IF))), timeout=30)
                return agent

            def nodestate() -> bool:
                try:
                    custom.get_cluster_custom_object("xdplb.io", "v1alpha1", "nodestates", NODE)
                except kubernetes.client.ApiException as e:
                    assert e.status == 404
                    return False
                return True

            # A restart (rolling update, crash): the DaemonSet stays, so does the data plane.
            agent = run_agent()
            wait_for("the NodeState", nodestate)
            agent.shutdown()
            assert xdp_attached(UNINSTALL_IF) and Path(UNINSTALL_PINS).is_dir() and nodestate()

            # helm uninstall: the DaemonSet is being deleted when its pods get SIGTERM.
            agent = run_agent()
            apps.delete_namespaced_daemon_set("xdplb-agent", "xdplb")
            assert uninstalling(api, "xdplb/xdplb-agent")
            agent.shutdown()
            assert not xdp_attached(UNINSTALL_IF)
            assert not Path(UNINSTALL_PINS).exists()
            assert not nodestate()
            assert {"delete nodestates.xdplb.io", "get daemonsets.apps"}.isdisjoint(
                account.unused())  # the rules only an uninstall needs

            # Gone outright, or our account deleted with it: an uninstall too. Unset: never.
            assert not uninstalling(api, "")
            apps.patch_namespaced_daemon_set("xdplb-agent", "xdplb",
                                             {"metadata": {"finalizers": None}})
            assert uninstalling(api, "xdplb/xdplb-agent")
            apps.create_namespaced_daemon_set("xdplb", agent_daemonset(
                AgentSettings(namespace="xdplb")))
            assert not uninstalling(api, "xdplb/xdplb-agent")
            cluster.emulator.revoke(AGENT_TOKEN)
            assert uninstalling(api, "xdplb/xdplb-agent")
    finally:
        subprocess.run(["ip", "link", "del", UNINSTALL_IF], capture_output=True)
        subprocess.run([str(XDPLB), "agent", "--cleanup", "--pin-dir", UNINSTALL_PINS],
                       capture_output=True)


def test_a_watch_refused_is_reported_and_keeps_the_maps(env: Env) -> None:
    # Runs last: it takes the agent's right to list EndpointSlices away for a while.
    env.apply(lb_doc("kept", 95, backends=backends(7)))
    env.wait_entry("kept", phase="Applied")
    account = env.account  # type: ignore[attr-defined]
    rules = list(account.rules)
    account.rules[:] = [r for r in rules if "endpointslices" not in r["resources"]]
    try:
        env.apply(lb_doc("blocked", 96, service={"name": "other", "port": "web"}))
        wait_for("the refusal in the NodeState", lambda: "cannot watch default (403 Forbidden)"
                 in (env.nodestate().get("status") or {}).get("error", ""))
        assert env.group("kept") == (Backend("10.0.0.7", 8080),)  # last good state serves on
        assert env.entry("blocked") is None
    finally:
        account.rules[:] = rules
    env.wait_entry("blocked", phase="Applied", backends=0)  # the Service has no endpoints
    wait_for("the error cleared", lambda: "403" not in env.nodestate()["status"]["error"])


def test_cli_needs_a_node_name(monkeypatch: pytest.MonkeyPatch,
                               caplog: pytest.LogCaptureFixture) -> None:
    from xdplb.cli import main

    monkeypatch.delenv("NODE_NAME", raising=False)
    assert main(["agent", "--kubernetes"]) == 2
    assert "--kubernetes needs --node-name (or the NODE_NAME variable)" in caplog.text


def test_backends_failing_health_checks_get_weight_zero_in_the_plan() -> None:
    doc = lb_doc("hc", 80, backends=backends(1, 2),
                 healthCheck={"protocol": "TCP", "intervalSeconds": 1})
    doc["metadata"].update(uid="u1", generation=1, creationTimestamp="2026-01-01T00:00:00Z")
    open_pool = PoolView(grants_of([(AddressPool.model_validate(OPEN_POOL), "u")]))
    plain = desire({("default", "hc"): doc}, {}, EndpointIndex.of([], []), open_pool)
    (lst,) = plain.plan.listeners
    assert {(t.address, t.port) for t in lst.health_targets} == {("10.0.0.1", 8080),
                                                                  ("10.0.0.2", 8080)}
    dead = next(t for t in lst.health_targets if t.address == "10.0.0.1")
    (lst,) = desire({("default", "hc"): doc}, {}, EndpointIndex.of([], []), open_pool,
                    frozenset({dead})).plan.listeners
    assert lst.default.backends == (Backend("10.0.0.1", 8080, 0, healthy=False),
                                    Backend("10.0.0.2", 8080, 1))


def test_a_watch_that_times_out_resumes_without_listing_again(env: Env) -> None:
    """Listing 100,000 routes takes seconds: a watch ends every `timeout`, and the
    next one starts from the last version seen, so nothing is listed again."""
    custom = kubernetes.client.CustomObjectsApi(env.cluster.client())
    lists = []

    @functools.wraps(custom.list_namespaced_custom_object)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("watch"):
            lists.append(time.monotonic())
        return custom.list_namespaced_custom_object(*args, **kwargs)

    sink: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    watch = _Watch("lb", call, {"group": "xdplb.io", "version": "v1alpha1",
                                "namespace": "watch-test", "plural": "loadbalancers"},
                   sink, env.cluster.client(), timeout=1)
    watch.start()
    try:
        assert sink.get(timeout=10)[:2] == ("lb", "SYNC")
        time.sleep(2.5)  # two watches have timed out
        doc = lb_doc("late", 8099, backends=backends(1))
        doc["metadata"]["namespace"] = "watch-test"
        custom.create_namespaced_custom_object("xdplb.io", "v1alpha1", "watch-test",
                                               "loadbalancers", doc)
        key, kind, obj = sink.get(timeout=10)
        assert (key, kind, obj["metadata"]["name"]) == ("lb", "ADDED", "late")
        assert len(lists) == 1
    finally:
        watch.stop()
