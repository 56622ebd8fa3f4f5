"""The CRDs: generated from the model, structural, bounded, and in agreement with it.

No API server runs here, so the schema is checked the way one would check it:
a JSON-schema validator with RE2 patterns and Kubernetes' formats, the CEL
rules evaluated by a CEL implementation wherever the schema declares them,
list-map keys as uniqueness, nulls pruned and unknown fields refused (kubectl's
strict field validation). Each row of the table goes through that and through
the Python validator, and both must give the same verdict.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import cel
import jsonschema
import pytest
import re2
import yaml

from xdplb.cli import main
from xdplb.k8s import celcost, crd
from xdplb.k8s.nodestate import NodeState, NodeStateStatus
from xdplb.spec import model
from xdplb.spec.load import Limits, SpecError, parse_manifests

ROOT = Path(__file__).resolve().parents[1]

# API server limits (k8s.io/apiserver, apiextensions-apiserver).
PER_EXPRESSION_LIMIT = 1_000_000  # PerCallLimit: one evaluation of one rule
PER_CRD_LIMIT = 100 * PER_EXPRESSION_LIMIT  # StaticEstimatedCRDCostLimit: all rules x cardinality
RUNTIME_BUDGET = 10_000_000  # RuntimeCELCostBudget: all rules of one object
ETCD_REQUEST_LIMIT = 1_572_864  # 1.5 MiB


# --- an API server's validation, emulated ----------------------------------------------------


def _re2_search(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if isinstance(instance, str) and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _cidr(value: object) -> bool:
    # Go's net.ParseCIDR: an address, '/', a prefix length; host bits are allowed.
    if not isinstance(value, str):
        return True
    try:
        address, _, length = value.partition("/")
        ipaddress.ip_address(address)
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return length.isdigit()


def _date_time(value: object) -> bool:
    # RFC 3339: a date, 'T', a time and an offset (or 'Z').
    if not isinstance(value, str):
        return True
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return False
    return "T" in value.upper() and parsed.tzinfo is not None


FORMATS = jsonschema.FormatChecker(["ipv4"])
FORMATS.checks("cidr")(_cidr)
FORMATS.checks("date-time")(_date_time)
Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _re2_search}
)


def _prune_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_nulls(v) for v in value]
    return value


def _walk(schema: dict[str, Any], value: Any, path: str) -> Any:
    """(schema, value, path) of every value in ``value`` that the schema describes."""
    yield schema, value, path
    if isinstance(value, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name in value:
                yield from _walk(prop, value[name], f"{path}.{name}" if path else name)
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            yield from _walk(schema["additionalProperties"], item, f"{path}[{key}]")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _walk(schema["items"], item, f"{path}[{i}]")


def api_server_errors(schema: dict[str, Any], doc: Any) -> list[str]:
    """What a Kubernetes API server (with kubectl's strict field validation) would say."""
    doc = _prune_nulls(doc)
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in Validator(schema, format_checker=FORMATS).iter_errors(doc)
    ]
    if errors:  # the API server runs CEL only on a schema-valid object
        return errors
    for node, value, path in _walk(schema, doc, ""):
        if isinstance(value, dict) and "properties" in node and path != "metadata":
            errors += [f"{path}.{k}: unknown field" for k in value if k not in node["properties"]]
        if node.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
            seen: set[str] = set()
            for i, item in enumerate(value):
                key = json.dumps([item.get(k) for k in node["x-kubernetes-list-map-keys"]])
                if key in seen:
                    errors.append(f"{path}[{i}]: Duplicate value: {key}")
                seen.add(key)
        for rule in node.get("x-kubernetes-validations", []):
            if cel.evaluate(rule["rule"], {"self": value}) is not True:
                errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    return errors


LB_SCHEMA = crd.loadbalancer_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
NS_SCHEMA = crd.nodestate_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --- manifests -------------------------------------------------------------------------------


def backend(address: str = "10.0.0.11", port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {"address": address, "port": port, **extra}


def listener(name: str = "http", port: int = 80, **extra: Any) -> dict[str, Any]:
    fields = {"name": name, "protocol": "TCP", "port": port, **extra}
    if "service" not in extra and "backends" not in extra:
        fields["backends"] = [backend()]
    return fields


def manifest(listeners: list[Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "xdplb.io/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"listeners": listeners if listeners is not None else [listener()], **spec},
    }


def drop(doc: dict[str, Any], *keys: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for key in keys:
        doc["spec"]["listeners"][0].pop(key)
    return doc


def routes(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"cidr": f"10.{(start + i) // 256}.{(start + i) % 256}.0/24", "backends": [backend()]}
        for i in range(count)
    ]


SVC = {"name": "web", "port": "http"}

# name -> (manifest, accepted): the API server and the Python validator must agree.
TABLE: dict[str, tuple[Any, bool]] = {
    "minimal": (manifest(), True),
    "service-by-name": (manifest([listener(service=SVC)]), True),
    "service-by-number": (manifest([listener(service={"name": "web", "port": 8080})]), True),
    "route-to-service": (
        manifest([listener(sourceRoutes=[{"cidr": "10.0.0.0/8", "service": SVC}])]),
        True,
    ),
    "node-selector": (
        manifest(nodeSelector={"kubernetes.io/os": "linux", "role": "", "xdplb.io/edge": "a_b.c"}),
        True,
    ),
    "udp-affinity": (
        manifest([listener(protocol="UDP", port=53, sessionAffinity="ClientIP")]),
        True,
    ),
    "null-address-pruned": (manifest([listener(address=None)]), True),
    "largest-cluster-object-shape": (
        manifest(
            [
                listener(
                    f"l{i}",
                    port=1000 + i,
                    backends=[backend(f"10.1.{i}.{j}") for j in range(64)],
                    sourceRoutes=routes(32, 32 * i),
                )
                for i in range(16)
            ]
        ),
        True,
    ),
    "all-routes-in-one-listener": (
        manifest([listener(sourceRoutes=routes(crd.MAX_ROUTES_PER_OBJECT))]),
        True,
    ),
    # groups: exactly one of backends / service
    "backends-and-service": (manifest([listener(service=SVC, backends=[backend()])]), False),
    "neither-backends-nor-service": (drop(manifest(), "backends"), False),
    "route-without-group": (manifest([listener(sourceRoutes=[{"cidr": "10.0.0.0/8"}])]), False),
    "sni-route-both": (
        manifest([listener(sniRoutes=[{"hostname": "a.example.com", "service": SVC,
                                       "backends": [backend()]}])]),
        False,
    ),
    # listener rules
    "proxy-protocol-without-sni": (manifest([listener(proxyProtocol="v2")]), False),
    "proxy-protocol-with-source-routes": (
        manifest([listener(proxyProtocol="v2",
                           sniRoutes=[{"hostname": "a.example.com", "service": SVC}],
                           sourceRoutes=[{"cidr": "10.0.0.0/8", "service": SVC}])]),
        False,
    ),
    "sni-on-udp": (
        manifest([listener(protocol="UDP", sniRoutes=[{"hostname": "a.example.com",
                                                       "service": SVC}])]),
        False,
    ),
    # Service references
    "service-name-upper-case": (manifest([listener(service={"name": "Web", "port": 80})]), False),
    "service-name-starts-with-digit": (
        manifest([listener(service={"name": "1web", "port": 80})]),
        False,
    ),
    "service-port-zero": (manifest([listener(service={"name": "web", "port": 0})]), False),
    "service-port-too-big": (manifest([listener(service={"name": "web", "port": 65536})]), False),
    "service-port-name-upper": (manifest([listener(service={"name": "web", "port": "HTTP"})]),
                                False),
    "service-port-name-digits": (manifest([listener(service={"name": "web", "port": "8080"})]),
                                 False),
    "service-port-name-double-hyphen": (
        manifest([listener(service={"name": "web", "port": "a--b"})]),
        False,
    ),
    "service-port-name-too-long": (
        manifest([listener(service={"name": "web", "port": "a" * 16})]),
        False,
    ),
    "service-without-port": (manifest([listener(service={"name": "web"})]), False),
    "service-port-float": (manifest([listener(service={"name": "web", "port": 80.5})]), False),
    # nodeSelector
    "label-key-space": (manifest(nodeSelector={"bad key": "x"}), False),
    "label-key-two-slashes": (manifest(nodeSelector={"a/b/c": "x"}), False),
    "label-key-name-too-long": (manifest(nodeSelector={"a" * 64: "x"}), False),
    "label-key-prefix-too-long": (
        manifest(nodeSelector={".".join(["a" * 63] * 4) + "/x": "y"}),
        False,
    ),
    "label-key-prefix-upper": (manifest(nodeSelector={"Example.com/x": "y"}), False),
    "label-value-bad": (manifest(nodeSelector={"role": "-edge"}), False),
    "label-value-too-long": (manifest(nodeSelector={"role": "a" * 64}), False),
    # field bounds shared by the model and the schema
    "port-range": (manifest([listener(port=70000)]), False),
    "weight-negative": (manifest([listener(backends=[backend(weight=-1)])]), False),
    "protocol": (manifest([listener(protocol="SCTP")]), False),
    "listener-name": (manifest([listener("Http")]), False),
    "address-invalid": (manifest([listener(backends=[backend("10.0.0.256")])]), False),
    "hostname-upper-case": (
        manifest([listener(sniRoutes=[{"hostname": "A.example.com", "service": SVC}])]),
        False,
    ),
    "unknown-field": (manifest([listener(foo=1)]), False),
    "no-listeners": (manifest([]), False),
    # uniqueness: list-map keys
    "duplicate-listener-name": (manifest([listener(), listener(port=81)]), False),
    "duplicate-backend": (
        manifest([listener(backends=[backend(), backend(weight=3)])]),
        False,
    ),
    "duplicate-cidr": (
        manifest([listener(sourceRoutes=routes(1) + routes(1))]),
        False,
    ),
    # storage bounds (cluster only)
    "too-many-listeners": (manifest([listener(f"l{i}", port=i + 1) for i in range(17)]), False),
    "default-group-too-large": (
        manifest([listener(backends=[backend(f"10.1.0.{j}") for j in range(65)])]),
        False,
    ),
    "route-group-too-large": (
        manifest([listener(sourceRoutes=[
            {"cidr": "10.0.0.0/8", "backends": [backend(f"10.1.0.{j}") for j in range(5)]}
        ])]),
        False,
    ),
    "too-many-routes-in-all": (
        manifest([listener("a", sourceRoutes=routes(300)),
                  listener("b", port=81, sourceRoutes=routes(crd.MAX_ROUTES_PER_OBJECT - 299,
                                                             300))]),
        False,
    ),
}

# Rules the schema cannot say: the API server accepts these objects, the operator's
# validation (the model) rejects them and reports Accepted=False with the message.
SCHEMA_GAPS: dict[str, tuple[Any, str]] = {
    "cidr-host-bits": (
        manifest([listener(sourceRoutes=[{"cidr": "198.51.100.1/24", "backends": [backend()]}])]),
        "has host bits set",
    ),
    "unspecified-backend": (
        manifest([listener(backends=[backend("0.0.0.0")])]),
        "is the unspecified address",
    ),
    "same-address-port-protocol": (
        manifest([listener("a"), listener("b")]),
        "is also defined by spec.listeners[0]",
    ),
    "same-network-spelled-twice": (
        manifest([listener(sourceRoutes=[{"cidr": "10.0.0.0/8", "backends": [backend()]},
                                         {"cidr": "10.0.0.1/8", "backends": [backend()]}])]),
        "has host bits set",
    ),
}


@pytest.mark.parametrize(("doc", "accepted"), TABLE.values(), ids=TABLE.keys())
def test_schema_and_python_agree(doc: Any, accepted: bool) -> None:
    server = api_server_errors(LB_SCHEMA, doc)
    python = crd.validate_object(doc)
    assert (server == [], python == []) == (accepted, accepted), (server, python)


@pytest.mark.parametrize(("doc", "message"), SCHEMA_GAPS.values(), ids=SCHEMA_GAPS.keys())
def test_schema_gaps_are_caught_by_the_model(doc: Any, message: str) -> None:
    assert api_server_errors(LB_SCHEMA, doc) == []
    (line,) = crd.validate_object(doc)
    assert message in line


def test_cluster_rejects_short_cidr_the_model_canonicalizes() -> None:
    # Standalone files may write 203.0.113.7; the API server's cidr format wants a prefix.
    doc = manifest([listener(sourceRoutes=[{"cidr": "203.0.113.7", "backends": [backend()]}])])
    assert crd.validate_object(doc) == []
    assert any("cidr" in e for e in api_server_errors(LB_SCHEMA, doc))


CEL_MESSAGES = {
    "backends-and-service": "spec.listeners[0]: name either backends or a service, not both",
    "neither-backends-nor-service": "spec.listeners[0].backends: is required",
    "route-without-group": "spec.listeners[0].sourceRoutes[0].backends: is required",
    "sni-on-udp": "spec.listeners[0].sniRoutes: sniRoutes are allowed only with protocol TCP",
    "proxy-protocol-without-sni": "spec.listeners[0].proxyProtocol: proxyProtocol needs"
                                  " sniRoutes (the header is added by the SNI acceptor)",
    "proxy-protocol-with-source-routes": "spec.listeners[0].proxyProtocol: proxyProtocol cannot"
                                         " be combined with sourceRoutes (source-routed flows"
                                         " bypass the SNI acceptor)",
    "too-many-routes-in-all": f"spec.listeners: {crd.ROUTE_TOTAL_RULE.message}",
}


@pytest.mark.parametrize("name", CEL_MESSAGES)
def test_cel_rules_report_the_same_line(name: str) -> None:
    doc, _ = TABLE[name]
    assert api_server_errors(LB_SCHEMA, doc) == [CEL_MESSAGES[name]]
    assert crd.validate_object(doc) == [CEL_MESSAGES[name]]


def test_python_messages_name_field_and_value() -> None:
    doc, _ = TABLE["service-port-name-upper"]
    assert crd.validate_object(doc) == [
        "spec.listeners[0].service.port: 'HTTP' is not a valid port name: use 1 to 15"
        " lower-case letters, digits and single inner '-', with at least one letter"
    ]
    doc, _ = TABLE["label-key-two-slashes"]
    assert crd.validate_object(doc) == [
        "spec.nodeSelector: 'a/b/c' is not a valid label key: at most one '/'"
    ]
    doc, _ = TABLE["default-group-too-large"]
    assert crd.validate_object(doc) == [
        "spec.listeners[0].backends: must have at most 64 items in a cluster"
        " (etcd limits object size)"
    ]
    doc, _ = TABLE["route-group-too-large"]
    assert crd.validate_object(doc) == [
        "spec.listeners[0].sourceRoutes[0].backends: must have at most 2 items in a cluster"
        " (etcd limits object size)"
    ]


def test_label_key_rule_is_exact_at_the_bounds() -> None:
    prefix = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
    for key, ok in ((f"{prefix}/x", True), (f"{prefix}d/x", False), ("a" * 63, True)):
        doc = manifest(nodeSelector={key: "v"})
        assert (api_server_errors(LB_SCHEMA, doc) == []) is ok
        assert (crd.validate_object(doc) == []) is ok


# --- standalone ------------------------------------------------------------------------------


def test_standalone_rejects_service_groups() -> None:
    doc = manifest([listener(service=SVC, sourceRoutes=[{"cidr": "10.0.0.0/8", "service": SVC}])])
    text = yaml.safe_dump(doc)
    with pytest.raises(SpecError) as info:
        parse_manifests(text, "lb.yaml")
    assert info.value.errors == [
        f"lb.yaml document 1 (default/web): {where}.service: Service backends need the agent in"
        " Kubernetes mode (--kubernetes); list backends instead"
        for where in ("spec.listeners[0]", "spec.listeners[0].sourceRoutes[0]")
    ]
    (lb,) = parse_manifests(text, "lb.yaml", Limits(service_backends=True))
    assert lb.spec.listeners[0].service == model.ServiceRef(name="web", port="http")


def test_standalone_rejects_a_traffic_policy() -> None:
    doc = manifest([listener()])
    doc["spec"]["trafficPolicy"] = "Local"
    text = yaml.safe_dump(doc)
    with pytest.raises(SpecError) as info:
        parse_manifests(text, "lb.yaml")
    assert info.value.errors == [
        "lb.yaml document 1 (default/web): spec.trafficPolicy: it picks among a Service's "
        "endpoints, which needs the agent in Kubernetes mode (--kubernetes)"]
    (lb,) = parse_manifests(text, "lb.yaml", Limits(service_backends=True))
    assert lb.spec.traffic_policy == "Local"


# --- the generated files ---------------------------------------------------------------------


def test_crds_folder_matches_the_generator() -> None:
    for name, doc in crd.crd_documents().items():
        path = ROOT / "crds" / name
        stale = f"{path} is stale: run `xdplb crds --output-dir crds`"
        assert path.read_text() == crd.to_yaml(doc), stale
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(crd.crd_documents())


def test_cli_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert docs == list(crd.crd_documents().values())
    assert main(["crds", "--output-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(crd.crd_documents())


def test_crd_identity_columns_and_subresources() -> None:
    lb, ns = crd.loadbalancer_crd(), crd.nodestate_crd()
    assert lb["metadata"]["name"] == "loadbalancers.xdplb.io"
    assert lb["spec"]["scope"] == "Namespaced"
    assert lb["spec"]["names"]["shortNames"] == ["xlb"]
    (version,) = lb["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Listeners": ".spec.listeners[*].name",
        "Nodes": ".status.nodes.summary",
        "Programmed": '.status.conditions[?(@.type=="Programmed")].status',
        "Age": ".metadata.creationTimestamp",
    }
    assert ns["metadata"]["name"] == "nodestates.xdplb.io"
    assert (ns["spec"]["scope"], ns["spec"]["names"]["kind"]) == ("Cluster", "NodeState")
    assert ns["spec"]["versions"][0]["subresources"] == {"status": {}}


@pytest.mark.parametrize("schema", [LB_SCHEMA, NS_SCHEMA], ids=["loadbalancer", "nodestate"])
def test_schema_is_structural(schema: dict[str, Any]) -> None:
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text
    assert "x-kubernetes-preserve-unknown-fields" not in text
    for node, _, path in _walk_schema(schema, ""):
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert node.get("type") in ("object", "array", "string", "integer", "boolean"), path
        assert "anyOf" not in node and "oneOf" not in node, path
        assert not isinstance(node.get("additionalProperties"), bool), path
        if node["type"] == "array":
            assert "maxItems" in node, f"{path}: unbounded list"
        if node["type"] == "string" and "enum" not in node and path not in (
            ".apiVersion", ".kind"
        ) and node.get("format") not in ("ipv4", "cidr", "date-time"):
            assert "maxLength" in node, f"{path}: unbounded string"
        if "default" in node:
            assert Validator(node, format_checker=FORMATS).is_valid(node["default"]), path


def _walk_schema(node: dict[str, Any], path: str) -> Any:
    yield node, None, path or "<root>"
    for name, prop in node.get("properties", {}).items():
        yield from _walk_schema(prop, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _walk_schema(node[key], f"{path}[]")


def test_patterns_are_re2() -> None:
    patterns = [n["pattern"] for s in (LB_SCHEMA, NS_SCHEMA) for n, _, _ in _walk_schema(s, "")
                if "pattern" in n]
    rules = [r for rc in celcost.rule_costs(LB_SCHEMA) for r in [rc.rule]]
    regexes = [lit for rule in rules for lit in re.findall(r"matches\('((?:[^'\\]|\\.)*)'\)", rule)]
    assert len(patterns) >= 8 and len(regexes) >= 2
    for pattern in patterns + [r.replace("\\\\", "\\") for r in regexes]:
        re2.compile(pattern)  # raises on look-around, back-references, ...


def test_list_map_keys_are_required() -> None:
    # The API server requires list-map keys to be required (or defaulted) fields.
    for node, _, path in _walk_schema(LB_SCHEMA, ""):
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", []) or "default" in item["properties"][key], path


# --- cost and size ---------------------------------------------------------------------------


def test_cel_cost_within_the_api_server_limits() -> None:
    costs = list(celcost.rule_costs(LB_SCHEMA)) + list(celcost.rule_costs(NS_SCHEMA))
    assert len(costs) >= 9
    for rc in costs:
        assert rc.cost <= PER_EXPRESSION_LIMIT, rc
    total = sum(rc.total for rc in costs)
    # The static total bounds any object's runtime cost too.
    assert total <= RUNTIME_BUDGET <= PER_CRD_LIMIT
    by_rule = {(rc.path, rc.rule[:16]): (rc.cost, rc.cardinality) for rc in costs}
    assert by_rule[("spec.listeners[].sourceRoutes[]", "has(self.backend")] == (
        4, crd.MAX_LISTENERS_PER_OBJECT * crd.MAX_ROUTES_PER_OBJECT)
    print(f"CEL worst case: {max(rc.cost for rc in costs)} per expression, {total} per object")


@pytest.mark.parametrize(
    ("rule", "schema", "cost"),
    [
        ("has(self.a)", {"type": "object", "properties": {"a": {"type": "string"}}}, 2),
        ("self.a == 'x'", {"type": "object", "properties": {"a": {"type": "string",
                                                                   "maxLength": 100}}}, 4),
        # 2 + 10 x (matches: ceil(0.1 x 21) x ceil(0.25 x 4) = 3, + 2 operands + 4)
        ("self.all(x, x.matches('^a$'))",
         {"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 20}}, 93),
    ],
)
def test_cost_estimator_arithmetic(rule: str, schema: dict[str, Any], cost: int) -> None:
    assert celcost.estimate(rule, schema) == cost


@pytest.mark.parametrize(
    ("rule", "schema", "error"),
    [
        ("self.all(x, true)", {"type": "array", "items": {"type": "string"}}, "no maxItems"),
        ("self.a.matches('b')", {"type": "object", "properties": {"a": {"type": "string"}}},
         "no maxLength"),
        ("self.a.lowerAscii() == 'b'", {"type": "object", "properties": {
            "a": {"type": "string", "maxLength": 5}}}, "not a standard CEL function"),
    ],
)
def test_cost_estimator_refuses_unbounded_or_unknown(rule: str, schema: Any, error: str) -> None:
    with pytest.raises(celcost.CostError, match=error):
        celcost.estimate(rule, schema)


def worst_case_loadbalancer() -> dict[str, Any]:
    """The largest object the CRD admits: every bound reached, every string at its longest."""
    def addr(i: int) -> str:  # IPv6, every group four digits: the longest address
        return f"fd00:ffff:ffff:ffff:ffff:ffff:{i // 65536 + 0x1000:x}:{i % 65536 + 0x1000:x}"

    per_listener = crd.MAX_ROUTES_PER_OBJECT // crd.MAX_LISTENERS_PER_OBJECT
    label = "a" * 63
    return {
        "apiVersion": "xdplb.io/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "x" * 253, "namespace": "y" * 63},
        "spec": {
            "interfaces": [f"{i:0>15}" for i in range(64)],
            "nodeSelector": {f"{i:0>63}.{label}.{label}.{'p' * 61}/{'n' * 63}": "v" * 63
                             for i in range(64)},
            "listeners": [
                {
                    "name": f"{i:0>63}",
                    "protocol": "TCP",
                    "port": 60000 + i,
                    "address": addr(i),
                    "sessionAffinity": "ClientIP",
                    "proxyProtocol": "v2",
                    "backends": [{"address": addr(j), "port": 65535, "weight": 65535}
                                 for j in range(64)],
                    "sniRoutes": [
                        {
                            "hostname": f"{i:0>2}{j:0>61}.{label}.{label}.{'b' * 61}",
                            "backends": [{"address": addr(k), "port": 65535, "weight": 65535}
                                         for k in range(crd.STORAGE_MAX_ITEMS[
                                             "spec.listeners[].sniRoutes[].backends"])],
                        }
                        for j in range(per_listener)
                    ],
                }
                for i in range(crd.MAX_LISTENERS_PER_OBJECT)
            ],
        },
    }


FORMAT_LENGTHS = {"ipv4": len("255.255.255.255"),
                  "cidr": len("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"),
                  "date-time": len("2006-01-02T15:04:05.999999999+00:00")}


def max_json_size(schema: dict[str, Any], skip: tuple[str, ...] = ()) -> int:
    """An upper bound of the compact JSON size of any value the schema admits.

    Every property present, every string at its longest (no escapes: the
    patterns admit none), every list and map full; properties named in ``skip``
    are left out (their bound is added by the caller).
    """
    if schema.get("x-kubernetes-int-or-string"):
        return max(schema["maxLength"] + 2, 5)
    kind = schema["type"]
    if kind == "string":
        if "enum" in schema:
            return max(len(v) for v in schema["enum"]) + 2
        return schema.get("maxLength", FORMAT_LENGTHS.get(schema.get("format", ""), 0)) + 2
    if kind == "integer":
        return max(len(str(schema.get("maximum", -2**63))), len(str(schema.get("minimum", 0))))
    if kind == "boolean":
        return 5
    if kind == "array":
        return 2 + schema["maxItems"] * (max_json_size(schema["items"], skip) + 1)
    if isinstance(schema.get("additionalProperties"), dict):
        entry = celcost.MAP_KEY_MAX_LENGTH + 3 + max_json_size(schema["additionalProperties"])
        return 2 + schema["maxProperties"] * (entry + 1)
    return 2 + sum(len(name) + 4 + max_json_size(prop, skip)
                   for name, prop in schema["properties"].items() if name not in skip)


def test_worst_case_object_fits_etcd() -> None:
    doc = worst_case_loadbalancer()
    assert api_server_errors(LB_SCHEMA, doc) == []  # the bounds can all be reached at once
    spec = LB_SCHEMA["properties"]["spec"]
    listener = spec["properties"]["listeners"]["items"]
    routes = ("sourceRoutes", "sniRoutes")
    # The route lists share one budget: at most MAX_ROUTES_PER_OBJECT routes in all.
    spec_bound = max_json_size(spec, routes) + crd.MAX_ROUTES_PER_OBJECT * max(
        max_json_size(listener["properties"][r]["items"]) + 1 for r in routes)
    status_bound = max_json_size(LB_SCHEMA["properties"]["status"])
    metadata = len(json.dumps({"metadata": doc["metadata"]}))
    assert len(json.dumps(doc["spec"], separators=(",", ":"))) <= spec_bound
    print(f"worst-case LoadBalancer: spec {spec_bound} B, status {status_bound} B")
    # Room is left for the rest of metadata (labels, annotations, managedFields).
    assert spec_bound + status_bound + metadata < 0.75 * ETCD_REQUEST_LIMIT
    spec_bytes = len(json.dumps(doc, separators=(",", ":")))
    status = {
        "observedGeneration": 2**31,
        "conditions": [
            {"type": f"{t:0>316}", "status": "Unknown", "observedGeneration": 2**31,
             "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "R" * 1024,
             "message": "m" * 32768}
            for t in range(8)
        ],
        "nodes": {"selected": 10**6, "programmed": 10**6, "summary": "1000000/1000000"},
        "listeners": [{"name": f"{i:0>63}", "backends": 10**6} for i in range(16)],
        "addresses": [{"address": f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:0>4x}",
                       "pool": "p" * 253, "announcedBy": "n" * 253} for i in range(16)],
    }
    assert api_server_errors(LB_SCHEMA, {**doc, "status": status}) == []
    status_bytes = len(json.dumps(status, separators=(",", ":")))
    assert spec_bytes + status_bytes <= spec_bound + status_bound + metadata


def test_worst_case_nodestate_fits_etcd() -> None:
    status = {
        "heartbeatTime": "2026-01-01T00:00:00Z",
        "mode": "generic",
        "interfaces": [{"name": f"{i:0>15}", "mode": "generic", "attached": False,
                        "error": "e" * 1024} for i in range(64)],
        "loadBalancers": [{"namespace": f"{i:0>63}", "name": "n" * 253, "uid": "u" * 64,
                           "generation": 2**62, "phase": "Failed", "message": "m" * 1024,
                           "listeners": 64, "backends": 10**6} for i in range(512)],
        "announcements": [{"address": f"2001:db8:ffff:ffff:ffff:ffff:{i:0>4x}:ffff",
                           "pool": "p" * 253, "interfaces": [f"{j:0>15}" for j in range(4)],
                           "since": "2026-01-01T00:00:00Z"} for i in range(256)],
        "error": "e" * 1024,
    }
    doc = {"apiVersion": "xdplb.io/v1alpha1", "kind": "NodeState",
           "metadata": {"name": "n" * 253}, "status": status}
    assert api_server_errors(NS_SCHEMA, doc) == []
    assert NodeStateStatus.model_validate(status).load_balancers[0].phase == "Failed"
    size = len(json.dumps(doc, separators=(",", ":")))
    bound = max_json_size(NS_SCHEMA["properties"]["status"])
    assert size <= bound + 300
    print(f"worst-case NodeState: {bound} B")
    assert bound < 0.75 * ETCD_REQUEST_LIMIT


# --- NodeState -------------------------------------------------------------------------------


def nodestate(**status: Any) -> dict[str, Any]:
    base = {"heartbeatTime": "2026-01-01T00:00:00Z", "mode": "native",
            "interfaces": [{"name": "eth0", "mode": "native", "attached": True}],
            "loadBalancers": [{"namespace": "default", "name": "web", "uid": "u1",
                               "generation": 3, "phase": "Applied", "listeners": 1,
                               "backends": 2}]}
    return {"apiVersion": "xdplb.io/v1alpha1", "kind": "NodeState",
            "metadata": {"name": "node-1"}, "status": {**base, **status}}


NODESTATES = {
    "good": (nodestate(), True),
    "no-heartbeat": (
        {**nodestate(), "status": {k: v for k, v in nodestate()["status"].items()
                                   if k != "heartbeatTime"}},
        False,
    ),
    "bad-phase": (nodestate(loadBalancers=[{"namespace": "a", "name": "b", "phase": "Done"}]),
                  False),
    "bad-mode": (nodestate(mode="offload"), False),
    "negative-generation": (
        nodestate(loadBalancers=[{"namespace": "a", "name": "b", "phase": "Applied",
                                  "generation": -1}]),
        False,
    ),
    "bad-time": (nodestate(heartbeatTime="yesterday"), False),
    "interface-error": (nodestate(interfaces=[{"name": "eth9", "attached": False,
                                               "error": "no such interface"}]), True),
}


@pytest.mark.parametrize(("doc", "accepted"), NODESTATES.values(), ids=NODESTATES.keys())
def test_nodestate_schema_and_model_agree(doc: dict[str, Any], accepted: bool) -> None:
    server_ok = api_server_errors(NS_SCHEMA, doc) == []
    try:
        NodeState.model_validate(doc)
        python_ok = True
    except ValueError:
        python_ok = False
    assert (server_ok, python_ok) == (accepted, accepted)


def test_nodestate_duplicate_entries_are_refused() -> None:
    entry = {"namespace": "default", "name": "web", "phase": "Applied"}
    errors = api_server_errors(NS_SCHEMA, nodestate(loadBalancers=[entry, {**entry}]))
    assert errors == ['status.loadBalancers[1]: Duplicate value: ["default", "web"]']


def test_nodestate_round_trip() -> None:
    status = NodeStateStatus.model_validate(nodestate()["status"])
    data = status.to_json()
    assert data["heartbeatTime"] == "2026-01-01T00:00:00Z"
    assert api_server_errors(NS_SCHEMA, {**nodestate(), "status": data}) == []
    assert NodeStateStatus.model_validate(data) == status
