"""IPv6 through the data path, with BPF_PROG_TEST_RUN on crafted frames: every path
IPv4 has (DNAT, conntrack, source routes, reverse NAT, source NAT both ways, ICMPv6
errors both ways, fragments, answers), extension headers, and the exact bytes and
checksums of each result (scapy computes the expected frame independently)."""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import replace
from typing import Any

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Ether

from tests.datapath import (
    CLIENT_MAC,
    INV,
    LB_MAC,
    TC_ACT_OK,
    XDP_DROP,
    XDP_PASS,
    Harness,
    backend,
    listener,
    needs_bpf,
    plan_of,
    stats_delta,
)
from xdplb.dataplane import layout as L
from xdplb.dataplane.layout import Stat
from xdplb.plan.explain import explain
from xdplb.plan.model import Plan

pytestmark = needs_bpf

VIP = "2001:db8::10"
CLIENT = "2001:db8:1::2"
B1 = ("2001:db8:20::2", 8080)
B2 = ("2001:db8:21::2", 8080)
UB1 = ("2001:db8:20::2", 5353)
NODE_B1 = "2001:db8:20::1"  # the node's address toward B1
SNAT_INV = replace(INV, routes={B1[0]: (NODE_B1, "lo"), B2[0]: ("2001:db8:21::1", "lo")})

TCP_LST = listener("tcp6", 80, [backend(*B1)], address=VIP)
UDP_LST = listener("udp6", 53, [backend(*UB1)], protocol="UDP", address=VIP)


def ether(reply: bool = False) -> Ether:
    return Ether(src=LB_MAC, dst=CLIENT_MAC) if reply else Ether(src=CLIENT_MAC, dst=LB_MAC)


def tcp6(src: str = CLIENT, sport: int = 40000, dst: str = VIP, dport: int = 80,
         flags: str = "S", payload: bytes = b"", ext: tuple[Any, ...] = (),
         seq: int = 1000, ack: int = 0) -> bytes:
    pkt = IPv6(src=src, dst=dst)
    for h in ext:
        pkt = pkt / h
    return bytes(ether() / pkt / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
                 / payload)


def udp6(src: str = CLIENT, sport: int = 40000, dst: str = VIP, dport: int = 53,
         payload: bytes = b"query") -> bytes:
    return bytes(ether() / IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def reply6(b: tuple[str, int] = B1, client: str = CLIENT, cport: int = 40000,
           flags: str = "SA", proto: str = "TCP", payload: bytes = b"") -> bytes:
    l4 = (TCP(sport=b[1], dport=cport, flags=flags, seq=5000, ack=1001) if proto == "TCP"
          else UDP(sport=b[1], dport=cport))
    return bytes(ether(reply=True) / IPv6(src=b[0], dst=client) / l4 / payload)


def rewritten6(frame: bytes, *, dst: tuple[str, int] | None = None,
               src: tuple[str, int] | None = None) -> bytes:
    """The frame with an end replaced and its L4 checksum recomputed by scapy."""
    pkt = Ether(frame)
    assert bytes(pkt) == frame, "scapy does not rebuild this frame byte for byte"
    ip, l4 = pkt[IPv6], pkt[TCP] if TCP in pkt else pkt[UDP]
    if dst:
        ip.dst, l4.dport = dst
    if src:
        ip.src, l4.sport = src
    del l4.chksum
    return bytes(pkt)


def valid6(frame: bytes) -> bool:
    """scapy computes the frame's outermost upper-layer checksum (ICMPv6's covers the
    quote, and the quote's own checksums are compared separately) to the value it holds."""
    pkt = Ether(frame)
    for layer, field in ((ICMPv6PacketTooBig, "cksum"), (ICMPv6DestUnreach, "cksum"),
                         (ICMPv6EchoReply, "cksum"), (TCP, "chksum"), (UDP, "chksum")):
        if layer in pkt:
            setattr(pkt[layer], field, None)
            return bytes(pkt) == frame
    raise AssertionError("no checksum to check")


def test_valid6_sees_a_wrong_checksum() -> None:
    frame = bytearray(reply6(payload=b"abc"))
    assert valid6(bytes(frame))
    frame[-1] ^= 1
    assert not valid6(bytes(frame))


def ct6(lb: Harness, src: str = CLIENT, sport: int = 40000, dst: str = VIP, dport: int = 80,
        proto: int = 6) -> L.CtVal:
    return lb.ct()[(src, sport, dst, dport, proto)]


def test_a_syn_is_dnatted_with_exact_bytes(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    frame = tcp6()
    before = lb.stats()
    r = lb.xdp(frame)
    assert (r.retval, r.data) == (XDP_PASS, rewritten6(frame, dst=B1))
    assert stats_delta(before, lb.stats()) == {Stat.NEW_DEFAULT: 1}
    f = ct6(lb)
    assert (L.from_ip(f.nat_addr), L.from_be16(f.nat_port)) == B1
    # The established segments follow the entry; the reply leaves from the VIP.
    data = tcp6(flags="PA", payload=b"GET /", seq=1001, ack=5001)
    assert lb.xdp(data).data == rewritten6(data, dst=B1)
    reply = reply6(flags="A", payload=b"HTTP/1.1 200")
    t = lb.tc(reply)
    assert (t.retval, t.data) == (TC_ACT_OK, rewritten6(reply, src=(VIP, 80)))
    assert stats_delta(before, lb.stats()) == {Stat.NEW_DEFAULT: 1, Stat.ESTABLISHED: 1,
                                               Stat.REPLY_NAT: 1}


def test_udp_both_ways(lb: Harness) -> None:
    lb.apply(plan_of(UDP_LST))
    frame = udp6()
    assert lb.xdp(frame).data == rewritten6(frame, dst=UB1)
    reply = reply6(UB1, proto="UDP", payload=b"answer")
    assert lb.tc(reply).data == rewritten6(reply, src=(VIP, 53))


def test_a_source_route_takes_the_longest_ipv6_prefix(lb: Harness) -> None:
    lst = listener("tcp6", 80, [backend(*B1)], address=VIP, sourceRoutes=[
        {"cidr": "2001:db8:1::/48", "backends": [backend(*B2)]},
        {"cidr": "2001:db8:1:0:ffff::/80", "backends": [backend(*B1)]},
    ])
    lb.apply(plan_of(lst))
    frame = tcp6(src="2001:db8:1:7::9")
    before = lb.stats()
    assert lb.xdp(frame).data == rewritten6(frame, dst=B2)
    frame = tcp6(src="2001:db8:1:0:ffff::9")
    assert lb.xdp(frame).data == rewritten6(frame, dst=B1)
    frame = tcp6(src="2001:db8:2::9")  # no route: the default group
    assert lb.xdp(frame).data == rewritten6(frame, dst=B1)
    assert stats_delta(before, lb.stats()) == {Stat.NEW_SRC_ROUTE: 2, Stat.NEW_DEFAULT: 1}


def test_client_ip_affinity_hashes_the_whole_address(lb: Harness) -> None:
    lst = listener("tcp6", 80, [backend(*B1), backend(*B2)], address=VIP,
                   sessionAffinity="ClientIP")
    plan = plan_of(lst)
    lb.apply(plan)
    for i in range(40):
        client = f"2001:db8:{i:x}::{i + 1:x}"
        want = explain(plan, client, 40000 + i, VIP, 80).backend
        assert want is not None
        frame = tcp6(src=client, sport=40000 + i)
        assert lb.xdp(frame).data == rewritten6(frame, dst=(want.address, want.port))


def test_source_nat_both_ways(lb: Harness) -> None:
    lb.apply(Plan(tuple(replace(x, source_nat=True) for x in plan_of(TCP_LST).listeners)),
             SNAT_INV)
    frame = tcp6()
    r = lb.xdp(frame)
    f = ct6(lb)
    assert f.flags & L.CT_SNAT and L.from_ip(f.snat_addr) == NODE_B1
    port = L.from_be16(f.snat_port)
    assert r.data == rewritten6(frame, dst=B1, src=(NODE_B1, port))
    # The backend answers the node; XDP sends it on to the client, from the VIP.
    answer = reply6(client=NODE_B1, cport=port)
    before = lb.stats()
    out = lb.xdp(answer)
    assert out.data == rewritten6(answer, src=(VIP, 80), dst=(CLIENT, 40000))
    assert stats_delta(before, lb.stats()) == {Stat.SNAT_REPLY: 1}


def test_extension_headers_are_walked(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    for ext in [(IPv6ExtHdrHopByHop(),), (IPv6ExtHdrDestOpt(),),
                (IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(), IPv6ExtHdrDestOpt())]:
        lb.flush_ct()
        frame = tcp6(ext=ext)
        assert lb.xdp(frame).data == rewritten6(frame, dst=B1), ext
    # Past the bound: passed untouched, and counted.
    frame = tcp6(ext=(IPv6ExtHdrHopByHop(),) + (IPv6ExtHdrDestOpt(),) * 4)
    before = lb.stats()
    r = lb.xdp(frame)
    assert (r.retval, r.data) == (XDP_PASS, frame)
    assert stats_delta(before, lb.stats()) == {Stat.UNPARSED: 1}


def test_fragments_follow_their_first(lb: Harness) -> None:
    lb.apply(plan_of(UDP_LST))
    whole = IPv6(src=CLIENT, dst=VIP) / IPv6ExtHdrFragment(id=0x1234) \
        / UDP(sport=40000, dport=53) / (b"x" * 3000)
    from scapy.layers.inet6 import fragment6
    first, *rest = fragment6(whole, 1280)
    frame = bytes(ether() / first)
    r = lb.xdp(frame)
    got = Ether(r.data)
    assert (got[IPv6].dst, got[UDP].dport) == (UB1[0], UB1[1])
    for frag in rest:
        frame = bytes(ether() / frag)
        out = Ether(lb.xdp(frame).data)
        assert (out[IPv6].src, out[IPv6].dst) == (CLIENT, UB1[0])
        assert bytes(out[IPv6].payload) == bytes(frag.payload)  # only the address moved
    # The reassembled datagram's checksum holds: the first fragment's covers it.
    lb.flush_ct()


def test_a_packet_too_big_reaches_the_backend_about_its_own_packet(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    lb.xdp(tcp6())
    # A router on the client's side cannot forward the LB's reply (VIP -> client).
    quoted = IPv6(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000, flags="A", seq=5001)
    ptb = bytes(ether() / IPv6(src="2001:db8:1::ff", dst=VIP)
                / ICMPv6PacketTooBig(mtu=1280) / quoted)
    before = lb.stats()
    r = lb.xdp(ptb)
    out = Ether(r.data)
    assert stats_delta(before, lb.stats()) == {Stat.ICMP_IN: 1}
    assert out[IPv6].dst == B1[0]  # to the backend ...
    inner = IPv6(bytes(out[ICMPv6PacketTooBig].payload))
    assert (inner.src, inner[TCP].sport) == (B1[0], B1[1])  # ... about its own packet
    assert valid6(r.data)
    want = IPv6(src=B1[0], dst=CLIENT) / TCP(sport=B1[1], dport=40000, flags="A", seq=5001)
    assert bytes(inner) == bytes(IPv6(bytes(want)))


def test_a_backend_error_reaches_the_client_about_its_packet_to_the_vip(lb: Harness) -> None:
    lb.apply(plan_of(UDP_LST))
    lb.xdp(udp6())
    # The backend cannot take the client's datagram (client -> backend, after DNAT).
    quoted = IPv6(src=CLIENT, dst=UB1[0]) / UDP(sport=40000, dport=UB1[1]) / b"query"
    err = bytes(ether(reply=True) / IPv6(src=UB1[0], dst=CLIENT)
                / ICMPv6DestUnreach(code=4) / quoted)
    before = lb.stats()
    t = lb.tc(err)
    out = Ether(t.data)
    assert stats_delta(before, lb.stats()) == {Stat.ICMP_OUT: 1}
    assert out[IPv6].src == VIP  # from the listener ...
    inner = IPv6(bytes(out[ICMPv6DestUnreach].payload))
    assert (inner.dst, inner[UDP].dport) == (VIP, 53)  # ... about the datagram to it
    assert valid6(t.data)


def test_a_vip_answers_pings_and_leaves_neighbour_discovery(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    ping = bytes(ether() / IPv6(src=CLIENT, dst=VIP, hlim=9) / ICMPv6EchoRequest(id=7, seq=3,
                                                                                 data=b"ping"))
    before = lb.stats()
    r = lb.xdp(ping)
    assert r.sent_back and stats_delta(before, lb.stats()) == {Stat.VIP_PING: 1}
    pong = Ether(r.data)
    assert (pong[IPv6].src, pong[IPv6].dst, pong[IPv6].hlim) == (VIP, CLIENT, 64)
    assert ICMPv6EchoReply in pong and pong[ICMPv6EchoReply].data == b"ping"
    assert valid6(r.data)
    ns = bytes(ether() / IPv6(src=CLIENT, dst=VIP) / ICMPv6ND_NS(tgt=VIP))
    r = lb.xdp(ns)
    assert (r.retval, r.data) == (XDP_PASS, ns)
    closed = tcp6(dport=22)
    assert lb.xdp(closed).retval == XDP_DROP


def test_a_syn_without_backend_gets_a_valid_rst(lb: Harness) -> None:
    lb.apply(plan_of(listener("tcp6", 80, [backend(*B1, weight=0)], address=VIP)))
    r = lb.xdp(tcp6())
    assert r.sent_back
    rst = Ether(r.data)
    assert (rst[IPv6].src, rst[IPv6].dst, rst[IPv6].plen) == (VIP, CLIENT, 20)
    assert rst[TCP].flags == "RA" and rst[TCP].ack == 1001 and valid6(r.data)


def test_a_partial_checksum_is_left_to_tc(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    pkt = Ether(tcp6())
    ip = pkt[IPv6]
    # The pseudo-header sum alone, as a local sender hands it over.
    b = bytearray(bytes(pkt))
    total = sum(int.from_bytes(bytes(IPv6(src=ip.src, dst=ip.dst))[8 + i:10 + i], "big")
                for i in range(0, 32, 2)) + 6 + len(pkt[TCP])
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    b[14 + 40 + 16:14 + 40 + 18] = total.to_bytes(2, "big")
    frame = bytes(b)
    r = lb.xdp(frame)
    assert (r.retval, r.data) == (XDP_PASS, frame)
    assert L.DeferMeta.from_buffer_copy(r.meta).kind == L.DEFER_FORWARD


def test_mutated_ipv6_frames_never_abort(lb: Harness) -> None:
    # Every byte of a few templates at random values: the verdict is always one of the
    # data path's own, and an untouched frame comes back unchanged.
    lb.apply(plan_of(TCP_LST, UDP_LST))
    rng = random.Random(6)
    templates = [tcp6(), udp6(), tcp6(ext=(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())),
                 bytes(ether() / IPv6(src=CLIENT, dst=VIP) / ICMPv6EchoRequest()),
                 bytes(ether() / IPv6(src=CLIENT, dst=VIP) / IPv6ExtHdrFragment(offset=8)
                       / (b"z" * 40))]
    for _ in range(3000):
        b = bytearray(rng.choice(templates))
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(14, len(b))] = rng.randrange(256)
        r = lb.xdp(bytes(b))
        assert r.retval in (XDP_PASS, XDP_DROP), bytes(b).hex()
    lb.flush_ct()


def _b6(prefix: str, n: int, zero: int | None = None) -> list[dict[str, Any]]:
    return [backend(f"{prefix}::{i + 2:x}", 8080, 0 if i == zero else 1 + i % 3)
            for i in range(n)]


def _csum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


_SYN6 = tcp6()


def syn6(src: str, sport: int, dst: str, dport: int) -> bytes:
    """tcp6()'s SYN for another four-tuple, without scapy (which would take most of the
    10,000-flow test's time): the template with addresses, ports and TCP checksum
    replaced. test_syn6_is_what_scapy_builds holds it to tcp6()."""
    f = bytearray(_SYN6)
    f[22:38], f[38:54] = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    struct.pack_into("!HHIIHHH", f, 54, sport, dport, *struct.unpack_from("!IIHH", f, 58), 0)
    seg = bytes(f[54:])
    struct.pack_into("!H", f, 70, _csum(bytes(f[22:54]) + struct.pack("!II", len(seg), 6) + seg))
    return bytes(f)


def test_syn6_is_what_scapy_builds() -> None:
    rng = random.Random(7)
    for _ in range(200):
        src = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        dst = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        sport, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
        assert syn6(src, sport, dst, dport) == tcp6(src=src, sport=sport, dst=dst, dport=dport)


def test_explain_predicts_the_data_path_for_ipv6(lb: Harness) -> None:
    # 10,000 random IPv6 SYNs land exactly where `xdplb explain` says: source routes of
    # several prefix lengths, ClientIP affinity, a group without eligible backends, a
    # wildcard listener, and destinations no listener serves.
    local = "2001:db8:ff::1"
    inv = replace(INV, addresses={"lo": ("127.0.0.1", local)})
    plan = plan_of(
        listener("web", 80, _b6("2001:db8:20", 5, zero=2), address=VIP, sourceRoutes=[
            {"cidr": "2001:db8:1::/48", "backends": _b6("2001:db8:21", 3)},
            {"cidr": "2001:db8:1:2::/64", "backends": _b6("2001:db8:22", 2)},
            {"cidr": "2001:db8:1:2:8000::/65", "backends": _b6("2001:db8:23", 4, zero=0)},
            {"cidr": "2001:db8:1:2::77/128", "backends": [backend("2001:db8:29::9", 9999)]},
        ]),
        listener("api", 443, _b6("2001:db8:25", 4), address="2001:db8::11",
                 sessionAffinity="ClientIP"),
        listener("closed", 8000, [backend("2001:db8:27::2", 8080, 0)], address="2001:db8::12"),
        listener("any", 9000, _b6("2001:db8:30", 3), address=None),
    )
    lb.apply(plan, inv)
    dests = [(VIP, 80), ("2001:db8::11", 443), ("2001:db8::12", 8000), (local, 9000),
             (VIP, 81), ("2001:db8::13", 80)]
    nets = ["2001:db8:1::/48", "2001:db8:1:2::/64", "2001:db8:1:2:8000::/66",
            "2001:db8:2::/48", "2001:db8:1:2::70/124"]
    rng = random.Random(66)
    seen: dict[str, int] = {}
    for i in range(10_000):
        net = ipaddress.IPv6Network(rng.choice(nets))
        src = str(net.network_address + rng.randrange(min(net.num_addresses, 2**64)))
        dst, dport = rng.choices(dests, [45, 25, 12, 10, 4, 4])[0]
        sport = 1024 + i
        e = explain(plan, src, sport, dst, dport, "TCP", local_addresses={local, "127.0.0.1"})
        frame = syn6(src, sport, dst, dport)
        r = lb.xdp(frame)
        if e.verdict == "dnat":
            assert e.backend is not None
            got: Any = (r.retval, str(ipaddress.IPv6Address(r.data[38:54])),
                        struct.unpack_from("!H", r.data, 56)[0])
            want: Any = (XDP_PASS, e.backend.address, e.backend.port)
            kind = "dnat " + e.route.split()[0]
        elif e.verdict == "rst":
            got, want, kind = r.sent_back, True, "rst"
        elif e.verdict == "drop":
            got, want, kind = r.retval, XDP_DROP, "drop"
        else:
            got, want, kind = (r.retval, r.data), (XDP_PASS, frame), e.verdict
        assert got == want, (src, sport, dst, dport, e.text())
        seen[kind] = seen.get(kind, 0) + 1
    for kind in ("dnat default", "dnat source", "rst", "drop", "pass"):
        assert seen.get(kind, 0) >= 100, seen
    lb.flush_ct()


def test_a_lost_ipv6_flow_is_selected_again(lb: Harness) -> None:
    lb.apply(plan_of(listener("tcp6", 80, [backend(*B1), backend(*B2)], address=VIP)))
    syn = tcp6()
    first = Ether(lb.xdp(syn).data)[IPv6].dst
    lb.flush_ct()
    data = tcp6(flags="PA", payload=b"more", seq=1001, ack=5001)
    before = lb.stats()
    out = lb.xdp(data)
    assert Ether(out.data)[IPv6].dst == first  # the same table, the same backend
    assert stats_delta(before, lb.stats()) == {Stat.RESELECTED: 1}
    assert valid6(out.data)
