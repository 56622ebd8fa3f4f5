"""The documentation: the generated reference is current and complete, and every
manifest under examples/ is valid where it is meant to be used."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.test_crd import LB_SCHEMA, api_server_errors
from xdplb.cli import main
from xdplb.k8s import crd
from xdplb.k8s.admission import PoolView, grants_of
from xdplb.k8s.poolstatus import overlaps
from xdplb.k8s.reference import MODEL_RULES, POOL_HEADING, SERVICE_HEADING, render
from xdplb.k8s.services import IPS_ANNOTATION, POOL_ANNOTATION, SHARING_ANNOTATION
from xdplb.spec import bounds, fields, model
from xdplb.spec.load import SpecError, load_file, parse_manifests
from xdplb.spec.pool import AddressPool

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
EXAMPLES = ROOT / "examples"
CLUSTER_EXAMPLES = EXAMPLES / "cluster"


@pytest.fixture(scope="module")
def whole() -> str:
    return render()


@pytest.fixture(scope="module")
def text(whole: str) -> str:
    """The LoadBalancer part."""
    return whole.split(POOL_HEADING)[0]


@pytest.fixture(scope="module")
def pool_text(whole: str) -> str:
    return whole.split(POOL_HEADING)[1].split(SERVICE_HEADING)[0]


def rows(text: str) -> dict[str, list[str]]:
    """Field path -> the cells of its row in the field tables."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) == 6:
                out[cells[0].strip("`")] = cells[1:]
    return out


def property_paths(node: dict[str, Any], path: str = "") -> list[str]:
    """Every property of a schema, as 'spec.listeners[].backends[].weight'."""
    paths = []
    for name, prop in node.get("properties", {}).items():
        where = f"{path}.{name}" if path else name
        paths.append(where)
        paths += property_paths(prop, where)
    if isinstance(node.get("items"), dict):
        paths += property_paths(node["items"], path + "[]")
    return paths


def manifest(**listener: Any) -> dict[str, Any]:
    fields = {"name": "http", "protocol": "TCP", "port": 80, **listener}
    if "service" not in fields:
        fields.setdefault("backends", [{"address": "10.0.0.11", "port": 8080}])
    return {
        "apiVersion": "xdplb.io/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "web"},
        "spec": {"listeners": [fields]},
    }


# --- the reference ---------------------------------------------------------------------------


def test_reference_is_current(whole: str) -> None:
    stale = f"{REFERENCE} is stale: run `.venv/bin/xdplb reference --output docs/reference.md`"
    assert REFERENCE.exists(), stale
    assert REFERENCE.read_text() == whole, stale


def test_cli_prints_and_writes(
    whole: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reference"]) == 0
    assert capsys.readouterr().out == whole
    out = tmp_path / "reference.md"
    assert main(["reference", "--output", str(out)]) == 0
    assert out.read_text() == whole


def test_every_pool_property_has_a_row_and_spec_fields_a_description(pool_text: str) -> None:
    schema = crd.addresspool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    paths = property_paths(schema) + property_paths(crd.structural(AddressPool))
    documented = rows(pool_text)
    assert len(paths) > 20
    assert set(paths) == documented.keys()
    assert [p for p, cells in documented.items() if p.startswith("spec.") and not cells[4]] == []
    for message in ("list addresses, or set nodeAddresses: true",
                    "In and NotIn need values; Exists and DoesNotExist take none"):
        assert message in pool_text
    assert "crds/addresspools.xdplb.io.yaml" in pool_text


def test_the_service_mapping_names_every_setting(whole: str) -> None:
    mapping = whole.split(SERVICE_HEADING)[1]
    for name in (IPS_ANNOTATION, POOL_ANNOTATION, SHARING_ANNOTATION, "loadBalancerClass",
                 "--default-service-class", "externalTrafficPolicy", "sessionAffinity",
                 "ipMode: VIP", "PoolExhausted", "NoAddressPool", "AddressInUse"):
        assert name in mapping, name


def test_every_property_has_a_row(text: str) -> None:
    # A field added to the model (or the CRD) shows up without anyone remembering to.
    documented = rows(text)
    paths = property_paths(LB_SCHEMA) + property_paths(crd.structural(model.LoadBalancer))
    assert len(paths) > 50
    assert sorted(set(paths) - documented.keys()) == []
    assert sorted(documented.keys() - set(paths)) == []


def test_every_spec_field_has_a_description(text: str) -> None:
    missing = [path for path, cells in rows(text).items()
               if path.startswith("spec.") and not cells[4]]
    assert missing == [], "add description= to these fields in xdplb/spec/model.py"


@pytest.mark.parametrize(
    ("path", "type_", "required", "default", "constraints"),
    [
        ("spec.listeners[].port", "integer", "yes", "", "1..65535"),
        ("spec.listeners[].backends[].weight", "integer", "", "`1`", "0..65535"),
        ("spec.listeners[].protocol", "string", "yes", "", "one of `TCP`, `UDP`"),
        ("spec.listeners[].healthCheck.intervalSeconds", "integer", "", "`5`", "1..300"),
        ("spec.listeners[].healthCheck.payload", "string", "", "", "length ≤ 64"),
        (
            "spec.listeners",
            "list of objects",
            "yes",
            "",
            f"1..{bounds.MAX_LISTENERS} items"
            f" (cluster: 1..{crd.STORAGE_MAX_ITEMS['spec.listeners']} items); unique by `name`",
        ),
        (
            "spec.listeners[].sourceRoutes",
            "list of objects",
            "",
            "",
            f"≤ {bounds.MAX_ROUTES_PER_LISTENER} items (cluster: ≤ {crd.MAX_ROUTES_PER_OBJECT}"
            " items); unique by `cidr`",
        ),
        (
            "spec.listeners[].sniRoutes[].backends",
            "list of objects",
            "",
            "",
            f"1..{bounds.MAX_BACKENDS_PER_GROUP} items (cluster: 1..2 items);"
            " unique by `address`, `port`",
        ),
        (
            "spec.listeners[].service.port",
            "integer or string",
            "yes",
            "",
            f"number 1..65535; name: length ≤ 15, pattern `{fields.PORT_NAME_PATTERN}`",
        ),
        (
            "spec.interfaces",
            "list of string",
            "",
            "",
            f"1..64 items; items unique; each item: length 1..15,"
            f" pattern `{fields.INTERFACE_PATTERN}`",
        ),
    ],
)
def test_rows_state_the_bounds(
    text: str, path: str, type_: str, required: str, default: str, constraints: str
) -> None:
    assert rows(text)[path][:4] == [type_, required, default, constraints]


def test_cel_rules_are_listed_with_their_mode(text: str) -> None:
    section = text.split("## Cross-field rules", 1)[1]
    messages = [r["message"] for node in _schema_nodes(LB_SCHEMA)
                for r in node.get("x-kubernetes-validations", [])]
    assert len(messages) >= 10
    for message in messages:
        assert message in section
    (total,) = [line for line in section.splitlines() if crd.ROUTE_TOTAL_RULE.message in line]
    assert total.endswith("| cluster |")
    (timeout,) = [line for line in section.splitlines() if "exceed intervalSeconds" in line]
    assert "`spec.listeners[].sourceRoutes[].healthCheck`" in timeout
    assert timeout.endswith("| both |")


def _schema_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [node]
    for prop in node.get("properties", {}).values():
        nodes += _schema_nodes(prop)
    if isinstance(node.get("items"), dict):
        nodes += _schema_nodes(node["items"])
    return nodes


def _sni(**extra: Any) -> dict[str, Any]:
    route = {"hostname": "a.example.com", "backends": [{"address": "10.0.0.12", "port": 443}]}
    return manifest(port=443, sniRoutes=[route], **extra)


def _twice() -> dict[str, Any]:
    doc = manifest(address="192.0.2.1")
    doc["spec"]["listeners"].append({**doc["spec"]["listeners"][0], "name": "again"})
    return doc


V6_ROUTE = {"cidr": "2001:db8::/32", "backends": [{"address": "10.0.0.12", "port": 80}]}
# One manifest per entry of MODEL_RULES, in order, that breaks that rule.
MODEL_RULE_CASES = [
    _twice(),
    manifest(sourceRoutes=[V6_ROUTE]),
    manifest(sourceRoutes=[{**V6_ROUTE, "cidr": "10.0.0.0/8",
                            "backends": [{"address": "2001:db8::12", "port": 80}]}]),
]


@pytest.mark.parametrize(("rule", "doc"), list(zip(MODEL_RULES, MODEL_RULE_CASES, strict=True)))
def test_model_rules_are_the_validators_messages(rule: Any, doc: dict[str, Any]) -> None:
    # The schema accepts these; the model (standalone and operator alike) must not.
    assert api_server_errors(LB_SCHEMA, doc) == []
    pattern = re.escape(rule.message)
    pattern = re.sub(r"\\\{\w+\\\}", ".+", pattern)
    field = "" if rule.reported_at.startswith("(") else re.sub(
        r"\\\[\\\]", r"\\[\\d+\\]", re.escape(rule.reported_at))
    errors = crd.validate_object(doc)
    assert any(re.fullmatch(rf"spec\.listeners\[\d+\]{field}: {pattern}", e) for e in errors), (
        errors
    )


def _at(doc: dict[str, Any], where: str, **fields: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    listener = doc["spec"]["listeners"][0]
    target = listener if where == "listener" else listener[where][0]
    target.pop("backends", None)
    target.update(fields)
    return doc


SERVICE = {"name": "web", "port": "http"}
ROUTE = {"cidr": "10.0.0.0/8", "backends": [{"address": "10.0.0.12", "port": 80}]}
SNI_ROUTE = {"hostname": "a.example.com", "backends": [{"address": "10.0.0.12", "port": 443}]}


@pytest.mark.parametrize(
    ("path", "doc"),
    [
        ("spec.listeners[0].service", _at(manifest(), "listener", service=SERVICE)),
        ("spec.listeners[0].sourceRoutes[0].service",
         _at(manifest(sourceRoutes=[ROUTE]), "sourceRoutes", service=SERVICE)),
        ("spec.listeners[0].sniRoutes[0].service",
         _at(manifest(sniRoutes=[SNI_ROUTE]), "sniRoutes", service=SERVICE)),
        ("spec.trafficPolicy",
         {**manifest(), "spec": {**manifest()["spec"], "trafficPolicy": "Cluster"}}),
    ],
)
def test_fields_marked_cluster_only_are_refused_standalone(
    text: str, path: str, doc: dict[str, Any]
) -> None:
    assert "Cluster only" in rows(text)[re.sub(r"\[\d+\]", "[]", path)][4]
    assert crd.validate_object(doc) == []
    with pytest.raises(SpecError) as info:
        parse_manifests(yaml.safe_dump(doc), "lb.yaml")
    assert [e.split(": ")[1] for e in info.value.errors] == [path]


def test_node_selector_is_accepted_standalone(text: str) -> None:
    assert "ignores it" in rows(text)["spec.nodeSelector"][4]
    doc = {**manifest(), "spec": {**manifest()["spec"], "nodeSelector": {"role": "edge"}}}
    assert len(parse_manifests(yaml.safe_dump(doc), "lb.yaml")) == 1


@pytest.mark.parametrize(
    ("address", "ok"),
    [("10.0.0.1", True), ("0.0.0.0", False), ("224.0.0.1", False),
     ("255.255.255.255", False), ("::", False), ("ff02::1", False), ("::ffff:10.0.0.1", False),
     ("2001:db8::1", True), ("2001:zz8::1", False)],
)
def test_address_note(text: str, address: str, ok: bool) -> None:
    assert "not 0.0.0.0 or ::, a multicast address" in rows(text)[
        "spec.listeners[].backends[].address"][3]
    doc = manifest(backends=[{"address": address, "port": 80}])
    assert (crd.validate_object(doc) == []) is ok


@pytest.mark.parametrize(
    ("fields", "path"),
    [({"address": "192.0.2.1", "backends": [{"address": "2001:db8::11", "port": 80}]},
      "backends"),
     ({"address": "2001:db8::1", "backends": [{"address": "10.0.0.11", "port": 80}]},
      "backends"),
     ({"ipFamily": "IPv6"}, "backends"),
     ({"address": "192.0.2.1", "ipFamily": "IPv6"}, "ipFamily"),
     ({"backends": [{"address": "10.0.0.11", "port": 80},
                    {"address": "2001:db8::11", "port": 80}]}, "backends")],
)
def test_a_listener_serves_one_family(fields: dict[str, Any], path: str) -> None:
    # No NAT64: the API server refuses a listener whose backends are of another family
    # than its address (or ipFamily), and the model says the same at the same path.
    doc = manifest(**fields)
    assert any(path in e for e in api_server_errors(LB_SCHEMA, doc)), \
        api_server_errors(LB_SCHEMA, doc)
    assert any(e.startswith(f"spec.listeners[0].{path}:") for e in crd.validate_object(doc)), \
        crd.validate_object(doc)


def test_a_dual_stack_service_is_two_listeners() -> None:
    doc = manifest(address="192.0.2.1")
    doc["spec"]["listeners"].append({"name": "http6", "protocol": "TCP", "port": 80,
                                     "address": "2001:DB8::0:1",
                                     "backends": [{"address": "2001:db8::11", "port": 80}]})
    (lb,) = parse_manifests(yaml.safe_dump(doc), "lb.yaml")
    v6 = lb.spec.listeners[1]
    assert (v6.address, v6.family, v6.endpoint) == ("2001:db8::1", "IPv6", "[2001:db8::1]:80/TCP")
    # Two wildcards of one port: one per family.
    doc = manifest()
    doc["spec"]["listeners"].append({"name": "http6", "protocol": "TCP", "port": 80,
                                     "ipFamily": "IPv6",
                                     "backends": [{"address": "2001:db8::11", "port": 80}]})
    assert crd.validate_object(doc) == []
    doc["spec"]["listeners"][1]["ipFamily"] = "IPv4"
    doc["spec"]["listeners"][1]["backends"] = [{"address": "10.0.0.11", "port": 80}]
    assert any("also defined" in e for e in crd.validate_object(doc))


def test_cidr_note(text: str) -> None:
    assert "no host bits set; standalone also takes a bare address as /32" in rows(text)[
        "spec.listeners[].sourceRoutes[].cidr"][3]
    bare = manifest(sourceRoutes=[{**ROUTE, "cidr": "203.0.113.7"}])
    (lb,) = parse_manifests(yaml.safe_dump(bare), "lb.yaml")
    assert lb.spec.listeners[0].source_routes[0].cidr == "203.0.113.7/32"
    assert any("cidr" in e for e in api_server_errors(LB_SCHEMA, bare))
    host_bits = manifest(sourceRoutes=[{**ROUTE, "cidr": "10.0.0.1/8"}])
    assert any("has host bits set" in e for e in crd.validate_object(host_bits))


# --- examples --------------------------------------------------------------------------------

EXAMPLE_FILES = sorted(EXAMPLES.rglob("*.yaml"))


def test_the_examples_are_there() -> None:
    names = {str(p.relative_to(ROOT)) for p in EXAMPLE_FILES}
    assert {"examples/lab.yaml", "examples/standalone.yaml", "examples/sni.yaml",
            "examples/source-nat.yaml", "examples/cluster/web.yaml",
            "examples/cluster/basic.yaml", "examples/cluster/pools.yaml",
            "examples/cluster/service.yaml"} <= names


POOL_SCHEMA = crd.addresspool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_is_valid(path: Path) -> None:
    if CLUSTER_EXAMPLES in path.parents:
        # As the API server (strict field validation) and then the operator would judge it.
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs
        for doc in docs:
            if doc["kind"] == "AddressPool":
                assert api_server_errors(POOL_SCHEMA, doc) == []
                assert crd.parse_pool(doc)[1] == []
            elif doc["kind"] == "Service":
                kubernetes_validate.validate(doc, "1.35", strict=True)
            else:
                assert api_server_errors(LB_SCHEMA, doc) == []
                assert crd.validate_object(doc) == []
    else:
        # What `xdplb validate` runs.
        assert load_file(path)


def test_the_example_pools_admit_the_example_loadbalancers() -> None:
    docs = [d for p in sorted(CLUSTER_EXAMPLES.glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]
    pools = [(AddressPool.model_validate(d), "") for d in docs if d["kind"] == "AddressPool"]
    view = PoolView(grants_of(pools))
    lbs = [model.LoadBalancer.model_validate(d) for d in docs if d["kind"] == "LoadBalancer"]
    assert len(lbs) >= 2
    for lb in lbs:
        assert view.judge(lb).refusal is None, lb.qualified_name
    assert pools and all(not overlaps(g, view.grants) for g in view.grants)


def test_every_example_is_named_in_the_docs() -> None:
    # README.md or any docs/*.md may name a file; docs/examples.md lists them all.
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    files = [p for p in EXAMPLES.rglob("*") if p.is_file()]
    assert files
    unnamed = [str(p.relative_to(ROOT)) for p in files if str(p.relative_to(ROOT)) not in docs]
    assert unnamed == [], "name these in README.md or docs/examples.md"


def test_every_data_path_counter_is_documented() -> None:
    # docs/data-path.md's table lists exactly the counters the programs have, so a new
    # one cannot go unexplained (the `path` label of xdplb_packets_by_path_total).
    from xdplb.dataplane.layout import Stat

    text = (ROOT / "docs" / "data-path.md").read_text()
    listed = re.findall(r"^\| `(\w+)` \| \S", text, re.MULTILINE)
    assert listed == [s.name.lower() for s in Stat]
    for test in re.findall(r"`(test_\w+)`", text):  # a test it names exists
        assert any(test in p.read_text() for p in (ROOT / "tests").glob("test_*.py")), test
