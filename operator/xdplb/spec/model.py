"""The LoadBalancer manifest: the one source of truth for configuration.

The models carry the field types of :mod:`xdplb.spec.fields` and declare their
cross-field rules in CEL, so that both reach the CRD's schema. ``LoadBalancer``
runs :func:`xdplb.spec.rules.check_rules` once every field is valid, so
``LoadBalancer.model_validate`` is always complete.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from xdplb.spec.api import ApiVersion
from xdplb.spec.bounds import (
    MAX_BACKENDS_PER_GROUP,
    MAX_INTERFACES,
    MAX_LISTENERS,
    MAX_NODE_SELECTOR_LABELS,
    MAX_ROUTES_PER_LISTENER,
)
from xdplb.spec.cel import CelRule, cel_string
from xdplb.spec.errors import RULES_ERROR
from xdplb.spec.fields import (
    LABEL_KEY_PATTERN,
    LABEL_KEY_PREFIX_PATTERN,
    BackendAddress,
    Cidr,
    Hostname,
    InterfaceName,
    LabelKey,
    LabelValue,
    ListenerName,
    NamespaceName,
    ObjectName,
    Port,
    ServiceName,
    ServicePort,
    VipAddress,
    Weight,
    family_of,
)
from xdplb.spec.rules import check_rules

__all__ = [
    "Backend",
    "HealthCheck",
    "Listener",
    "LoadBalancer",
    "LoadBalancerSpec",
    "Metadata",
    "ServiceRef",
    "SniRoute",
    "SourceRoute",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # Cross-field rules of this object, and of some of its fields (by alias): the
    # schema below carries them, xdplb.spec.celcheck evaluates them.
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()
    cel_field_rules: ClassVar[dict[str, tuple[CelRule, ...]]] = {}

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        target = handler.resolve_ref_schema(json_schema)
        # An optional field is omitted, never null (the API server prunes nulls): keep
        # only its value schema, which is what a structural CRD schema needs.
        for prop in target.get("properties", {}).values():
            branches = prop.get("anyOf", [])
            if len(branches) == 2 and {"type": "null"} in branches:
                (value,) = (b for b in branches if b != {"type": "null"})
                del prop["anyOf"]
                if prop.get("default", 0) is None:
                    del prop["default"]
                prop.update(value)
        if cls.cel_rules:
            target["x-kubernetes-validations"] = [r.schema() for r in cls.cel_rules]
        for alias, rules in cls.cel_field_rules.items():
            target["properties"][alias]["x-kubernetes-validations"] = [r.schema() for r in rules]
        return json_schema


class Backend(_Model):
    """One real server; traffic is split by weight (0 = no new connections)."""

    address: BackendAddress = Field(
        description="the backend's address, of the listener's family (IPv4 or IPv6)")
    port: Port = Field(description="the backend's port")
    weight: Weight = Field(
        default=1, description="share of new flows, relative to the group's other backends")

    @property
    def endpoint(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


class ServiceRef(_Model):
    """A Service port of the LoadBalancer's namespace; its EndpointSlices are the backends."""

    name: ServiceName = Field(description="the Service's name")
    port: ServicePort = Field(
        description="a port of the Service, by name or by number (of the listener's protocol)")


class HealthCheck(_Model):
    """Active probes of a group's backends from each node: a backend that fails
    `unhealthyThreshold` in a row gets no new flows (open flows continue) until
    it passes `healthyThreshold` in a row."""

    cel_rules = (
        CelRule("self.timeoutSeconds <= self.intervalSeconds",
                "must not exceed intervalSeconds", ".timeoutSeconds"),
        CelRule("self.protocol == 'UDP' || !has(self.payload)",
                "is sent by UDP probes only", ".payload"),
    )

    protocol: Literal["TCP", "UDP"] = Field(
        description="TCP: connect; UDP: send payload, expect any answer")
    port: Port | None = Field(default=None, description="omitted: each backend's port")
    interval_seconds: Annotated[int, Field(strict=True, ge=1, le=300)] = Field(
        default=5, alias="intervalSeconds", description="seconds between probes of a backend")
    timeout_seconds: Annotated[int, Field(strict=True, ge=1, le=60)] = Field(
        default=1, alias="timeoutSeconds",  # 1: never above the shortest interval
        description="seconds a probe may take before it counts as failed")
    healthy_threshold: Annotated[int, Field(strict=True, ge=1, le=10)] = Field(
        default=2, alias="healthyThreshold",
        description="passes in a row that bring a failed backend back")
    unhealthy_threshold: Annotated[int, Field(strict=True, ge=1, le=10)] = Field(
        default=3, alias="unhealthyThreshold",
        description="failures in a row after which a backend gets no new flows")
    payload: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="the UDP probe's datagram; omitted: an empty one")


# A listener's default group or a route's group: inline backends or a Service.
_BackendList = Annotated[list[Backend], Field(min_length=1, max_length=MAX_BACKENDS_PER_GROUP)]
_LISTS = "backend lists"  # the validation context's key: see _shared_list


def _shared_list(value: Any, handler: ValidatorFunctionWrapHandler,
                 info: ValidationInfo) -> Any:
    """A route's backend list, validated once per distinct list in one
    LoadBalancer.parse() and then shared: routes mostly name a few pools, and
    100,000 routes' own copies would hold ~50 MB and take ~0.5 s to build.
    Models are never changed after validation."""
    lists = (info.context or {}).get(_LISTS)
    if lists is None or not isinstance(value, list):
        return handler(value)
    # The raw JSON's repr tells every value and type apart (strict fields tell 1
    # from True and "1"); the same list in another key order is only not shared.
    key = repr(value)
    if key not in lists:
        lists[key] = handler(value)
    return lists[key]


_RouteBackendList = Annotated[_BackendList, WrapValidator(_shared_list)]
_GROUP_RULES = (
    CelRule("has(self.backends) || has(self.service)", "is required", ".backends"),
    CelRule(
        "!(has(self.backends) && has(self.service))",
        "name either backends or a service, not both",
    ),
)


class SourceRoute(_Model):
    """Clients from `cidr` go to `backends` instead of the listener's default group."""

    cel_rules = _GROUP_RULES

    cidr: Cidr = Field(description="client network; the longest prefix matching a client wins")
    backends: _RouteBackendList | None = Field(default=None,
                                              description="the route's backends")
    service: ServiceRef | None = None
    health_check: HealthCheck | None = Field(
        default=None, alias="healthCheck", description="omitted: the listener's")


class SniRoute(_Model):
    """TLS connections naming `hostname` go to `backends`."""

    cel_rules = _GROUP_RULES

    hostname: Hostname = Field(
        description="server name of the ClientHello, matched exactly, in any case")
    backends: _RouteBackendList | None = Field(default=None,
                                              description="the route's backends")
    service: ServiceRef | None = None
    health_check: HealthCheck | None = Field(
        default=None, alias="healthCheck", description="omitted: the listener's")


class Listener(_Model):
    """A (VIP, port, protocol) to balance; `address` omitted means every local address of
    its family. A listener serves one address family: its address's, else `ipFamily`'s,
    else its backends'; for dual-stack, write a listener per family."""

    cel_rules = (
        *_GROUP_RULES,
        CelRule(
            "!has(self.address) || !has(self.ipFamily)"
            " || (self.ipFamily == 'IPv6') == self.address.contains(':')",
            "must be the family of the address",
            ".ipFamily",
        ),
        CelRule(
            "!has(self.backends) || self.backends.all(b, b.address.contains(':') == (has("
            "self.address) ? self.address.contains(':') : has(self.ipFamily) ? self.ipFamily"
            " == 'IPv6' : self.backends[0].address.contains(':')))",
            "must all be of the listener's address family (no NAT64): write a listener per"
            " family",
            ".backends",
        ),
        CelRule(
            "self.protocol == 'TCP' || !has(self.sniRoutes) || size(self.sniRoutes) == 0",
            "sniRoutes are allowed only with protocol TCP",
            ".sniRoutes",
        ),
        # XDP rewrites packets and cannot add a header: only flows through the SNI
        # acceptor can carry one, and source routes bypass it.
        CelRule(
            "!has(self.proxyProtocol) || (has(self.sniRoutes) && size(self.sniRoutes) > 0)",
            "proxyProtocol needs sniRoutes (the header is added by the SNI acceptor)",
            ".proxyProtocol",
        ),
        CelRule(
            "!has(self.proxyProtocol) || !has(self.sourceRoutes) || size(self.sourceRoutes) == 0",
            "proxyProtocol cannot be combined with sourceRoutes (source-routed flows bypass"
            " the SNI acceptor)",
            ".proxyProtocol",
        ),
    )

    name: ListenerName = Field(description="unique within the LoadBalancer")
    protocol: Literal["TCP", "UDP"] = Field(description="transport protocol of the listener")
    port: Port = Field(description="port the clients connect to")
    address: VipAddress | None = Field(
        default=None, description="VIP (IPv4 or IPv6); omitted = every address of its family")
    ip_family: Literal["IPv4", "IPv6"] | None = Field(
        default=None, alias="ipFamily",
        description="the family of a listener without an address (with one, its family);"
        " omitted: its backends', else IPv4")
    backends: _BackendList | None = Field(
        default=None, description="the default group: clients that no route claims")
    service: ServiceRef | None = None
    health_check: HealthCheck | None = Field(
        default=None, alias="healthCheck",
        description="probes for this listener's groups; omitted: none")
    source_routes: list[SourceRoute] = Field(
        default_factory=list, alias="sourceRoutes", max_length=MAX_ROUTES_PER_LISTENER,
        description="groups by client network; they win over sniRoutes",
    )
    sni_routes: list[SniRoute] = Field(
        default_factory=list, alias="sniRoutes", max_length=MAX_ROUTES_PER_LISTENER,
        description="groups by TLS server name (TLS is not terminated)",
    )
    session_affinity: Literal["None", "ClientIP"] = Field(
        default="None", alias="sessionAffinity",
        description="None: a backend per flow; ClientIP: a backend per client address")
    source_nat: Literal["None", "Node"] = Field(
        default="None", alias="sourceNAT",
        description="None: backends see the client's address and must route replies via this"
        " node; Node: new flows leave from the node's address toward the backend",
    )
    proxy_protocol: Literal["v2"] | None = Field(
        default=None, alias="proxyProtocol",
        description="v2: the SNI acceptor opens each backend connection with a PROXY v2 header",
    )

    @property
    def is_sni(self) -> bool:
        return bool(self.sni_routes)

    @property
    def family(self) -> str:
        """IPv4 or IPv6 (see the class)."""
        if self.address:
            return family_of(self.address)
        if self.ip_family:
            return self.ip_family
        return family_of(self.backends[0].address) if self.backends else "IPv4"

    @property
    def identity(self) -> tuple[str | None, int, str, str]:
        """What must be unique among all listeners of a node (a listener without an
        address takes every address of its family)."""
        return (self.address, self.port, self.protocol, self.family)

    @property
    def endpoint(self) -> str:
        if self.address is None:
            host = "*" if self.family == "IPv4" else "[::]"
        else:
            host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}/{self.protocol}"

    def groups(self) -> tuple[Listener | SourceRoute | SniRoute, ...]:
        """Its default group (itself) and its routes' groups."""
        return (self, *self.source_routes, *self.sni_routes)


class LoadBalancerSpec(_Model):
    cel_field_rules = {
        "nodeSelector": (
            CelRule(
                f"self.all(k, k.matches({cel_string(LABEL_KEY_PATTERN)})"
                f" && k.matches({cel_string(LABEL_KEY_PREFIX_PATTERN)}))",
                "keys must be label keys: [DNS subdomain '/'] name of 1 to 63 letters, digits,"
                " '-', '_' or '.'",
            ),
        )
    }

    interfaces: (
        Annotated[list[InterfaceName], Field(min_length=1, max_length=MAX_INTERFACES)] | None
    ) = Field(default=None, description="Interfaces to attach to; omitted = default route's")
    node_selector: (
        Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_NODE_SELECTOR_LABELS)] | None
    ) = Field(
        default=None,
        alias="nodeSelector",
        description="Labels a Node must have to serve this LoadBalancer; omitted = every node",
    )
    traffic_policy: Literal["Cluster", "Local"] | None = Field(
        default=None, alias="trafficPolicy",
        description="Service groups (Kubernetes mode): Cluster = any endpoint, with source NAT;"
        " Local = only this node's endpoints, client address kept (a node without one leaves"
        " the listener's traffic untouched); omitted = any endpoint, per listener sourceNAT")
    listeners: Annotated[list[Listener], Field(min_length=1, max_length=MAX_LISTENERS)] = Field(
        description="what to balance: one entry per (address, port, protocol)")


class Metadata(BaseModel):
    # Kubernetes adds labels, uid, resourceVersion, ...: keep them, check only ours.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: ObjectName = Field(description="unique among the LoadBalancers of a namespace")
    namespace: NamespaceName = Field(
        default="default", description="where a group's service is looked up")


class LoadBalancer(_Model):
    """A LoadBalancer manifest (xdplb.io/v1alpha1)."""

    api_version: ApiVersion = Field(alias="apiVersion")
    kind: Literal["LoadBalancer"]
    metadata: Metadata
    spec: LoadBalancerSpec
    status: dict[str, Any] | None = Field(
        default=None, description="written by the operator; never read back")

    @classmethod
    def parse(cls, doc: Any) -> LoadBalancer:
        """model_validate, with equal route backend lists made one (_shared_list)."""
        return cls.model_validate(doc, context={_LISTS: {}})

    @property
    def qualified_name(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @model_validator(mode="after")
    def _rules(self) -> LoadBalancer:
        # Runs only when every field is valid; paths travel in ctx for format_errors.
        if problems := check_rules(self):
            summary = "; ".join(f"{path}: {msg}" for path, msg in problems)
            raise PydanticCustomError(
                RULES_ERROR, "{summary}", {"summary": summary, "problems": problems}
            )
        return self
