"""Validated LoadBalancer specs -> Plan (pure)."""

from __future__ import annotations

from collections.abc import Iterable

from xdplb.plan.model import Backend, Group, Listener, Plan, SniRoute, SourceRoute
from xdplb.spec import model as spec


def _group(backends: Iterable[spec.Backend]) -> Group:
    return Group.of([Backend(b.address, b.port, b.weight) for b in backends])


def plan_listener(lb: spec.LoadBalancer, lst: spec.Listener) -> Listener:
    return Listener(
        owner=f"{lb.metadata.namespace}/{lb.metadata.name}",
        name=lst.name,
        address=lst.address,
        port=lst.port,
        protocol=lst.protocol,
        interfaces=tuple(lb.spec.interfaces or ()),
        default=_group(lst.backends),
        source_routes=tuple(sorted((SourceRoute(r.cidr, _group(r.backends))
                                    for r in lst.source_routes), key=lambda r: r.network)),
        sni_routes=tuple(sorted((SniRoute(r.hostname, _group(r.backends))
                                 for r in lst.sni_routes), key=lambda r: r.hostname)),
        client_ip_affinity=lst.session_affinity == "ClientIP",
    )


def build_plan(lbs: Iterable[spec.LoadBalancer]) -> Plan:
    listeners = [plan_listener(lb, lst) for lb in lbs for lst in lb.spec.listeners]
    listeners.sort(key=lambda lst: (lst.owner, lst.name))
    return Plan(tuple(listeners))
