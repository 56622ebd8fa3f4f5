"""Address pools and Services of type LoadBalancer, in the API emulator with the real kopf
runtime, real kubectl and the chart's RBAC enforced (the operator's side; the agents'
side, with a real data plane, is in test_cluster_agent.py and test_l2.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.cluster import KUBECTL, Cluster, wait_for
from tests.test_operator import (
    LB_API,
    Env,
    operator_cluster,
    operator_env,
    operator_settings,
    running_operator,
)
from xdplb.k8s.client import Kube

pytestmark = pytest.mark.skipif(not KUBECTL.exists(), reason="run scripts/setup.sh for kubectl")

CLASS = "xdplb.io/xdplb"


def pool(name: str, *addresses: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("namespaceSelector", {})
    return {"apiVersion": "xdplb.io/v1alpha1", "kind": "AddressPool",
            "metadata": {"name": name}, "spec": {"addresses": list(addresses), **spec}}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}}


def lb(name: str, ns: str, address: str | None, port: int = 80,
       backends: tuple[str, ...] = ("10.0.0.11",), **listener: Any) -> dict[str, Any]:
    ln: dict[str, Any] = {"name": "l", "protocol": "TCP", "port": port,
                          "backends": [{"address": b, "port": 8080} for b in backends],
                          **listener}
    if address:
        ln["address"] = address
    return {"apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer",
            "metadata": {"name": name, "namespace": ns}, "spec": {"listeners": [ln]}}


def service(name: str, ns: str = "default", cls: str | None = CLASS,
            ports: tuple[tuple[str, int, str], ...] = (("http", 80, "TCP"),),
            annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "LoadBalancer",
        "ports": [{"name": n, "port": p, "protocol": pr, "targetPort": 8080}
                  for n, p, pr in ports], **spec}
    if cls:
        body["loadBalancerClass"] = cls
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
            "spec": body}


class Api:
    """Reads as a user would, through the admin's connection."""

    def __init__(self, env: Env) -> None:
        self.env, self.admin = env, env.admin

    def apply(self, *docs: dict[str, Any]) -> None:
        self.env.cluster.kubectl("apply", "-f", "-",
                                 stdin="\n".join(json.dumps(d) for d in docs))

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.admin.get(path)  # type: ignore[no-any-return]
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return None
            raise

    def lb(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.get(f"{LB_API}/namespaces/{ns}/loadbalancers/{name}")

    def svc(self, name: str, ns: str = "default") -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{ns}/services/{name}")

    def condition(self, ns: str, name: str, ctype: str) -> dict[str, Any]:
        conds = ((self.lb(ns, name) or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == ctype), {})

    def wait_condition(self, ns: str, name: str, ctype: str, status: str, **fields: Any
                       ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            c = self.condition(ns, name, ctype)
            return c if c.get("status") == status and all(
                c.get(k) == v for k, v in fields.items()) else None
        return wait_for(f"{ns}/{name}: {ctype}={status} {fields}", check)

    def events(self, ns: str, name: str, kind: str) -> list[dict[str, Any]]:
        items = self.admin.get(f"/api/v1/namespaces/{ns}/events")["items"]
        return [{"type": e["type"], "reason": e["reason"], "message": e["message"]}
                for e in items if e["involvedObject"]["name"] == name
                and e["involvedObject"]["kind"] == kind]

    def wait_event(self, ns: str, name: str, kind: str, reason: str) -> dict[str, Any]:
        return wait_for(f"{kind} {ns}/{name}: Event {reason}", lambda: next(
            (e for e in self.events(ns, name, kind) if e["reason"] == reason), None))

    def ingress(self, name: str, ns: str = "default") -> list[dict[str, Any]]:
        status = (self.svc(name, ns) or {}).get("status") or {}
        return list((status.get("loadBalancer") or {}).get("ingress") or [])

    def wait_address(self, name: str, ns: str = "default") -> str:
        found = wait_for(f"an address for Service {ns}/{name}", lambda: self.ingress(name, ns))
        assert found == [{"ip": found[0]["ip"], "ipMode": "VIP"}], found
        return str(found[0]["ip"])

    def pool_status(self, name: str) -> dict[str, Any]:
        return (self.get(f"{LB_API}/addresspools/{name}") or {}).get("status") or {}


TEAM_A = pool("a-pool", "192.0.2.0/28", namespaceSelector={"matchLabels": {"team": "a"}},
              allowedPorts=[{"port": 80}, {"port": 443, "protocol": "TCP"}])
TEAM_B = pool("b-pool", "198.51.100.0/28", namespaceSelector={"matchLabels": {"team": "b"}})


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with operator_env(tmp_path, pools=(TEAM_A, TEAM_B)) as env:
        a = Api(env)
        a.apply(namespace("team-a", team="a"), namespace("team-b", team="b"))
        yield a


# --- what a namespace may claim ------------------------------------------------------------


def test_unsafe_objects_are_refused_naming_the_pools(api: Api) -> None:
    api.apply(lb("ssh", "team-a", None, port=22),
              lb("outside", "team-a", "198.51.100.5"),
              lb("metadata", "team-a", "192.0.2.5", backends=("169.254.169.254",)),
              lb("elsewhere", "default", "192.0.2.6"))
    ssh = api.wait_condition("team-a", "ssh", "Accepted", "False", reason="AddressNotAllowed")
    assert ssh["message"] == (
        "spec.listeners[0]: a listener without an address serves every address of the node"
        " (port 22/TCP); it needs an AddressPool with nodeAddresses: true that admits"
        " namespace 'team-a'. AddressPools admitting namespace 'team-a':"
        " a-pool (192.0.2.0/28; ports 80, 443/TCP)")
    outside = api.wait_condition("team-a", "outside", "Accepted", "False",
                                 reason="AddressNotAllowed")
    assert outside["message"].startswith(
        "spec.listeners[0].address: 198.51.100.5 is in no AddressPool that admits namespace"
        " 'team-a'.")  # it is in b-pool, which admits team-b only
    assert outside["message"].endswith("a-pool (192.0.2.0/28; ports 80, 443/TCP)")
    meta = api.wait_condition("team-a", "metadata", "Accepted", "False",
                              reason="AddressNotAllowed")
    assert meta["message"].startswith(
        "spec.listeners[0].backends[0].address: 169.254.169.254 is link-local"
        " (169.254.0.0/16): never a backend.")
    elsewhere = api.wait_condition("default", "elsewhere", "Accepted", "False",
                                   reason="AddressNotAllowed")
    assert elsewhere["message"].endswith(". no AddressPool admits namespace 'default'")
    for name in ("ssh", "outside", "metadata"):
        assert api.condition("team-a", name, "Programmed")["reason"] == "NotAccepted"
        event = api.wait_event("team-a", name, "LoadBalancer", "AddressNotAllowed")
        assert event["type"] == "Warning"
    # A port the pool does not allow, and a node's own address as a backend.
    api.env.node("n1")
    api.env.admin.patch("/api/v1/nodes/n1/status", {
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.99"}]}})
    api.apply(lb("port", "team-a", "192.0.2.7", port=8080),
              lb("kubelet", "team-a", "192.0.2.8", backends=("10.0.0.99",)))
    port = api.wait_condition("team-a", "port", "Accepted", "False", reason="AddressNotAllowed")
    assert port["message"].startswith(
        "spec.listeners[0].port: 8080/TCP is not allowed by a-pool (192.0.2.0/28; ports 80,"
        " 443/TCP).")
    kubelet = api.wait_condition("team-a", "kubelet", "Accepted", "False",
                                 reason="AddressNotAllowed")
    assert "10.0.0.99 is an address of a node: never a backend" in kubelet["message"]


def test_a_pool_admits_and_removing_the_admission_unprograms(api: Api) -> None:
    env = api.env
    env.node("n1")
    api.apply(lb("web", "team-b", "198.51.100.5"))
    api.wait_condition("team-b", "web", "Accepted", "True")
    body = api.lb("team-b", "web")
    assert body is not None
    env.report("n1", {"namespace": "team-b", "name": "web", "uid": body["metadata"]["uid"],
                      "generation": 1, "phase": "Applied", "listeners": 1, "backends": 1})
    api.wait_condition("team-b", "web", "Programmed", "True")
    status = (api.lb("team-b", "web") or {})["status"]
    assert status["addresses"] == [{"address": "198.51.100.5", "pool": "b-pool",
                                    "announcedBy": ""}]
    wait_for("b-pool uses 1 of 16", lambda: (s := api.pool_status("b-pool")).get("used") == 1
             and s["total"] == "16")

    # The namespace loses the label the pool selects: refused, and no longer programmed.
    api.apply(namespace("team-b", team="c"))
    refused = api.wait_condition("team-b", "web", "Accepted", "False",
                                 reason="AddressNotAllowed")
    assert refused["message"].endswith("no AddressPool admits namespace 'team-b'")
    assert api.condition("team-b", "web", "Programmed")["status"] == "False"
    wait_for("b-pool uses none", lambda: api.pool_status("b-pool").get("used") == 0)
    # The pool widens its selector: admitted again, with no change to the object.
    api.apply(pool("b-pool", "198.51.100.0/28",
                   namespaceSelector={"matchExpressions": [
                       {"key": "team", "operator": "In", "values": ["b", "c"]}]}))
    api.wait_condition("team-b", "web", "Accepted", "True")
    api.wait_condition("team-b", "web", "Programmed", "True")


def test_allowed_backend_cidrs_and_node_addresses(api: Api) -> None:
    api.apply(pool("edge", "203.0.113.0/24", namespaceSelector={"matchLabels": {"team": "a"}},
                   allowedBackendCIDRs=["10.1.0.0/16"], nodeAddresses=True))
    api.apply(lb("inside", "team-a", "203.0.113.1", backends=("10.1.2.3",)),
              lb("outside", "team-a", "203.0.113.2", backends=("10.2.0.1",)),
              lb("wild", "team-a", None, port=8443, backends=("10.1.2.4",)))
    api.wait_condition("team-a", "inside", "Accepted", "True")
    api.wait_condition("team-a", "wild", "Accepted", "True")
    out = api.wait_condition("team-a", "outside", "Accepted", "False",
                             reason="AddressNotAllowed")
    assert out["message"].startswith(
        "spec.listeners[0]: backend 10.2.0.1 lies outside allowedBackendCIDRs of pool edge"
        " (10.1.0.0/16).")


def test_overlapping_pools_are_reported_not_merged(api: Api) -> None:
    api.apply(pool("wide", "192.0.2.0/24", namespaceSelector={"matchLabels": {"team": "b"}}))
    overlap = wait_for("the overlap on a-pool", lambda: next(
        (c for c in api.pool_status("a-pool").get("conditions", [])
         if c["type"] == "Overlapping" and c["status"] == "True"), None))
    assert overlap["message"].startswith("shares 192.0.2.0/28 with pool wide")
    wait_for("the overlap on wide", lambda: any(
        c["type"] == "Overlapping" and c["status"] == "True" and "with pool a-pool" in
        c["message"] for c in api.pool_status("wide").get("conditions", [])))
    assert api.wait_event("default", "wide", "AddressPool", "Overlapping")["type"] == "Warning"
    # Not merged: team-b gets the shared addresses through wide, on any port; team-a
    # through a-pool, on its ports only.
    api.apply(lb("b", "team-b", "192.0.2.1", port=22), lb("a", "team-a", "192.0.2.2", port=22))
    api.wait_condition("team-b", "b", "Accepted", "True")
    api.wait_condition("team-a", "a", "Accepted", "False", reason="AddressNotAllowed")
    table = api.env.cluster.kubectl("get", "xpool").stdout.split("\n")
    assert table[0].split() == ["NAME", "USED", "TOTAL", "AUTO", "ANNOUNCE", "AGE"]
    wait_for("wide: 1/256 in kubectl get xpool", lambda: api.env.cluster.kubectl(
        "get", "xpool", "wide").stdout.split("\n")[1].split()[1:3] == ["1", "256"])


def test_an_invalid_pool_admits_nothing_and_says_why(api: Api) -> None:
    # Host bits pass the schema (a string), not the model.
    api.apply(pool("bad", "203.0.113.1/24", namespaceSelector={}))
    accepted = wait_for("bad: Accepted=False", lambda: next(
        (c for c in api.pool_status("bad").get("conditions", [])
         if c["type"] == "Accepted" and c["status"] == "False"), None))
    assert accepted["message"] == ("spec.addresses[0]: '203.0.113.1/24' has host bits set"
                                   " (the network is '203.0.113.0/24')")
    api.apply(lb("web", "team-a", "203.0.113.5"))
    api.wait_condition("team-a", "web", "Accepted", "False", reason="AddressNotAllowed")


# --- Services of type LoadBalancer -----------------------------------------------------------

SVC_POOL = pool("services", "198.18.0.1-198.18.0.2", namespaceSelector={})


@pytest.fixture
def svc_api(tmp_path: Path) -> Iterator[Api]:
    with operator_env(tmp_path, pools=(SVC_POOL,)) as env:
        yield Api(env)


def test_service_gets_address_status_and_derived_loadbalancer(svc_api: Api) -> None:
    api = svc_api
    api.apply(service("web", sessionAffinity="ClientIP", externalTrafficPolicy="Local",
                      ports=(("http", 80, "TCP"), ("dns", 53, "UDP"))))
    first = api.wait_address("web")
    assert first == "198.18.0.1"
    derived = wait_for("the derived LoadBalancer", lambda: api.lb("default", "web"))
    svc = api.svc("web")
    assert svc is not None
    assert derived["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Service", "name": "web", "uid": svc["metadata"]["uid"],
        "controller": True}]
    assert derived["spec"] == {"trafficPolicy": "Local", "listeners": [
        {"name": "http", "protocol": "TCP", "port": 80, "address": first,
         "service": {"name": "web", "port": "http"}, "sessionAffinity": "ClientIP"},
        {"name": "dns", "protocol": "UDP", "port": 53, "address": first,
         "service": {"name": "web", "port": "dns"}, "sessionAffinity": "ClientIP"}]}
    api.wait_condition("default", "web", "Accepted", "True")
    event = api.wait_event("default", "web", "Service", "AddressAllocated")
    assert event == {"type": "Normal", "reason": "AddressAllocated",
                     "message": f"{first} from pool services"}
    row = api.env.cluster.kubectl("get", "svc", "web").stdout.split("\n")[1].split()
    assert row[:4] == ["web", "LoadBalancer", "<none>", first]

    # A second Service: the other address. A third: none left.
    api.apply(service("api"))
    second = api.wait_address("api")
    assert second == "198.18.0.2"
    api.apply(service("late"))
    exhausted = api.wait_event("default", "late", "Service", "PoolExhausted")
    assert exhausted == {"type": "Warning", "reason": "PoolExhausted",
                         "message": "no free address in services"}
    assert api.ingress("late") == [] and api.lb("default", "late") is None
    wait_for("services uses 2 of 2", lambda: api.pool_status("services").get("used") == 2)

    # The first goes: its address and its LoadBalancer go with it, to the next Service.
    api.env.cluster.kubectl("delete", "service", "web")
    wait_for("the derived LoadBalancer gone", lambda: api.lb("default", "web") is None)
    assert api.wait_address("late") == first
    assert api.ingress("api") == [{"ip": second, "ipMode": "VIP"}]


def test_other_classes_are_never_touched(svc_api: Api) -> None:
    api = svc_api
    api.apply(service("theirs", cls="example.com/other-lb"), service("unclassed", cls=None),
              service("ours"))
    api.wait_address("ours")
    time.sleep(1.0)  # proving an absence: the controller has run since
    for name in ("theirs", "unclassed"):
        body = api.svc(name)
        assert body is not None and "status" not in body, body
        assert api.lb("default", name) is None
        assert api.events("default", name, "Service") == []


def test_requested_addresses_sharing_and_conflicts(svc_api: Api) -> None:
    api = svc_api
    api.apply(pool("more", "198.18.1.0/30", namespaceSelector={}, autoAssign=False))
    # By annotation, in a pool that hands out nothing by itself.
    api.apply(service("dns-tcp", annotations={"xdplb.io/loadBalancerIPs": "198.18.1.1",
                                              "xdplb.io/allow-shared-ip": "dns"},
                      ports=(("dns", 53, "TCP"),)))
    assert api.wait_address("dns-tcp") == "198.18.1.1"
    # The same key, other ports: shared. The same address without the key: refused.
    api.apply(service("dns-udp", loadBalancerIP="198.18.1.1",
                      annotations={"xdplb.io/allow-shared-ip": "dns"},
                      ports=(("dns", 53, "UDP"),)))
    assert api.wait_address("dns-udp") == "198.18.1.1"
    api.apply(service("thief", loadBalancerIP="198.18.1.1"))
    taken = api.wait_event("default", "thief", "Service", "AddressInUse")
    assert taken["message"].startswith("198.18.1.1 is allocated to Service default/dns-tcp")
    # Outside every pool, and a pool named on purpose.
    api.apply(service("nowhere", loadBalancerIP="203.0.113.9"))
    nowhere = api.wait_event("default", "nowhere", "Service", "AddressNotAllowed")
    assert nowhere["message"] == "203.0.113.9 is in no AddressPool that admits namespace 'default'"
    api.apply(service("picky", annotations={"xdplb.io/address-pool": "more"}))
    assert api.wait_address("picky") == "198.18.1.0"  # every address of a CIDR is handed out
    # A class change releases the address and the derived object.
    svc = api.svc("picky")
    assert svc is not None
    svc["spec"]["loadBalancerClass"] = "example.com/other-lb"
    api.apply({k: v for k, v in svc.items() if k != "status"})
    wait_for("picky released", lambda: api.lb("default", "picky") is None
             and api.ingress("picky") == [])
    assert api.wait_event("default", "picky", "Service", "AddressReleased")["type"] == "Normal"


def test_allocation_is_stable_across_operator_restarts(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        operator_cluster(cluster, (pool("services", "198.18.0.0/29", namespaceSelector={}),))
        settings = operator_settings(cluster)
        admin = Kube(str(cluster.admin_kubeconfig))
        docs = [service(f"s{i}") for i in range(4)]
        with running_operator(cluster, settings) as state:
            api = Api(Env(cluster, state, settings))
            for doc in docs:
                api.apply(doc)
                api.wait_address(doc["metadata"]["name"])
            before = {d["metadata"]["name"]: api.ingress(d["metadata"]["name"]) for d in docs}
        # While the operator is away, s1 goes and two Services come: the newcomers must
        # not take what s0, s2 and s3 hold, and one of them gets s1's.
        cluster.kubectl("delete", "service", "s1")
        admin.request("DELETE", f"{LB_API}/namespaces/default/loadbalancers/s1")
        admin.patch(f"{LB_API}/namespaces/default/loadbalancers/s1",
                    {"metadata": {"finalizers": None}})
        with running_operator(cluster, settings) as state:
            api = Api(Env(cluster, state, settings))
            api.apply(service("new1"), service("new2"))
            got = {api.wait_address("new1"), api.wait_address("new2")}
            for name in ("s0", "s2", "s3"):
                assert api.ingress(name) == before[name]
            held = {before[n][0]["ip"] for n in ("s0", "s2", "s3")}
            assert not got & held and before["s1"][0]["ip"] in got
            assert len(got) == 2


def test_kubectl_expose_with_the_default_class(tmp_path: Path) -> None:
    with operator_env(tmp_path, pools=(SVC_POOL,), default_service_class=True) as env:
        # (`kubectl create deployment` would send protobuf, which the emulator cannot read.)
        env.cluster.kubectl("apply", "-f", "-", stdin=json.dumps({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}}))
        env.cluster.kubectl("expose", "deployment", "web", "--type=LoadBalancer", "--port", "80")
        api = Api(env)
        address = api.wait_address("web")
        out = env.cluster.kubectl("get", "svc", "web").stdout.split("\n")
        assert out[0].split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
        assert out[1].split()[:5] == ["web", "LoadBalancer", "<none>", address, "80/TCP"]
        derived = api.lb("default", "web")
        assert derived is not None
        assert derived["spec"]["listeners"] == [{
            "name": "tcp-80", "protocol": "TCP", "port": 80, "address": address,
            "service": {"name": "web", "port": 80}, "sessionAffinity": "None"}]
        assert derived["spec"]["trafficPolicy"] == "Cluster"


def test_ipv6_listeners_are_judged_alike(api: Api) -> None:
    api.apply(pool("v6", "2001:db8:a::/120", "2001:db8:a:1::10-2001:db8:a:1::20",
                   namespaceSelector={"matchLabels": {"team": "a"}}))
    api.apply(lb("in-range", "team-a", "2001:db8:a:1::15", backends=("2001:db8:f::1",)),
              lb("outside", "team-a", "2001:db8:b::5", backends=("2001:db8:f::1",)),
              lb("link-local", "team-a", "2001:db8:a::6", backends=("fe80::1",)),
              lb("loopback", "team-a", "2001:db8:a::7", backends=("::1",)))
    api.wait_condition("team-a", "in-range", "Accepted", "True")
    out = api.wait_condition("team-a", "outside", "Accepted", "False",
                             reason="AddressNotAllowed")
    assert out["message"].startswith("spec.listeners[0].address: 2001:db8:b::5 is in no"
                                     " AddressPool that admits namespace 'team-a'.")
    for name, what in (("link-local", "fe80::1 is link-local (fe80::/10)"),
                       ("loopback", "::1 is loopback (::1)")):
        refused = api.wait_condition("team-a", name, "Accepted", "False",
                                     reason="AddressNotAllowed")
        assert f"{what}: never a backend" in refused["message"], refused
    wait_for("v6 uses 1", lambda: api.pool_status("v6").get("used") == 1
             and api.pool_status("v6").get("total") == str(256 + 17))


# --- Services of either family, and of both --------------------------------------------------

V6_POOL = pool("services6", "2001:db8:5::1-2001:db8:5::2", namespaceSelector={})
DUAL = {"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"]}


def listeners(api: Api, name: str) -> list[tuple[str, str, int]]:
    derived = api.lb("default", name) or {}
    return [(ln["name"], ln["address"], ln["port"])
            for ln in derived.get("spec", {}).get("listeners", [])]


def addresses(api: Api, name: str, count: int) -> list[str]:
    found = wait_for(f"{count} addresses for Service {name}",
                     lambda: len(got := api.ingress(name)) == count and got)
    assert all(i["ipMode"] == "VIP" for i in found), found
    return [i["ip"] for i in found]


def test_services_of_either_family_and_dual_stack(tmp_path: Path) -> None:
    with operator_env(tmp_path, pools=(SVC_POOL, V6_POOL)) as env:
        api = Api(env)
        # IPv6 only: an IPv6 address, listeners of the ports' own names.
        api.apply(service("six", ipFamilies=["IPv6"], ipFamilyPolicy="SingleStack"))
        assert addresses(api, "six", 1) == ["2001:db8:5::1"]
        wait_for("six's listeners", lambda: listeners(api, "six") == [
            ("http", "2001:db8:5::1", 80)])
        # Dual-stack: one address per family, primary first; a listener per port per family.
        api.apply(service("both", ports=(("http", 80, "TCP"), ("dns", 53, "UDP")), **DUAL))
        assert addresses(api, "both", 2) == ["198.18.0.1", "2001:db8:5::2"]
        wait_for("both's listeners", lambda: listeners(api, "both") == [
            ("http", "198.18.0.1", 80), ("dns", "198.18.0.1", 53),
            ("http-ipv6", "2001:db8:5::2", 80), ("dns-ipv6", "2001:db8:5::2", 53)])
        assert api.wait_event("default", "both", "Service", "AddressAllocated")["message"] \
            == "198.18.0.1 from pool services, 2001:db8:5::2 from pool services6"
        api.wait_condition("default", "both", "Accepted", "True")
        wait_for("the EXTERNAL-IP column lists both", lambda: api.env.cluster.kubectl(
            "get", "svc", "both").stdout.split("\n")[1].split()[3]
            == "198.18.0.1,2001:db8:5::2")

        # IPv6 exhausted. PreferDualStack: the primary family only, with an Event.
        api.apply(service("prefer", **DUAL))
        assert addresses(api, "prefer", 1) == ["198.18.0.2"]
        degraded = api.wait_event("default", "prefer", "Service", "DualStackDegraded")
        assert degraded == {"type": "Warning", "reason": "DualStackDegraded", "message":
                            "served in IPv4 only: IPv6: no free address in services6"}
        assert listeners(api, "prefer") == [("http", "198.18.0.2", 80)]
        # RequireDualStack, and SingleStack IPv6: nothing at all; no address is spent.
        api.apply(service("require", ipFamilyPolicy="RequireDualStack",
                          ipFamilies=["IPv6", "IPv4"], ports=(("https", 443, "TCP"),)),
                  service("six-late", ipFamilies=["IPv6"]))
        refused = api.wait_event("default", "require", "Service", "PoolExhausted")
        assert refused["message"] == ("IPv6: no free address in services6 (ipFamilyPolicy"
                                      " RequireDualStack: no family is served)")
        assert api.wait_event("default", "six-late", "Service", "PoolExhausted")["message"] \
            == "no free address in services6"
        for name in ("require", "six-late"):
            assert api.ingress(name) == [] and api.lb("default", name) is None
        # A family with no pool at all, and an address of a family the Service is not in.
        api.apply(service("v4-asks-v6", loadBalancerIP="2001:db8:5::9"))
        wrong = api.wait_event("default", "v4-asks-v6", "Service", "AddressIgnored")
        assert wrong["message"] == ("spec.loadBalancerIP: 2001:db8:5::9 is IPv6, not a family"
                                    " the Service is served in (IPv4; spec.ipFamilies)")

        # "six" goes: the oldest Service short of IPv6, "prefer", gets its address (while
        # "require" cannot: no IPv4 address is free).
        env.cluster.kubectl("delete", "service", "six")
        wait_for("six's LoadBalancer gone", lambda: api.lb("default", "six") is None)
        assert addresses(api, "prefer", 2) == ["198.18.0.2", "2001:db8:5::1"]
        assert api.ingress("require") == [] and api.ingress("six-late") == []
        # "both" goes: "require" gets both families at last.
        env.cluster.kubectl("delete", "service", "both")
        assert addresses(api, "require", 2) == ["2001:db8:5::2", "198.18.0.1"]
        wait_for("require's listeners, IPv6 first", lambda: listeners(api, "require") == [
            ("https", "2001:db8:5::2", 443), ("https-ipv4", "198.18.0.1", 443)])
        wait_for("services6 uses 2 of 2", lambda: api.pool_status("services6").get("used") == 2)
        assert api.ingress("six-late") == []


def test_dual_stack_allocation_is_stable_across_restarts(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        operator_cluster(cluster, (pool("services", "198.18.0.0/30", namespaceSelector={}),
                                   pool("services6", "2001:db8:5::/126", namespaceSelector={})))
        settings = operator_settings(cluster)
        names = ("d0", "d1", "d2")
        with running_operator(cluster, settings) as state:
            api = Api(Env(cluster, state, settings))
            for name in names:
                api.apply(service(name, annotations={
                    "xdplb.io/loadBalancerIPs": "2001:db8:5::3"} if name == "d0" else {},
                    **DUAL))
                addresses(api, name, 2)
            before = {n: api.ingress(n) for n in names}
        assert [i["ip"] for i in before["d0"]][1] == "2001:db8:5::3"
        cluster.kubectl("delete", "service", "d1")
        with running_operator(cluster, settings) as state:
            api = Api(Env(cluster, state, settings))
            api.apply(service("new", **DUAL))
            got = addresses(api, "new", 2)
            for name in ("d0", "d2"):
                assert api.ingress(name) == before[name]
            held = {i["ip"] for n in ("d0", "d2") for i in before[n]}
            assert not set(got) & held, (got, held)
            wait_for("d1's LoadBalancer gone", lambda: api.lb("default", "d1") is None)
