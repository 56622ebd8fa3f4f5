"""Listener conflicts between LoadBalancers: oldest wins, wildcards overlap VIPs."""

from __future__ import annotations

from xdplb.k8s.conflicts import Claim, Endpoint, claim_of, resolve


def claim(name: str, created: str, *eps: tuple[str | None, int, str], ns: str = "default"
          ) -> Claim:
    return Claim((ns, name), created,
                 tuple(Endpoint(f"l{i}", a, p, proto) for i, (a, p, proto) in enumerate(eps)))


T1, T2, T3 = "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z", "2026-01-01T00:00:03Z"


def test_same_address_port_protocol_the_younger_loses_naming_the_winner() -> None:
    old = claim("old", T1, ("192.0.2.10", 80, "TCP"))
    new = claim("new", T2, ("192.0.2.10", 80, "TCP"))
    losers = resolve([new, old])
    assert set(losers) == {("default", "new")}
    c = losers[("default", "new")]
    assert c.winner == ("default", "old")
    assert c.message() == ("listener 'l0' (192.0.2.10:80/TCP) overlaps listener 'l0'"
                           " (192.0.2.10:80/TCP) of LoadBalancer default/old, which is older")


def test_wildcard_overlaps_a_vip_on_the_same_port_in_both_orders() -> None:
    vip = claim("vip", T1, ("192.0.2.10", 80, "TCP"))
    wild = claim("wild", T2, (None, 80, "TCP"))
    assert resolve([vip, wild])[("default", "wild")].winner == ("default", "vip")
    wild_first = claim("wild", T1, (None, 80, "TCP"))
    vip_later = claim("vip", T2, ("192.0.2.10", 80, "TCP"))
    assert resolve([vip_later, wild_first])[("default", "vip")].winner == ("default", "wild")


def test_no_conflict_across_protocols_ports_or_addresses() -> None:
    claims = [claim("a", T1, ("192.0.2.10", 80, "TCP")),
              claim("b", T2, ("192.0.2.10", 80, "UDP")),
              claim("c", T3, ("192.0.2.10", 81, "TCP"), ("192.0.2.11", 80, "TCP"))]
    assert resolve(claims) == {}


def test_same_age_falls_back_to_namespace_then_name() -> None:
    a = claim("b", T1, ("192.0.2.10", 80, "TCP"), ns="alpha")
    b = claim("a", T1, ("192.0.2.10", 80, "TCP"), ns="beta")
    assert resolve([b, a])[("beta", "a")].winner == ("alpha", "b")


def test_a_loser_blocks_nobody() -> None:
    first = claim("first", T1, ("192.0.2.10", 80, "TCP"))
    second = claim("second", T2, ("192.0.2.10", 80, "TCP"), ("192.0.2.20", 443, "TCP"))
    third = claim("third", T3, ("192.0.2.20", 443, "TCP"))
    assert set(resolve([first, second, third])) == {("default", "second")}


def test_claim_of_reads_a_manifest_spec() -> None:
    spec = {"listeners": [{"name": "dns", "protocol": "UDP", "port": 53},
                          {"name": "web", "protocol": "TCP", "port": 80, "address": "192.0.2.1"}]}
    c = claim_of(("ns", "x"), T1, spec)
    assert c.endpoints == (Endpoint("dns", None, 53, "UDP"),
                           Endpoint("web", "192.0.2.1", 80, "TCP"))
    assert str(c.endpoints[0]) == "*:53/UDP"
