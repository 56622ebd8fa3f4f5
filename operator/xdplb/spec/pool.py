"""The AddressPool manifest: which addresses and ports the cluster admin grants to which
namespaces (cluster-scoped, xdplb.io/v1alpha1).

Addresses are IPv4 or IPv6 CIDRs and ranges, judged alike for listeners of either
family. (Services are given IPv4 addresses, and L2 announcement is IPv4, for now.)
As for LoadBalancer, cross-field rules are CEL rules declared on the models, so the
CRD and the Python validator say the same thing.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from xdplb.spec.addresses import AddressRange, parse_range, special_overlap
from xdplb.spec.api import ApiVersion
from xdplb.spec.cel import CelRule, cel_string
from xdplb.spec.celcheck import cel_problems
from xdplb.spec.errors import RULES_ERROR, show_value
from xdplb.spec.fields import (
    LABEL_KEY_PATTERN,
    LABEL_KEY_PREFIX_PATTERN,
    InterfaceName,
    LabelKey,
    LabelValue,
    ObjectName,
    Port,
)
from xdplb.spec.model import _Model

__all__ = [
    "MAX_POOL_ENTRIES",
    "AddressPool",
    "AddressPoolSpec",
    "LabelSelector",
    "LabelSelectorRequirement",
    "PortRange",
]

MAX_POOL_ENTRIES = 64


def _pool_entry(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    r = parse_range(value)
    if (what := special_overlap(r)) is not None:
        raise ValueError(f"{show_value(value)} reaches into {what}: never a pool's")
    return r.text


def _any_cidr(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{show_value(value)} is not a valid CIDR") from None
    if "/" in value and net.network_address != ipaddress.ip_interface(value).ip:
        raise ValueError(f"{show_value(value)} has host bits set (the network is {str(net)!r})")
    return str(net)


PoolEntry = Annotated[
    str, Field(min_length=1, max_length=100), BeforeValidator(_pool_entry)]
AnyCidr = Annotated[
    str, Field(max_length=50, json_schema_extra={"format": "cidr"}), BeforeValidator(_any_cidr)]

_LABEL_KEYS_RULE = CelRule(
    f"self.all(k, k.matches({cel_string(LABEL_KEY_PATTERN)})"
    f" && k.matches({cel_string(LABEL_KEY_PREFIX_PATTERN)}))",
    "keys must be label keys: [DNS subdomain '/'] name of 1 to 63 letters, digits,"
    " '-', '_' or '.'",
)


class LabelSelectorRequirement(_Model):
    """One requirement on a namespace's labels (as in any Kubernetes label selector)."""

    cel_rules = (
        CelRule("self.operator == 'In' || self.operator == 'NotIn'"
                " ? has(self.values) && size(self.values) > 0"
                " : !has(self.values) || size(self.values) == 0",
                "In and NotIn need values; Exists and DoesNotExist take none", ".values"),
    )

    key: LabelKey = Field(max_length=317, pattern=LABEL_KEY_PATTERN,
                          description="the label's key")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="how the label's value is compared with values")
    values: Annotated[list[LabelValue], Field(max_length=64)] | None = Field(
        default=None, description="the values In and NotIn compare with")


class LabelSelector(_Model):
    """Which namespaces: every label of matchLabels and every requirement must hold; an
    empty selector ({}) selects every namespace. Each namespace carries the label
    kubernetes.io/metadata.name with its own name."""

    cel_field_rules: ClassVar[dict[str, tuple[CelRule, ...]]] = {
        "matchLabels": (_LABEL_KEYS_RULE,)}

    match_labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=64)] | None = Field(
        default=None, alias="matchLabels", description="labels a namespace must have")
    match_expressions: (
        Annotated[list[LabelSelectorRequirement], Field(max_length=16)] | None
    ) = Field(default=None, alias="matchExpressions",
              description="requirements a namespace's labels must meet")


class PortRange(_Model):
    """Ports port..endPort (or port alone), of one protocol or of both."""

    cel_rules = (
        CelRule("!has(self.endPort) || self.endPort >= self.port",
                "must not be below port", ".endPort"),
    )

    port: Port = Field(description="the first port allowed")
    end_port: Port | None = Field(default=None, alias="endPort",
                                  description="the last port allowed; omitted: port alone")
    protocol: Literal["TCP", "UDP"] | None = Field(
        default=None, description="omitted: TCP and UDP")

    def allows(self, port: int, protocol: str) -> bool:
        return (self.port <= port <= (self.end_port or self.port)
                and self.protocol in (None, protocol))

    def __str__(self) -> str:
        ports = f"{self.port}-{self.end_port}" if self.end_port else str(self.port)
        return f"{ports}/{self.protocol}" if self.protocol else ports


class AddressPoolSpec(_Model):
    cel_rules = (
        CelRule("(has(self.addresses) && size(self.addresses) > 0)"
                " || (has(self.nodeAddresses) && self.nodeAddresses)",
                "list addresses, or set nodeAddresses: true", ".addresses"),
        CelRule("!has(self.l2Interfaces) || (has(self.announce) && self.announce == 'L2')",
                "l2Interfaces are for announce: L2", ".l2Interfaces"),
    )

    addresses: Annotated[list[PoolEntry], Field(max_length=MAX_POOL_ENTRIES)] = Field(
        default_factory=list,
        description="CIDRs (192.0.2.0/28, 2001:db8::/120) and ranges (192.0.2.10-192.0.2.20)"
        " a LoadBalancer of an admitted namespace may use as listener addresses (Services"
        " are given IPv4 ones for now)")
    namespace_selector: LabelSelector = Field(
        alias="namespaceSelector",
        description="the namespaces this pool admits; {} admits every namespace")
    allowed_ports: Annotated[list[PortRange], Field(min_length=1, max_length=64)] | None = Field(
        default=None, alias="allowedPorts",
        description="the ports listeners may use on these addresses; omitted: any port")
    allowed_backend_cidrs: Annotated[list[AnyCidr], Field(min_length=1, max_length=64)] | None = (
        Field(default=None, alias="allowedBackendCIDRs",
              description="where listed backends of admitted listeners must lie; omitted:"
              " anywhere but loopback, link-local, multicast and the nodes' own addresses,"
              " which are never allowed. Service backends are always the object's own"
              " namespace's endpoints"))
    auto_assign: bool = Field(
        default=True, alias="autoAssign",
        description="hand addresses out to Services of type LoadBalancer that ask for none;"
        " false: only to those that name this pool or an address in it")
    node_addresses: bool = Field(
        default=False, alias="nodeAddresses",
        description="admitted namespaces may also have listeners without an address, which"
        " serve every address of the nodes' interfaces (on allowedPorts, if set)")
    announce: Literal["None", "L2"] = Field(
        default="None",
        description="None: route the addresses to the nodes yourself (static routes, ECMP,"
        " BGP); L2: one elected node per address answers ARP (IPv6: Neighbour"
        " Solicitations) for it on the local network and sends gratuitous ARP (IPv6:"
        " unsolicited Neighbour Advertisements) when it takes over")
    l2_interfaces: (
        Annotated[list[InterfaceName], Field(min_length=1, max_length=16)] | None
    ) = Field(default=None, alias="l2Interfaces",
              description="announce: L2: interfaces to announce on; omitted: those whose"
              " network holds the address, else the listener's interfaces")

    def ranges(self) -> tuple[AddressRange, ...]:
        return tuple(parse_range(a) for a in self.addresses)


class PoolMetadata(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: ObjectName = Field(description="the pool's name (cluster-scoped)")


class AddressPool(_Model):
    """An AddressPool manifest (xdplb.io/v1alpha1, cluster-scoped)."""

    api_version: ApiVersion = Field(alias="apiVersion")
    kind: Literal["AddressPool"]
    metadata: PoolMetadata
    spec: AddressPoolSpec
    status: dict[str, Any] | None = Field(
        default=None, description="written by the operator; never read back")

    @property
    def name(self) -> str:
        return self.metadata.name

    @model_validator(mode="after")
    def _rules(self) -> AddressPool:
        problems = list(cel_problems(self.spec, "spec"))
        ranges = self.spec.ranges()
        for i, r in enumerate(ranges):
            for j in range(i):
                if (both := r.overlap(ranges[j])) is not None:
                    problems.append((f"spec.addresses[{i}]",
                                     f"{r.text!r} overlaps spec.addresses[{j}]"
                                     f" ({ranges[j].text!r}) in {both.text}"))
                    break
        if problems:
            summary = "; ".join(f"{path}: {msg}" for path, msg in problems)
            raise PydanticCustomError(
                RULES_ERROR, "{summary}", {"summary": summary, "problems": problems})
        return self
