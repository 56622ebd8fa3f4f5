"""LoadBalancer manifest: accepted shapes, one failing example per rule, loader behaviour."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from xdplb.spec import model
from xdplb.spec.errors import format_errors
from xdplb.spec.fields import HOSTNAME_PATTERN, hostname_problem
from xdplb.spec.load import DocumentCache, Limits, SpecError, load_file, parse_manifests
from xdplb.spec.model import LoadBalancer
from xdplb.spec.rules import check_rules

SRC = "t.yaml"
PREFIX = f"{SRC} document 1 (default/web): "


# --- helpers -------------------------------------------------------------------


def backend(address: str = "10.0.0.11", port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {"address": address, "port": port, **extra}


def listener(name: str = "http", **extra: Any) -> dict[str, Any]:
    return {"name": name, "protocol": "TCP", "port": 80, "backends": [backend()], **extra}


def manifest(
    name: str = "web", namespace: str = "default", listeners: list[Any] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "xdplb.io/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"listeners": listeners if listeners is not None else [listener()], **spec},
    }


def dump(*docs: Any) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def problems(*docs: Any, limits: Limits | None = None) -> list[str]:
    try:
        parse_manifests(dump(*docs), SRC, limits or Limits())
    except SpecError as exc:
        return exc.errors
    return []


def edit(change: Callable[[dict[str, Any]], Any], doc: dict[str, Any] | None = None) -> Any:
    """A copy of `doc` (default: a valid manifest) after `change` mutated it."""
    doc = copy.deepcopy(doc or manifest())
    change(doc)
    return doc


def first_listener(**fields: Any) -> dict[str, Any]:
    return edit(lambda d: d["spec"]["listeners"][0].update(fields))


def sni(hostname: str, **fields: Any) -> dict[str, Any]:
    return first_listener(sniRoutes=[{"hostname": hostname, "backends": [backend()]}], **fields)


BRIEF_EXAMPLE = """\
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {name: web, namespace: default}
spec:
  interfaces: [eth0, eth1]
  listeners:
  - name: http
    protocol: TCP
    port: 80
    address: 192.0.2.10
    backends:
    - {address: 10.0.0.11, port: 8080, weight: 3}
    - {address: 10.0.0.12, port: 8080}
    sourceRoutes:
    - cidr: 198.51.100.0/24
      backends: [{address: 10.0.0.13, port: 8080}]
    sniRoutes:
    - hostname: api.example.com
      backends: [{address: 10.0.0.21, port: 8443}]
    sessionAffinity: None
"""


# --- accepted manifests --------------------------------------------------------

GOOD = {
    "minimal": manifest(),
    "example-without-sni": yaml.safe_load(BRIEF_EXAMPLE.split("    sniRoutes:")[0]),
    "udp-wildcard-affinity": manifest(
        listeners=[
            listener(
                "dns",
                protocol="UDP",
                port=53,
                sessionAffinity="ClientIP",
                backends=[backend(port=65535, weight=0), backend("10.0.0.12", weight=65535)],
            )
        ]
    ),
    "same-port-other-protocol-or-address": manifest(
        listeners=[
            listener("a"),
            listener("b", protocol="UDP"),
            listener("c", address="192.0.2.10"),
            listener("d", address="192.0.2.11"),
        ]
    ),
    "kubernetes-metadata-and-status": edit(
        lambda d: (
            d["metadata"].update(uid="1234", labels={"app": "web"}, resourceVersion="7"),
            d.update(status={"conditions": []}),
        )
    ),
    "full-group-and-routes": first_listener(
        backends=[backend(f"10.0.{i // 256}.{i % 256}") for i in range(1024)],
        sourceRoutes=[
            {"cidr": "198.51.100.0/24", "backends": [backend()]},
            {"cidr": "198.51.100.0/25", "backends": [backend()]},  # overlap is fine: LPM
        ],
    ),
    "dotted-name-and-null-address": edit(
        lambda d: (
            d["metadata"].update(name="web.example"),
            d["spec"]["listeners"][0].update(address=None),
        )
    ),
}


@pytest.mark.parametrize("doc", GOOD.values(), ids=GOOD.keys())
def test_good_manifests(doc: dict[str, Any]) -> None:
    assert problems(doc) == []
    (lb,) = parse_manifests(dump(doc))
    # Dumping by alias gives a manifest that validates to the same model.
    assert LoadBalancer.model_validate(lb.model_dump(by_alias=True)) == lb


def test_defaults_and_names() -> None:
    (lb,) = parse_manifests(dump(manifest()))
    ln = lb.spec.listeners[0]
    assert lb.spec.interfaces is None
    assert lb.metadata.namespace == "default"
    assert lb.qualified_name == "default/web"
    assert (ln.address, ln.session_affinity, ln.source_routes, ln.sni_routes) == (
        None,
        "None",
        [],
        [],
    )
    assert ln.backends[0].weight == 1
    assert not ln.is_sni
    assert ln.identity == (None, 80, "TCP", "IPv4")
    assert ln.endpoint == "*:80/TCP"


def test_populate_by_field_name() -> None:
    lb = LoadBalancer(
        api_version="xdplb.io/v1alpha1",
        kind="LoadBalancer",
        metadata={"name": "web"},
        spec={"listeners": [listener(session_affinity="ClientIP")]},
    )
    assert lb.spec.listeners[0].session_affinity == "ClientIP"


def test_canonical_forms() -> None:
    doc = first_listener(
        sourceRoutes=[
            {"cidr": "198.51.100.0/255.255.255.0", "backends": [backend()]},
            {"cidr": "203.0.113.7", "backends": [backend()]},
        ]
    )
    (lb,) = parse_manifests(dump(doc))
    assert [r.cidr for r in lb.spec.listeners[0].source_routes] == [
        "198.51.100.0/24",
        "203.0.113.7/32",
    ]


def test_sni_accepted() -> None:
    (lb,) = parse_manifests(BRIEF_EXAMPLE)
    ln = lb.spec.listeners[0]
    assert ln.is_sni
    assert ln.sni_routes[0].hostname == "api.example.com"
    assert lb.spec.interfaces == ["eth0", "eth1"]
    assert [b.weight for b in ln.backends] == [3, 1]


def test_idna_a_labels_are_hostnames() -> None:
    assert problems(sni("xn--bcher-kva.example")) == []


# --- one failing example per rule ----------------------------------------------

BAD: dict[str, tuple[Any, list[str]]] = {
    # structure
    "missing-field": (
        edit(lambda d: d["spec"]["listeners"][0].pop("port")),
        ["spec.listeners[0].port: is required"],
    ),
    "missing-spec": (edit(lambda d: d.pop("spec")), ["spec: is required"]),
    "unknown-field": (
        manifest(listeners=[listener("a"), listener("b", port=81, foo=1)]),
        ["spec.listeners[1].foo: unknown field"],
    ),
    "unknown-top-level-field": (edit(lambda d: d.update(extra=1)), ["extra: unknown field"]),
    "spec-not-mapping": (
        edit(lambda d: d.update(spec=[1])),
        ["spec: must be a mapping, got a list"],
    ),
    "listeners-not-list": (
        manifest(listeners={"a": 1}),  # type: ignore[arg-type]
        ["spec.listeners: must be a list, got a mapping"],
    ),
    "status-not-mapping": (
        edit(lambda d: d.update(status="x")),
        ["status: must be a mapping, got a string ('x')"],
    ),
    "name-not-string": (
        first_listener(name=80),
        ["spec.listeners[0].name: 80 is not a string"],
    ),
    # enumerations
    "protocol": (
        first_listener(protocol="SCTP"),
        ["spec.listeners[0].protocol: 'SCTP' is not one of TCP, UDP"],
    ),
    "protocol-lower-case": (
        first_listener(protocol="tcp"),
        ["spec.listeners[0].protocol: 'tcp' is not one of TCP, UDP"],
    ),
    "session-affinity": (
        first_listener(sessionAffinity=None),
        ["spec.listeners[0].sessionAffinity: null is not one of None, ClientIP"],
    ),
    "api-version": (
        edit(lambda d: d.update(apiVersion="xdplb.io/v1")),
        ["apiVersion: expected xdplb.io/v1alpha1, got 'xdplb.io/v1'"],
    ),
    # integers and ranges
    "backend-port-range": (
        first_listener(backends=[backend(), backend("10.0.0.12", 70000)]),
        ["spec.listeners[0].backends[1].port: 70000 is not a valid port"],
    ),
    "listener-port-zero": (
        first_listener(port=0),
        ["spec.listeners[0].port: 0 is not a valid port"],
    ),
    "port-string": (first_listener(port="80"), ["spec.listeners[0].port: '80' is not an integer"]),
    "port-float": (first_listener(port=80.5), ["spec.listeners[0].port: 80.5 is not an integer"]),
    "port-bool": (first_listener(port=True), ["spec.listeners[0].port: true is not an integer"]),
    "weight-range": (
        first_listener(backends=[backend(weight=70000)]),
        ["spec.listeners[0].backends[0].weight: 70000 is not a valid weight (0..65535)"],
    ),
    "weight-negative": (
        first_listener(backends=[backend(weight=-1)]),
        ["spec.listeners[0].backends[0].weight: -1 is not a valid weight (0..65535)"],
    ),
    # list sizes
    "no-listeners": (manifest(listeners=[]), ["spec.listeners: must have 1 to 64 items"]),
    "too-many-listeners": (
        manifest(listeners=[listener(f"l{i}", port=i + 1) for i in range(65)]),
        ["spec.listeners: must have 1 to 64 items"],
    ),
    "no-default-group": (
        edit(lambda d: d["spec"]["listeners"][0].pop("backends")),
        ["spec.listeners[0].backends: is required"],
    ),
    "empty-group": (
        first_listener(backends=[]),
        ["spec.listeners[0].backends: must have 1 to 1024 items"],
    ),
    "group-too-large": (
        first_listener(backends=[backend(f"10.0.{i // 256}.{i % 256}") for i in range(1025)]),
        ["spec.listeners[0].backends: must have 1 to 1024 items"],
    ),
    "empty-route-group": (
        first_listener(sourceRoutes=[{"cidr": "198.51.100.0/24", "backends": []}]),
        ["spec.listeners[0].sourceRoutes[0].backends: must have 1 to 1024 items"],
    ),
    "empty-interfaces": (manifest(interfaces=[]), ["spec.interfaces: must have 1 to 64 items"]),
    # names
    "listener-name-case": (
        first_listener(name="Http"),
        [
            "spec.listeners[0].name: 'Http' is not a valid listener name: use 1 to 63 lower-case"
            " letters, digits and '-', starting and ending with a letter or digit"
        ],
    ),
    "listener-name-length": (
        first_listener(name="a" * 64),
        [
            f"spec.listeners[0].name: '{'a' * 64}' is not a valid listener name: use 1 to 63"
            " lower-case letters, digits and '-', starting and ending with a letter or digit"
        ],
    ),
    "listener-name-duplicate": (
        manifest(listeners=[listener("http"), listener("x", port=81), listener("http", port=82)]),
        ["spec.listeners[2].name: 'http' is used by spec.listeners[0]"],
    ),
    "interface-slash": (
        manifest(interfaces=["eth0", "a/b"]),
        [
            "spec.interfaces[1]: 'a/b' is not a valid interface name: use 1 to 15 characters,"
            " no '/', ':' or spaces"
        ],
    ),
    "interface-space": (
        manifest(interfaces=["eth 0"]),
        [
            "spec.interfaces[0]: 'eth 0' is not a valid interface name: use 1 to 15 characters,"
            " no '/', ':' or spaces"
        ],
    ),
    "interface-length": (
        manifest(interfaces=["x" * 16]),
        [
            f"spec.interfaces[0]: '{'x' * 16}' is not a valid interface name: use 1 to 15"
            " characters, no '/', ':' or spaces"
        ],
    ),
    "interface-duplicate": (
        manifest(interfaces=["eth0", "eth1", "eth0"]),
        ["spec.interfaces[2]: 'eth0' is also listed at spec.interfaces[0]"],
    ),
    "metadata-name-missing": (
        edit(lambda d: d["metadata"].pop("name")),
        ["metadata.name: is required"],
    ),
    "namespace": (
        edit(lambda d: d["metadata"].update(namespace="a.b")),
        [
            "metadata.namespace: 'a.b' is not a valid namespace: use a lower-case DNS label"
            " (RFC 1123)"
        ],
    ),
    # addresses and networks
    "address-invalid": (
        first_listener(backends=[backend("10.0.0.256")]),
        ["spec.listeners[0].backends[0].address: '10.0.0.256' is not a valid IP address"],
    ),
    "address-ipv6-listener-ipv4-backends": (
        first_listener(address="2001:db8::1"),
        ["spec.listeners[0].backends: must all be of the listener's address family (no NAT64):"
         " write a listener per family"],
    ),
    "address-mixed-backends": (
        first_listener(backends=[backend("10.0.0.2"), backend("2001:db8::2")]),
        ["spec.listeners[0].backends: must all be of the listener's address family (no NAT64):"
         " write a listener per family"],
    ),
    "address-ipv4-mapped": (
        first_listener(backends=[backend("::ffff:10.0.0.2")]),
        ["spec.listeners[0].backends[0].address: '::ffff:10.0.0.2' is an IPv4-mapped IPv6"
         " address: write the IPv4 address '10.0.0.2'"],
    ),
    "address-unspecified-ipv6-listener": (
        first_listener(address="::"),
        ["spec.listeners[0].address: '::' is the unspecified address: omit address to listen"
         " on all"],
    ),
    "address-multicast-ipv6-backend": (
        first_listener(backends=[backend("ff02::1")]),
        ["spec.listeners[0].backends[0].address: 'ff02::1' is a multicast address"],
    ),
    "address-unspecified-listener": (
        first_listener(address="0.0.0.0"),
        [
            "spec.listeners[0].address: '0.0.0.0' is the unspecified address:"
            " omit address to listen on all"
        ],
    ),
    "address-multicast-backend": (
        first_listener(backends=[backend("224.0.0.1")]),
        ["spec.listeners[0].backends[0].address: '224.0.0.1' is a multicast address"],
    ),
    "address-broadcast-backend": (
        first_listener(backends=[backend("255.255.255.255")]),
        ["spec.listeners[0].backends[0].address: '255.255.255.255' is the broadcast address"],
    ),
    "cidr-host-bits": (
        first_listener(sourceRoutes=[{"cidr": "198.51.100.1/24", "backends": [backend()]}]),
        [
            "spec.listeners[0].sourceRoutes[0].cidr: '198.51.100.1/24' has host bits set"
            " (the network is '198.51.100.0/24')"
        ],
    ),
    "cidr-invalid": (
        first_listener(sourceRoutes=[{"cidr": "198.51.100.0/33", "backends": [backend()]}]),
        ["spec.listeners[0].sourceRoutes[0].cidr: '198.51.100.0/33' is not a valid CIDR"],
    ),
    "cidr-ipv6-on-ipv4": (
        first_listener(sourceRoutes=[{"cidr": "2001:db8::/32", "backends": [backend()]}]),
        ["spec.listeners[0].sourceRoutes[0].cidr: '2001:db8::/32' is not an IPv4 network,"
         " the listener's family"],
    ),
    "cidr-ipv6-host-bits": (
        first_listener(address="2001:db8::1", backends=[backend("2001:db8::2")],
                       sourceRoutes=[{"cidr": "2001:db8::1/64",
                                      "backends": [backend("2001:db8::3")]}]),
        ["spec.listeners[0].sourceRoutes[0].cidr: '2001:db8::1/64' has host bits set"
         " (the network is '2001:db8::/64')"],
    ),
    "cidr-duplicate": (
        first_listener(
            sourceRoutes=[
                {"cidr": "198.51.100.0/24", "backends": [backend()]},
                {"cidr": "198.51.100.0/255.255.255.0", "backends": [backend()]},
            ]
        ),
        [
            "spec.listeners[0].sourceRoutes[1].cidr: '198.51.100.0/24' is also used by"
            " spec.listeners[0].sourceRoutes[0]"
        ],
    ),
    # duplicates
    "backend-duplicate": (
        first_listener(backends=[backend(), backend("10.0.0.12"), backend(weight=5)]),
        [
            "spec.listeners[0].backends[2]: backend 10.0.0.11:8080 is also listed at"
            " spec.listeners[0].backends[0]"
        ],
    ),
    "backend-duplicate-in-route": (
        first_listener(
            sourceRoutes=[{"cidr": "198.51.100.0/24", "backends": [backend(), backend()]}]
        ),
        [
            "spec.listeners[0].sourceRoutes[0].backends[1]: backend 10.0.0.11:8080 is also"
            " listed at spec.listeners[0].sourceRoutes[0].backends[0]"
        ],
    ),
    "listener-identity-duplicate": (
        manifest(
            listeners=[listener("a", address="192.0.2.10"), listener("b", address="192.0.2.10")]
        ),
        ["spec.listeners[1]: listener 192.0.2.10:80/TCP is also defined by spec.listeners[0]"],
    ),
    # hostnames
    "hostname-upper-case": (
        sni("API.example.com"),
        ["spec.listeners[0].sniRoutes[0].hostname: 'API.example.com' must be lower-case"],
    ),
    "hostname-non-ascii": (
        sni("bücher.example"),
        [
            "spec.listeners[0].sniRoutes[0].hostname: 'bücher.example' must be ASCII:"
            " use the IDNA form 'xn--bcher-kva.example'"
        ],
    ),
    "hostname-one-label": (
        sni("localhost"),
        [
            "spec.listeners[0].sniRoutes[0].hostname: 'localhost' must have at least two labels,"
            " like example.com"
        ],
    ),
    "hostname-empty-label": (
        sni("example.com."),
        ["spec.listeners[0].sniRoutes[0].hostname: 'example.com.' has an empty label"],
    ),
    "hostname-wildcard": (
        sni("*.example.com"),
        [
            "spec.listeners[0].sniRoutes[0].hostname: '*.example.com': wildcard hostnames are"
            " not supported"
        ],
    ),
    "hostname-character": (
        sni("a_b.example.com"),
        [
            "spec.listeners[0].sniRoutes[0].hostname: 'a_b.example.com': label 'a_b' may"
            " contain only a-z, 0-9 and '-'"
        ],
    ),
    "hostname-hyphen": (
        sni("-a.example.com"),
        [
            "spec.listeners[0].sniRoutes[0].hostname: '-a.example.com': label '-a' must not"
            " start or end with '-'"
        ],
    ),
    "hostname-label-length": (
        sni("a" * 64 + ".com"),
        [
            f"spec.listeners[0].sniRoutes[0].hostname: '{'a' * 64}.com': label '{'a' * 64}'"
            " is longer than 63 characters"
        ],
    ),
    "hostname-length": (
        sni(".".join(["a" * 63] * 4)),
        [
            "spec.listeners[0].sniRoutes[0].hostname: '"
            + ("a" * 63 + ".")
            + "a" * 13
            + "...' is longer than 253 characters"
        ],
    ),
    "hostname-duplicate": (
        first_listener(
            sniRoutes=[
                {"hostname": "api.example.com", "backends": [backend()]},
                {"hostname": "api.example.com", "backends": [backend()]},
            ]
        ),
        [
            "spec.listeners[0].sniRoutes[1].hostname: 'api.example.com' is also used by"
            " spec.listeners[0].sniRoutes[0]",
        ],
    ),
    # product state
    "sni-on-udp": (
        sni("api.example.com", protocol="UDP"),
        ["spec.listeners[0].sniRoutes: sniRoutes are allowed only with protocol TCP"],
    ),
    "proxy-protocol-without-sni": (
        first_listener(proxyProtocol="v2"),
        ["spec.listeners[0].proxyProtocol: proxyProtocol needs sniRoutes (the header is added"
         " by the SNI acceptor)"],
    ),
    "proxy-protocol-with-source-routes": (
        sni("api.example.com", proxyProtocol="v2",
            sourceRoutes=[{"cidr": "198.51.100.0/24", "backends": [backend()]}]),
        ["spec.listeners[0].proxyProtocol: proxyProtocol cannot be combined with sourceRoutes"
         " (source-routed flows bypass the SNI acceptor)"],
    ),
    "proxy-protocol-v1": (
        sni("api.example.com", proxyProtocol="v1"),
        ["spec.listeners[0].proxyProtocol: expected v2, got 'v1'"],
    ),
}


@pytest.mark.parametrize(("doc", "expected"), BAD.values(), ids=BAD.keys())
def test_bad_manifests(doc: Any, expected: list[str]) -> None:
    lines = problems(doc)
    # The document label is covered by the loader tests; here only path and message.
    assert all(line.startswith(f"{SRC} document 1") for line in lines)
    assert [re.sub(r"^t\.yaml document 1( \([^)]*\))?: ", "", line) for line in lines] == expected


@pytest.mark.parametrize(("doc", "expected"), BAD.values(), ids=BAD.keys())
def test_model_reports_same_lines(doc: Any, expected: list[str]) -> None:
    # The model alone (the operator's path) produces the same lines as the loader.
    with pytest.raises(ValidationError) as info:
        LoadBalancer.model_validate(doc)
    lines = format_errors(info.value)
    assert lines == expected
    for line in lines:
        assert "https://" not in line
        assert "Traceback" not in line
        assert "\n" not in line


def test_errors_of_all_fields_are_collected() -> None:
    doc = manifest(
        listeners=[
            listener("Http", protocol="SCTP", port=70000),
            listener("b", backends=[backend("x", weight=-1)]),
        ]
    )
    assert problems(doc) == [
        PREFIX + line
        for line in [
            "spec.listeners[0].name: 'Http' is not a valid listener name: use 1 to 63 lower-case"
            " letters, digits and '-', starting and ending with a letter or digit",
            "spec.listeners[0].protocol: 'SCTP' is not one of TCP, UDP",
            "spec.listeners[0].port: 70000 is not a valid port",
            "spec.listeners[1].backends[0].address: 'x' is not a valid IP address",
            "spec.listeners[1].backends[0].weight: -1 is not a valid weight (0..65535)",
        ]
    ]


def test_too_many_source_routes() -> None:
    routes = [
        {"cidr": f"10.{i // 256}.{i % 256}.0/24", "backends": [backend()]} for i in range(10001)
    ]
    with pytest.raises(ValidationError) as info:
        LoadBalancer.model_validate(first_listener(sourceRoutes=routes))
    assert format_errors(info.value) == [
        "spec.listeners[0].sourceRoutes: must have at most 10000 items"
    ]


def test_check_rules_is_pure_and_reports_paths() -> None:
    # Models are mutable without re-validation, so check_rules can be run on its own.
    lb = LoadBalancer.model_validate(manifest(listeners=[listener("a"), listener("b", port=81)]))
    lb.spec.listeners[1].name = "a"
    assert check_rules(lb) == [("spec.listeners[1].name", "'a' is used by spec.listeners[0]")]


# --- loader ----------------------------------------------------------------------


def test_document_level_errors() -> None:
    text = "- a\n---\nkind: Service\nmetadata: {name: svc}\n---\nmetadata: {name: x}\n"
    with pytest.raises(SpecError) as info:
        parse_manifests(text, SRC)
    assert info.value.errors == [
        f"{SRC} document 1: document must be a mapping, got a list",
        f"{SRC} document 2 (default/svc): kind: expected LoadBalancer, got 'Service'",
        f"{SRC} document 3 (default/x): kind: is required",
    ]


def test_multi_document_duplicates() -> None:
    api = manifest("api", listeners=[listener("http", address="192.0.2.10")])
    web = manifest(
        "web",
        listeners=[
            listener("http", address="192.0.2.11"),
            listener("dup", address="192.0.2.10"),
            listener("udp", address="192.0.2.10", protocol="UDP"),  # other protocol: fine
            listener("any"),  # wildcard differs from a specific address: fine
        ],
    )
    web_again = manifest("web", listeners=[listener("x", port=8080)])
    broken = manifest("broken", listeners=[listener(port=0)])
    text = dump(api, web) + "---\n---\n" + dump(web_again, broken)  # document 3 is empty
    with pytest.raises(SpecError) as info:
        parse_manifests(text, SRC)
    assert info.value.errors == [
        f"{SRC} document 5 (default/broken): spec.listeners[0].port: 0 is not a valid port",
        f"{SRC} document 2 (default/web): spec.listeners[1]: listener 192.0.2.10:80/TCP"
        " is also defined by default/api spec.listeners[0]",
        f"{SRC} document 4 (default/web): metadata.name: LoadBalancer default/web"
        f" is also defined by {SRC} document 2 (default/web)",
    ]
    assert str(info.value) == "\n".join(info.value.errors)


def test_same_name_other_namespace_is_fine() -> None:
    docs = [manifest("web"), manifest("web", namespace="prod", listeners=[listener(port=81)])]
    lbs = parse_manifests(dump(*docs), SRC)
    assert [lb.qualified_name for lb in lbs] == ["default/web", "prod/web"]


def test_empty_input() -> None:
    assert parse_manifests("", SRC) == []
    assert parse_manifests("---\n---\n", SRC) == []


def many_listeners(name: str, count: int, routes: int = 0, key: str = "sourceRoutes") -> Any:
    def route(i: int) -> dict[str, Any]:
        if key == "sniRoutes":
            return {"hostname": f"h{i}.example.com", "backends": [backend()]}
        return {"cidr": f"10.{i}.0.0/16", "backends": [backend()]}

    return manifest(
        name,
        listeners=[
            listener(f"l{i}", address=f"192.0.2.{len(name)}", port=1000 + i, **{key: [route(i)]})
            if i < routes
            else listener(f"l{i}", address=f"192.0.2.{len(name)}", port=1000 + i)
            for i in range(count)
        ],
    )


def test_limit_listeners() -> None:
    docs = [many_listeners("a", 2), many_listeners("bb", 2)]
    assert problems(*docs, limits=Limits(max_listeners=4)) == []
    assert problems(*docs, limits=Limits(max_listeners=3)) == [
        f"{SRC}: 4 listeners exceed the capacity 3 (--max-listeners)"
    ]


def test_limit_source_routes() -> None:
    docs = [many_listeners("a", 2, routes=2), many_listeners("bb", 1, routes=1)]
    assert problems(*docs, limits=Limits(max_source_routes=3)) == []
    assert problems(*docs, limits=Limits(max_source_routes=2)) == [
        f"{SRC}: 3 source routes exceed the capacity 2 (--max-source-routes)"
    ]


def test_limit_sni_routes() -> None:
    docs = [many_listeners("a", 2, routes=2, key="sniRoutes")]
    assert problems(*docs, limits=Limits(max_sni_routes=2)) == []
    assert problems(*docs, limits=Limits(max_sni_routes=1)) == [
        f"{SRC}: 2 SNI routes exceed the capacity 1 (the SNI map)"
    ]


def test_limit_backends_per_group() -> None:
    doc = first_listener(
        backends=[backend("10.0.0.1"), backend("10.0.0.2")],
        sourceRoutes=[{"cidr": "198.51.100.0/24", "backends": [backend("10.0.0.3")]}],
    )
    assert problems(doc, limits=Limits(max_backends_per_group=2)) == []
    assert problems(doc, limits=Limits(max_backends_per_group=1)) == [
        PREFIX + "spec.listeners[0].backends: 2 backends exceed the capacity 1"
        " of a group"
    ]


def test_default_limits() -> None:
    assert Limits() == Limits(
        max_listeners=4096,
        max_backends_per_group=1024,
        max_source_routes=1_000_000,
        max_sni_routes=1_000_000,
    )


def test_yaml_syntax_error() -> None:
    text = "apiVersion: xdplb.io/v1alpha1\nspec:\n  listeners: [a, b\nkind: LoadBalancer\n"
    with pytest.raises(SpecError) as info:
        parse_manifests(text, SRC)
    (line,) = info.value.errors
    assert line.startswith(f"{SRC}: line 4, column 5: ")
    assert "Traceback" not in line


def test_yaml_duplicate_key() -> None:
    text = dump(manifest()).replace("    port: 80\n", "    port: 80\n    port: 81\n", 1)
    assert "port: 81" in text
    with pytest.raises(SpecError) as info:
        parse_manifests(text, SRC)
    assert re.fullmatch(rf"{SRC}: line \d+, column \d+: duplicate key 'port'", str(info.value))


def test_yaml_is_safe() -> None:
    with pytest.raises(SpecError) as info:
        parse_manifests("!!python/object/apply:os.system ['true']\n", SRC)
    assert "could not determine a constructor" in str(info.value)


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "lb.yaml"
    path.write_text(dump(manifest(), manifest("api", listeners=[listener(port=443)])))
    assert [lb.qualified_name for lb in load_file(path)] == ["default/web", "default/api"]

    path.write_text(dump(first_listener(port=0)))
    with pytest.raises(SpecError) as info:
        load_file(str(path))
    assert info.value.errors == [
        f"{path} document 1 (default/web): spec.listeners[0].port: 0 is not a valid port"
    ]


def test_load_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"missing\.yaml: cannot read: No such file"):
        load_file(tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_file(binary)


# --- schema ------------------------------------------------------------------------


def test_json_schema_has_bounds() -> None:
    schema = LoadBalancer.model_json_schema(by_alias=True)
    defs = schema["$defs"]
    assert set(schema["required"]) == {"apiVersion", "kind", "metadata", "spec"}
    assert schema["additionalProperties"] is False
    backend_props = defs["Backend"]["properties"]
    assert (backend_props["port"]["minimum"], backend_props["port"]["maximum"]) == (1, 65535)
    assert (backend_props["weight"]["minimum"], backend_props["weight"]["maximum"]) == (0, 65535)
    assert backend_props["weight"]["default"] == 1
    listener_props = defs["Listener"]["properties"]
    assert (listener_props["port"]["minimum"], listener_props["port"]["maximum"]) == (1, 65535)
    assert listener_props["protocol"]["enum"] == ["TCP", "UDP"]
    assert listener_props["sessionAffinity"]["default"] == "None"
    assert (listener_props["backends"]["minItems"], listener_props["backends"]["maxItems"]) == (
        1,
        1024,
    )
    assert listener_props["sourceRoutes"]["maxItems"] == 10000
    assert listener_props["sniRoutes"]["maxItems"] == 10000
    assert listener_props["name"]["maxLength"] == 63
    listeners = defs["LoadBalancerSpec"]["properties"]["listeners"]
    assert (listeners["minItems"], listeners["maxItems"]) == (1, 64)
    hostname = defs["SniRoute"]["properties"]["hostname"]
    assert (hostname["maxLength"], hostname["pattern"]) == (253, HOSTNAME_PATTERN)
    assert defs["Metadata"]["additionalProperties"] is True
    for name in ("Backend", "Listener", "SourceRoute", "SniRoute", "LoadBalancerSpec"):
        assert defs[name]["additionalProperties"] is False


# --- properties ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="aZ09-._ü*", max_size=70) | st.from_regex(HOSTNAME_PATTERN, fullmatch=True))
def test_hostname_problem_agrees_with_schema_pattern(host: str) -> None:
    schema_ok = len(host) <= 253 and re.fullmatch(HOSTNAME_PATTERN, host) is not None
    assert (hostname_problem(host) is None) == schema_ok


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["name", "port", "backends", "listeners", "address", "x"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(spec=json_like, metadata=json_like)
def test_format_errors_always_one_clean_line_per_problem(spec: Any, metadata: Any) -> None:
    doc = {
        "apiVersion": "xdplb.io/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": metadata,
        "spec": spec,
    }
    try:
        LoadBalancer.model_validate(doc)
    except ValidationError as exc:
        lines = format_errors(exc)
        assert lines
        for line in lines:
            assert re.fullmatch(r"[^\s:]+: \S.*", line), line
            assert "https://" not in line and "Traceback" not in line and "\n" not in line


# --- re-reading a file -------------------------------------------------------------------------


def three_documents(port_b: int = 81) -> str:
    return "".join(
        f"---\napiVersion: xdplb.io/v1alpha1\nkind: LoadBalancer\nmetadata: {{name: {name}}}\n"
        f"spec:\n  listeners:\n  - name: http\n    protocol: TCP\n    port: {port}\n"
        f"    address: 192.0.2.10\n    backends: [{{address: 10.0.0.1, port: 8080}}]\n"
        for name, port in (("a", 80), ("b", port_b), ("c", 82)))


def test_document_cache_parses_only_changed_documents() -> None:
    cache = DocumentCache()
    first = parse_manifests(three_documents(), "lb.yaml", cache=cache)
    second = parse_manifests(three_documents(port_b=83), "lb.yaml", cache=cache)
    assert [lb.metadata.name for lb in second] == ["a", "b", "c"]
    assert second[0] is first[0] and second[2] is first[2]  # taken from the cache
    assert second[1] is not first[1] and second[1].spec.listeners[0].port == 83
    assert len(cache.entries) == 3  # only the documents of the last parse are kept


def test_document_cache_keeps_numbers_and_lines_of_later_documents() -> None:
    cache = DocumentCache()
    parse_manifests(three_documents(), "lb.yaml", cache=cache)
    bad = three_documents().replace("port: 82", "port: 70000")
    with pytest.raises(SpecError) as info:
        parse_manifests(bad, "lb.yaml", cache=cache)
    assert info.value.errors == [
        "lb.yaml document 3 (default/c): spec.listeners[0].port: 70000 is not a valid port"]
    broken = three_documents().replace("  listeners:\n  - name: http\n    protocol: TCP\n"
                                       "    port: 82", "  listeners: [\n    port: 82")
    with pytest.raises(SpecError) as info:
        parse_manifests(broken, "lb.yaml", cache=cache)
    (line,) = info.value.errors
    with pytest.raises(yaml.MarkedYAMLError) as whole:  # the file read in one piece
        list(yaml.safe_load_all(broken))
    mark = whole.value.problem_mark
    assert mark is not None and mark.line > 20  # in the third document
    assert line.startswith(f"lb.yaml: line {mark.line + 1}, column {mark.column + 1}: "), line


def test_equal_route_backend_lists_become_one_list_each_still_validated() -> None:
    routes = [{"cidr": f"10.{i}.0.0/16", "backends": [backend()]} for i in range(3)]
    routes.append({"cidr": "10.8.0.0/16", "backends": [backend(port=9090)]})
    lb = model.LoadBalancer.parse(manifest(listeners=[listener(sourceRoutes=routes)]))
    lists = [r.backends for r in lb.spec.listeners[0].source_routes]
    assert lists[0] is lists[1] is lists[2] and lists[3] is not lists[0]
    assert lists[3] == [model.Backend(address="10.0.0.11", port=9090)]
    # A value equal to a valid one but of another type is validated on its own.
    routes.append({"cidr": "10.9.0.0/16", "backends": [backend(port=True)]})
    assert problems(manifest(listeners=[listener(sourceRoutes=routes)])) == [
        "t.yaml document 1 (default/web): spec.listeners[0].sourceRoutes[4].backends[0].port:"
        " true is not an integer"]
