"""Validated LoadBalancer specs -> Plan (pure)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from xdplb.plan.model import (
    Backend,
    Group,
    HealthCheck,
    Listener,
    Plan,
    SniRoute,
    SourceRoute,
    Target,
)
from xdplb.spec import model as spec

# (namespace, Service port, protocol, this node's endpoints only, address family 4 or 6)
# -> its backends now: plan.endpoints.EndpointIndex.
ServiceResolver = Callable[[str, spec.ServiceRef, str, bool, int], Iterable[Backend]]


def _no_services(namespace: str, ref: spec.ServiceRef, protocol: str,
                 local: bool, family: int) -> Iterable[Backend]:
    raise ValueError(f"Service {namespace}/{ref.name} needs a resolver (Kubernetes mode)")


def health_check(hc: spec.HealthCheck | None) -> HealthCheck | None:
    if hc is None:
        return None
    return HealthCheck(hc.protocol, hc.port, float(hc.interval_seconds),
                       float(hc.timeout_seconds), hc.healthy_threshold, hc.unhealthy_threshold,
                       (hc.payload or "").encode())


def plan_listener(lb: spec.LoadBalancer, lst: spec.Listener,
                  services: ServiceResolver = _no_services,
                  down: frozenset[Target] = frozenset(),
                  groups: dict[Group, Group] | None = None) -> Listener:
    """`down`: health-check targets that failed; their backends get weight 0.
    `groups`: the groups planned so far, so equal groups are one object (100,000
    routes to the same backends hold one group, and compare by identity)."""
    targets: set[Target] = set()
    known: dict[Group, Group] = {} if groups is None else groups
    family = 6 if lst.family == "IPv6" else 4
    # Routes of one pool share one backend list (spec.LoadBalancer.parse): its group,
    # by the list's identity, when nothing else shapes it.
    by_list: dict[int, Group] = {}

    def _group(group: spec.Listener | spec.SourceRoute | spec.SniRoute) -> Group:
        fixed = (group.service is None and lst.health_check is None
                 and getattr(group, "health_check", None) is None)
        if fixed and (g := by_list.get(id(group.backends))) is not None:
            return g
        g = _new_group(group)
        g = known.setdefault(g, g)
        if fixed:
            by_list[id(group.backends)] = g
        return g

    def _new_group(group: spec.Listener | spec.SourceRoute | spec.SniRoute) -> Group:
        if group.service is not None:
            backends = list(services(lb.metadata.namespace, group.service, lst.protocol,
                                     lb.spec.traffic_policy == "Local", family))
        else:
            backends = [Backend(b.address, b.port, b.weight) for b in group.backends or ()]
        check = health_check(getattr(group, "health_check", None) or lst.health_check)
        if check is None:
            return Group.of(backends)
        checked = []
        for b in backends:
            t = Target(b.address, check.port or b.port, check)
            targets.add(t)
            checked.append(replace(b, weight=0, healthy=False) if t in down else b)
        return Group.of(checked)

    return Listener(
        owner=f"{lb.metadata.namespace}/{lb.metadata.name}",
        name=lst.name,
        address=lst.address,
        port=lst.port,
        protocol=lst.protocol,
        interfaces=tuple(lb.spec.interfaces or ()),
        default=_group(lst),
        source_routes=tuple(sorted((SourceRoute(r.cidr, _group(r))
                                    for r in lst.source_routes), key=SourceRoute.sort_key)),
        sni_routes=tuple(sorted((SniRoute(r.hostname, _group(r))
                                 for r in lst.sni_routes), key=lambda r: r.hostname)),
        client_ip_affinity=lst.session_affinity == "ClientIP",
        proxy_protocol=lst.proxy_protocol == "v2",
        # trafficPolicy Cluster: an endpoint on another node answers this one, not the client.
        source_nat=lst.source_nat == "Node" or lb.spec.traffic_policy == "Cluster",
        health_targets=tuple(sorted(targets)),
        family=family,
    )


# A memo for the listeners of one LoadBalancer: (spec, compute) -> listeners.
Memo = Callable[[spec.LoadBalancer, Callable[[], list[Listener]]], list[Listener]]


class PlanMemo:
    """A Memo by LoadBalancer object: the agents keep the objects of unchanged
    manifests, so a change re-plans one LoadBalancer, not all of them. Listeners
    are reused only when they depend on the spec alone: not with Service groups,
    whose endpoints move, nor health checks, whose results do."""

    def __init__(self) -> None:
        # id -> (the object, which keeps its id unique; its listeners, None: computed each time)
        self._plans: dict[int, tuple[spec.LoadBalancer, list[Listener] | None]] = {}

    def __call__(self, lb: spec.LoadBalancer,
                 compute: Callable[[], list[Listener]]) -> list[Listener]:
        if id(lb) not in self._plans:
            dynamic = any(g.service is not None or getattr(g, "health_check", None) is not None
                          for lst in lb.spec.listeners
                          for g in lst.groups())
            self._plans[id(lb)] = (lb, None if dynamic else compute())
        listeners = self._plans[id(lb)][1]
        return compute() if listeners is None else listeners

    def keep_only(self, lbs: Iterable[spec.LoadBalancer]) -> None:
        live = {id(lb) for lb in lbs}
        self._plans = {k: v for k, v in self._plans.items() if k in live}


def build_plan(lbs: Iterable[spec.LoadBalancer],
               services: ServiceResolver = _no_services,
               down: frozenset[Target] = frozenset(),
               memo: Memo | None = None) -> Plan:
    listeners, untouched = [], []
    groups: dict[Group, Group] = {}
    for lb in lbs:
        def compute(lb: spec.LoadBalancer = lb) -> list[Listener]:
            return [plan_listener(lb, lst, services, down, groups) for lst in lb.spec.listeners]

        for lst, planned in zip(lb.spec.listeners, memo(lb, compute) if memo else compute(),
                                strict=True):
            # trafficPolicy Local on a node without a local endpoint: leave the traffic
            # to whatever else serves it here, rather than refuse it.
            if (lb.spec.traffic_policy == "Local" and lst.service is not None
                    and not planned.default.backends):
                untouched.append(planned.label)
            else:
                listeners.append(planned)
    listeners.sort(key=lambda lst: (lst.owner, lst.name))
    return Plan(tuple(listeners), tuple(sorted(untouched)))
