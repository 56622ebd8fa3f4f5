"""`xdplb explain` (plan.explain, pure Python) predicts what the XDP program does with a
new flow: random SYNs through PROG_TEST_RUN land exactly where explain says, before and
after a backend is removed."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP

from tests.datapath import (
    XDP_DROP,
    XDP_PASS,
    Harness,
    backend,
    ether,
    listener,
    needs_bpf,
    plan_of,
)
from xdplb.plan.explain import explain
from xdplb.plan.model import Plan

pytestmark = needs_bpf

SEED = 20240611
PER_PHASE = 6000

# Template SYN: the program checks no checksum, so addresses and ports are packed in.
TEMPLATE = bytes(ether() / IP(src="10.10.1.2", dst="192.0.2.10")
                 / TCP(sport=40000, dport=80, flags="S", seq=1))
IP_OFF = 14
SRC_OFF, DST_OFF = IP_OFF + 12, IP_OFF + 16
SPORT_OFF, DPORT_OFF = IP_OFF + 20, IP_OFF + 22


def _backends(prefix: str, n: int, port: int = 8080, zero: int | None = None) -> list[dict]:
    return [backend(f"{prefix}.{i + 2}", port, 0 if i == zero else 1 + i % 3)
            for i in range(n)]


def listeners(drop: bool) -> list[dict]:
    """drop: the second phase, one backend fewer in several groups."""
    web_default = _backends("10.20.1", 5, zero=2)
    routed = _backends("10.20.2", 3)
    api_default = _backends("10.20.5", 4)
    if drop:
        web_default = [b for b in web_default if b["address"] != "10.20.1.3"]
        routed = routed[:-1]
        api_default = api_default[1:]
    return [
        listener("web", 80, web_default, sourceRoutes=[
            {"cidr": "10.10.0.0/16", "backends": routed},
            {"cidr": "10.10.2.0/24", "backends": _backends("10.20.3", 2)},
            {"cidr": "10.10.2.128/25", "backends": _backends("10.20.4", 4, zero=0)},
            {"cidr": "10.10.2.77/32", "backends": [backend("10.20.9.9", 9999)]},
        ]),
        listener("api", 443, api_default, address="192.0.2.11",
                 sessionAffinity="ClientIP", sourceRoutes=[
                     {"cidr": "10.10.3.0/24", "backends": _backends("10.20.6", 2)}]),
        listener("closed", 8000, [backend("10.20.7.2", 8080, 0)], address="192.0.2.12",
                 sourceRoutes=[{"cidr": "10.10.4.0/24",
                                "backends": _backends("10.20.8", 2)}]),
        listener("any", 9000, _backends("10.20.10", 3), address=None),
    ]


DESTINATIONS = [("192.0.2.10", 80), ("192.0.2.11", 443), ("192.0.2.12", 8000),
                ("127.0.0.1", 9000), ("192.0.2.10", 81), ("192.0.2.13", 80)]
DEST_WEIGHTS = [45, 25, 12, 10, 4, 4]
SOURCE_NETS = [ipaddress.IPv4Network(n) for n in
               ("10.10.1.0/24", "10.10.2.0/24", "10.10.2.64/30", "10.10.3.0/24",
                "10.10.4.0/24", "10.10.0.0/16", "10.11.0.0/16", "172.16.0.0/12")]


def _flows(rng: random.Random, n: int) -> list[tuple[str, int, str, int]]:
    seen: set[tuple[str, int, str, int]] = set()
    out = []
    while len(out) < n:
        net = rng.choice(SOURCE_NETS)
        src = str(net.network_address + rng.randrange(net.num_addresses))
        if rng.random() < 0.02:
            src = "10.10.2.77"
        dst, dport = rng.choices(DESTINATIONS, DEST_WEIGHTS)[0]
        flow = (src, rng.randrange(1024, 65536), dst, dport)
        if flow not in seen:
            seen.add(flow)
            out.append(flow)
    return out


def _frame(src: str, sport: int, dst: str, dport: int) -> bytes:
    b = bytearray(TEMPLATE)
    b[SRC_OFF:SRC_OFF + 4] = ipaddress.IPv4Address(src).packed
    b[DST_OFF:DST_OFF + 4] = ipaddress.IPv4Address(dst).packed
    struct.pack_into("!HH", b, SPORT_OFF, sport, dport)
    return bytes(b)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def _run_phase(h: Harness, plan: Plan, rng: random.Random) -> Counter[str]:
    h.flush_ct()
    seen: Counter[str] = Counter()
    mismatches = []
    for src, sport, dst, dport in _flows(rng, PER_PHASE):
        e = explain(plan, src, sport, dst, dport, "TCP", local_addresses=None)
        frame = _frame(src, sport, dst, dport)
        r = h.xdp(frame)
        if e.verdict == "dnat":
            assert e.backend is not None and e.backend.weight > 0
            got = (r.retval, str(ipaddress.IPv4Address(r.data[DST_OFF:DST_OFF + 4])),
                   struct.unpack_from("!H", r.data, DPORT_OFF)[0])
            want = (XDP_PASS, e.backend.address, e.backend.port)
            seen["dnat " + e.route.split()[0] + (" client-ip" if dport == 443 else "")] += 1
        elif e.verdict == "rst":
            got, want = (r.sent_back, len(r.data)), (True, 54)
            seen["rst"] += 1
        elif e.verdict == "drop":
            got, want = r.retval, XDP_DROP
            seen["drop"] += 1
        else:
            got, want = (r.retval, r.data), (XDP_PASS, frame)
            seen[e.verdict] += 1
        if got != want:
            mismatches.append(((src, sport, dst, dport), e.text(), got, want))
    assert mismatches == [], f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
    return seen


def test_explain_predicts_the_data_path(harness: Harness) -> None:
    h = harness
    h.reset()
    rng = random.Random(SEED)
    total: Counter[str] = Counter()
    for drop in (False, True):
        plan = plan_of(*listeners(drop))
        h.apply(plan)
        total += _run_phase(h, plan, rng)
    assert sum(total.values()) >= 10_000
    # every path was taken often enough to mean something
    for path in ("dnat default", "dnat source", "dnat default client-ip",
                 "dnat source client-ip", "rst", "drop", "pass"):
        assert total[path] >= 100, (path, total)
