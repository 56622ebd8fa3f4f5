"""The API emulator behaves like an API server where the operator and agent rely on it."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiException

from tests.k8s.cluster import KUBECTL, Cluster
from xdplb.k8s.client import Kube

LBS = "/apis/xdplb.io/v1alpha1/namespaces/default/loadbalancers"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


pytestmark = pytest.mark.skipif(not KUBECTL.exists(), reason="run scripts/setup.sh for kubectl")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path) as c:
        c.apply_crds()
        yield c


@pytest.fixture
def admin(cluster: Cluster) -> Kube:
    return Kube(str(cluster.admin_kubeconfig))


def lb(name: str, port: int = 80) -> dict[str, Any]:
    return {"apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer",
            "metadata": {"name": name, "labels": {"tier": "web" if port == 80 else "db"}},
            "spec": {"listeners": [{"name": "l", "protocol": "TCP", "port": port,
                                    "backends": [{"address": "10.0.0.1", "port": 80}]}]},
            "status": {"observedGeneration": 99}}


def watch(cluster: Cluster, path: str) -> list[dict[str, Any]]:
    """Every event of a watch that the server ends after one second."""
    sep = "&" if "?" in path else "?"
    req = urllib.request.Request(f"{cluster.url}{path}{sep}watch=true&timeoutSeconds=1")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


def test_create_sets_metadata_and_drops_status(admin: Kube) -> None:
    obj = admin.request("POST", LBS, lb("a"))
    meta = obj["metadata"]
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]
    assert int(meta["resourceVersion"]) > 0 and meta["namespace"] == "default"
    assert "status" not in obj  # the status subresource owns it
    with pytest.raises(ApiException) as e:
        admin.request("POST", LBS, lb("a"))
    assert e.value.status == 409


def test_status_subresource_semantics_and_generation(admin: Kube) -> None:
    admin.request("POST", LBS, lb("a"))
    main = admin.patch(f"{LBS}/a", {"status": {"observedGeneration": 5},
                                    "metadata": {"labels": {"x": "y"}}})
    assert "status" not in main and main["metadata"]["generation"] == 1  # metadata only
    st = admin.patch(f"{LBS}/a/status", {"status": {"observedGeneration": 1},
                                         "spec": {"listeners": []}})
    assert st["status"] == {"observedGeneration": 1}
    assert st["spec"]["listeners"][0]["port"] == 80 and st["metadata"]["generation"] == 1
    spec = admin.patch(f"{LBS}/a", {"spec": {"listeners": [{"name": "l", "protocol": "UDP",
                                                            "port": 53, "backends": []}]}})
    assert spec["metadata"]["generation"] == 2 and spec["status"] == {"observedGeneration": 1}
    same = admin.patch(f"{LBS}/a", {"spec": spec["spec"]})
    assert same["metadata"]["resourceVersion"] == spec["metadata"]["resourceVersion"]


def test_preconditions(admin: Kube) -> None:
    obj = admin.request("POST", LBS, lb("a"))
    rv = obj["metadata"]["resourceVersion"]
    admin.patch(f"{LBS}/a", {"metadata": {"labels": {"x": "1"}}})
    with pytest.raises(ApiException) as e:
        admin.request("PATCH", f"{LBS}/a", [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/labels/y", "value": "2"}],
            "application/json-patch+json")
    assert e.value.status == 422
    with pytest.raises(ApiException) as e:
        admin.request("PUT", f"{LBS}/a", obj)
    assert e.value.status == 409


def test_lists_have_kinds_and_honour_selectors(admin: Kube) -> None:
    admin.request("POST", LBS, lb("a"))
    admin.request("POST", LBS, lb("b", port=5432))
    assert admin.get(LBS)["kind"] == "LoadBalancerList"
    assert [o["metadata"]["name"] for o in admin.get(f"{LBS}?labelSelector=tier%3Ddb")[
        "items"]] == ["b"]
    assert [o["metadata"]["name"] for o in admin.get(f"{LBS}?labelSelector=tier+in+(web,x)")[
        "items"]] == ["a"]
    assert [o["metadata"]["name"] for o in admin.get(f"{LBS}?labelSelector=!tier")["items"]] == []
    assert [o["metadata"]["name"] for o in admin.get(
        f"{LBS}?fieldSelector=metadata.name%3Da")["items"]] == ["a"]


def test_watch_filters_by_label_and_resumes_from_a_version(cluster: Cluster, admin: Kube
                                                           ) -> None:
    for svc in ("web", "db"):
        admin.request("POST", SLICES, {"metadata": {
            "name": f"{svc}-1", "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": []})
    events = watch(cluster, f"{SLICES}?labelSelector=kubernetes.io%2Fservice-name%3Dweb")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "web-1")]
    rv = admin.get(SLICES)["metadata"]["resourceVersion"]
    admin.patch(f"{SLICES}/web-1", {"endpoints": [{"addresses": ["10.0.0.1"]}]})
    admin.patch(f"{SLICES}/db-1", {"endpoints": [{"addresses": ["10.0.0.2"]}]})
    events = watch(cluster, f"{SLICES}?resourceVersion={rv}"
                            "&labelSelector=kubernetes.io%2Fservice-name%3Dweb")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "web-1")]
    listed = watch(cluster, f"{SLICES}?sendInitialEvents=true&allowWatchBookmarks=true")
    assert [e["type"] for e in listed] == ["ADDED", "ADDED", "BOOKMARK"]
    assert listed[-1]["object"]["metadata"]["annotations"] == {
        "k8s.io/initial-events-end": "true"}


def test_finalizers_hold_deletion(cluster: Cluster, admin: Kube) -> None:
    obj = lb("a")
    obj["metadata"]["finalizers"] = ["example.com/hold"]
    admin.request("POST", LBS, obj)
    rv = admin.get(LBS)["metadata"]["resourceVersion"]
    admin.request("DELETE", f"{LBS}/a")
    assert admin.get(f"{LBS}/a")["metadata"]["deletionTimestamp"]
    admin.patch(f"{LBS}/a", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as e:
        admin.get(f"{LBS}/a")
    assert e.value.status == 404
    types = [e["type"] for e in watch(cluster, f"{LBS}?resourceVersion={rv}")]
    assert types == ["MODIFIED", "DELETED"]


def test_rbac_denies_what_is_not_granted_and_records_use(cluster: Cluster) -> None:
    account = cluster.emulator.grant("t", "system:serviceaccount:ns:reader", [
        {"apiGroups": ["xdplb.io"], "resources": ["loadbalancers"], "verbs": ["list", "get"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["watch"]}])
    reader = Kube(str(cluster.kubeconfig("reader", "t")))
    assert reader.get(LBS)["items"] == []
    with pytest.raises(ApiException) as e:
        reader.patch(f"{LBS}/a/status", {"status": {}})
    assert e.value.status == 403
    assert json.loads(e.value.body)["message"] == (
        'loadbalancers.xdplb.io "a" is forbidden: User "system:serviceaccount:ns:reader" cannot'
        ' patch resource "loadbalancers/status" in API group "xdplb.io" in the namespace'
        ' "default"')
    assert account.unused() == ["get loadbalancers.xdplb.io", "watch nodes.core"]


def test_kubectl_applies_and_gets_unchanged(cluster: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "lb.yaml"
    manifest.write_text(json.dumps({k: v for k, v in lb("web").items() if k != "status"}))
    assert cluster.kubectl("apply", "-f", str(manifest)).stdout.strip() == \
        "loadbalancer.xdplb.io/web created"
    assert cluster.kubectl("apply", "-f", str(manifest)).stdout.strip() == \
        "loadbalancer.xdplb.io/web unchanged"
    got = json.loads(cluster.kubectl("get", "xlb", "web", "-o", "json").stdout)
    assert got["metadata"]["generation"] == 1
    rows = {line.split()[0]: line.split()[1:] for line in
            cluster.kubectl("api-resources").stdout.splitlines()[1:]}
    assert rows["loadbalancers"] == ["xlb", "xdplb.io/v1alpha1", "true", "LoadBalancer"]
    assert rows["nodestates"] == ["xdplb.io/v1alpha1", "false", "NodeState"]
