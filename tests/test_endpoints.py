"""Service backends from EndpointSlices, and the plan groups they make."""

from __future__ import annotations

from typing import Any

from xdplb.plan.endpoints import EndpointIndex, service_port_name, slice_backends
from xdplb.plan.model import Backend
from xdplb.plan.planner import build_plan
from xdplb.spec.model import LoadBalancer, ServiceRef


def endpoint(address: str, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None) -> dict[str, Any]:
    cond = {k: v for k, v in (("ready", ready), ("serving", serving),
                              ("terminating", terminating)) if v is not None}
    return {"addresses": [address], "conditions": cond}


def eps(name: str, endpoints: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None,
        namespace: str = "default", service: str = "web", address_type: str = "IPv4"
        ) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": address_type,
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080,
                                                    "protocol": "TCP"}],
    }


def service(name: str = "web", ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"ports": ports if ports is not None else [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def test_ready_serving_terminating() -> None:
    slices = [eps("web-a", [
        endpoint("10.0.0.1"),                                     # ready: new flows
        endpoint("10.0.0.2", ready=False, serving=True, terminating=True),  # draining
        endpoint("10.0.0.3", ready=False, serving=False, terminating=True),  # gone
        endpoint("10.0.0.4", ready=False),                        # not ready, not terminating
        endpoint("10.0.0.5", ready=None),                         # unknown readiness = ready
    ])]
    assert sorted(slice_backends(slices, "http", "TCP")) == [
        Backend("10.0.0.1", 8080, 1), Backend("10.0.0.2", 8080, 0), Backend("10.0.0.5", 8080, 1)]


def test_ports_by_name_protocol_and_address_type() -> None:
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"},
             {"name": "dns", "port": 5353, "protocol": "UDP"}]
    slices = [eps("a", [endpoint("10.0.0.1")], ports),
              eps("b", [endpoint("fd00::1")], ports, address_type="IPv6")]
    assert slice_backends(slices, "dns", "UDP") == (Backend("10.0.0.1", 5353, 1),)
    assert slice_backends(slices, "dns", "TCP") == ()
    assert slice_backends(slices, "metrics", "TCP") == ()


def test_endpoint_in_two_slices_ready_wins() -> None:
    slices = [eps("a", [endpoint("10.0.0.1", ready=False, serving=True, terminating=True)]),
              eps("b", [endpoint("10.0.0.1")])]
    assert slice_backends(slices, "http", "TCP") == (Backend("10.0.0.1", 8080, 1),)


def test_service_port_number_resolves_through_the_service() -> None:
    svc = service(ports=[{"name": "http", "port": 80, "protocol": "TCP"},
                         {"name": "dns", "port": 53, "protocol": "UDP"},
                         {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])
    assert service_port_name(svc, 80, "TCP") == "http"
    assert service_port_name(svc, 53, "TCP") == "dns-tcp"
    assert service_port_name(svc, 53, "UDP") == "dns"
    assert service_port_name(svc, 81, "TCP") is None
    assert service_port_name(None, 80, "TCP") is None  # no Service: cannot resolve
    assert service_port_name(None, "http", "TCP") == "http"
    unnamed = service(ports=[{"port": 80, "protocol": "TCP"}])
    assert service_port_name(unnamed, 80, "TCP") == ""
    assert slice_backends([eps("a", [endpoint("10.0.0.9")], [{"port": 9000}])], "", "TCP") == (
        Backend("10.0.0.9", 9000, 1),)


def test_index_groups_slices_by_service_and_namespace() -> None:
    index = EndpointIndex.of(
        [service()],
        [eps("web-a", [endpoint("10.0.0.1")]), eps("web-b", [endpoint("10.0.0.2")]),
         eps("api-a", [endpoint("10.0.0.3")], service="api"),
         eps("web-x", [endpoint("10.0.0.4")], namespace="other")])
    assert sorted(index.backends("default", ServiceRef(name="web", port=80), "TCP")) == [
        Backend("10.0.0.1", 8080, 1), Backend("10.0.0.2", 8080, 1)]
    assert index.backends("default", ServiceRef(name="web", port="http"), "TCP") == index.backends(
        "default", ServiceRef(name="web", port=80), "TCP")
    assert index.backends("other", ServiceRef(name="web", port=80), "TCP") == ()  # no Service
    assert index.backends("other", ServiceRef(name="web", port="http"), "TCP") == (
        Backend("10.0.0.4", 8080, 1),)
    assert index.backends("default", ServiceRef(name="none", port="http"), "TCP") == ()


def lb() -> LoadBalancer:
    return LoadBalancer.model_validate({
        "apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"listeners": [{
            "name": "http", "protocol": "TCP", "port": 80, "address": "192.0.2.10",
            "service": {"name": "web", "port": "http"},
            "sourceRoutes": [{"cidr": "198.51.100.0/24",
                              "backends": [{"address": "10.9.0.1", "port": 80}]}],
        }]},
    })


def test_plan_groups_follow_endpoint_changes() -> None:
    def plan_for(*endpoints: dict[str, Any]) -> Any:
        index = EndpointIndex.of([service()], [eps("web-a", list(endpoints))])
        (listener,) = build_plan([lb()], index.backends).listeners
        return listener

    both = plan_for(endpoint("10.0.0.1"), endpoint("10.0.0.2"))
    assert both.default.backends == (Backend("10.0.0.1", 8080, 1), Backend("10.0.0.2", 8080, 1))
    assert set(both.default.table) == {0, 1}
    assert both.source_routes[0].group.backends == (Backend("10.9.0.1", 80, 1),)

    draining = plan_for(endpoint("10.0.0.1"),
                        endpoint("10.0.0.2", ready=False, serving=True, terminating=True))
    assert draining.default.backends == (Backend("10.0.0.1", 8080, 1),
                                         Backend("10.0.0.2", 8080, 0))
    assert set(draining.default.table) == {0}  # no new flows to the draining endpoint

    removed = plan_for(endpoint("10.0.0.1"))
    assert removed.default.backends == (Backend("10.0.0.1", 8080, 1),)

    none_ready = plan_for(endpoint("10.0.0.2", ready=False, serving=True, terminating=True))
    assert none_ready.default.table == ()  # a group with no eligible backend
    assert plan_for().default.backends == ()


def on(node: str, ep: dict[str, Any]) -> dict[str, Any]:
    return {**ep, "nodeName": node}


def lb_with(policy: str) -> LoadBalancer:
    doc = lb().model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["trafficPolicy"] = policy
    return LoadBalancer.model_validate(doc)


def test_traffic_policy_local_keeps_this_nodes_endpoints_and_the_client_address() -> None:
    slices = [eps("web-a", [on("n1", endpoint("10.0.0.1")), on("n2", endpoint("10.0.0.2"))])]
    plan = build_plan([lb_with("Local")], EndpointIndex.of([service()], slices, "n1").backends)
    (listener,) = plan.listeners
    assert listener.default.backends == (Backend("10.0.0.1", 8080, 1),)
    assert not listener.source_nat and plan.untouched == ()


def test_traffic_policy_local_without_a_local_endpoint_leaves_the_listener_alone() -> None:
    slices = [eps("web-a", [on("n2", endpoint("10.0.0.2"))])]
    plan = build_plan([lb_with("Local")], EndpointIndex.of([service()], slices, "n1").backends)
    assert plan.listeners == () and plan.untouched == ("default/web/http",)


def test_traffic_policy_cluster_takes_any_endpoint_with_source_nat() -> None:
    slices = [eps("web-a", [on("n1", endpoint("10.0.0.1")), on("n2", endpoint("10.0.0.2"))])]
    plan = build_plan([lb_with("Cluster")], EndpointIndex.of([service()], slices, "n1").backends)
    (listener,) = plan.listeners
    assert len(listener.default.backends) == 2 and listener.source_nat
