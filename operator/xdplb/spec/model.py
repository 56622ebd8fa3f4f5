"""The LoadBalancer manifest: the one source of truth for configuration.

Field constraints (ge/le/min_length/max_length/pattern) carry the bounds so
that they appear in the JSON schema the CRD is generated from. Small
validators add precise messages and canonical forms. Rules that relate
several items (duplicates, product state) live in :func:`check_rules`, which
reports exact paths; ``LoadBalancer`` runs it once every field is valid, so
``LoadBalancer.model_validate`` is always complete. :func:`format_errors`
turns a ``ValidationError`` into ``<path>: <message>`` lines.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from xdplb.spec.api import ApiVersion
from xdplb.spec.cel import CelRule, cel_string, evaluate

__all__ = [
    "MAX_BACKENDS_PER_GROUP",
    "MAX_LISTENERS",
    "MAX_NODE_SELECTOR_LABELS",
    "MAX_ROUTES_PER_LISTENER",
    "SNI_SUPPORTED",
    "Backend",
    "Listener",
    "LoadBalancer",
    "LoadBalancerSpec",
    "Metadata",
    "ServiceRef",
    "SniRoute",
    "SourceRoute",
    "cel_problems",
    "check_rules",
    "format_errors",
    "hostname_problem",
    "show_value",
]

# Flip once the data plane can steer by TLS SNI; check_rules reads it at call time.
SNI_SUPPORTED = True

MAX_LISTENERS = 64
MAX_BACKENDS_PER_GROUP = 1024
MAX_ROUTES_PER_LISTENER = 10_000
MAX_INTERFACES = 64
MAX_NODE_SELECTOR_LABELS = 64

# Same text for Field(pattern=...) (the schema) and the validators (the messages).
LISTENER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
INTERFACE_PATTERN = r"^[^/:\s]+$"
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
HOSTNAME_PATTERN = rf"^{_LABEL}(\.{_LABEL})+$"
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Kubernetes naming rules, in RE2 syntax (the API server's regex engine).
SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # DNS-1035 label
# IANA service name: a-z, 0-9, single inner '-', at least one letter (at most 15: maxLength).
PORT_NAME_PATTERN = r"^([a-z0-9]+-)*[0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*$"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
# A label key is [DNS subdomain prefix '/'] name; the second pattern caps the prefix at 253.
LABEL_KEY_PATTERN = rf"^({_LABEL}(\.{_LABEL})*/)?{_LABEL_NAME}$"
LABEL_KEY_PREFIX_PATTERN = r"^([-a-z0-9.]{1,253}/)?[^/]*$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

# Error type of the check_rules report; format_errors expands it into lines.
RULES_ERROR = "xdplb_rules"


# --- field validators --------------------------------------------------------
# BeforeValidators run ahead of the Field constraints so a bad value gets a
# specific message; non-strings pass through to get the plain type error.


def _shape(pattern: str, max_len: int, what: str, rule: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if isinstance(value, str) and not (len(value) <= max_len and re.fullmatch(pattern, value)):
            raise ValueError(f"{show_value(value)} is not a valid {what}: {rule}")
        return value

    return BeforeValidator(check)


def hostname_problem(host: str) -> str | None:
    """Explain why ``host`` is not a lower-case ASCII DNS name, or None if it is one."""
    shown = show_value(host)
    if not host.isascii():
        try:
            hint = f": use the IDNA form {host.encode('idna').decode('ascii')!r}"
        except UnicodeError:
            hint = ""
        return f"{shown} must be ASCII{hint}"
    if host != host.lower():
        return f"{shown} must be lower-case"
    if len(host) > 253:
        return f"{shown} is longer than 253 characters"
    labels = host.split(".")
    if len(labels) < 2:
        return f"{shown} must have at least two labels, like example.com"
    for label in labels:
        if not label:
            return f"{shown} has an empty label"
        if label == "*":
            return f"{shown}: wildcard hostnames are not supported"
        if len(label) > 63:
            return f"{shown}: label {show_value(label)} is longer than 63 characters"
        if not re.fullmatch(r"[a-z0-9-]+", label):
            return f"{shown}: label {show_value(label)} may contain only a-z, 0-9 and '-'"
        if label.startswith("-") or label.endswith("-"):
            return f"{shown}: label {show_value(label)} must not start or end with '-'"
    if not re.fullmatch(HOSTNAME_PATTERN, host):  # backstop: the schema pattern decides
        return f"{shown} is not a valid hostname"
    return None


def _check_hostname(value: Any) -> Any:
    if isinstance(value, str) and (problem := hostname_problem(value)):
        raise ValueError(problem)
    return value


# Canonical dotted quads (no leading zeros): the common case, checked without
# ipaddress, which costs ~20 µs a call (2 s for 100,000 routes).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_ADDRESS = re.compile(rf"({_OCTET})(?:\.{_OCTET}){{3}}")
_CANONICAL_CIDR = re.compile(rf"({_OCTET}(?:\.{_OCTET}){{3}})/(3[0-2]|[12]?[0-9])")


def _check_unicast(addr: ipaddress.IPv4Address, value: str) -> None:
    # Nothing can be sent to or served on these, so they are always mistakes.
    if addr.is_unspecified:
        raise ValueError(f"{show_value(value)} is the unspecified address")
    if addr.is_multicast:
        raise ValueError(f"{show_value(value)} is a multicast address")
    if addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{show_value(value)} is the broadcast address")


def _ipv4_address(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if (m := _CANONICAL_ADDRESS.fullmatch(value)) and 0 < int(m[1]) < 224:
        return value  # canonical and unicast: what the checks below would return
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{show_value(value)} is not a valid IP address") from None
    if addr.version == 6:
        raise ValueError(f"{show_value(value)} is an IPv6 address: IPv6 is not supported yet")
    _check_unicast(addr, value)
    return str(addr)


def _vip_address(value: Any) -> Any:
    if value == "0.0.0.0":  # wildcard is spelled by omission, keeping listener identity unique
        raise ValueError("'0.0.0.0' is the unspecified address: omit address to listen on all")
    return _ipv4_address(value)


def _ipv4_network(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if m := _CANONICAL_CIDR.fullmatch(value):
        addr = int.from_bytes(socket.inet_aton(m[1]), "big")
        if not addr & ((1 << (32 - int(m[2]))) - 1):
            return value
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{show_value(value)} is not a valid CIDR") from None
    if net.version == 6:
        raise ValueError(f"{show_value(value)} is an IPv6 network: IPv6 is not supported yet")
    if net.network_address != ipaddress.ip_interface(value).ip:
        raise ValueError(f"{show_value(value)} has host bits set (the network is {str(net)!r})")
    return str(net)


Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
Weight = Annotated[int, Field(strict=True, ge=0, le=65535)]
# "format" lets the API server reject malformed values before we ever see them.
BackendAddress = Annotated[
    str, Field(json_schema_extra={"format": "ipv4"}), BeforeValidator(_ipv4_address)
]
VipAddress = Annotated[
    str, Field(json_schema_extra={"format": "ipv4"}), BeforeValidator(_vip_address)
]
Cidr = Annotated[str, Field(json_schema_extra={"format": "cidr"}), BeforeValidator(_ipv4_network)]
Hostname = Annotated[
    str,
    Field(min_length=1, max_length=253, pattern=HOSTNAME_PATTERN),
    BeforeValidator(_check_hostname),
]
ListenerName = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=LISTENER_NAME_PATTERN),
    _shape(
        LISTENER_NAME_PATTERN,
        63,
        "listener name",
        "use 1 to 63 lower-case letters, digits and '-', starting and ending with a letter"
        " or digit",
    ),
]
InterfaceName = Annotated[
    str,
    Field(min_length=1, max_length=15, pattern=INTERFACE_PATTERN),
    _shape(
        INTERFACE_PATTERN, 15, "interface name", "use 1 to 15 characters, no '/', ':' or spaces"
    ),
]
ObjectName = Annotated[
    str,
    Field(min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN),
    _shape(OBJECT_NAME_PATTERN, 253, "name", "use a lower-case DNS subdomain (RFC 1123)"),
]
NamespaceName = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=LISTENER_NAME_PATTERN),
    _shape(LISTENER_NAME_PATTERN, 63, "namespace", "use a lower-case DNS label (RFC 1123)"),
]
ServiceName = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=SERVICE_NAME_PATTERN),
    _shape(
        SERVICE_NAME_PATTERN,
        63,
        "Service name",
        "use 1 to 63 lower-case letters, digits and '-', starting with a letter (RFC 1035)",
    ),
]


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a Kubernetes label key, or None if it is one."""
    shown = show_value(key)
    prefix, _, name = key.rpartition("/")
    if "/" in prefix:
        return f"{shown} is not a valid label key: at most one '/'"
    if prefix and (len(prefix) > 253 or not re.fullmatch(OBJECT_NAME_PATTERN, prefix)):
        return f"{shown} is not a valid label key: the prefix must be a DNS subdomain"
    if not (len(name) <= 63 and re.fullmatch(_LABEL_NAME, name)):
        return (
            f"{shown} is not a valid label key: the name must be 1 to 63 letters, digits,"
            " '-', '_' or '.', starting and ending with a letter or digit"
        )
    return None


def _label_key(value: Any) -> Any:
    if isinstance(value, str) and (problem := label_key_problem(value)):
        raise ValueError(problem)
    return value


LabelKey = Annotated[str, BeforeValidator(_label_key)]
LabelValue = Annotated[
    str,
    Field(max_length=63, pattern=LABEL_VALUE_PATTERN),
    _shape(
        LABEL_VALUE_PATTERN,
        63,
        "label value",
        "use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter"
        " or digit",
    ),
]


def _service_port(value: Any) -> Any:
    # A Service port is named by its name or its number, as in a Service's targetPort.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{show_value(value)} is not a port number or name")
    if isinstance(value, int) and not 1 <= value <= 65535:
        raise ValueError(f"{show_value(value)} is not a valid port")
    if isinstance(value, str) and not (len(value) <= 15 and re.fullmatch(PORT_NAME_PATTERN, value)):
        raise ValueError(
            f"{show_value(value)} is not a valid port name: use 1 to 15 lower-case letters,"
            " digits and single inner '-', with at least one letter"
        )
    return value


# int-or-string: the bounds outside anyOf apply to the matching type only, which keeps
# the schema structural; the CEL cost estimator never sees this field.
ServicePort = Annotated[
    int | str,
    BeforeValidator(_service_port),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "minimum": 1,
            "maximum": 65535,
            "maxLength": 15,
            "pattern": PORT_NAME_PATTERN,
        }
    ),
]


# --- models ------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # Cross-field rules of this object, and of some of its fields (by alias).
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

    address: BackendAddress = Field(description="the backend's IPv4 address")
    port: Port = Field(description="the backend's port")
    weight: Weight = Field(
        default=1, description="share of new flows, relative to the group's other backends")

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


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
BackendList = Annotated[list[Backend], Field(min_length=1, max_length=MAX_BACKENDS_PER_GROUP)]
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


RouteBackendList = Annotated[BackendList, WrapValidator(_shared_list)]
GROUP_RULES = (
    CelRule("has(self.backends) || has(self.service)", "is required", ".backends"),
    CelRule(
        "!(has(self.backends) && has(self.service))",
        "name either backends or a service, not both",
    ),
)


class SourceRoute(_Model):
    """Clients from `cidr` go to `backends` instead of the listener's default group."""

    cel_rules = GROUP_RULES

    cidr: Cidr = Field(description="client network; the longest prefix matching a client wins")
    backends: RouteBackendList | None = Field(default=None,
                                              description="the route's backends")
    service: ServiceRef | None = None
    health_check: HealthCheck | None = Field(
        default=None, alias="healthCheck", description="omitted: the listener's")


class SniRoute(_Model):
    """TLS connections naming `hostname` go to `backends`."""

    cel_rules = GROUP_RULES

    hostname: Hostname = Field(
        description="server name of the ClientHello, matched exactly, in any case")
    backends: RouteBackendList | None = Field(default=None,
                                              description="the route's backends")
    service: ServiceRef | None = None
    health_check: HealthCheck | None = Field(
        default=None, alias="healthCheck", description="omitted: the listener's")


class Listener(_Model):
    """A (VIP, port, protocol) to balance; `address` omitted means every local address."""

    cel_rules = (
        *GROUP_RULES,
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
    address: VipAddress | None = Field(default=None, description="VIP; omitted = every address")
    backends: BackendList | None = Field(
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
    def identity(self) -> tuple[str | None, int, str]:
        """What must be unique among all listeners of a node."""
        return (self.address, self.port, self.protocol)

    @property
    def endpoint(self) -> str:
        return f"{self.address or '*'}:{self.port}/{self.protocol}"


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


# --- cross-item rules --------------------------------------------------------


def _repeats(keys: Sequence[Hashable]) -> Iterator[tuple[int, int]]:
    """(index, index of its first occurrence) of every repeated key."""
    if len(set(keys)) == len(keys):
        return
    first: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i:
            yield i, j


@dataclass(frozen=True)
class _View:
    """What of an object one rule can observe (None: everything)."""

    values: frozenset[str] | None  # field names whose JSON value the rule reads
    presence: tuple[tuple[str, str], ...] = ()  # (alias, name) the rule tests only with has()
    sizes: tuple[tuple[str, str], ...] = ()  # (alias, name) of lists read only by has(), size()


@cache
def _view(cls: type[_Model], rule: CelRule) -> _View:
    by_alias = {(f.alias or name): name for name, f in cls.model_fields.items()}
    named = re.findall(r"\bself\.(\w+)", rule.rule)
    if not set(named) <= by_alias.keys() or re.search(r"\bself\b(?!\.)", rule.rule):
        return _View(None)
    tested = re.findall(r"\bhas\(self\.(\w+)\)", rule.rule)
    sized = re.findall(r"\bsize\(self\.(\w+)\)", rule.rule)
    presence = {a for a in tested if named.count(a) == tested.count(a)}
    sizes = {a for a in sized if named.count(a) == tested.count(a) + sized.count(a)
             and list in map(get_origin, (cls.model_fields[by_alias[a]].annotation,
                                          *get_args(cls.model_fields[by_alias[a]].annotation)))}
    return _View(
        frozenset(by_alias[a] for a in set(named) - presence - sizes),
        tuple(sorted((a, by_alias[a]) for a in presence)),
        tuple(sorted((a, by_alias[a]) for a in sizes)),
    )


# What a rule sees of a field it only tests or counts: absent (None), present (-1),
# or a list of that many items.
_Shape = tuple[tuple[str, int | None], ...]


def _shape(model: BaseModel, seen: Iterable[tuple[str, str, bool]]) -> _Shape:
    """What rules see of the fields ``seen``, as (alias, name, counted by its length)."""
    return tuple((a, None if (v := getattr(model, n)) is None else len(v) if counted else -1)
                 for a, n, counted in seen)


def _stand_in(shape: _Shape) -> dict[str, Any]:
    return {a: True if n < 0 else [0] * n for a, n in shape if n is not None}


@dataclass(frozen=True)
class _Rules:
    """The CEL rules of a class, split by what they observe."""

    shaped: tuple[tuple[str, str, bool], ...]  # (alias, name, counted) the shape rules see
    by_shape: tuple[CelRule, ...]  # rules that see only presence and list lengths
    by_value: tuple[CelRule, ...]


@cache
def _rules(cls: type[_Model]) -> _Rules:
    views = {rule: _view(cls, rule) for rule in cls.cel_rules}
    by_shape = tuple(r for r, v in views.items() if v.values == frozenset())
    shaped = {(a, n, False) for r in by_shape for a, n in views[r].presence}
    shaped |= {(a, n, True) for r in by_shape for a, n in views[r].sizes}
    return _Rules(tuple(sorted(shaped)), by_shape,
                  tuple(r for r in cls.cel_rules if r not in by_shape))


@cache
def _failing_for_shape(cls: type[_Model], shape: _Shape) -> tuple[CelRule, ...]:
    data = _stand_in(shape)
    return tuple(r for r in _rules(cls).by_shape if not evaluate(r, data))


def _failing(model: _Model) -> Iterator[CelRule]:
    """The rules of ``model`` that fail on its JSON form, as far as each rule can see it.

    A rule observes only the fields it names, so the others are not converted
    (a listener's 10,000 routes, say). A field it only tests with has()
    matters by its presence alone, and a list it only counts by its length,
    so verdicts that depend on nothing else are computed once per shape (the
    100,000 routes of a file have one or two). Absent (None) fields stay
    absent, as in the API.
    """
    rules = _rules(type(model))
    if rules.by_shape:
        yield from _failing_for_shape(type(model), _shape(model, rules.shaped))
    for rule in rules.by_value:
        view = _view(type(model), rule)
        shape = _shape(model, ((a, n, False) for a, n in view.presence))
        shape += _shape(model, ((a, n, True) for a, n in view.sizes))
        data = model.model_dump(mode="json", by_alias=True, exclude_none=True,
                                include=view.values)
        if not evaluate(rule, {**_stand_in(shape), **data}):
            yield rule


def cel_problems(model: BaseModel, path: str = "") -> Iterator[tuple[str, str]]:
    """Every declared CEL rule that fails in ``model`` and below, as (path, message)."""
    if isinstance(model, _Model):
        for rule in _failing(model):
            field = rule.field_path.lstrip(".")
            yield (_join(path, field) if field else path), rule.message
        for alias, rules in model.cel_field_rules.items():
            name = next(n for n, f in type(model).model_fields.items() if (f.alias or n) == alias)
            value = getattr(model, name)
            for rule in rules if value is not None else ():
                if not evaluate(rule, value):
                    yield _join(path, alias), rule.message
    for name, alias in _ruled_fields(type(model)):
        value, where = getattr(model, name), _join(path, alias)
        if isinstance(value, BaseModel):
            yield from cel_problems(value, where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if not _passes_by_shape(item):
                    yield from cel_problems(item, f"{where}[{i}]")


def _passes_by_shape(model: BaseModel) -> bool:
    """Whether ``model`` passes every rule on what its shape alone decides: no rule
    reads a value, and no field with rules below is set (a route naming backends: the
    quick answer for 100,000 of them)."""
    plan = _shape_plan(type(model))
    if plan is None:
        return False
    ruled, shaped = plan
    if any(getattr(model, n) is not None for n in ruled):
        return False
    return not _failing_for_shape(type(model), _shape(model, shaped))


@cache
def _shape_plan(cls: type[BaseModel]) -> tuple[tuple[str, ...],
                                               tuple[tuple[str, str, bool], ...]] | None:
    """For _passes_by_shape: the fields with rules below and the fields the shape rules
    see, or None when a rule of ``cls`` reads values."""
    if not issubclass(cls, _Model) or cls.cel_field_rules or _rules(cls).by_value:
        return None
    return tuple(n for n, _a in _ruled_fields(cls)), _rules(cls).shaped


@cache
def _ruled_fields(cls: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    """(name, alias) of the fields whose models declare CEL rules, here or below."""
    return tuple((name, info.alias or name) for name, info in cls.model_fields.items()
                 if any(_has_rules(t) for t in _model_types(info.annotation)))


@cache
def _has_rules(cls: type[BaseModel]) -> bool:
    """Whether ``cls`` or a model below it declares CEL rules."""
    return (issubclass(cls, _Model) and bool(cls.cel_rules or cls.cel_field_rules)) or bool(
        _ruled_fields(cls))


def _model_types(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in getattr(annotation, "__args__", ()):
        yield from _model_types(arg)


def check_rules(lb: LoadBalancer) -> list[tuple[str, str]]:
    """Rules spanning several items or product state, as (path, message) pairs."""
    spec = lb.spec
    problems = list(cel_problems(spec, "spec"))
    names = spec.interfaces or []
    problems += [(f"spec.interfaces[{i}]",
                  f"{show_value(names[i])} is also listed at spec.interfaces[{j}]")
                 for i, j in _repeats(names)]
    listeners = spec.listeners
    problems += [(f"spec.listeners[{i}].name",
                  f"{show_value(listeners[i].name)} is used by spec.listeners[{j}]")
                 for i, j in _repeats([ln.name for ln in listeners])]
    problems += [(f"spec.listeners[{i}]",
                  f"listener {listeners[i].endpoint} is also defined by spec.listeners[{j}]")
                 for i, j in _repeats([ln.identity for ln in listeners])]
    for i, listener in enumerate(listeners):
        problems += _listener_rules(f"spec.listeners[{i}]", listener)
    return problems


def _listener_rules(lp: str, listener: Listener) -> Iterator[tuple[str, str]]:
    # The protocol and proxyProtocol rules are CEL rules of Listener (see cel_problems).
    if listener.sni_routes and listener.protocol == "TCP" and not SNI_SUPPORTED:
        yield f"{lp}.sniRoutes", "SNI routing is not supported yet"

    groups = [(lp, listener.backends)]
    groups += [(f"{lp}.sourceRoutes[{j}]", r.backends)
               for j, r in enumerate(listener.source_routes) if r.backends and len(r.backends) > 1]
    groups += [(f"{lp}.sniRoutes[{j}]", r.backends)
               for j, r in enumerate(listener.sni_routes) if r.backends and len(r.backends) > 1]
    for gp, group in groups:
        for i, j in _repeats([(b.address, b.port) for b in group or ()]):
            yield (f"{gp}.backends[{i}]",
                   f"backend {group[i].endpoint} is also listed at {gp}.backends[{j}]")

    for kind, field, routes in (("sourceRoutes", "cidr", listener.source_routes),
                                ("sniRoutes", "hostname", listener.sni_routes)):
        keys = [getattr(r, field) for r in routes]
        for i, j in _repeats(keys):
            yield (f"{lp}.{kind}[{i}].{field}",
                   f"{show_value(keys[i])} is also used by {lp}.{kind}[{j}]")


# --- error formatting --------------------------------------------------------

# Both ends of each list bound, for "must have N to M items".
_LIST_BOUNDS: dict[str, tuple[int, int]] = {
    "listeners": (1, MAX_LISTENERS),
    "backends": (1, MAX_BACKENDS_PER_GROUP),
    "sourceRoutes": (0, MAX_ROUTES_PER_LISTENER),
    "sniRoutes": (0, MAX_ROUTES_PER_LISTENER),
    "interfaces": (1, MAX_INTERFACES),
}

_RANGE_NAMES: dict[str, Callable[[Any], str]] = {
    "port": lambda v: f"{show_value(v)} is not a valid port",
    "weight": lambda v: f"{show_value(v)} is not a valid weight (0..65535)",
}

_COMPARISONS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def show_value(value: Any) -> str:
    """A value as the user wrote it in YAML, quoted if it is a string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return _kind(value)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return f"a string ({show_value(value)})"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value})"
    return "null" if value is None else type(value).__name__


def error_path(loc: Iterable[int | str]) -> str:
    """('spec', 'listeners', 0, 'port') -> 'spec.listeners[0].port'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    return prefix + (path if path.startswith("[") else "." + path)


def _message(err: Any) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    field = next((p for p in reversed(err["loc"]) if isinstance(p, str)), "")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "invalid_key":
        return "field names must be strings"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        if len(options) == 1:
            return f"expected {options[0]}, got {show_value(value)}"
        return f"{show_value(value)} is not one of {', '.join(options)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{show_value(value)} is not an integer"
    if kind == "string_type":
        return f"{show_value(value)} is not a string"
    if kind == "list_type":
        return f"must be a list, got {_kind(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping, got {_kind(value)}"
    if kind in _COMPARISONS:
        key, op = _COMPARISONS[kind]
        if field in _RANGE_NAMES:
            return _RANGE_NAMES[field](value)
        return f"{show_value(value)} must be {op} {ctx.get(key)}"
    if kind in ("too_short", "too_long"):
        low, high = _LIST_BOUNDS.get(field, (ctx.get("min_length", 0), ctx.get("max_length")))
        if high is None:
            return f"must have at least {low} items"
        return f"must have at most {high} items" if low == 0 else f"must have {low} to {high} items"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else err["msg"]
    if kind == "string_too_long":
        return f"{show_value(value)} is longer than {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"{show_value(value)} does not match {ctx.get('pattern')}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return str(err["msg"])


def format_errors(exc: ValidationError) -> list[str]:
    """One `<path>: <message>` line per problem, paths in YAML (alias) names."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if loc[-1:] == ("[key]",):  # a bad mapping key: the message names it
            loc = loc[:-2]
        path = error_path(loc)
        if err["type"] == RULES_ERROR:
            lines += [f"{_join(path, sub)}: {msg}" for sub, msg in err["ctx"]["problems"]]
        else:
            lines.append(f"{path or 'manifest'}: {_message(err)}")
    return lines
