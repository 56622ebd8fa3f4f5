"""`xdplb operator` against the API emulator: real kopf runtime, real kubectl, RBAC enforced.

The operator runs with its ClusterRole rules only (403 for anything else) and
finds the API through a kubeconfig, as in a cluster. Agents are played by the
test, which writes NodeState reports as the agent does.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.chart import chart_grants
from tests.k8s.cluster import KUBECTL, Cluster, wait_for, write_kubeconfig
from xdplb.k8s.client import Kube
from xdplb.k8s.daemonset import AgentSettings
from xdplb.k8s.index import State
from xdplb.k8s.operator import run
from xdplb.k8s.settings import LeaderElectionSettings, OperatorSettings
from xdplb.k8s.status import LoadBalancerStatus

pytestmark = pytest.mark.skipif(not KUBECTL.exists(), reason="run scripts/setup.sh for kubectl")

LB_API = "/apis/xdplb.io/v1alpha1"
XDPLB = Path(sys.executable).parent / "xdplb"
OPERATOR_TOKEN = "operator-token"
SYSTEM_NS = "xdplb-system"


class Env:
    def __init__(self, cluster: Cluster, state: State, settings: OperatorSettings) -> None:
        self.cluster, self.state, self.settings = cluster, state, settings
        self.admin = Kube(str(cluster.admin_kubeconfig))
        self.account = cluster.emulator.accounts[OPERATOR_TOKEN]

    # LoadBalancers, through kubectl as a user would

    def apply(self, *docs: dict[str, Any]) -> None:
        stdin = "\n".join(json.dumps(d) for d in docs)
        self.cluster.kubectl("apply", "-f", "-", stdin=stdin)

    def lb(self, name: str) -> dict[str, Any] | None:
        try:
            return self.admin.get(f"{LB_API}/namespaces/default/loadbalancers/{name}")
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return None
            raise

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        lb = self.lb(name) or {}
        conds = (lb.get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == ctype), {})

    def wait_condition(self, name: str, ctype: str, status: str, **fields: Any
                       ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            c = self.condition(name, ctype)
            ok = c.get("status") == status and all(c.get(k) == v for k, v in fields.items())
            return c if ok else None

        return wait_for(f"{name}: {ctype}={status} {fields}", check)

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.admin.get("/api/v1/namespaces/default/events?fieldSelector="
                               f"involvedObject.name%3D{name}")["items"]
        return [{"type": e["type"], "reason": e["reason"], "message": e["message"]}
                for e in items]

    def wait_event(self, name: str, reason: str) -> dict[str, Any]:
        return wait_for(f"{name}: event {reason}", lambda: next(
            (e for e in self.events(name) if e["reason"] == reason), None))

    # the agents' side: Nodes and NodeState reports

    def programmed(self, name: str, node: str) -> None:
        """LoadBalancer ``name`` created and reported applied by ``node``, its only node."""
        self.node(node)
        self.apply(lb_doc(name))
        self.report(node, self.applied(name))
        self.wait_condition(name, "Programmed", "True")

    def node(self, name: str, **labels: str) -> None:
        self.admin.request("POST", "/api/v1/nodes", {"metadata": {
            "name": name, "labels": {"kubernetes.io/os": "linux", **labels}}})

    def report(self, node: str, *entries: dict[str, Any], error: str | None = None,
               heartbeat: datetime.datetime | None = None) -> None:
        path = f"{LB_API}/nodestates/{node}"
        try:
            self.admin.get(path)
        except Exception:
            self.admin.request("POST", f"{LB_API}/nodestates", {
                "apiVersion": "xdplb.io/v1alpha1", "kind": "NodeState",
                "metadata": {"name": node}})
        beat = heartbeat or datetime.datetime.now(datetime.UTC)
        self.admin.patch(f"{path}/status", {"status": {
            "heartbeatTime": beat.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "mode": "native",
            "interfaces": [{"name": "eth0", "mode": "native", "attached": True, "error": None}],
            "loadBalancers": list(entries), "error": error}})

    def applied(self, name: str, generation: int | None = None, phase: str = "Applied",
                message: str = "") -> dict[str, Any]:
        lb = self.lb(name)
        assert lb is not None
        meta = lb["metadata"]
        return {"namespace": "default", "name": name, "uid": meta["uid"],
                "generation": generation or meta["generation"], "phase": phase,
                "message": message, "listeners": 1, "backends": 2}


def lb_doc(name: str, port: int = 80, address: str | None = "192.0.2.10",
           backends: tuple[str, ...] = ("10.0.0.11", "10.0.0.12"), **spec: Any
           ) -> dict[str, Any]:
    listener: dict[str, Any] = {"name": "http", "protocol": "TCP", "port": port,
                                "backends": [{"address": b, "port": 8080} for b in backends]}
    if address:
        listener["address"] = address
    return {"apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"listeners": [listener], **spec}}


OPERATOR_POD = "xdplb-operator-5d4f-x2x9q"


def seed_operator_pod(admin: Kube, deployment: dict[str, Any]) -> str:
    """What the Deployment controller makes of ``deployment``: a ReplicaSet and its pod
    (labelled with the Deployment's selector), each owned by the one before."""
    meta = deployment["metadata"]
    labels = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    api = f"namespaces/{meta['namespace']}"
    rs = admin.request("POST", f"/apis/apps/v1/{api}/replicasets", {
        "metadata": {"name": OPERATOR_POD.rsplit("-", 1)[0], "labels": labels,
                     "ownerReferences": [{
                         "apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                         "uid": meta["uid"], "controller": True}]}})
    admin.request("POST", f"/api/v1/{api}/pods", {
        "metadata": {"name": OPERATOR_POD, "labels": labels, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs["metadata"]["name"],
            "uid": rs["metadata"]["uid"], "controller": True}]}})
    return OPERATOR_POD


def seed_operator_deployment(admin: Kube) -> dict[str, Any]:
    """The operator's Deployment -> ReplicaSet -> Pod chain, as a cluster has it."""
    dep = admin.request("POST", f"/apis/apps/v1/namespaces/{SYSTEM_NS}/deployments", {
        "metadata": {"name": "xdplb-operator"}, "spec": {"replicas": 1}})
    seed_operator_pod(admin, dep)
    return dep


OPEN_POOL = {"apiVersion": "xdplb.io/v1alpha1", "kind": "AddressPool",
             "metadata": {"name": "open"},
             "spec": {"addresses": ["192.0.2.0/24"], "namespaceSelector": {},
                      "nodeAddresses": True, "autoAssign": False}}


def operator_settings(cluster: Cluster, **overrides: Any) -> OperatorSettings:
    return replace(OperatorSettings(
        kubeconfig=str(cluster.kubeconfig("operator", OPERATOR_TOKEN)),
        pod_name=OPERATOR_POD, pod_namespace=SYSTEM_NS,
        agent=AgentSettings(namespace=SYSTEM_NS, image="registry.example/xdplb:1.2.3"),
        status_interval=0.2, resync_interval=0.3,
        # As deployed: the Lease taken and renewed (each granted verb used within 0.5 s).
        leader_election=LeaderElectionSettings(
            enabled=True, namespace=SYSTEM_NS, identity=OPERATOR_POD,
            retry_period=0.5)), **overrides)


@contextmanager
def running_operator(cluster: Cluster, settings: OperatorSettings) -> Iterator[State]:
    """`xdplb operator` in a thread of this process until the block ends."""
    state = State(settings)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=run, args=(settings, stop, ready, state), daemon=True)
    thread.start()
    assert ready.wait(20), "the operator did not start"
    try:
        yield state
    finally:
        stop.set()
        thread.join(20)


def operator_cluster(cluster: Cluster, pools: tuple[dict[str, Any], ...]) -> None:
    """What an install leaves before the operator starts: CRDs, the pools, the operator's
    account with exactly the chart's rules, its Deployment."""
    cluster.apply_crds()
    if pools:
        cluster.kubectl("apply", "-f", "-", stdin="\n".join(json.dumps(p) for p in pools))
    cluster.emulator.grant(OPERATOR_TOKEN, f"system:serviceaccount:{SYSTEM_NS}:xdplb-operator",
                           chart_grants("operator", SYSTEM_NS))
    seed_operator_deployment(Kube(str(cluster.admin_kubeconfig)))


@contextmanager
def operator_env(tmp_path: Any, pools: tuple[dict[str, Any], ...] = (OPEN_POOL,),
                 **overrides: Any) -> Iterator[Env]:
    """The operator, with ``pools`` in place (by default one that admits every namespace
    to 192.0.2.0/24 and to the nodes' addresses)."""
    with Cluster(tmp_path) as cluster:
        operator_cluster(cluster, pools)
        settings = operator_settings(cluster, **overrides)
        with running_operator(cluster, settings) as state:
            yield Env(cluster, state, settings)


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    with operator_env(tmp_path) as e:
        yield e


def daemonset(env: Env) -> dict[str, Any] | None:
    try:
        return env.admin.get(f"/apis/apps/v1/namespaces/{SYSTEM_NS}/daemonsets/xdplb-agent")
    except Exception:
        return None


def test_create_accepts_and_ensures_the_agent_daemonset(env: Env) -> None:
    env.node("n1")
    env.apply(lb_doc("web"))
    accepted = env.wait_condition("web", "Accepted", "True", reason="Accepted")
    assert accepted["observedGeneration"] == 1
    assert env.wait_event("web", "Accepted")["type"] == "Normal"

    ds = wait_for("agent DaemonSet", lambda: daemonset(env))
    spec = ds["spec"]["template"]["spec"]
    (agent,) = spec["containers"]
    assert agent["image"] == "registry.example/xdplb:1.2.3"
    assert agent["args"][:2] == ["agent", "--kubernetes"]
    assert {"name": "NODE_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in agent["env"]
    assert spec["hostNetwork"] is True
    assert agent["securityContext"]["capabilities"] == {
        "drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"]}
    assert agent["securityContext"]["privileged"] is False
    assert {"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}
            } in spec["volumes"]
    (owner,) = ds["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("Deployment", "xdplb-operator")

    # Drift is patched back in place: same object (uid), the operator's image again.
    env.cluster.kubectl("-n", SYSTEM_NS, "set", "image", "daemonset/xdplb-agent",
                        "agent=someone/else:0")
    restored = wait_for("DaemonSet image restored", lambda: (d := daemonset(env)) and d["spec"][
        "template"]["spec"]["containers"][0]["image"] == "registry.example/xdplb:1.2.3" and d)
    assert restored["metadata"]["uid"] == ds["metadata"]["uid"]

    # A LoadBalancer change never touches the DaemonSet's template.
    before = daemonset(env)
    assert before is not None
    env.apply(lb_doc("web", backends=("10.0.0.11",)))
    env.wait_condition("web", "Accepted", "True", observedGeneration=2)
    after = daemonset(env)
    assert after is not None
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert [e["reason"] for e in env.events("web")].count("Accepted") == 1


def test_agent_report_programs_the_loadbalancer(env: Env) -> None:
    env.node("n1")
    env.node("win", **{"kubernetes.io/os": "windows"})  # never selected
    env.apply(lb_doc("web"))
    pending = env.wait_condition("web", "Programmed", "False", reason="Pending")
    assert "n1 (no report)" in pending["message"]
    env.report("n1", env.applied("web"))
    programmed = env.wait_condition("web", "Programmed", "True")
    assert programmed["observedGeneration"] == 1
    status = (env.lb("web") or {})["status"]
    LoadBalancerStatus.model_validate(status)  # what the CRD's status schema is made from
    assert status["nodes"] == {"selected": 1, "programmed": 1, "summary": "1/1"}
    assert status["listeners"] == [{"name": "http", "backends": 2}]
    assert status["observedGeneration"] == 1
    assert env.condition("web", "Degraded")["status"] == "False"
    assert env.wait_event("web", "Programmed")["type"] == "Normal"
    assert env.cluster.kubectl("get", "xlb", "web", "-o", "name").stdout.strip() \
        == "loadbalancer.xdplb.io/web"


def test_invalid_object_gets_a_clear_condition_and_warning(env: Env) -> None:
    # Passes a structural schema (an IPv4 address), fails the model: multicast.
    env.apply(lb_doc("bad", backends=("10.0.0.11", "224.0.0.5")))
    cond = env.wait_condition("bad", "Accepted", "False", reason="Invalid")
    assert cond["message"] == ("spec.listeners[0].backends[1].address:"
                               " '224.0.0.5' is a multicast address")
    event = env.wait_event("bad", "Invalid")
    assert event["type"] == "Warning"
    assert event["message"] == cond["message"]
    assert env.condition("bad", "Programmed")["reason"] == "NotAccepted"


def test_conflicting_loadbalancers_the_younger_is_conflicted(env: Env) -> None:
    env.apply(lb_doc("first"))
    env.wait_condition("first", "Accepted", "True")
    env.apply(lb_doc("second"))  # same VIP, port and protocol
    env.apply(lb_doc("wild", address=None))  # a wildcard overlapping the VIP on port 80
    env.apply(lb_doc("other-port", port=8443, address=None))
    second = env.wait_condition("second", "Accepted", "False", reason="Conflicted")
    assert "LoadBalancer default/first" in second["message"]
    assert "192.0.2.10:80/TCP" in second["message"]
    wild = env.wait_condition("wild", "Accepted", "False", reason="Conflicted")
    assert "default/first" in wild["message"] and "*:80/TCP" in wild["message"]
    env.wait_condition("other-port", "Accepted", "True")
    assert env.wait_event("second", "Conflicted")["type"] == "Warning"
    assert env.condition("first", "Accepted")["status"] == "True"

    # The winner goes: the next oldest takes the listener, the one after it stays out.
    env.cluster.kubectl("delete", "loadbalancer", "first")
    env.wait_condition("second", "Accepted", "True")
    wait_for("wild conflicted with default/second", lambda: "default/second" in env.condition(
        "wild", "Accepted").get("message", ""))
    assert env.condition("wild", "Accepted")["reason"] == "Conflicted"


def test_update_is_followed_by_observed_generation(env: Env) -> None:
    env.node("n1")
    env.apply(lb_doc("web"))
    env.report("n1", env.applied("web"))
    env.wait_condition("web", "Programmed", "True", observedGeneration=1)
    env.apply(lb_doc("web", port=81))
    lb = wait_for("generation 2", lambda: (o := env.lb("web")) and
                  o["metadata"]["generation"] == 2 and o)
    pending = env.wait_condition("web", "Programmed", "False", observedGeneration=2)
    assert "n1 (at generation 1)" in pending["message"]
    assert (env.lb("web") or {})["status"]["observedGeneration"] == 2
    env.report("n1", env.applied("web", generation=2))
    env.wait_condition("web", "Programmed", "True", observedGeneration=2)
    assert lb["metadata"]["uid"] == (env.lb("web") or {})["metadata"]["uid"]


def test_delete_waits_until_the_agents_report_removal(env: Env) -> None:
    env.node("n1")
    env.node("n2")
    env.apply(lb_doc("web"))
    env.report("n1", env.applied("web"))
    env.report("n2", env.applied("web"))
    env.wait_condition("web", "Programmed", "True")
    held = env.lb("web")
    assert held is not None and held["metadata"]["finalizers"] == ["xdplb.io/release"]
    # Nothing but the user's own annotation: no copy of the spec kept by the operator.
    assert list(held["metadata"]["annotations"]) == [
        "kubectl.kubernetes.io/last-applied-configuration"]
    env.cluster.kubectl("delete", "loadbalancer", "web", "--wait=false")
    entry = env.applied("web")
    wait_for("deletionTimestamp", lambda: (o := env.lb("web")) and
             o["metadata"].get("deletionTimestamp"))
    env.report("n1", {**entry, "phase": "Removed"})
    # n2 still has it: the finalizer holds the object (observed over several status ticks).
    with pytest.raises(AssertionError):
        wait_for("release while n2 still applies it", lambda: env.lb("web") is None, timeout=1.0)
    env.report("n2")  # the entry is gone from n2's report
    wait_for("LoadBalancer released", lambda: env.lb("web") is None)
    assert "ReleaseTimeout" not in [e["reason"] for e in env.events("web")]


def test_release_removes_only_our_finalizer(env: Env) -> None:
    env.apply(lb_doc("web"))
    wait_for("our finalizer", lambda: (o := env.lb("web")) and o["metadata"].get("finalizers"))
    lb = env.lb("web") or {}
    env.admin.request("PATCH", f"{LB_API}/namespaces/default/loadbalancers/web", [
        {"op": "add", "path": "/metadata/finalizers/-", "value": "example.com/keep"}],
        "application/json-patch+json")
    env.cluster.kubectl("delete", "loadbalancer", "web", "--wait=false")
    kept = wait_for("our finalizer removed", lambda: (o := env.lb("web")) and o["metadata"][
        "finalizers"] == ["example.com/keep"] and o)
    assert kept["metadata"]["uid"] == lb["metadata"]["uid"]
    env.admin.patch(f"{LB_API}/namespaces/default/loadbalancers/web",
                    {"metadata": {"finalizers": None}})
    wait_for("gone", lambda: env.lb("web") is None)


def test_release_after_a_conflict_tries_again_with_the_object_as_it_is(tmp_path: Any) -> None:
    """The object changed after the version the release holds (a status write, another
    finalizer): the guarded patch conflicts, and release must not give up on it."""
    import asyncio

    from xdplb.k8s.finalizer import FINALIZER, release

    with Cluster(tmp_path) as cluster:
        cluster.apply_crds()
        admin = Kube(str(cluster.admin_kubeconfig))
        doc = lb_doc("web")
        doc["metadata"]["finalizers"] = [FINALIZER, "example.com/keep"]
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(doc))
        cluster.kubectl("delete", "loadbalancer", "web", "--wait=false")
        path = f"{LB_API}/namespaces/default/loadbalancers/web"
        stale = admin.get(path)
        admin.patch(path, {"metadata": {"labels": {"changed": "after"}}})
        settings = OperatorSettings(kubeconfig=str(cluster.admin_kubeconfig))
        asyncio.run(release(settings, State(settings), admin, stale))
        assert admin.get(path)["metadata"]["finalizers"] == ["example.com/keep"]
        admin.patch(path, {"metadata": {"finalizers": None}})


def test_release_leaves_a_new_object_of_the_same_name_alone(tmp_path: Any) -> None:
    """The deleted object is gone and another was created under its name before the
    release's patch: the conflict must not make the release take the new one's
    finalizer."""
    import asyncio

    from xdplb.k8s.finalizer import FINALIZER, release

    with Cluster(tmp_path) as cluster:
        cluster.apply_crds()
        admin = Kube(str(cluster.admin_kubeconfig))
        path = f"{LB_API}/namespaces/default/loadbalancers/web"
        doc = lb_doc("web")
        doc["metadata"]["finalizers"] = [FINALIZER, "example.com/keep"]
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(doc))
        cluster.kubectl("delete", "loadbalancer", "web", "--wait=false")
        deleted = admin.get(path)
        admin.patch(path, {"metadata": {"finalizers": None}})
        wait_for("gone", lambda: not cluster.kubectl("get", "loadbalancers", "-o", "name",
                                                     check=False).stdout.strip())
        doc["metadata"]["finalizers"] = [FINALIZER]
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(doc))
        settings = OperatorSettings(kubeconfig=str(cluster.admin_kubeconfig))
        asyncio.run(release(settings, State(settings), admin, deleted))
        again = admin.get(path)
        assert again["metadata"]["uid"] != deleted["metadata"]["uid"]
        assert again["metadata"]["finalizers"] == [FINALIZER]
        admin.patch(path, {"metadata": {"finalizers": None}})


def test_release_tries_again_after_a_failed_request(tmp_path: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """No other event of a deleted object may come to start another release: a request
    that fails (here the first PATCH times out) must not leave the object held."""
    import asyncio

    import urllib3

    from xdplb.k8s.finalizer import FINALIZER, release

    class FailingOnce(Kube):
        failed = 0

        def request(self, method: str, path: str, body: Any = None,
                    content_type: str = "application/json", timeout: float | None = None
                    ) -> Any:
            if method == "PATCH" and not self.failed:
                self.failed += 1
                raise urllib3.exceptions.ReadTimeoutError(None, path, "read timed out")
            return super().request(method, path, body, content_type, timeout)

    with Cluster(tmp_path) as cluster:
        cluster.apply_crds()
        doc = lb_doc("web")
        doc["metadata"]["finalizers"] = [FINALIZER, "example.com/keep"]
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(doc))
        cluster.kubectl("delete", "loadbalancer", "web", "--wait=false")
        kube = FailingOnce(str(cluster.admin_kubeconfig))
        path = f"{LB_API}/namespaces/default/loadbalancers/web"
        settings = OperatorSettings(kubeconfig=str(cluster.admin_kubeconfig))
        asyncio.run(release(settings, State(settings), kube, kube.get(path)))
        assert kube.failed == 1
        assert kube.get(path)["metadata"]["finalizers"] == ["example.com/keep"]
        assert "finalizer of default/web not removed yet" in caplog.text
        kube.patch(path, {"metadata": {"finalizers": None}})


def test_api_requests_time_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An API server that accepts and never answers: the request fails in time instead
    of holding its caller (and the handler of its object) for good."""
    import socket

    import urllib3

    from xdplb.k8s import client

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host, port = silent.getsockname()
        config = write_kubeconfig(tmp_path / "kubeconfig", f"http://{host}:{port}")
        monkeypatch.setattr(client, "REQUEST_TIMEOUT", 0.5)
        t0 = time.monotonic()
        with pytest.raises(urllib3.exceptions.HTTPError):
            Kube(str(config)).get("/api")
        assert time.monotonic() - t0 < 5


def test_delete_is_released_after_the_bounded_wait(tmp_path: Any) -> None:
    with operator_env(tmp_path, release_timeout=1.5) as env:
        env.programmed("web", "n1")
        env.cluster.kubectl("delete", "loadbalancer", "web", "--wait=false")
        wait_for("released after the bounded wait", lambda: env.lb("web") is None, timeout=10)
        warning = env.wait_event("web", "ReleaseTimeout")
        assert warning["type"] == "Warning"
        assert "still applied on 1 node(s): n1" in warning["message"]


def test_silent_node_is_not_programmed_and_recovers(tmp_path: Any) -> None:
    with operator_env(tmp_path, silence=2.0) as env:
        env.programmed("web", "n1")
        # No heartbeat from now on.
        degraded = env.wait_condition("web", "Degraded", "True")
        assert degraded["message"].startswith("n1: no heartbeat for ")
        assert env.condition("web", "Programmed")["status"] == "False"
        assert (env.lb("web") or {})["status"]["nodes"]["summary"] == "0/1"
        assert env.wait_event("web", "Degraded")["type"] == "Warning"
        env.report("n1", env.applied("web"))  # the agent is back
        env.wait_condition("web", "Programmed", "True")
        env.wait_condition("web", "Degraded", "False")
        assert env.wait_event("web", "Recovered")["type"] == "Normal"


def test_failing_node_is_listed_in_degraded(env: Env) -> None:
    env.node("n1")
    env.node("n2")
    env.apply(lb_doc("web"))
    env.report("n1", env.applied("web"))
    env.report("n2", env.applied("web", phase="Failed", message="interface eth9 not found"),
               error="interface eth9 not found")
    degraded = env.wait_condition("web", "Degraded", "True")
    assert degraded["message"] == ("n2: interface eth9 not found;"
                                   " n2: interface eth9 not found")
    programmed = env.condition("web", "Programmed")
    assert programmed["status"] == "False" and programmed["message"].startswith("1/2 nodes")


def test_node_selector_selects_nodes(env: Env) -> None:
    env.node("n1", pool="edge")
    env.node("n2", pool="core")
    env.apply(lb_doc("edge", nodeSelector={"pool": "edge"}))
    env.apply(lb_doc("all", port=81))
    env.report("n1", env.applied("edge"), env.applied("all"))
    env.report("n2", env.applied("all"))
    env.wait_condition("edge", "Programmed", "True")
    env.wait_condition("all", "Programmed", "True")
    assert (env.lb("edge") or {})["status"]["nodes"]["summary"] == "1/1"
    assert (env.lb("all") or {})["status"]["nodes"]["summary"] == "2/2"


def test_service_groups_count_their_endpoints(env: Env) -> None:
    env.admin.request("POST", "/api/v1/namespaces/default/services", {
        "metadata": {"name": "api"},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})

    def endpoints(*ready: bool) -> list[dict[str, Any]]:
        return [{"addresses": [f"10.1.0.{i + 1}"], "conditions": {
            "ready": r, "serving": True, "terminating": not r}} for i, r in enumerate(ready)]

    slices = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
    env.admin.request("POST", slices, {
        "metadata": {"name": "api-1", "labels": {"kubernetes.io/service-name": "api"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints(True, True)})
    doc = lb_doc("svc")
    listener = doc["spec"]["listeners"][0]
    del listener["backends"]
    listener["service"] = {"name": "api", "port": 80}  # the Service port, by number
    listener["sourceRoutes"] = [{"cidr": "10.9.0.0/16",
                                 "backends": [{"address": "10.2.0.1", "port": 80}]}]
    env.apply(doc)
    env.wait_condition("svc", "Accepted", "True")

    def backends() -> int:
        return ((env.lb("svc") or {}).get("status") or {}).get("listeners", [{}])[0].get(
            "backends", -1)

    wait_for("2 endpoints + 1 route backend", lambda: backends() == 3)
    # A draining endpoint still belongs to the group; one that is gone does not.
    env.admin.patch(f"{slices}/api-1", {"endpoints": endpoints(True, False, True)})
    wait_for("3 endpoints + 1 route backend", lambda: backends() == 4)
    env.admin.request("DELETE", f"{slices}/api-1")
    wait_for("the route backend only", lambda: backends() == 1)


def status_changes(env: Env, name: str) -> int:
    """Writes that changed the status of ``name``, as the API server recorded them."""
    resource = ("xdplb.io", "v1alpha1", "loadbalancers")
    log = env.cluster.call(lambda: [e[3] for e in env.cluster.emulator.log
                                    if e[1] == resource and e[3]["metadata"]["name"] == name])
    return sum(1 for a, b in itertools.pairwise(log) if a.get("status") != b.get("status"))


def test_status_writes_are_coalesced_and_only_on_change(tmp_path: Any) -> None:
    with operator_env(tmp_path, status_interval=1.0) as env:
        env.programmed("web", "n1")
        time.sleep(1.0)  # let the interval since the last write pass
        writes = status_changes(env, "web")

        # Heartbeats that change nothing write nothing.
        for _ in range(10):
            env.report("n1", env.applied("web"))
        time.sleep(1.2)  # proving an absence: a write would have landed within one interval
        assert status_changes(env, "web") == writes

        # A burst of 20 changes is written at most once per second, ending in the last state.
        started = time.monotonic()
        for i in range(20):
            env.report("n1", env.applied("web", phase="Failed" if i % 2 else "Applied",
                                         message=f"attempt {i}"))
        burst = time.monotonic() - started
        env.wait_condition("web", "Degraded", "True", message="n1: attempt 19")
        time.sleep(1.2)  # any further write would land within one interval
        written = status_changes(env, "web") - writes
        assert 1 <= written <= burst / 1.0 + 2, (written, burst)
        assert env.condition("web", "Degraded")["message"] == "n1: attempt 19"


def test_operator_needs_every_granted_rule(env: Env) -> None:
    """A full life cycle uses each rule of the ClusterRole: none is granted for nothing."""
    env.programmed("web", "n1")
    wait_for("agent DaemonSet", lambda: daemonset(env))
    env.cluster.kubectl("-n", SYSTEM_NS, "set", "image", "daemonset/xdplb-agent", "agent=x:0")
    wait_for("DaemonSet patched back", lambda: (d := daemonset(env)) and d["spec"]["template"][
        "spec"]["containers"][0]["image"] == env.settings.agent.image)
    env.cluster.kubectl("delete", "loadbalancer", "web", "--wait=false")
    env.report("n1", {**env.applied("web"), "phase": "Removed"})
    wait_for("deleted", lambda: env.lb("web") is None)
    # A Service of the class: its LoadBalancer created, its status written; then deleted.
    env.apply({"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "svc", "namespace": "default",
        "annotations": {"xdplb.io/address-pool": "open"}}, "spec": {
        "type": "LoadBalancer", "loadBalancerClass": "xdplb.io/xdplb",
        "ports": [{"port": 80, "protocol": "TCP"}]}})
    wait_for("the Service's LoadBalancer", lambda: env.lb("svc"))
    wait_for("the Service's address", lambda: env.admin.get(
        "/api/v1/namespaces/default/services/svc").get("status"))
    env.cluster.kubectl("delete", "service", "svc")
    wait_for("the Service's LoadBalancer gone", lambda: env.lb("svc") is None)
    # The leader renews its Lease every retry period (0.5 s here): a renewal is an update.
    lease = f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/xdplb-operator"
    wait_for("a renewal of the Lease", lambda: (
        (spec := env.admin.get(lease)["spec"])["renewTime"] != spec["acquireTime"]))
    assert env.account.unused() == []


def test_namespace_option_limits_the_loadbalancers_served(tmp_path: Any) -> None:
    with operator_env(tmp_path, namespace="default") as env:
        env.node("n1")
        other = {**lb_doc("elsewhere", port=81),
                 "metadata": {"name": "elsewhere", "namespace": "other"}}
        env.apply(other)
        env.apply(lb_doc("web"))
        env.report("n1", env.applied("web"))
        env.wait_condition("web", "Programmed", "True")
        served = env.admin.get(f"{LB_API}/namespaces/other/loadbalancers/elsewhere")
        assert "status" not in served
        assert "xdplb.io/release" not in (served["metadata"].get("finalizers") or [])


def test_xdplb_operator_command_finds_the_api_through_kubeconfig(tmp_path: Any) -> None:
    """The CLI as deployed: flags default from the environment, the API from $KUBECONFIG."""
    with Cluster(tmp_path) as cluster:
        cluster.apply_crds()
        cluster.emulator.grant(OPERATOR_TOKEN, "system:serviceaccount:x:xdplb-operator",
                               chart_grants("operator", "lb-system"))
        env_vars = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig("op", OPERATOR_TOKEN)),
                    "XDPLB_AGENT_IMAGE": "registry.example/agent:9", "XDPLB_XDP_MODE": "generic"}
        env_vars.pop("POD_NAME", None)
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(OPEN_POOL))
        proc = subprocess.Popen([str(XDPLB), "operator", "--agent-namespace", "lb-system",
                                 "--conntrack-capacity", "4096"], env=env_vars,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps(lb_doc("web")))
            admin = Kube(str(cluster.admin_kubeconfig))

            def accepted() -> bool:
                lb = admin.get(f"{LB_API}/namespaces/default/loadbalancers/web")
                return any(c["type"] == "Accepted" and c["status"] == "True"
                           for c in (lb.get("status") or {}).get("conditions", []))

            try:
                wait_for("Accepted by the operator process", accepted, timeout=30)
            except AssertionError as e:
                proc.terminate()
                raise AssertionError(f"{e}\noperator output:\n{proc.communicate()[0]}") from None
            ds = admin.get("/apis/apps/v1/namespaces/lb-system/daemonsets/xdplb-agent")
            (agent,) = ds["spec"]["template"]["spec"]["containers"]
            assert agent["image"] == "registry.example/agent:9"
            args = dict(zip(agent["args"][2::2], agent["args"][3::2], strict=True))
            assert args["--xdp-mode"] == "generic" and args["--conntrack-capacity"] == "4096"
            assert "ownerReferences" not in ds["metadata"]  # not running in a cluster
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=20)
        assert "agent DaemonSet lb-system/xdplb-agent created" in out


def test_index_wakes_only_the_loadbalancers_a_change_touches() -> None:
    """1,000 nodes x 100 LoadBalancers: heartbeats wake nobody, one entry wakes one object."""
    state = State(OperatorSettings(silence=30))
    state.on_pool("ADDED", json.loads(json.dumps(OPEN_POOL)))
    now = datetime.datetime.now(datetime.UTC)

    def report(node: int, beat: datetime.datetime, phase: str = "Applied") -> dict[str, Any]:
        return {"metadata": {"name": f"n{node}"}, "status": {
            "heartbeatTime": beat.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "loadBalancers": [{"namespace": "default", "name": f"lb{i}", "uid": f"u{i}",
                               "generation": 1, "phase": phase if i == 3 else "Applied"}
                              for i in range(100)]}}

    for i in range(100):
        doc = lb_doc(f"lb{i}", port=1000 + i)
        doc["metadata"].update(uid=f"u{i}", generation=1, creationTimestamp="2026-01-01T00:00:00Z")
        state.on_lb("ADDED", doc)
    for n in range(1000):
        state.on_node("ADDED", {"metadata": {"name": f"n{n}",
                                             "labels": {"kubernetes.io/os": "linux"}}})
        state.on_nodestate("ADDED", report(n, now))
    state.dirty.clear()

    later = now + datetime.timedelta(seconds=5)
    for n in range(1000):
        state.on_nodestate("MODIFIED", report(n, later))
    assert state.dirty == set()
    state.on_nodestate("MODIFIED", report(7, later, phase="Failed"))
    assert state.dirty == {("default", "lb3")}
    status = state.status(("default", "lb3"), later)
    assert status["nodes"]["summary"] == "999/1000"

    state.dirty.clear()
    state.find_silent(later + datetime.timedelta(seconds=20))
    assert state.dirty == set()
    state.find_silent(later + datetime.timedelta(seconds=40))  # every node fell silent
    assert len(state.dirty) == 100
    state.dirty.clear()
    state.on_node("MODIFIED", {"metadata": {"name": "n1", "labels": {
        "kubernetes.io/os": "linux"}}})
    assert state.dirty == set()  # nothing the selection depends on changed
    state.on_node("MODIFIED", {"metadata": {"name": "n1", "labels": {"kubernetes.io/os": "linux",
                                                                     "pool": "x"}}})
    assert len(state.dirty) == 100
