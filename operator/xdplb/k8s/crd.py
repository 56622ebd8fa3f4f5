"""The CustomResourceDefinitions, generated from the pydantic models.

The spec model is the one source of truth: its JSON schema (bounds, patterns,
formats, the CEL rules declared beside each model class) becomes a structural
OpenAPI v3 schema: ``$ref`` inlined, ``type`` everywhere, no
``additionalProperties: false`` (the API server prunes unknown fields), no
null branches (it prunes nulls too).

Storage bounds. The model's bounds are the data plane's (64 listeners, 1,024
backends per group, 10,000 routes per listener): one such object would be
hundreds of megabytes, and etcd refuses a request over 1.5 MiB. A cluster
object is therefore bounded tighter (:data:`STORAGE_MAX_ITEMS` and the route
total :data:`ROUTE_TOTAL_RULE`); larger configurations are split over several
LoadBalancers, and big groups name a Service instead of listing addresses.
Their worst case (tests/test_crd.py bounds it from the schema, and prints it)
stays under three quarters of etcd's limit, leaving room for metadata and
managedFields. The 1,000-route total is what a full health check on every
route (a 64-byte payload each) leaves room for, with IPv6 addresses at their longest.
Big objects are best applied with
``kubectl apply --server-side`` (client-side apply copies the object into an
annotation, and annotations are limited to 256 KiB).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from xdplb.k8s.nodestate import NodeState
from xdplb.k8s.status import AddressPoolStatus, LoadBalancerStatus
from xdplb.spec.api import GROUP, VERSION
from xdplb.spec.cel import CelRule, evaluate
from xdplb.spec.errors import format_errors
from xdplb.spec.model import LoadBalancer
from xdplb.spec.pool import AddressPool

__all__ = [
    "MAX_ROUTES_PER_OBJECT",
    "ROUTE_TOTAL_RULE",
    "STORAGE_MAX_ITEMS",
    "addresspool_crd",
    "crd_documents",
    "loadbalancer_crd",
    "nodestate_crd",
    "parse_object",
    "parse_pool",
    "structural",
    "validate_object",
]


Schema = dict[str, Any]

# Cluster-only list bounds by schema path ("[]" = every item); see the module doc.
MAX_LISTENERS_PER_OBJECT = 16
MAX_ROUTES_PER_OBJECT = 1000
STORAGE_MAX_ITEMS: dict[str, int] = {
    "spec.listeners": MAX_LISTENERS_PER_OBJECT,
    "spec.listeners[].backends": 64,
    "spec.listeners[].sourceRoutes": MAX_ROUTES_PER_OBJECT,
    "spec.listeners[].sourceRoutes[].backends": 2,
    "spec.listeners[].sniRoutes": MAX_ROUTES_PER_OBJECT,
    "spec.listeners[].sniRoutes[].backends": 2,
}


def _routes_of(listener: str) -> str:
    return (
        f"(has({listener}.sourceRoutes) ? size({listener}.sourceRoutes) : 0)"
        f" + (has({listener}.sniRoutes) ? size({listener}.sniRoutes) : 0)"
    )


# Standard CEL has no sum over a list, so the total is spelled out, one guarded
# term per possible listener (the list is at most MAX_LISTENERS_PER_OBJECT long).
ROUTE_TOTAL_RULE = CelRule(
    " + ".join(
        f"(size(self.listeners) > {i} ? {_routes_of(f'self.listeners[{i}]')} : 0)"
        for i in range(MAX_LISTENERS_PER_OBJECT)
    )
    + f" <= {MAX_ROUTES_PER_OBJECT}",
    f"a LoadBalancer holds at most {MAX_ROUTES_PER_OBJECT} sourceRoutes and sniRoutes in all:"
    " split it into several LoadBalancers",
    ".listeners",
)
STORAGE_RULES: dict[str, tuple[CelRule, ...]] = {"spec": (ROUTE_TOTAL_RULE,)}


def _route_counts(spec: dict[str, Any]) -> dict[str, Any]:
    """What ROUTE_TOTAL_RULE reads of a spec: the lengths of the route lists (handing
    the CEL interpreter 10,000 routes only to count them costs ~25 ms)."""
    return {"listeners": [{key: [0] * len(ln[key]) for key in ("sourceRoutes", "sniRoutes")
                           if key in ln} for ln in spec.get("listeners", [])]}


_STORAGE_VIEWS: dict[CelRule, Callable[[dict[str, Any]], dict[str, Any]]] = {
    ROUTE_TOTAL_RULE: _route_counts}

# Uniqueness the API server enforces (and server-side apply merges by).
LIST_MAP_KEYS: dict[str, list[str]] = {
    "spec.listeners": ["name"],
    "spec.listeners[].backends": ["address", "port"],
    "spec.listeners[].sourceRoutes": ["cidr"],
    "spec.listeners[].sourceRoutes[].backends": ["address", "port"],
    "spec.listeners[].sniRoutes": ["hostname"],
    "spec.listeners[].sniRoutes[].backends": ["address", "port"],
    "status.conditions": ["type"],
    "status.listeners": ["name"],
    "status.addresses": ["address"],
}
NODESTATE_LIST_MAP_KEYS: dict[str, list[str]] = {
    "status.interfaces": ["name"],
    "status.loadBalancers": ["namespace", "name"],
    "status.announcements": ["address"],
}
POOL_LIST_MAP_KEYS: dict[str, list[str]] = {
    "status.conditions": ["type"],
}
POOL_LIST_SETS = ("spec.addresses", "spec.allowedBackendCIDRs", "spec.l2Interfaces")
LIST_SETS = ("spec.interfaces",)


# --- structural schema ---------------------------------------------------------------


def structural(model: type[BaseModel]) -> Schema:
    """The model's JSON schema in the structural form a CRD requires."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return _convert(schema, defs)


def _convert(node: Schema, defs: dict[str, Schema]) -> Schema:
    branches = node.get("anyOf", [])
    if len(branches) == 2 and {"type": "null"} in branches:
        # Optional: omitted, never null (the API server prunes nulls of such fields).
        (value,) = (b for b in branches if b != {"type": "null"})
        node = {k: v for k, v in node.items() if k != "anyOf" and (k, v) != ("default", None)}
        node.update(value)
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[1]])
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    out: Schema = {}
    for key, value in node.items():
        if key in ("title", "examples"):
            continue
        if key == "additionalProperties" and isinstance(value, bool):
            continue  # false: the API server prunes unknown fields; true: see metadata
        if key == "const":
            out["enum"] = [value]
            out.setdefault("type", _json_type(value))
        elif key == "properties":
            out[key] = {name: _convert(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _convert(value, defs)
        elif key == "anyOf":
            out[key] = [_convert(branch, defs) for branch in value]
        else:
            out[key] = value
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        raise ValueError(f"schema without a type: {node}")
    return out


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[type(value)]


def _nodes(schema: Schema, path: str) -> Iterator[Schema]:
    """The schema node at ``path`` ('spec.listeners[].backends')."""
    node = schema
    for part in path.split("."):
        name, items = part.removesuffix("[]"), part.endswith("[]")
        node = node["properties"][name]
        if items:
            node = node["items"]
    yield node


def _annotate(root: Schema, keys: dict[str, list[str]], sets: tuple[str, ...] = ()) -> None:
    for path, fields in keys.items():
        for node in _nodes(root, path):
            node["x-kubernetes-list-type"] = "map"
            node["x-kubernetes-list-map-keys"] = fields
    for path in sets:
        for node in _nodes(root, path):
            node["x-kubernetes-list-type"] = "set"


def _object_root(spec: Schema | None, status: Schema, required: list[str]) -> Schema:
    props: Schema = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    }
    if spec is not None:
        props["spec"] = spec
    props["status"] = status
    root: Schema = {"type": "object", "properties": props}
    if required:
        root["required"] = required
    return root


def loadbalancer_schema() -> Schema:
    spec = structural(LoadBalancer)["properties"]["spec"]
    root = _object_root(spec, structural(LoadBalancerStatus), ["spec"])
    for path, limit in STORAGE_MAX_ITEMS.items():
        for node in _nodes(root, path):
            node["maxItems"] = min(node.get("maxItems", limit), limit)
    for path, rules in STORAGE_RULES.items():
        for node in _nodes(root, path):
            node.setdefault("x-kubernetes-validations", []).extend(r.schema() for r in rules)
    _annotate(root, LIST_MAP_KEYS, LIST_SETS)
    return root


def nodestate_schema() -> Schema:
    status = structural(NodeState)["properties"]["status"]
    root = _object_root(None, status, [])
    _annotate(root, NODESTATE_LIST_MAP_KEYS)
    return root


def addresspool_schema() -> Schema:
    spec = structural(AddressPool)["properties"]["spec"]
    root = _object_root(spec, structural(AddressPoolStatus), ["spec"])
    _annotate(root, POOL_LIST_MAP_KEYS, POOL_LIST_SETS)
    return root


def _crd(
    kind: str,
    plural: str,
    scope: str,
    schema: Schema,
    short_names: list[str],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    names: dict[str, Any] = {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": kind.lower(),
        "categories": ["xdplb"],
    }
    if short_names:
        names["shortNames"] = short_names
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": names,
            "scope": scope,
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def loadbalancer_crd() -> dict[str, Any]:
    return _crd(
        "LoadBalancer",
        "loadbalancers",
        "Namespaced",
        loadbalancer_schema(),
        ["xlb"],
        [
            {"name": "Listeners", "type": "string", "jsonPath": ".spec.listeners[*].name"},
            {"name": "Nodes", "type": "string", "jsonPath": ".status.nodes.summary",
             "description": "nodes that applied this generation / nodes selected"},
            {"name": "Programmed", "type": "string",
             "jsonPath": '.status.conditions[?(@.type=="Programmed")].status'},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def nodestate_crd() -> dict[str, Any]:
    return _crd(
        "NodeState",
        "nodestates",
        "Cluster",
        nodestate_schema(),
        [],
        [
            {"name": "Mode", "type": "string", "jsonPath": ".status.mode"},
            {"name": "LoadBalancers", "type": "string",
             "jsonPath": ".status.loadBalancers[*].name"},
            {"name": "Heartbeat", "type": "date", "jsonPath": ".status.heartbeatTime"},
            {"name": "Error", "type": "string", "jsonPath": ".status.error", "priority": 1},
        ],
    )


def addresspool_crd() -> dict[str, Any]:
    return _crd(
        "AddressPool",
        "addresspools",
        "Cluster",
        addresspool_schema(),
        ["xpool"],
        [
            {"name": "Used", "type": "integer", "jsonPath": ".status.used",
             "description": "addresses of the pool that listeners use"},
            {"name": "Total", "type": "string", "jsonPath": ".status.total",
             "description": "addresses in the pool"},
            {"name": "Auto", "type": "boolean", "jsonPath": ".spec.autoAssign",
             "description": "handed out to Services that ask for no address"},
            {"name": "Announce", "type": "string", "jsonPath": ".spec.announce"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Addresses", "type": "string", "jsonPath": ".spec.addresses",
             "priority": 1},
        ],
    )


def crd_documents() -> dict[str, dict[str, Any]]:
    """File name -> CRD, as kept in the repository's crds/ folder."""
    crds = [loadbalancer_crd(), nodestate_crd(), addresspool_crd()]
    return {f"{crd['metadata']['name']}.yaml": crd for crd in crds}


def to_yaml(doc: dict[str, Any]) -> str:
    header = "# Generated by `xdplb crds` from the spec model; do not edit.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)


# --- the cluster's validation, in Python ---------------------------------------------


# A JSON path as a chain (parent, name, index or None): made in O(1) for each of
# 100,000 routes, and spelled out only for the few values a check reports.
_At = tuple[Any, str, int | None] | None


def _values(doc: Any, path: str) -> list[tuple[_At, Any]]:
    """(path, value) of every value at schema ``path`` in ``doc``."""
    level: list[tuple[_At, Any]] = [(None, doc)]
    for head in path.split("."):
        name, items = head.removesuffix("[]"), head.endswith("[]")
        deeper: list[tuple[_At, Any]] = []
        for at, node in level:
            if isinstance(node, dict) and name in node:
                if items:
                    deeper += [((at, name, i), v) for i, v in enumerate(node[name])]
                else:
                    deeper.append(((at, name, None), node[name]))
        level = deeper
    return level


def _spell(at: _At) -> str:
    parts: list[str] = []
    while at is not None:
        at, name, i = at
        parts.append(f".{name}" if i is None else f".{name}[{i}]")
    return "".join(reversed(parts)).lstrip(".")


def storage_problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The cluster-only bounds, as (path, message), for a manifest the model accepts."""
    problems = [
        (_spell(at), f"must have at most {limit} items in a cluster (etcd limits object size)")
        for path, limit in STORAGE_MAX_ITEMS.items()
        for at, value in _values(doc, path)
        if isinstance(value, list) and len(value) > limit
    ]
    for path, rules in STORAGE_RULES.items():
        for at, value in _values(doc, path):
            problems += [
                (_spell(at) + rule.field_path, rule.message) for rule in rules
                if not evaluate(rule, view(value) if (view := _STORAGE_VIEWS.get(rule)) else value)
            ]
    return problems


def parse_object(doc: Any) -> tuple[LoadBalancer | None, list[str]]:
    """A LoadBalancer object of a cluster as a model, or None and ``<path>: <message>`` lines.

    The model's validation (the same as standalone, CEL rules included) and then
    the storage bounds of the CRD.
    """
    try:
        lb = LoadBalancer.parse(doc)
    except ValidationError as exc:
        return None, format_errors(exc)
    # On the object as the API holds it, pruned to the schema's (camelCase) field
    # names, which the model accepted: the bounds are list lengths, which
    # validation does not change.
    problems = [f"{path}: {message}" for path, message in storage_problems(doc)]
    return (None, problems) if problems else (lb, [])


def parse_pool(doc: Any) -> tuple[AddressPool | None, list[str]]:
    """An AddressPool object as a model, or None and ``<path>: <message>`` lines."""
    try:
        return AddressPool.model_validate(doc), []
    except ValidationError as exc:
        return None, format_errors(exc)


def validate_object(doc: Any) -> list[str]:
    """Everything wrong with a LoadBalancer object of a cluster; empty when it is good."""
    return parse_object(doc)[1]
