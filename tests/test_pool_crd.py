"""The AddressPool CRD and model: generated, structural, cheap to validate, and in
agreement with each other (the API server emulated as in test_crd.py); the address
arithmetic of both families."""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any

import pytest
import re2

from tests.test_crd import PER_EXPRESSION_LIMIT, RUNTIME_BUDGET, _walk_schema, api_server_errors
from xdplb.k8s import celcost, crd
from xdplb.spec.addresses import AddressRange, parse_range, special_kind
from xdplb.spec.pool import AddressPool

POOL_SCHEMA = crd.addresspool_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def pool(**spec: Any) -> dict[str, Any]:
    spec.setdefault("namespaceSelector", {})
    if "addresses" not in spec and not spec.get("nodeAddresses"):
        spec["addresses"] = ["192.0.2.0/28"]
    return {"apiVersion": "xdplb.io/v1alpha1", "kind": "AddressPool",
            "metadata": {"name": "p"}, "spec": spec}


# name -> (pool, the API server's verdict, the model's verdict)
TABLE: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "minimal": (pool(), True, True),
    "ranges-both-families": (pool(addresses=["192.0.2.10-192.0.2.20", "2001:db8::/120",
                                             "2001:db8:1::5-2001:db8:1::9", "198.51.100.7"]),
                             True, True),
    "selector": (pool(namespaceSelector={
        "matchLabels": {"team": "a", "example.com/tier": "web"},
        "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]},
                             {"key": "legacy", "operator": "DoesNotExist"}]}), True, True),
    "ports-and-backends": (pool(allowedPorts=[{"port": 80}, {"port": 8000, "endPort": 8100,
                                                             "protocol": "TCP"}],
                                allowedBackendCIDRs=["10.0.0.0/8", "fd00::/8"]), True, True),
    "node-addresses-only": (pool(addresses=[], nodeAddresses=True,
                                 allowedPorts=[{"port": 30000, "endPort": 32767}]), True, True),
    "l2": (pool(announce="L2", l2Interfaces=["eth1"]), True, True),
    # CEL: the API server and the model refuse alike.
    "nothing-granted": (pool(addresses=[]), False, False),
    "values-for-exists": (pool(namespaceSelector={"matchExpressions": [
        {"key": "a", "operator": "Exists", "values": ["x"]}]}), False, False),
    "in-without-values": (pool(namespaceSelector={"matchExpressions": [
        {"key": "a", "operator": "In"}]}), False, False),
    "end-below-port": (pool(allowedPorts=[{"port": 90, "endPort": 80}]), False, False),
    "l2-interfaces-without-l2": (pool(l2Interfaces=["eth1"]), False, False),
    "bad-label-key": (pool(namespaceSelector={"matchLabels": {"a/b/c": "x"}}), False, False),
    # The schema cannot say these; the model does (the operator reports the pool invalid).
    "host-bits": (pool(addresses=["192.0.2.1/24"]), True, False),
    "backwards-range": (pool(addresses=["192.0.2.9-192.0.2.1"]), True, False),
    "mixed-range": (pool(addresses=["192.0.2.1-2001:db8::1"]), True, False),
    "overlapping-entries": (pool(addresses=["192.0.2.0/28", "192.0.2.8-192.0.2.40"]),
                            True, False),
    "metadata-address": (pool(addresses=["169.254.169.254"]), True, False),
    "loopback": (pool(addresses=["127.0.0.0/8"]), True, False),
    "not-an-address": (pool(addresses=["web"]), True, False),
    # The schema refuses these before anyone else.
    "unknown-field": (pool(autoassign=True), False, False),
    "bad-announce": (pool(announce="BGP"), False, False),
    "no-selector": ({**pool(), "spec": {"addresses": ["192.0.2.0/28"]}}, False, False),
}


@pytest.mark.parametrize(("doc", "server", "model"), TABLE.values(), ids=TABLE.keys())
def test_schema_and_model_agree(doc: dict[str, Any], server: bool, model: bool) -> None:
    assert (api_server_errors(POOL_SCHEMA, doc) == []) is server, api_server_errors(
        POOL_SCHEMA, doc)
    assert (crd.parse_pool(doc)[0] is not None) is model, crd.parse_pool(doc)[1]


def test_the_model_says_where_and_why() -> None:
    bad = pool(addresses=["192.0.2.0/28", "192.0.2.8-192.0.2.40", "169.254.169.254",
                          "192.0.2.1-2001:db8::1"],
               allowedPorts=[{"port": 90, "endPort": 80}])
    assert crd.parse_pool(bad)[1] == [
        "spec.addresses[2]: '169.254.169.254' reaches into link-local (169.254.0.0/16):"
        " never a pool's",
        "spec.addresses[3]: '192.0.2.1-2001:db8::1': both ends of a range must be of one"
        " family",
    ]
    fields_ok = pool(addresses=["192.0.2.0/28", "192.0.2.8-192.0.2.40"],
                     allowedPorts=[{"port": 90, "endPort": 80}])
    assert crd.parse_pool(fields_ok)[1] == [
        "spec.allowedPorts[0].endPort: must not be below port",
        "spec.addresses[1]: '192.0.2.8-192.0.2.40' overlaps spec.addresses[0]"
        " ('192.0.2.0/28') in 192.0.2.8/29",
    ]


def test_canonical_forms() -> None:
    p = AddressPool.model_validate(pool(addresses=["2001:DB8::/120", "198.51.100.7",
                                                   "10.0.0.1 - 10.0.0.3"],
                                        allowedBackendCIDRs=["FD00::/8"]))
    assert p.spec.addresses == ["2001:db8::/120", "198.51.100.7/32", "10.0.0.1-10.0.0.3"]
    assert p.spec.allowed_backend_cidrs == ["fd00::/8"]
    assert [r.size for r in p.spec.ranges()] == [256, 1, 3]


def test_address_ranges_of_both_families() -> None:
    r4, r6 = parse_range("192.0.2.0/30"), parse_range("2001:db8::/64")
    assert [str(a) for a in r4.addresses()] == [f"192.0.2.{i}" for i in range(4)]
    assert r6.size == 2 ** 64 and next(iter(r6.addresses())) == ipaddress.ip_address(
        "2001:db8::")
    assert "2001:db8::ffff" in r6 and "192.0.2.3" in r4 and "192.0.2.4" not in r4
    assert "2001:db8::1" not in r4 and "not an address" not in r4
    both = r4.overlap(parse_range("192.0.2.2-192.0.2.9"))
    assert both == AddressRange(4, int(ipaddress.ip_address("192.0.2.2")),
                                int(ipaddress.ip_address("192.0.2.3"))) and both.text == \
        "192.0.2.2/31"
    assert r4.overlap(r6) is None and r4.overlap(parse_range("192.0.2.4/30")) is None
    assert parse_range("2001:db8::1-2001:db8::3").overlap(r6).text == \
        "2001:db8::1-2001:db8::3"  # type: ignore[union-attr]
    assert special_kind(ipaddress.ip_address("fe80::1")) == "link-local (fe80::/10)"
    assert special_kind(ipaddress.ip_address("169.254.169.254")) == \
        "link-local (169.254.0.0/16)"
    assert special_kind(ipaddress.ip_address("192.0.2.1")) is None


def test_identity_columns_and_subresources() -> None:
    doc = crd.addresspool_crd()
    assert doc["metadata"]["name"] == "addresspools.xdplb.io"
    assert (doc["spec"]["scope"], doc["spec"]["names"]["shortNames"]) == ("Cluster", ["xpool"])
    (version,) = doc["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: (c["jsonPath"], c.get("priority", 0))
               for c in version["additionalPrinterColumns"]}
    assert columns["Used"] == (".status.used", 0) and columns["Total"] == (".status.total", 0)
    assert columns["Addresses"] == (".spec.addresses", 1)


def test_schema_is_structural_bounded_and_re2() -> None:
    text = json.dumps(POOL_SCHEMA)
    assert "$ref" not in text and "anyOf" not in text
    for node, _, path in _walk_schema(POOL_SCHEMA, ""):
        assert node.get("type") in ("object", "array", "string", "integer", "boolean"), path
        if node["type"] == "array":
            assert "maxItems" in node, f"{path}: unbounded list"
        if node["type"] == "string" and "enum" not in node and path not in (
                ".apiVersion", ".kind") and node.get("format") != "date-time":
            assert "maxLength" in node, f"{path}: unbounded string"
        if "pattern" in node:
            re2.compile(node["pattern"])
        if node.get("x-kubernetes-list-type") == "map":
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in node["items"].get("required", []), path


def test_cel_cost_within_the_api_server_limits() -> None:
    costs = list(celcost.rule_costs(POOL_SCHEMA))
    assert len(costs) == 5
    for rc in costs:
        assert rc.cost <= PER_EXPRESSION_LIMIT, rc
    assert sum(rc.total for rc in costs) <= RUNTIME_BUDGET


def test_status_the_operator_writes_fits_the_schema() -> None:
    import datetime

    from xdplb.k8s.admission import Grant
    from xdplb.k8s.poolstatus import pool_status
    from xdplb.k8s.statuswriter import with_transition_times

    a = Grant.of(AddressPool.model_validate(pool(addresses=["2001:db8::/64"])))
    status = pool_status("p", 1, {"p": a}, None, 3)
    now = datetime.datetime.now(datetime.UTC)
    status["conditions"] = with_transition_times(status["conditions"], None, now)
    doc = copy.deepcopy(pool())
    doc["status"] = status
    assert api_server_errors(POOL_SCHEMA, doc) == []
    assert status["total"] == str(2 ** 64) and status["used"] == 3
