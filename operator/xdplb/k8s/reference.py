"""The configuration reference (docs/reference.md), rendered from the models (pure).

LoadBalancer first, then AddressPool, then how a Service of type LoadBalancer becomes
a LoadBalancer (from k8s/services.py's names).

Two schemas are walked side by side: the model's own (``crd.structural``, what a
standalone file is checked against) and the CRD's openAPIV3Schema (what the API
server checks: tighter list bounds, the status the operator writes). Every
property of either shows up; a bound the CRD tightens is shown with its cluster
value. The cross-field rules are the CEL validations declared in the schemas,
plus the few the model checks in Python only (:data:`MODEL_RULES`, whose
messages tests/test_docs.py compares with the validator's).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from xdplb.k8s.crd import addresspool_crd, loadbalancer_crd, structural
from xdplb.k8s.services import (
    DEFAULT_CLASS,
    IPS_ANNOTATION,
    POOL_ANNOTATION,
    SERVICE_LABEL,
    SHARING_ANNOTATION,
)
from xdplb.spec.api import GROUP, VERSION
from xdplb.spec.fields import IP_PATTERN
from xdplb.spec.model import LoadBalancer
from xdplb.spec.pool import AddressPool

__all__ = ["MODEL_RULES", "POOL_HEADING", "SERVICE_HEADING", "ModelRule", "render"]

Schema = dict[str, Any]

# Things the model's validators check beyond the JSON schema, by format (an address's
# schema is the pattern IP_PATTERN, named "ip" here).
FORMAT_NOTES = {
    "ip": "IPv4 or IPv6 (written in its canonical form); not 0.0.0.0 or ::, a multicast"
          " address, 255.255.255.255 or an IPv4-mapped IPv6 address",
    "cidr": "IPv4 or IPv6, of the listener's family; no host bits set; standalone also"
            " takes a bare address as /32 or /128",
}
POOL_FORMAT_NOTES = {"cidr": "IPv4 or IPv6; no host bits set"}
POOL_HEADING = "# AddressPool reference"
SERVICE_HEADING = "# Services of type LoadBalancer"
POOL_CRD_FILE = f"crds/addresspools.{GROUP}.yaml"
POOL_ENTRY_NOTE = ("each: a CIDR without host bits, FIRST-LAST (one family, FIRST ≤ LAST) or"
                   " an address; IPv4 or IPv6; none in loopback, link-local, multicast,"
                   " 0.0.0.0/8 or 255.255.255.255; entries do not overlap")
FORMAT_NAMES = {"ip": "IP address", "cidr": "CIDR", "date-time": "RFC 3339 time"}

# Where the modes differ beyond bounds: spec/load.py refuses Service groups and
# trafficPolicy without Kubernetes mode, and only the cluster agent reads nodeSelector.
REFUSED_STANDALONE = "**Cluster only**: a standalone file with it is refused."
CLUSTER_ONLY = {
    "spec.nodeSelector": "**Cluster only**: a standalone agent ignores it.",
    "spec.trafficPolicy": REFUSED_STANDALONE,
}

# A CEL rule longer than this is named, not quoted (the route total is one term per listener).
MAX_RULE_SHOWN = 90
CRD_FILE = f"crds/loadbalancers.{GROUP}.yaml"


@dataclass(frozen=True)
class ModelRule:
    """A rule the model checks in Python only: the API server accepts such an object,
    and the operator reports it (Accepted=False) with this message."""

    applies_to: str
    reported_at: str
    message: str  # the validator's text; {placeholders} stand for values


MODEL_RULES = (
    ModelRule("spec.listeners[]", "(the object)",
              "listener {address}:{port}/{protocol} is also defined by {path}"),
    ModelRule("spec.listeners[].sourceRoutes[]", ".sourceRoutes[].cidr",
              "{cidr} is not an {family} network, the listener's family"),
    ModelRule("spec.listeners[].sourceRoutes[], spec.listeners[].sniRoutes[]",
              ".sourceRoutes[].backends[].address",
              "{address} is not an {family} address, the listener's family (no NAT64): write"
              " a listener per family"),
)


@dataclass(frozen=True)
class _Row:
    path: str
    type: str
    required: bool
    default: str
    constraints: str
    description: str


@dataclass(frozen=True)
class _Section:
    path: str
    description: str
    rows: tuple[_Row, ...]


# --- schema walk -----------------------------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _object(node: Schema | None) -> tuple[Schema | None, bool]:
    """The object schema below ``node`` (itself, or its items), and whether it is a list's."""
    if node is None:
        return None, False
    if node.get("type") == "array":
        items = node.get("items", {})
        return (items, True) if "properties" in items else (None, True)
    return (node, False) if "properties" in node else (None, False)


def _sections(model: Schema | None, cluster: Schema | None, path: str,
              description: str = "", notes: dict[str, str] | None = None
              ) -> Iterator[_Section]:
    m_props: Schema = (model or {}).get("properties", {})
    c_props: Schema = (cluster or {}).get("properties", {})
    required = set((model or {}).get("required", [])) | set((cluster or {}).get("required", []))
    rows: list[_Row] = []
    below: list[tuple[Schema | None, Schema | None, str, str]] = []
    for name in [*m_props, *(n for n in c_props if n not in m_props)]:
        m, c = m_props.get(name), c_props.get(name)
        where = _join(path, name)
        rows.append(_row(where, m, c, name in required, notes))
        (m_obj, m_listed), (c_obj, c_listed) = _object(m), _object(c)
        listed = m_listed or c_listed
        if m_obj is not None or c_obj is not None:
            # A list's items carry the class's own description; an object field's is the row's.
            about = ((m_obj or c_obj or {}).get("description", "")) if listed else ""
            below.append((m_obj, c_obj, where + ("[]" if listed else ""), about))
    yield _Section(path, description, tuple(rows))
    for m_obj, c_obj, where, about in below:
        yield from _sections(m_obj, c_obj, where, about, notes)


def _row(path: str, model: Schema | None, cluster: Schema | None, required: bool,
         notes: dict[str, str] | None = None) -> _Row:
    node = model if model is not None else cluster
    assert node is not None
    description = node.get("description", "")
    if not description and node.get("type") == "array":
        description = node.get("items", {}).get("description", "")
    note = CLUSTER_ONLY.get(path)
    if note is None and path.startswith("spec.") and path.endswith(".service"):
        note = REFUSED_STANDALONE
    description = _text(description)
    if note:
        description = f"{description.rstrip('.')}. {note}" if description else note
    default = f"`{_show(node['default'])}`" if "default" in node else ""
    return _Row(path, _type(node), required, default,
                _constraints(model, cluster, notes=FORMAT_NOTES if notes is None else notes),
                description)


def _text(text: str) -> str:
    return " ".join(text.split())


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _type(node: Schema) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "integer or string"
    kind = node.get("type", "")
    if kind == "array":
        items = node.get("items", {})
        return "list of objects" if items.get("type") == "object" else f"list of {_type(items)}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of string to {_type(node['additionalProperties'])}"
    if kind == "string" and "format" in node:
        return FORMAT_NAMES.get(node["format"], f"string ({node['format']})")
    if kind == "string" and node.get("pattern") == IP_PATTERN:
        return FORMAT_NAMES["ip"]
    return str(kind)


# --- constraints -----------------------------------------------------------------------------

_RANGES = (("minimum", "maximum", "{}"), ("minLength", "maxLength", "length {}"),
           ("minItems", "maxItems", "{} items"), ("minProperties", "maxProperties", "{} entries"))


def _range(node: Schema, low_key: str, high_key: str, form: str) -> str | None:
    low, high = node.get(low_key), node.get(high_key)
    if low is None and high is None:
        return None
    if low is not None and high is not None:
        text = f"{low}..{high}"
    else:
        text = f"≥ {low}" if low is not None else f"≤ {high}"
    return form.format(text)


def _tighter(model: Schema, cluster: Schema) -> Schema:
    """The bounds a cluster object meets: the model's and the CRD's (which may be tighter)."""
    out = dict(model)
    for low_key, high_key, _ in _RANGES:
        if low_key in cluster:
            out[low_key] = max(out.get(low_key, cluster[low_key]), cluster[low_key])
        if high_key in cluster:
            out[high_key] = min(out.get(high_key, cluster[high_key]), cluster[high_key])
    return out


def _constraints(model: Schema | None, cluster: Schema | None, sep: str = "; ",
                 notes: dict[str, str] = FORMAT_NOTES) -> str:
    node = model if model is not None else cluster
    assert node is not None
    parts: list[str] = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{_show(v)}`" for v in node["enum"]))
    for low_key, high_key, form in _RANGES:
        text = _range(node, low_key, high_key, form)
        if model is not None and cluster is not None:
            in_cluster = _range(_tighter(model, cluster), low_key, high_key, form)
            if in_cluster != text:
                text = f"{text or 'any'} (cluster: {in_cluster})"
        if text:
            parts.append(text)
    if "pattern" in node and node["pattern"] != IP_PATTERN:  # an address: its note says it
        parts.append(f"pattern `{node['pattern']}`")
    if node.get("x-kubernetes-int-or-string"):
        # Each bound applies to the branch of its type: a number, or a (port) name.
        number = _range(node, "minimum", "maximum", "{}")
        names = [p for p in parts if p != number]
        parts = [f"number {number}", f"name: {', '.join(names)}"]
    lists = cluster if cluster is not None else node
    if lists.get("x-kubernetes-list-type") == "map":
        keys = lists["x-kubernetes-list-map-keys"]
        parts.append("unique by " + ", ".join(f"`{k}`" for k in keys))
    elif lists.get("x-kubernetes-list-type") == "set":
        parts.append("items unique")
    if model is not None and node.get("format") in notes:
        parts.append(notes[node["format"]])
    if model is not None and node.get("pattern") == IP_PATTERN and "ip" in notes:
        parts.append(notes["ip"])
    for key, label in (("items", "items"), ("additionalProperties", "values")):
        inner = node.get(key)
        if isinstance(inner, dict) and inner.get("type") != "object":
            cluster_inner = (cluster or {}).get(key) if model is not None else None
            if text := _constraints(inner, cluster_inner, ", ", notes):
                parts.append(f"each {label[:-1]}: {text}")
    return sep.join(parts)


# --- rules -----------------------------------------------------------------------------------


def _rules(node: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    for rule in node.get("x-kubernetes-validations", []):
        yield path, rule
    for name, prop in node.get("properties", {}).items():
        yield from _rules(prop, _join(path, name))
    if isinstance(node.get("items"), dict):
        yield from _rules(node["items"], path + "[]")


def _rule_rows(model: Schema, cluster: Schema, crd_file: str = CRD_FILE
               ) -> list[tuple[str, str, str, str, str]]:
    """(applies to, reported at, message, rule, modes), one row per distinct rule."""
    everywhere = {(path, rule["rule"]) for path, rule in _rules(model, "")}
    merged: dict[tuple[str, str, str, str], list[str]] = {}
    for path, rule in _rules(cluster, ""):
        modes = "both" if (path, rule["rule"]) in everywhere else "cluster"
        key = (rule["rule"], rule["message"], rule.get("fieldPath", ""), modes)
        merged.setdefault(key, []).append(path)
    rows = []
    for (expr, message, field, modes), paths in merged.items():
        shown = f"`{expr}`" if len(expr) <= MAX_RULE_SHOWN else f"(long; see `{crd_file}`)"
        where = ", ".join(f"`{p}`" for p in paths)
        rows.append((where, f"`{field}`" if field else "(the object)", message, shown, modes))
    return rows


# --- Markdown --------------------------------------------------------------------------------


def _cell(text: str) -> str:
    # A '|' ends a table cell even inside a code span unless escaped.
    return text.replace("|", "\\|")


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _field_tables(model: Schema, cluster: Schema, root: str,
                  notes: dict[str, str] | None = None) -> list[str]:
    lines = ["## Fields"]
    for section in _sections(model, cluster, "", notes=notes):
        title = section.path or root
        lines += ["", f"### `{title}`", ""]
        if section.description:
            lines += [_text(section.description), ""]
        rows = [
            (f"`{r.path}`", r.type, "yes" if r.required else "", r.default, r.constraints,
             r.description)
            for r in section.rows
        ]
        lines += _table(("Field", "Type", "Required", "Default", "Constraints", "Description"),
                        rows)
    return lines


def render() -> str:
    """docs/reference.md, as Markdown."""
    return "\n".join([_render_lb(), _render_pool(), _render_services()])


def _render_pool() -> str:
    model = structural(AddressPool)
    cluster = addresspool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lines = [
        POOL_HEADING,
        "",
        f"An `AddressPool` ({GROUP}/{VERSION}, cluster-scoped, short name `xpool`) is the",
        "cluster admin's grant: the namespaces its selector admits may use its addresses",
        "as listener addresses, on its ports. In a cluster, a LoadBalancer that uses an",
        "address no admitting pool holds, a port the pool does not allow, no address",
        "without a pool's `nodeAddresses: true`, or a backend that is loopback, link-local,",
        "multicast, broadcast, a node's own address or outside the pool's",
        "`allowedBackendCIDRs`, gets `Accepted=False`, reason `AddressNotAllowed`, with the",
        "pools that admit its namespace in the message; no agent programs it. A standalone",
        "file is the admin's own and is not judged. Pools that overlap are reported",
        "(condition `Overlapping`, a Warning Event), not merged: each admits its own",
        f"namespaces. The CRD is `{POOL_CRD_FILE}`; `kubectl get xpool` shows the addresses",
        "used and in all.",
        "",
    ]
    lines += _field_tables(model, cluster, "AddressPool", POOL_FORMAT_NOTES)
    lines = [f"{line[:-2]}; {POOL_ENTRY_NOTE} |" if line.startswith("| `spec.addresses` |")
             else line for line in lines]
    lines += ["", "## Cross-field rules", "",
              "CEL validations of the CRD, evaluated by the model too.", ""]
    lines += _table(("Applies to", "Reported at", "Message", "Rule (CEL)", "Mode"),
                    list(_rule_rows(model, cluster, POOL_CRD_FILE)))
    lines += ["", "Checked by the model only: the API server accepts such a pool, and the",
              "operator reports the message in its `Accepted` condition (such a pool admits",
              "nothing): entries that overlap each other, and the entry forms above.", ""]
    return "\n".join(lines)


SERVICE_ROWS = (
    ("`spec.type: LoadBalancer`", "only such Services; any other type is never touched"),
    ("`spec.loadBalancerClass`", f"`{DEFAULT_CLASS}` (the operator's `--service-class`):"
     " answered; another class: never touched; none: answered only with"
     " `--default-service-class` (leave it off when another implementation answers those)"),
    ("`spec.ipFamilies`, `spec.ipFamilyPolicy`", "an address per family listed (IPv4 when"
     " absent; the first only unless the policy is `PreferDualStack` or"
     " `RequireDualStack`). `PreferDualStack` without an address of the second family:"
     " served in the first alone (Event `DualStackDegraded`) until one is free;"
     " `RequireDualStack`: both families or nothing"),
    ("`spec.loadBalancerIP`, annotation `" + IPS_ANNOTATION + "`",
     "the addresses asked for (the annotation: one per family, comma-separated); each"
     " must lie in a pool that admits the namespace, else Event `AddressNotAllowed`; one"
     " of a family the Service is not in: Event `AddressIgnored`"),
    (f"annotation `{POOL_ANNOTATION}`", "allocate from this pool, even when its"
     " `autoAssign` is false"),
    ("(no address asked for)", "the lowest free address of the family in the first pool,"
     " by name, that admits the namespace, has `autoAssign: true` and allows every port"
     " of the Service; none: Event `NoAddressPool`; all taken: Event `PoolExhausted`"),
    (f"annotation `{SHARING_ANNOTATION}`", "Services with the same key and disjoint ports"
     " (port and protocol) may share an address; any other second claim: Event"
     " `AddressInUse`"),
    ("`spec.ports[]`", "one listener each per family: `name` (or `<protocol>-<port>`;"
     " the second family's end in `-ipv6` or `-ipv4`), `protocol`, `port`, the family's"
     " address, `service: {name, port: <name or number>}`; SCTP ports are not served"
     " (Event `PortNotServed`)"),
    ("EndpointSlices", "the backends, of the listener's family: ready endpoints take new"
     " flows, terminating ones drain"),
    ("`spec.externalTrafficPolicy`", "`trafficPolicy`: `Local` as is; `Cluster` (or none)"
     " as `Cluster` (any endpoint, with source NAT)"),
    ("`spec.sessionAffinity`", "`sessionAffinity` of every listener (`ClientIP` or `None`)"),
    ("`status.loadBalancer.ingress`", "`[{ip: <address>, ipMode: VIP}]`, one per family,"
     " primary first; Events"
     " `AddressAllocated`, and `AddressReleased` when the Service changes class"),
)


def _render_services() -> str:
    lines = [
        SERVICE_HEADING,
        "",
        "The operator answers a Service of type LoadBalancer of its class with a",
        "LoadBalancer of the same name in the Service's namespace, owned by the Service",
        f"(controller reference; label `{SERVICE_LABEL}`), so it goes with the Service.",
        "The address a Service has (its LoadBalancer's, or the one in its status) stays",
        "its own across operator restarts while a pool admits it, and is never given to",
        "another Service; when the Service is deleted, or changes class or type, the",
        "LoadBalancer is deleted and the address is free once it is gone. A LoadBalancer",
        "of that name that is not the Service's is left alone (Event",
        "`LoadBalancerNameTaken`).",
        "",
    ]
    lines += _table(("Service", "LoadBalancer"), SERVICE_ROWS)
    lines.append("")
    return "\n".join(lines)


def _render_lb() -> str:
    """The LoadBalancer part."""
    model = structural(LoadBalancer)
    cluster = loadbalancer_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lines = [
        "# LoadBalancer configuration reference",
        "",
        "<!-- Generated by `xdplb reference --output docs/reference.md`; do not edit. -->",
        "",
        f"A `LoadBalancer` ({GROUP}/{VERSION}) has the same fields in a standalone file",
        "(`xdplb agent --config`, checked by `xdplb validate`) and in a cluster",
        f"(`kubectl apply`, checked by the CRD in `{CRD_FILE}` and again by the operator).",
        "A bound written `A (cluster: B)` is tighter in a cluster, where one object must fit",
        "in etcd: split a larger configuration over several LoadBalancers. Fields marked",
        "**Cluster only** need the agent in Kubernetes mode. `[]` stands for every item of",
        "a list. In a cluster, the addresses a LoadBalancer may use are granted by",
        "AddressPools (below). Examples: [examples.md](examples.md).",
        "",
    ]
    lines += _field_tables(model, cluster, "LoadBalancer")
    lines += [
        "",
        "## Cross-field rules",
        "",
        "CEL validations of the CRD; the model evaluates the same expressions, so a standalone",
        "file gets the same message at the same path. Mode `cluster`: in a cluster only.",
        "",
    ]
    lines += _table(("Applies to", "Reported at", "Message", "Rule (CEL)", "Mode"),
                    list(_rule_rows(model, cluster)))
    lines += [
        "",
        "Checked by the model only, in both modes: the API server accepts these objects, and",
        "the operator reports the message in the `Accepted` condition.",
        "",
    ]
    lines += _table(("Applies to", "Reported at", "Message"),
                    [(f"`{r.applies_to}`", r.reported_at if r.reported_at.startswith("(")
                      else f"`{r.reported_at}`", re.sub(r"\{(\w+)\}", r"*\1*", r.message))
                     for r in MODEL_RULES])
    lines += [
        "",
        "Across LoadBalancers: in a standalone file, a listener's address, port and protocol",
        "are unique over all documents. In a cluster, listeners of different LoadBalancers",
        "overlap when they share port and protocol and the address (or one has none); the",
        "oldest LoadBalancer keeps the listener, the others get `Accepted=False`, reason",
        "`Conflicted`. A standalone agent also refuses totals above its map capacities",
        "(`xdplb agent --help`).",
        "",
    ]
    return "\n".join(lines)
