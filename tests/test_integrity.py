"""The data path off the happy path, with BPF_PROG_TEST_RUN on crafted frames: the two
entries of a flow, source-NAT ports, traffic that is not the load balancer's, fragments,
partial checksums, RSTs, backends that leave, and a flood of forged packets."""

from __future__ import annotations

import random
import struct
import time
from dataclasses import replace

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from tests.datapath import (
    B1,
    B2,
    CAPS,
    CLIENT,
    CLIENT_MAC,
    LB_MAC,
    NODE_B1,
    SHORT,
    SNAT_INV,
    TC_ACT_OK,
    TCP_LST,
    UB1,
    UDP_LST,
    VIP,
    XDP_DROP,
    XDP_PASS,
    Harness,
    backend,
    checksums_valid,
    dnat,
    ether,
    fwd_key,
    listener,
    needs_bpf,
    plan_of,
    reply_snat,
    reply_tcp,
    reply_udp,
    rev_key,
    rewritten,
    segment,
    snat_plan,
    snat_port_of,
    stats_delta,
    sweep,
    syn,
    udp,
)
from xdplb.dataplane import layout as L
from xdplb.dataplane.layout import Stat

pytestmark = needs_bpf

WAIT = 1.3  # seconds: past SHORT's unreplied, closing and UDP timeouts


def snat_reply(port: int, b: tuple[str, int] = B1, flags: str = "A",
               payload: bytes = b"answer", proto: str = "TCP") -> bytes:
    """A backend's answer to a source-NAT flow: to the node's address and port."""
    l4 = (TCP(sport=b[1], dport=port, flags=flags, seq=5000, ack=1001) if proto == "TCP"
          else UDP(sport=b[1], dport=port))
    return bytes(Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=b[0], dst=NODE_B1) / l4 / payload)


# --- the two entries of a flow live and die together --------------------------------------

def test_a_lost_reply_entry_is_made_again_by_the_next_packet(lb: Harness) -> None:
    # Source NAT: the reply entry holds the port. Gone (by hand: the map never evicts),
    # the flow's next packet makes it again, and the answers find their client.
    lb.apply(snat_plan(UDP_LST), SNAT_INV)
    lb.xdp(udp())
    port = snat_port_of(lb, dport=53, proto=17)
    lb.maps["ct_reply"].delete(bytes(L.CtKey(L.ip(UB1[0]), L.ip(NODE_B1), L.be16(UB1[1]),
                                             L.be16(port), 17)))
    frame = udp(payload=b"again")
    assert lb.xdp(frame).data == rewritten(frame, dst=UB1, src=(NODE_B1, port))
    answer = snat_reply(port, UB1, proto="UDP")
    assert lb.xdp(answer).data == rewritten(answer, src=(VIP, 53), dst=(CLIENT, 40000))


def test_a_flow_whose_port_another_holds_never_sends_from_it() -> None:
    # One port in the range. Client A's reply entry goes (by hand), and client B takes
    # the port: A's packets must never leave from it again (the backend would answer B).
    # A UDP flow is refused until a port frees up; a TCP one is reset.
    one = Harness(replace(CAPS, snat_port_min=40000, snat_port_max=40000))
    try:
        one.reset()
        one.apply(snat_plan(TCP_LST, UDP_LST), SNAT_INV)
        a, b = "10.10.1.2", "10.10.1.3"
        assert one.xdp(udp(src=a)).retval == XDP_PASS
        rk = bytes(L.CtKey(L.ip(UB1[0]), L.ip(NODE_B1), L.be16(UB1[1]), L.be16(40000), 17))
        one.maps["ct_reply"].delete(rk)
        frame = udp(src=b)
        assert one.xdp(frame).data == rewritten(frame, dst=UB1, src=(NODE_B1, 40000))
        before = one.stats()
        assert one.xdp(udp(src=a, payload=b"a again")).retval == XDP_DROP
        assert stats_delta(before, one.stats()) == {Stat.SNAT_PORT_LOST: 1,
                                                    Stat.SNAT_EXHAUSTED: 1}
        held = L.CtReplyVal.from_buffer_copy(one.maps["ct_reply"].lookup(rk))
        assert L.from_ip(held.client) == b  # B's, untouched
        # TCP: the flow whose port went is reset, and made again by nobody.
        one.flush_ct()
        one.xdp(syn(src=a))
        tk = bytes(L.CtKey(L.ip(B1[0]), L.ip(NODE_B1), L.be16(B1[1]), L.be16(40000), 6))
        one.maps["ct_reply"].delete(tk)
        one.xdp(syn(src=b, sport=41000))
        data = segment(src=a, flags="PA", payload=b"x")
        before = one.stats()
        r = one.xdp(data)
        assert r.sent_back and TCP(r.data[34:]).flags == "R"
        assert stats_delta(before, one.stats()) == {Stat.SNAT_PORT_LOST: 1,
                                                    Stat.SNAT_NO_FLOW: 1}
        assert fwd_key(src=a) not in one.ct()
    finally:
        one.close()


def test_a_lost_reply_entry_of_a_two_entry_flow_is_made_again(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST, listener("tcp81", 81, [backend(*B1)])))
    held = L.from_be16(L.RevNatVal.from_buffer_copy(lb.maps["rev_nat"].lookup(bytes(
        L.RevNatKey(L.ip(B1[0]), L.be16(B1[1]), 6, 0)))).vport)
    other = 161 - held
    lb.xdp(syn(dport=other))
    assert rev_key() in lb.replies()
    lb.maps["ct_reply"].delete(bytes(L.CtKey(L.ip(B1[0]), L.ip(CLIENT), L.be16(B1[1]),
                                             L.be16(40000), 6)))
    lb.xdp(segment(dport=other))
    assert rev_key() in lb.replies()
    reply = reply_tcp(flags="A")
    assert lb.tc(reply).data == reply_snat(reply, VIP, other)


def test_a_rst_made_from_a_partial_checksum_segment_stays_partial(lb: Harness) -> None:
    # The answer goes on in the skb of the segment it replaces, which keeps asking the
    # kernel to complete its checksum: a RST made from such a segment must hold the
    # pseudo-header sum (completed, it is right), one made from a complete segment a
    # complete checksum.
    lb.apply(snat_plan(TCP_LST), SNAT_INV)
    stray = segment(flags="PA", payload=b"x")
    for frame, want in ((stray, "complete"), (partial(stray), "partial")):
        r = lb.xdp(frame)
        assert r.sent_back and TCP(r.data[34:]).flags == "R"
        assert len(r.data) == 54
        if want == "complete":
            assert checksums_valid(r.data)
        else:
            assert r.data == partial(r.data) and not checksums_valid(r.data)


def test_a_source_nat_flow_whose_entry_was_evicted_keeps_its_port(short: Harness) -> None:
    # The forward entry (in the LRU map) is gone; the reply entry, never evicted, keeps
    # the port until it has been idle for as long as any flow may be: no new flow takes
    # it meanwhile, and the backend's late answer is dropped, not delivered elsewhere.
    lb = short
    lb.apply(snat_plan(TCP_LST), SNAT_INV)
    lb.xdp(syn())
    port = snat_port_of(lb)
    lb.maps["ct"].delete(bytes(L.CtKey(L.ip(CLIENT), L.ip(VIP), L.be16(40000), L.be16(80),
                                       6)))
    data = segment(flags="PA", payload=b"x")
    before = lb.stats()
    r = lb.xdp(data)  # a segment without its flow: reset at once, no state made
    assert r.sent_back
    rst = TCP(r.data[34:])
    assert (rst.flags, rst.seq) == ("R", 5000)  # RFC 793: the sequence its ACK expects
    assert stats_delta(before, lb.stats()) == {Stat.SNAT_NO_FLOW: 1}
    assert lb.ct() == {}
    late = snat_reply(port)
    before = lb.stats()
    assert lb.xdp(late).data == late
    assert stats_delta(before, lb.stats()) == {Stat.REPLY_EXPIRED: 1}
    assert sweep(lb).deleted == 0  # idle for less than any flow may be
    assert (B1[0], B1[1], NODE_B1, port, 6) in lb.replies()


# --- traffic that is not the load balancer's -------------------------------------------------

def test_only_a_syn_takes_a_route_on_an_sni_listener(lb: Harness) -> None:
    # A route added while connections of the acceptor are open must not take them
    # over: a segment without an entry on an SNI listener stays the acceptor's.
    lb.apply(plan_of(listener("tls", 443, [backend(*B1)], sniRoutes=[
        {"hostname": "a.example.com", "backends": [backend(*B2)]}], sourceRoutes=[
        {"cidr": "10.10.1.0/24", "backends": [backend("10.20.3.2", 8443)]}])))
    before = lb.stats()
    data = segment(dport=443, flags="PA", payload=b"\x17\x03\x03")
    r = lb.xdp(data)
    assert (r.retval, r.data) == (XDP_PASS, data)
    assert stats_delta(before, lb.stats()) == {Stat.SNI_PASS: 1}
    assert lb.ct() == {}
    frame = syn(dport=443)
    assert lb.xdp(frame).data == dnat(frame, "10.20.3.2", 8443)


def test_a_client_on_a_backends_network_is_source_natted(lb: Harness) -> None:
    # 10.20.1.50 shares B1's network: B1 would answer it directly, so its flows to B1
    # leave from the node's address; to B2, on another network, they keep the client's.
    inv = replace(SNAT_INV, networks={"lo": ("10.20.1.0/24", "127.0.0.0/8")})
    lb.apply(plan_of(listener("tcp", 80, [backend(*B1)]),
                     listener("tcp2", 81, [backend(*B2)])), inv)
    frame = syn(src="10.20.1.50")
    r = lb.xdp(frame)
    f = lb.ct()[fwd_key(src="10.20.1.50")]
    assert f.flags & L.CT_SNAT
    assert r.data == rewritten(frame, dst=B1, src=(NODE_B1, L.from_be16(f.snat_port)))
    other = syn(src="10.20.1.50", dport=81)
    assert lb.xdp(other).data == dnat(other, *B2)


# --- fragments ----------------------------------------------------------------------------------

def fragments(frame: bytes, size: int = 1480) -> list[bytes]:
    """An IPv4 frame cut into fragments of at most `size` bytes of payload, by scapy."""
    from scapy.layers.inet import fragment
    pkt = Ether(frame)
    return [bytes(Ether(src=pkt.src, dst=pkt.dst) / f) for f in fragment(pkt[IP], size)]


def test_every_fragment_goes_where_its_first_went(lb: Harness) -> None:
    lb.apply(plan_of(UDP_LST))
    datagram = udp(payload=bytes(range(256)) * 16)  # 4,096 bytes: three fragments
    parts = fragments(datagram)
    assert len(parts) == 3
    before = lb.stats()
    out = [lb.xdp(f) for f in parts]
    assert all(r.retval == XDP_PASS for r in out)
    want = fragments(dnat(datagram, *UB1))
    assert [r.data for r in out] == want  # exact bytes: addresses, ports, checksums
    assert stats_delta(before, lb.stats()) == {Stat.NEW_DEFAULT: 1, Stat.FRAGMENT: 2}
    # The answer, fragmented too, leaves as coming from the listener.
    answer = reply_udp(payload=bytes(range(255, -1, -1)) * 16)
    back = [lb.tc(f).data for f in fragments(answer)]
    assert back == fragments(reply_snat(answer, VIP, 53))


def test_source_nat_fragments_both_ways(lb: Harness) -> None:
    lb.apply(snat_plan(UDP_LST), SNAT_INV)
    datagram = udp(payload=b"q" * 3000)
    out = [lb.xdp(f).data for f in fragments(datagram)]
    port = snat_port_of(lb, dport=53, proto=17)
    assert out == fragments(rewritten(datagram, dst=UB1, src=(NODE_B1, port)))
    answer = snat_reply(port, UB1, payload=b"a" * 3000, proto="UDP")
    want = fragments(rewritten(answer, src=(VIP, 53), dst=(CLIENT, 40000)))
    assert [lb.xdp(f).data for f in fragments(answer)] == want
    lb.maps["frags"].delete_batch([k for k, _v in lb.maps["frags"].items()])
    assert [lb.tc_in(f).data for f in fragments(answer)] == want  # a backend-side interface


# --- partial checksums ----------------------------------------------------------------------------

def partial(frame: bytes) -> bytes:
    """The frame as a local sender or a veth hands it over with CHECKSUM_PARTIAL: its L4
    checksum holds only the folded pseudo-header sum."""
    pkt = Ether(frame)
    ip, l4 = pkt[IP], pkt[TCP] if TCP in pkt else pkt[UDP]
    words = struct.unpack("!4H", bytes(ip)[12:20])
    s = sum(words) + ip.proto + len(l4)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    b = bytearray(frame)
    off = 14 + ip.ihl * 4 + (16 if TCP in pkt else 6)
    struct.pack_into("!H", b, off, s)
    return bytes(b)


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_a_partial_checksum_is_left_to_tc(lb: Harness, proto: str) -> None:
    # XDP cannot update such a checksum right (the kernel completes it later from what
    # is there): it tracks the flow and leaves the rewrite to TC ingress.
    lb.apply(plan_of(TCP_LST, UDP_LST))
    frame = partial(syn() if proto == "TCP" else udp())
    before = lb.stats()
    r = lb.xdp(frame)
    assert (r.retval, r.data) == (XDP_PASS, frame)
    meta = L.DeferMeta.from_buffer_copy(r.meta)
    assert (meta.magic, meta.kind) == (L.DEFER_MAGIC, L.DEFER_FORWARD)
    assert stats_delta(before, lb.stats()) == {Stat.NEW_DEFAULT: 1, Stat.CSUM_DEFERRED: 1}
    assert len(lb.ct()) == 1
    full = syn(sport=40001) if proto == "TCP" else udp(sport=40001)
    r = lb.xdp(full)  # a complete checksum: rewritten in XDP
    assert r.meta == b"" and r.data == dnat(full, *(B1 if proto == "TCP" else UB1))


# --- TCP state -----------------------------------------------------------------------------------

def test_a_handshake_completes_only_with_the_clients_ack(short: Harness) -> None:
    lb = short
    lb.apply(plan_of(TCP_LST))
    lb.xdp(syn())
    lb.tc(reply_tcp(flags="SA"))
    assert lb.ct()[fwd_key()].flags == L.CT_REPLIED  # a forged SYN's entry stops here
    time.sleep(WAIT)
    assert lb.xdp(segment(flags="A", payload=b"")).retval == XDP_PASS
    assert lb.ct()[fwd_key()].flags == 0  # expired: the ACK found no entry, reselected
    lb.flush_ct()
    lb.xdp(syn())
    lb.tc(reply_tcp(flags="SA"))
    lb.xdp(segment(flags="A", payload=b""))
    assert lb.ct()[fwd_key()].flags == L.CT_REPLIED | L.CT_ESTABLISHED
    time.sleep(WAIT)
    before = lb.stats()
    lb.xdp(segment(flags="PA"))
    assert stats_delta(before, lb.stats()) == {Stat.ESTABLISHED: 1}


@pytest.mark.parametrize(("seq", "ends"), [(1001, True), (1001 + (1 << 19), True),
                                           (1001 + (1 << 21), False), (1001 - (1 << 21), False)],
                         ids=["exact", "in-window", "ahead", "behind"])
def test_a_rst_ends_a_flow_only_within_its_window(lb: Harness, seq: int, ends: bool) -> None:
    lb.apply(snat_plan(TCP_LST), SNAT_INV)
    lb.xdp(syn(seq=1000))
    rst = bytes(ether() / IP(src=CLIENT, dst=VIP)
                / TCP(sport=40000, dport=80, flags="R", seq=seq & 0xFFFFFFFF))
    before = lb.stats()
    assert lb.xdp(rst).retval == XDP_PASS  # forwarded either way: the backend decides
    f = lb.ct()[fwd_key()]
    assert bool(f.flags & L.CT_RST) == ends
    assert stats_delta(before, lb.stats()) == (
        {Stat.ESTABLISHED: 1} if ends else {Stat.ESTABLISHED: 1, Stat.RST_IGNORED: 1})


def test_a_refusal_of_a_syn_ends_the_flow(lb: Harness) -> None:
    # The backend's side never sent: its RST|ACK must acknowledge the client's SYN.
    lb.apply(plan_of(TCP_LST))
    lb.xdp(syn(seq=1000))
    lb.tc(reply_tcp(flags="RA"))  # ack 1001 (reply_tcp's)
    assert lb.ct()[fwd_key()].flags & L.CT_RST
    lb.flush_ct()
    lb.xdp(syn(seq=7000))
    before = lb.stats()
    lb.tc(reply_tcp(flags="RA"))  # acknowledges nothing the client sent
    assert not lb.ct()[fwd_key()].flags & L.CT_RST
    assert stats_delta(before, lb.stats()) == {Stat.REPLY_NAT: 1, Stat.RST_IGNORED: 1}


# --- a flow whose backend is gone ----------------------------------------------------------------

@pytest.mark.parametrize("why", ["removed", "failed"])
def test_a_udp_flow_leaves_a_gone_backend_and_tcp_drains(lb: Harness, why: str) -> None:
    two_udp = listener("udp", 53, [backend(*UB1), backend("10.20.2.2", 5353)], protocol="UDP")
    two_tcp = listener("tcp", 80, [backend(*B1), backend(*B2)])
    lb.apply(plan_of(two_udp, two_tcp))
    sports = range(40000, 40040)
    for sport in sports:
        lb.xdp(udp(sport=sport))
        lb.xdp(syn(sport=sport))
    on_ub1 = [p for p in sports
              if L.from_ip(lb.ct()[fwd_key(sport=p, dport=53, proto=17)].nat_addr) == UB1[0]]
    on_b1 = [p for p in sports if L.from_ip(lb.ct()[fwd_key(sport=p)].nat_addr) == B1[0]]
    assert on_ub1 and on_b1
    if why == "removed":
        lb.apply(plan_of(listener("udp", 53, [backend("10.20.2.2", 5353)], protocol="UDP"),
                         listener("tcp", 80, [backend(*B2)])))
    else:  # failing its health check: weight 0, not healthy
        plan = plan_of(two_udp, two_tcp)
        down = {UB1, B1}
        lb.apply(replace(plan, listeners=tuple(replace(lst, default=type(lst.default).of([
            replace(b, weight=0, healthy=False) if (b.address, b.port) in down else b
            for b in lst.default.backends])) for lst in plan.listeners)))
    before = lb.stats()
    for sport in on_ub1:
        frame = udp(sport=sport, payload=b"next")
        assert lb.xdp(frame).data == dnat(frame, "10.20.2.2", 5353)
        frame = segment(sport=sport)
        assert lb.xdp(frame).data == dnat(frame, *B1) or sport not in on_b1
    moved = stats_delta(before, lb.stats())[Stat.UDP_MOVED]
    assert moved == len(on_ub1)


def test_a_draining_udp_backend_keeps_its_flows(lb: Harness) -> None:
    # Weight 0 (terminating, drained by hand) is no reason to move: open flows stay.
    lb.apply(plan_of(listener("udp", 53, [backend(*UB1)], protocol="UDP")))
    lb.xdp(udp())
    lb.apply(plan_of(listener("udp", 53, [backend(*UB1, weight=0),
                                          backend("10.20.2.2", 5353)], protocol="UDP")))
    frame = udp(payload=b"next")
    before = lb.stats()
    assert lb.xdp(frame).data == dnat(frame, *UB1)
    assert stats_delta(before, lb.stats()) == {Stat.ESTABLISHED: 1}


# --- a flood of forged packets ----------------------------------------------------------------

def test_a_flood_of_forged_packets_through_a_source_nat_listener() -> None:
    # 100,000 SYNs and other segments from random sources: a stray segment makes no
    # state (it is answered with a RST), a SYN holds a port only for the short timeout
    # of a handshake the client never completes, legitimate flows go on during the
    # flood and after it, and the sweeper gives the ports back.
    three = [backend(*B1), backend(*B2), backend("10.20.3.2", 8080)]
    inv = replace(SNAT_INV, routes={**SNAT_INV.routes, "10.20.3.2": ("10.20.3.1", "lo")})
    h = Harness(replace(CAPS, conntrack=131_072), SHORT)
    try:
        h.reset()
        h.apply(snat_plan(listener("tcp", 80, three)), inv)
        rng = random.Random(7)
        template = bytearray(syn())
        syns = strays = 0
        for i in range(100_000):
            src = rng.getrandbits(32) | 0x01000000
            struct.pack_into("!I", template, 26, src)
            struct.pack_into("!H", template, 34, rng.randrange(1024, 65536))
            stray = rng.random() < 0.5
            template[47] = 0x10 if stray else 0x02  # ACK, or SYN
            template[24:26] = b"\0\0"
            frame = bytes(template)
            r = h.xdp(frame)
            syns, strays = syns + (not stray), strays + stray
            assert r.retval == XDP_PASS and r.sent_back == stray
            if i % 10_000 == 0:  # a legitimate client, during the flood
                legit = syn(src="10.10.9.9", sport=20000 + i // 10_000)
                assert h.xdp(legit).retval == XDP_PASS
        stats = h.stats()
        assert stats[Stat.SNAT_NO_FLOW] == strays
        assert stats[Stat.NEW_DEFAULT] == syns + 10
        assert stats[Stat.SNAT_EXHAUSTED] == 0
        assert len(h.ct()) == syns + 10 and len(h.replies()) == syns + 10
        time.sleep(WAIT)  # past the handshake timeout: the forged flows are over
        assert sweep(h).deleted == 2 * (syns + 10)
        assert h.ct() == {} and h.replies() == {}
        after = syn(src="10.10.9.9", sport=30000)
        assert h.xdp(after).retval == XDP_PASS
    finally:
        h.close()


# --- the interfaces toward backends -------------------------------------------------------------

def test_tc_ingress_leaves_what_is_no_source_nat_reply(lb: Harness) -> None:
    # A backend-side interface carries the node's own traffic too: an answer to a port
    # no flow holds, a reply toward a client, a client's SYN all pass as they are.
    lb.apply(snat_plan(TCP_LST), SNAT_INV)
    before = lb.stats()
    for frame in (snat_reply(40000), reply_tcp(), syn()):
        r = lb.tc_in(frame)
        assert (r.retval, r.data) == (TC_ACT_OK, frame)
    assert stats_delta(before, lb.stats()) == {}
