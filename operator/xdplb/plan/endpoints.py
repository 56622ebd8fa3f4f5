"""Service backends: EndpointSlices -> the backends of a group (pure).

A group naming ``service: {name, port}`` gets one backend per endpoint of the
Service's EndpointSlices (label ``kubernetes.io/service-name``, same
namespace):

- ready endpoints get weight 1: they take new flows;
- serving but terminating endpoints get weight 0: no new flows, while the
  flows they already have continue (conntrack keeps them), so a rolling
  update drains instead of cutting connections;
- other endpoints (not serving, or gone) are not in the group; a Service
  without a ready endpoint is a group with no eligible backend.

Port resolution. EndpointSlice ports carry the Service port's *name* and the
target port's *number*. A name in the LoadBalancer is matched against the
slice ports directly. A number is the Service port number (as a client of
the Service would use it): it is looked up in the Service's ``spec.ports``
to find that port's name, then matched like a name. Without the Service
object a number cannot be resolved and the group stays empty.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xdplb.plan.model import Backend
from xdplb.spec.api import Ref
from xdplb.spec.model import ServiceRef

__all__ = ["SERVICE_NAME_LABEL", "EndpointIndex", "service_port_name"]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

Json = Mapping[str, Any]


def service_port_name(service: Json | None, port: int | str, protocol: str) -> str | None:
    """The name of the Service port ``port`` (a name or a Service port number), or None."""
    if isinstance(port, str):
        return port
    for entry in (service or {}).get("spec", {}).get("ports") or []:
        if entry.get("port") == port and entry.get("protocol", "TCP") == protocol:
            return str(entry.get("name") or "")
    return None


def _condition(conditions: Json, key: str, default: bool) -> bool:
    value = conditions.get(key)
    return default if value is None else bool(value)


def _weight(endpoint: Json) -> int | None:
    """1 for new flows, 0 to drain, None to leave the group (EndpointConditions semantics)."""
    cond = endpoint.get("conditions") or {}
    ready = _condition(cond, "ready", True)  # unknown readiness counts as ready
    serving = _condition(cond, "serving", ready)
    terminating = _condition(cond, "terminating", False)
    if ready:
        return 1
    if serving and terminating:
        return 0
    return None


def slice_backends(slices: Iterable[Json], port_name: str, protocol: str,
                   node: str | None = None, family: int = 4) -> tuple[Backend, ...]:
    """The backends that ``slices`` give for the Service port named ``port_name``
    (with ``node``: only the endpoints on that node), of one address family: each
    family's endpoints back that family's listener."""
    weights: dict[tuple[str, int], int] = {}
    address_type = "IPv6" if family == 6 else "IPv4"
    for eps in slices:
        if eps.get("addressType", "IPv4") != address_type:
            continue  # the other family's, and FQDN slices
        ports = [p for p in eps.get("ports") or []
                 if (p.get("name") or "") == port_name and p.get("protocol", "TCP") == protocol
                 and p.get("port")]
        for port in ports:
            for endpoint in eps.get("endpoints") or []:
                if node is not None and endpoint.get("nodeName") != node:
                    continue
                weight = _weight(endpoint)
                addresses = endpoint.get("addresses") or []
                if weight is None or not addresses:
                    continue
                # Addresses are fungible: use the first (canonical, as the spec's are).
                key = (str(ipaddress.ip_address(addresses[0])), int(port["port"]))
                # An endpoint listed twice (slices being rebalanced): ready wins over draining.
                weights[key] = max(weights.get(key, 0), weight)
    return tuple(Backend(address, port, weight) for (address, port), weight in weights.items())


@dataclass(frozen=True)
class EndpointIndex:
    """Services and EndpointSlices of a cluster, by (namespace, Service name)."""

    services: Mapping[Ref, Json] = field(default_factory=dict)
    slices: Mapping[Ref, tuple[Json, ...]] = field(default_factory=dict)
    node: str = ""  # this node, for trafficPolicy Local

    @staticmethod
    def of(services: Iterable[Json], slices: Iterable[Json], node: str = "") -> EndpointIndex:
        by_service: dict[Ref, list[Json]] = defaultdict(list)
        for eps in slices:
            meta = eps.get("metadata") or {}
            name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
            if name:
                by_service[(meta.get("namespace", ""), name)].append(eps)
        return EndpointIndex(
            {(s["metadata"].get("namespace", ""), s["metadata"]["name"]): s for s in services},
            {ref: tuple(items) for ref, items in by_service.items()},
            node,
        )

    def backends(self, namespace: str, ref: ServiceRef, protocol: str,
                 local: bool = False, family: int = 4) -> tuple[Backend, ...]:
        """The group of ``ref`` (the planner's ServiceResolver); ``local``: only the
        endpoints on ``node`` (trafficPolicy Local); ``family``: the listener's."""
        key = (namespace, ref.name)
        port_name = service_port_name(self.services.get(key), ref.port, protocol)
        if port_name is None:
            return ()
        return slice_backends(self.slices.get(key, ()), port_name, protocol,
                              self.node if local else None, family)
