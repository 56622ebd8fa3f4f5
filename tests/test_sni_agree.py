"""The SNI acceptor, `xdplb explain` and XDP pick the same backend after an apply.

XDP never picks for an SNI flow (it leaves the flow to the acceptor), so the listeners
here also have source routes whose groups are the SNI routes' groups (the same backends
and weights make the same group, so the same Maglev table): a SYN from a routed client
takes XDP through that table with the flow hash, and the acceptor's pick for the route's
hostname, from the snapshot the agent hands it, must land on the same backend, as must
`explain` with the server name. Random flows, before and after the groups change."""

from __future__ import annotations

import ipaddress
import random
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.datapath import XDP_PASS, Harness, backend, dst_of, listener, needs_bpf, plan_of, syn
from xdplb.plan.explain import explain
from xdplb.plan.model import Plan
from xdplb.sni.routes import Route, RoutingReceiver, RoutingSender, pick_for

pytestmark = needs_bpf

FLOWS = 1500


def groups(changed: bool) -> dict[str, list[dict[str, Any]]]:
    a = [backend(f"10.30.1.{i}", 443, 1 + i % 3) for i in range(2, 7)]
    b = [backend("10.30.2.2", 443), backend("10.30.2.3", 8443)]
    default = [backend(f"10.30.3.{i}", 443) for i in range(2, 5)]
    if changed:        # one backend more, one fewer, a weight to 0
        a = [*a[1:], backend("10.30.1.9", 443, 2)]
        default[0] = backend("10.30.3.2", 443, 0)
    return {"a": a, "b": b, "default": default}


def plan(changed: bool) -> Plan:
    g = groups(changed)

    def tls(name: str, address: str, **extra: Any) -> dict[str, Any]:
        return listener(name, 443, g["default"], address=address, sourceRoutes=[
            {"cidr": "10.10.0.0/16", "backends": g["a"]},
            {"cidr": "10.11.0.0/16", "backends": g["b"]},
            {"cidr": "10.12.0.0/16", "backends": g["default"]}], sniRoutes=[
            {"hostname": "a.example.com", "backends": g["a"]},
            {"hostname": "b.example.com", "backends": g["b"]}], **extra)

    return plan_of(tls("tls", "192.0.2.10"),
                   tls("sticky", "192.0.2.11", sessionAffinity="ClientIP"))


# The SNI name whose group is the source route's, for each routed client network.
NAME_OF_NET = {"10.10.0.0/16": "a.example.com", "10.11.0.0/16": "b.example.com",
               "10.12.0.0/16": "unknown.example.com"}


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def _check(h: Harness, p: Plan, rng: random.Random) -> Counter[str]:
    h.flush_ct()
    h.apply(p)
    recv = RoutingReceiver()
    recv.apply(RoutingSender().update(p, h.writer.listener_ids))
    seen: Counter[str] = Counter()
    mismatches = []
    for _ in range(FLOWS):
        net = rng.choice(list(NAME_OF_NET))
        network = ipaddress.IPv4Network(net)
        src = str(network.network_address + rng.randrange(1, network.num_addresses - 1))
        sport = rng.randrange(1024, 65536)
        lst = rng.choice(p.listeners)
        assert lst.address is not None
        name = NAME_OF_NET[net]
        route = Route(h.writer.listener_ids[lst.identity], lst.label,
                      lst.client_ip_affinity)
        acceptor = pick_for(recv.routing, route, name, socket.AF_INET, (src, sport),
                            int(ipaddress.IPv4Address(lst.address)), 443)
        e = explain(p, src, sport, lst.address, 443, "TCP", server_name=name)
        run = h.xdp(syn(src, sport, lst.address, 443))
        assert run.retval == XDP_PASS
        xdp = dst_of(run.data)
        got = (acceptor.address if acceptor else None,
               (e.backend.address, e.backend.port) if e.backend else None, xdp)
        if len(set(got)) != 1:
            mismatches.append((src, sport, lst.label, name, got))
        seen[f"{lst.label} {xdp[0]}"] += 1
    assert mismatches == [], f"{len(mismatches)} of {FLOWS} differ, first: {mismatches[:3]}"
    return seen


def test_acceptor_explain_and_xdp_agree(harness: Harness) -> None:
    harness.reset()
    rng = random.Random(20261202)
    for changed in (False, True):
        seen = _check(harness, plan(changed), rng)
        # Every backend with a weight got flows, through both listeners.
        weighted = {b["address"] for g in groups(changed).values() for b in g if b["weight"]}
        for label in ("default/web/tls", "default/web/sticky"):
            assert {k.split()[1] for k in seen if k.startswith(label)} == weighted, seen
