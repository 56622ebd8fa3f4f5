"""LoadBalancer status from Nodes and NodeState reports (pure)."""

from __future__ import annotations

import datetime
from typing import Any

from xdplb.k8s.conditions import (
    NodeInfo,
    NodeReport,
    Verdict,
    lb_status,
    listener_counts,
    same_status,
    selector_matches,
    status_events,
    with_transition_times,
)

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
OK = Verdict(True, "Accepted", "valid: 1 listener")
UID = "uid-1"


def lb(generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "default", "name": "web", "uid": UID,
                         "generation": generation},
            "spec": {"listeners": [{"name": "http", "protocol": "TCP", "port": 80,
                                    "backends": [{"address": "10.0.0.1", "port": 80},
                                                 {"address": "10.0.0.2", "port": 80}],
                                    "sourceRoutes": [{"cidr": "10.1.0.0/16", "backends": [
                                        {"address": "10.0.0.1", "port": 80},
                                        {"address": "10.0.0.3", "port": 80}]}]}], **spec}}


def node(name: str, os: str = "linux", deleting: bool = False, **labels: str) -> NodeInfo:
    return NodeInfo(name, {"kubernetes.io/os": os, **labels}, deleting)


def report(*entries: dict[str, Any], age: float = 1.0, error: str | None = None,
           interfaces: list[dict[str, Any]] | None = None) -> NodeReport:
    beat = (NOW - datetime.timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return NodeReport.from_status({"heartbeatTime": beat, "loadBalancers": list(entries),
                                   "error": error, "interfaces": interfaces or []})


def entry(generation: int = 1, phase: str = "Applied", uid: str = UID, message: str = ""
          ) -> dict[str, Any]:
    return {"namespace": "default", "name": "web", "uid": uid, "generation": generation,
            "phase": phase, "message": message}


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_programmed_when_every_selected_node_applied_this_generation() -> None:
    nodes = [node("a"), node("b"), node("win", os="windows"), node("gone", deleting=True)]
    status = lb_status(lb(2), OK, nodes, {"a": report(entry(2)), "b": report(entry(2))}, NOW)
    assert status["nodes"] == {"selected": 2, "programmed": 2, "summary": "2/2"}
    assert cond(status, "Programmed") == {
        "type": "Programmed", "status": "True", "reason": "Programmed",
        "message": "2/2 nodes applied generation 2", "observedGeneration": 2}
    assert cond(status, "Degraded")["status"] == "False"
    assert status["observedGeneration"] == 2
    assert status["listeners"] == [{"name": "http", "backends": 3}]


def test_pending_nodes_are_named() -> None:
    reports = {"a": report(entry(1)), "b": report(entry(2)),
               "c": report(entry(2, uid="an-older-object"))}
    status = lb_status(lb(2), OK, [node(n) for n in "abcd"], reports, NOW)
    prog = cond(status, "Programmed")
    assert prog["status"] == "False" and prog["reason"] == "Pending"
    assert prog["message"] == ("1/4 nodes applied generation 2; waiting for a (at generation 1),"
                               " c (not applied yet), d (no report)")
    assert status["nodes"]["summary"] == "1/4"


def test_silent_node_is_not_programmed_and_degrades() -> None:
    status = lb_status(lb(), OK, [node("a"), node("b")],
                       {"a": report(entry(), age=31), "b": report(entry(), age=29)}, NOW)
    assert status["nodes"]["summary"] == "1/2"
    assert cond(status, "Degraded")["message"] == "a: no heartbeat for 31s"
    fast = lb_status(lb(), OK, [node("b")], {"b": report(entry(), age=3)}, NOW, silence=2)
    assert fast["nodes"]["summary"] == "0/1"


def test_failures_and_node_errors_are_listed_in_degraded() -> None:
    reports = {"a": report(entry(phase="Failed", message="map full")),
               "b": report(entry(), interfaces=[{"name": "eth9", "attached": False,
                                                 "error": "no such interface"}])}
    status = lb_status(lb(), OK, [node("a"), node("b")], reports, NOW)
    deg = cond(status, "Degraded")
    assert deg["status"] == "True" and deg["reason"] == "NodeErrors"
    assert deg["message"] == "a: map full; b: interface eth9: no such interface"
    assert status["nodes"]["summary"] == "1/2"


def test_node_selector_and_the_agents_own_selector() -> None:
    nodes = [node("a", pool="edge"), node("b", pool="core"), node("c", pool="edge", lb="no")]
    reports = {n: report(entry()) for n in "abc"}
    s = lb_status(lb(nodeSelector={"pool": "edge"}), OK, nodes, reports, NOW,
                  agent_selector={"kubernetes.io/os": "linux"})
    assert s["nodes"]["summary"] == "2/2"
    s = lb_status(lb(nodeSelector={"matchExpressions": [
        {"key": "lb", "operator": "DoesNotExist"}]}), OK, nodes, reports, NOW)
    assert s["nodes"]["summary"] == "2/2"
    assert lb_status(lb(), OK, nodes, reports, NOW, agent_selector={"lb": "no"}
                     )["nodes"]["summary"] == "1/1"
    none = lb_status(lb(nodeSelector={"pool": "nowhere"}), OK, nodes, reports, NOW)
    assert cond(none, "Programmed")["reason"] == "NoNodes"


def test_selector_forms() -> None:
    labels = {"a": "1", "b": "2"}
    assert selector_matches(None, labels) and selector_matches({}, labels)
    assert selector_matches({"a": "1"}, labels) and not selector_matches({"a": "2"}, labels)
    assert selector_matches({"matchLabels": {"b": "2"}, "matchExpressions": [
        {"key": "a", "operator": "In", "values": ["1", "3"]},
        {"key": "c", "operator": "NotIn", "values": ["x"]},
        {"key": "b", "operator": "Exists"}]}, labels)
    assert not selector_matches({"matchExpressions": [
        {"key": "a", "operator": "NotIn", "values": ["1"]}]}, labels)


def test_not_accepted_is_neither_programmed_nor_degraded() -> None:
    bad = Verdict(False, "Conflicted", "listener 'http' overlaps ...")
    status = lb_status(lb(), bad, [node("a")], {"a": report(entry())}, NOW)
    assert cond(status, "Accepted") == {"type": "Accepted", "status": "False",
                                        "reason": "Conflicted", "observedGeneration": 1,
                                        "message": "listener 'http' overlaps ..."}
    assert cond(status, "Programmed")["reason"] == "NotAccepted"
    assert status["nodes"]["programmed"] == 0


def test_transition_times_and_events() -> None:
    first = lb_status(lb(), OK, [node("a")], {}, NOW)
    c1 = with_transition_times(first["conditions"], None, NOW)
    assert all(c["lastTransitionTime"] == "2026-01-01T12:00:00Z" for c in c1)
    assert status_events(None, c1) == [("Normal", "Accepted", "valid: 1 listener")]

    later = NOW + datetime.timedelta(seconds=5)
    second = lb_status(lb(), OK, [node("a")], {"a": report(entry())}, later)
    c2 = with_transition_times(second["conditions"], c1, later)
    times = {c["type"]: c["lastTransitionTime"] for c in c2}
    assert times == {"Accepted": "2026-01-01T12:00:00Z", "Programmed": "2026-01-01T12:00:05Z",
                     "Degraded": "2026-01-01T12:00:00Z"}
    assert status_events(c1, c2) == [("Normal", "Programmed", "1/1 nodes applied generation 1")]
    assert status_events(c2, c2) == []

    failing = lb_status(lb(), OK, [node("a")], {"a": report(entry(phase="Failed",
                                                                   message="boom"))}, later)
    c3 = with_transition_times(failing["conditions"], c2, later)
    assert status_events(c2, c3) == [("Warning", "Degraded", "a: boom")]
    assert status_events(c3, c2) == [("Normal", "Programmed", "1/1 nodes applied generation 1"),
                                     ("Normal", "Recovered", "no node reports an error")]
    assert same_status({**second, "conditions": c2}, second)
    assert not same_status({**first, "conditions": c1}, second)


def test_listener_counts_resolve_service_groups() -> None:
    spec = {"listeners": [
        {"name": "a", "protocol": "UDP", "service": {"name": "dns", "port": "dns"},
         "sourceRoutes": [{"cidr": "10.0.0.0/8", "service": {"name": "dns2", "port": 53}},
                          {"cidr": "10.1.0.0/16", "backends": [{"address": "10.9.9.9",
                                                                "port": 53}]}]},
        {"name": "b", "protocol": "TCP", "backends": [{"address": "10.0.0.1", "port": 80}]}]}
    seen = []

    def resolve(ns: str, svc: Any, proto: str) -> list[tuple[str, int]]:
        seen.append((ns, svc["name"], proto))
        return {"dns": [("10.0.0.1", 53), ("10.0.0.2", 53)],
                "dns2": [("10.0.0.2", 53), ("10.0.0.3", 53)]}[svc["name"]]

    assert listener_counts(spec, "kube-system", resolve) == [
        {"name": "a", "backends": 4}, {"name": "b", "backends": 1}]
    assert seen == [("kube-system", "dns", "UDP"), ("kube-system", "dns2", "UDP")]
    assert listener_counts(spec) == [{"name": "a", "backends": 1}, {"name": "b", "backends": 1}]
