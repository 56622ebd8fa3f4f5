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
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_BACKENDS_PER_GROUP",
    "MAX_LISTENERS",
    "MAX_ROUTES_PER_LISTENER",
    "SNI_SUPPORTED",
    "Backend",
    "Listener",
    "LoadBalancer",
    "LoadBalancerSpec",
    "Metadata",
    "SniRoute",
    "SourceRoute",
    "check_rules",
    "format_errors",
    "hostname_problem",
    "show_value",
]

# Flip once the data plane can steer by TLS SNI; check_rules reads it at call time.
SNI_SUPPORTED = False

MAX_LISTENERS = 64
MAX_BACKENDS_PER_GROUP = 1024
MAX_ROUTES_PER_LISTENER = 10_000
MAX_INTERFACES = 64

# Same text for Field(pattern=...) (the schema) and the validators (the messages).
LISTENER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
INTERFACE_PATTERN = r"^[^/:\s]+$"
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
HOSTNAME_PATTERN = rf"^{_LABEL}(\.{_LABEL})+$"
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

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


# --- models ------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Backend(_Model):
    """One real server; traffic is split by weight (0 = no new connections)."""

    address: BackendAddress
    port: Port
    weight: Weight = 1

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


# A listener's default group or a route's group.
BackendGroup = Annotated[list[Backend], Field(min_length=1, max_length=MAX_BACKENDS_PER_GROUP)]


class SourceRoute(_Model):
    """Clients from `cidr` go to `backends` instead of the listener's default group."""

    cidr: Cidr
    backends: BackendGroup


class SniRoute(_Model):
    """TLS connections naming `hostname` go to `backends`."""

    hostname: Hostname
    backends: BackendGroup


class Listener(_Model):
    """A (VIP, port, protocol) to balance; `address` omitted means every local address."""

    name: ListenerName
    protocol: Literal["TCP", "UDP"]
    port: Port
    address: VipAddress | None = Field(default=None, description="VIP; omitted = every address")
    backends: BackendGroup
    source_routes: list[SourceRoute] = Field(
        default_factory=list, alias="sourceRoutes", max_length=MAX_ROUTES_PER_LISTENER
    )
    sni_routes: list[SniRoute] = Field(
        default_factory=list, alias="sniRoutes", max_length=MAX_ROUTES_PER_LISTENER
    )
    session_affinity: Literal["None", "ClientIP"] = Field(default="None", alias="sessionAffinity")

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
    interfaces: (
        Annotated[list[InterfaceName], Field(min_length=1, max_length=MAX_INTERFACES)] | None
    ) = Field(default=None, description="Interfaces to attach to; omitted = default route's")
    listeners: Annotated[list[Listener], Field(min_length=1, max_length=MAX_LISTENERS)]


class Metadata(BaseModel):
    # Kubernetes adds labels, uid, resourceVersion, ...: keep them, check only ours.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: ObjectName
    namespace: NamespaceName = "default"


class LoadBalancer(_Model):
    """A LoadBalancer manifest (xdplb.io/v1alpha1)."""

    api_version: Literal["xdplb.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LoadBalancer"]
    metadata: Metadata
    spec: LoadBalancerSpec
    status: dict[str, Any] | None = None  # written by the operator, never read back

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


def _repeats(items: Iterable[tuple[str, Hashable, str]]) -> Iterator[tuple[str, str, str]]:
    """For (path, key, shown) items, yield (path, shown, first path) of every repeated key."""
    first: dict[Hashable, str] = {}
    for path, key, shown in items:
        if key in first:
            yield path, shown, first[key]
        else:
            first[key] = path


def check_rules(lb: LoadBalancer) -> list[tuple[str, str]]:
    """Rules spanning several items or product state, as (path, message) pairs."""
    spec = lb.spec
    problems = [
        (path, f"{shown} is also listed at {first}")
        for path, shown, first in _repeats(
            (f"spec.interfaces[{i}]", name, show_value(name))
            for i, name in enumerate(spec.interfaces or [])
        )
    ]
    listeners = [(f"spec.listeners[{i}]", ln) for i, ln in enumerate(spec.listeners)]
    problems += [
        (f"{path}.name", f"{shown} is used by {first}")
        for path, shown, first in _repeats(
            (lp, ln.name, show_value(ln.name)) for lp, ln in listeners
        )
    ]
    problems += [
        (path, f"listener {shown} is also defined by {first}")
        for path, shown, first in _repeats((lp, ln.identity, ln.endpoint) for lp, ln in listeners)
    ]
    for lp, listener in listeners:
        problems += _listener_rules(lp, listener)
    return problems


def _listener_rules(lp: str, listener: Listener) -> Iterator[tuple[str, str]]:
    if listener.sni_routes:
        if listener.protocol != "TCP":
            yield f"{lp}.sniRoutes", "sniRoutes are allowed only with protocol TCP"
        elif not SNI_SUPPORTED:
            yield f"{lp}.sniRoutes", "SNI routing is not supported yet"

    source_routes = [(f"{lp}.sourceRoutes[{j}]", r) for j, r in enumerate(listener.source_routes)]
    sni_routes = [(f"{lp}.sniRoutes[{j}]", r) for j, r in enumerate(listener.sni_routes)]
    groups = [(lp, listener.backends)] + [(rp, r.backends) for rp, r in source_routes + sni_routes]
    for gp, group in groups:
        for path, shown, first in _repeats(
            (f"{gp}.backends[{k}]", (b.address, b.port), b.endpoint) for k, b in enumerate(group)
        ):
            yield path, f"backend {shown} is also listed at {first}"

    for path, shown, first in _repeats((rp, r.cidr, show_value(r.cidr)) for rp, r in source_routes):
        yield f"{path}.cidr", f"{shown} is also used by {first}"
    for path, shown, first in _repeats(
        (rp, r.hostname, show_value(r.hostname)) for rp, r in sni_routes
    ):
        yield f"{path}.hostname", f"{shown} is also used by {first}"


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
        path = error_path(err["loc"])
        if err["type"] == RULES_ERROR:
            lines += [f"{_join(path, sub)}: {msg}" for sub, msg in err["ctx"]["problems"]]
        else:
            lines.append(f"{path or 'manifest'}: {_message(err)}")
    return lines
