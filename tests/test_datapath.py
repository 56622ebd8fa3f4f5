"""The XDP and TC programs, run with BPF_PROG_TEST_RUN on crafted frames: exact output
bytes (checksums recomputed by scapy), conntrack entries and counters."""

from __future__ import annotations

import struct
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, in4_chksum
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether

from tests.datapath import (
    AHEAD,
    B1,
    B2,
    BOOT,
    CAPS,
    CLIENT,
    CLIENT_MAC,
    INV,
    LB_MAC,
    NEW_STATS,
    NODE_B1,
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
    ct_val,
    dnat,
    ether,
    fwd_key,
    listener,
    needs_bpf,
    plan_of,
    put_flow,
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
from xdplb.dataplane.config import Timeouts
from xdplb.dataplane.layout import Stat

pytestmark = needs_bpf

# --- 1. a new flow ---------------------------------------------------------------------

def test_syn_to_listener_is_dnatted_and_tracked(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST, UDP_LST))
    frame = syn()
    before = lb.stats()
    t0 = L.ct_now_ns()
    r = lb.xdp(frame)
    t1 = L.ct_now_ns()

    assert r.retval == XDP_PASS
    assert r.data == dnat(frame, *B1)
    ct = lb.ct()
    # One entry: B1's rev_nat entry names VIP:80, so its replies find the flow there.
    assert set(ct) == {fwd_key()} and lb.replies() == {}
    lid = lb.writer.listener_ids[(VIP, 80, "TCP")]
    bid = lb.writer.backend_ids[B1]
    f = ct[fwd_key()]
    assert (L.from_ip(f.nat_addr), L.from_be16(f.nat_port)) == B1
    assert (f.backend, f.listener, f.flags) == (bid, lid, 0)
    assert t0 <= f.last_ns <= t1 and f.created_s == f.last_ns // 10**9
    assert list(f.packets) == [1, 0] and list(f.bytes) == [len(frame), 0]
    assert list(f.seq_end) == [1001, 0]  # the SYN's sequence number, which it takes
    assert stats_delta(before, lb.stats()) == {Stat.NEW_DEFAULT: 1}
    assert lb.listener_stats(VIP, 80) == (1, len(frame), 1)
    assert lb.backend_stats(*B1) == (1, len(frame), 1)


def test_udp_to_listener_is_dnatted(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST, UDP_LST))
    frame = udp()
    r = lb.xdp(frame)
    assert r.retval == XDP_PASS
    assert r.data == dnat(frame, *UB1)
    assert set(lb.ct()) == {fwd_key(dport=53, proto=17)}
    assert lb.listener_stats(VIP, 53, "UDP") == (1, len(frame), 1)


def test_flow_to_a_backends_second_address_gets_a_reply_entry(lb: Harness) -> None:
    # B1 serves VIP:80 and VIP:81; its rev_nat entry names one of them: a flow to the
    # other has a reply entry, which its replies are restored from.
    lb.apply(plan_of(TCP_LST, listener("tcp81", 81, [backend(*B1)])))
    held = L.from_be16(L.RevNatVal.from_buffer_copy(lb.maps["rev_nat"].lookup(bytes(
        L.RevNatKey(L.ip(B1[0]), L.be16(B1[1]), 6, 0)))).vport)
    other = 161 - held
    frame = syn(dport=other)
    t0 = L.ct_now_ns()
    assert lb.xdp(frame).data == dnat(frame, *B1)
    t1 = L.ct_now_ns()
    assert set(lb.ct()) == {fwd_key(dport=other)}
    assert lb.ct()[fwd_key(dport=other)].flags == L.CT_PAIRED
    assert set(lb.replies()) == {rev_key()}
    rv = lb.replies()[rev_key()]
    assert (L.from_ip(rv.client), L.from_be16(rv.cport)) == (CLIENT, 40000)
    assert (L.from_ip(rv.vip), L.from_be16(rv.vport), rv.flags) == (VIP, other, 0)
    assert t0 <= rv.last_ns <= t1 and rv.created_s == rv.last_ns // 10**9
    reply = reply_tcp(flags="SA")
    assert lb.tc(reply).data == reply_snat(reply, VIP, other)
    frame = syn(dport=held, sport=40001)  # to the address rev_nat names: one entry
    lb.xdp(frame)
    assert fwd_key(dport=held, sport=40001) in lb.ct()
    assert rev_key(cport=40001) not in lb.replies()
    reply = reply_tcp(flags="SA", cport=40001)
    assert lb.tc(reply).data == reply_snat(reply, VIP, held)


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_client_port_moving_to_a_backends_second_address_takes_its_replies(
        lb: Harness, proto: str) -> None:
    # Client port 40000 reached B1 through the address rev_nat names, then reaches B1
    # through its other address: to B1 that is the same connection, so its replies
    # belong to the new flow, not to the old one that rev_nat would find first.
    lb.apply(plan_of(listener("a", 80, [backend(*B1)], protocol=proto),
                     listener("b", 81, [backend(*B1)], protocol=proto)))
    held = L.from_be16(L.RevNatVal.from_buffer_copy(lb.maps["rev_nat"].lookup(bytes(
        L.RevNatKey(L.ip(B1[0]), L.be16(B1[1]), L.PROTO[proto], 0)))).vport)
    other = 161 - held
    first = syn(dport=held) if proto == "TCP" else udp(dport=held)
    lb.xdp(first)
    if proto == "TCP":  # the first flow closed: FIN both ways
        lb.xdp(segment(dport=held, flags="FA"))
        lb.tc(reply_tcp(flags="FA"))
    second = syn(dport=other) if proto == "TCP" else udp(dport=other)
    assert lb.xdp(second).data == dnat(second, *B1)
    n = L.PROTO[proto]
    assert fwd_key(dport=held, proto=n) not in lb.ct()
    reply = reply_tcp(flags="SA") if proto == "TCP" else reply_udp(B1)
    before = lb.stats()
    assert lb.tc(reply).data == reply_snat(reply, VIP, other)
    assert stats_delta(before, lb.stats()) == {Stat.REPLY_NAT: 1}


def test_reply_of_an_expired_one_entry_flow_is_not_guessed(short: Harness) -> None:
    # The flow outlived its idle timeout at the LB: nothing proves the backend's
    # segment is the LB's any more (a connection made to the backend itself looks the
    # same), so it leaves untouched and no entry is made from it. The flow recovers
    # when the client next sends.
    short.apply(plan_of(TCP_LST))
    short.put_ct(fwd_key(), ct_val(B1, flags=L.CT_REPLIED | L.CT_ESTABLISHED, seen=BOOT))
    reply = reply_tcp(flags="PA", payload=b"late")
    before = short.stats()
    assert short.tc(reply).data == reply
    assert stats_delta(before, short.stats()) == {}
    assert short.ct()[fwd_key()].last_ns == 0
    data = segment(flags="PA", payload=b"next")
    assert short.xdp(data).data == dnat(data, *B1)
    assert short.tc(reply).data == reply_snat(reply, VIP, 80)


# --- 2. established flows follow their entry ------------------------------------------

def test_established_flow_follows_entry_after_group_change(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    first = syn()
    assert lb.xdp(first).data == dnat(first, *B1)
    lb.apply(plan_of(listener("tcp", 80, [backend(*B2), backend("10.20.3.2", 8080)])))

    before = lb.stats()
    data = segment(flags="PA", payload=b"GET / HTTP/1.0\r\n\r\n")
    r = lb.xdp(data)
    assert r.retval == XDP_PASS
    assert r.data == dnat(data, *B1)
    again = syn()  # the client retransmits its SYN
    r = lb.xdp(again)
    assert r.retval == XDP_PASS
    assert r.data == dnat(again, *B1)
    assert stats_delta(before, lb.stats()) == {Stat.ESTABLISHED: 2}
    f = lb.ct()[fwd_key()]
    assert list(f.packets) == [3, 0]
    assert list(f.bytes) == [len(first) + len(data) + len(again), 0]
    assert lb.listener_stats(VIP, 80) == (3, len(first) + len(data) + len(again), 1)

    other = syn(sport=40001)  # a new flow takes the new group
    r = lb.xdp(other)
    assert r.retval == XDP_PASS
    assert L.from_ip(lb.ct()[fwd_key(sport=40001)].nat_addr) in (B2[0], "10.20.3.2")

    # B1 left the plan, but its flow has no reply entry: its rev_nat entry stays while
    # the flow lives, and its replies keep coming from the listener.
    reply = reply_tcp(flags="PA", payload=b"HTTP/1.0 200 OK\r\n")
    assert lb.tc(reply).data == reply_snat(reply, VIP, 80)
    lb.writer.release_rev_nat(sweep(lb).relied)
    assert lb.tc(reply).data == reply_snat(reply, VIP, 80)
    b1 = bytes(L.RevNatKey(L.ip(B1[0]), L.be16(B1[1]), 6, 0))
    assert lb.maps["rev_nat"].lookup(b1) is not None
    lb.flush_ct()  # once it is gone, so is B1's entry
    lb.writer.release_rev_nat(sweep(lb).relied)
    assert lb.maps["rev_nat"].lookup(b1) is None
    assert lb.tc(reply).data == reply


def test_jumbo_multi_buffer_segment_is_dnatted_and_counted_whole(lb: Harness) -> None:
    # The program is loaded multi-buffer aware: a 9,000-byte frame reaches it as a
    # head buffer plus fragments; headers are rewritten, every byte is counted.
    lb.apply(plan_of(TCP_LST))
    first = syn()
    lb.xdp(first)
    jumbo = segment(flags="PA", payload=bytes(range(256)) * 35)
    assert len(jumbo) > 9000
    r = lb.xdp(jumbo)
    assert r.retval == XDP_PASS
    assert r.data == dnat(jumbo, *B1)
    assert list(lb.ct()[fwd_key()].bytes) == [len(first) + len(jumbo), 0]


def test_fin_and_rst_flags_are_recorded(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    lb.xdp(syn())
    lb.xdp(segment(flags="FA", payload=b""))
    assert lb.ct()[fwd_key()].flags == L.CT_FIN_FWD
    lb.tc(reply_tcp(flags="FA"))
    assert lb.ct()[fwd_key()].flags == L.CT_FIN_FWD | L.CT_FIN_REV | L.CT_REPLIED


# --- 3. replies through TC egress -----------------------------------------------------

def test_tcp_reply_source_restored(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    lb.xdp(syn())
    before = lb.stats()
    reply = reply_tcp(payload=b"hi")
    r = lb.tc(reply)
    assert r.retval == TC_ACT_OK
    assert r.data == reply_snat(reply, VIP, 80)
    assert stats_delta(before, lb.stats()) == {Stat.REPLY_NAT: 1}
    f = lb.ct()[fwd_key()]
    assert f.flags == L.CT_REPLIED
    assert list(f.packets) == [1, 1] and f.bytes[1] == len(reply)
    assert lb.listener_stats(VIP, 80)[:2] == (2, len(syn()) + len(reply))


def test_udp_reply_source_restored(lb: Harness) -> None:
    lb.apply(plan_of(UDP_LST))
    lb.xdp(udp())
    reply = reply_udp()
    r = lb.tc(reply)
    assert r.retval == TC_ACT_OK
    assert r.data == reply_snat(reply, VIP, 53)
    assert Ether(r.data)[UDP].chksum not in (0, None)


def test_udp_without_checksum_keeps_none(lb: Harness) -> None:
    lb.apply(plan_of(UDP_LST))
    frame = udp(chksum=0)
    r = lb.xdp(frame)
    assert r.data == dnat(frame, *UB1)
    assert Ether(r.data)[UDP].chksum == 0
    reply = reply_udp(chksum=0)
    r = lb.tc(reply)
    assert r.data == reply_snat(reply, VIP, 53)
    assert Ether(r.data)[UDP].chksum == 0


def _port_making_udp_checksum_zero(make: object, rewrite: object, field: str) -> int:
    """A port (the `field` of `make`'s packet) for which the rewritten packet's computed
    UDP checksum is 0, i.e. must be sent as 0xffff. A port change of d moves the one's
    complement sum by d, so the candidate is computed from one sample and verified."""
    base = 40000
    out = Ether(rewrite(make(base)))  # type: ignore[operator]
    total = ~out[UDP].chksum & 0xFFFF  # one's complement sum over the packet
    for cand in ((base + 0xFFFF - total) % 0xFFFF, (base - total) % 0xFFFF):
        if not 1024 <= cand <= 65535:
            continue
        pkt = Ether(rewrite(make(cand)))  # type: ignore[operator]
        u = pkt[UDP].copy()
        u.chksum = 0
        if in4_chksum(17, pkt[IP], bytes(u)) == 0 and pkt[UDP].chksum == 0xFFFF:
            assert getattr(pkt[UDP], field) == cand
            return cand
    for cand in range(1024, 65536):  # fall back to a plain search
        pkt = Ether(rewrite(make(cand)))  # type: ignore[operator]
        if pkt[UDP].chksum == 0xFFFF:
            return cand
    raise AssertionError("no port found")


def test_udp_dnat_computed_zero_checksum_is_sent_as_ffff(lb: Harness) -> None:
    lb.apply(plan_of(UDP_LST))
    sport = _port_making_udp_checksum_zero(lambda p: udp(sport=p),
                                           lambda f: dnat(f, *UB1), "sport")
    frame = udp(sport=sport)
    assert Ether(frame)[UDP].chksum not in (0, 0xFFFF)
    r = lb.xdp(frame)
    assert r.retval == XDP_PASS
    assert r.data == dnat(frame, *UB1)
    assert Ether(r.data)[UDP].chksum == 0xFFFF


def test_udp_reply_computed_zero_checksum_is_sent_as_ffff(lb: Harness) -> None:
    lb.apply(plan_of(UDP_LST))
    cport = _port_making_udp_checksum_zero(lambda p: reply_udp(cport=p),
                                           lambda f: reply_snat(f, VIP, 53), "dport")
    lb.xdp(udp(sport=cport))
    reply = reply_udp(cport=cport)
    assert Ether(reply)[UDP].chksum not in (0, 0xFFFF)
    r = lb.tc(reply)
    assert r.data == reply_snat(reply, VIP, 53)
    assert Ether(r.data)[UDP].chksum == 0xFFFF


def test_udp_dnat_intermediate_zero_checksum(lb: Harness) -> None:
    """The address is rewritten before the port: a checksum that is 0 in between must
    not be taken for "no checksum" (which would skip the port's update)."""
    lb.apply(plan_of(UDP_LST))
    sport = _port_making_udp_checksum_zero(lambda p: udp(sport=p),
                                           lambda f: rewritten(f, dst=(UB1[0], 53)), "sport")
    frame = udp(sport=sport)
    r = lb.xdp(frame)
    assert r.data == dnat(frame, *UB1)
    assert checksums_valid(r.data)


def test_udp_reply_intermediate_zero_checksum(lb: Harness) -> None:
    lb.apply(plan_of(UDP_LST))
    cport = _port_making_udp_checksum_zero(lambda p: reply_udp(cport=p),
                                           lambda f: rewritten(f, src=(VIP, UB1[1])), "dport")
    lb.xdp(udp(sport=cport))
    reply = reply_udp(cport=cport)
    r = lb.tc(reply)
    assert r.data == reply_snat(reply, VIP, 53)
    assert checksums_valid(r.data)


def test_reply_without_entry_untouched(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    lb.xdp(syn())
    before = lb.stats()
    for reply in (reply_tcp(cport=40001), reply_tcp(b=B2), reply_udp(b=B1)):
        r = lb.tc(reply)
        assert (r.retval, r.data) == (TC_ACT_OK, reply)
    assert stats_delta(before, lb.stats()) == {}


# --- 4. IP options and VLAN tags --------------------------------------------------------

@pytest.mark.parametrize("frame", [
    bytes(ether() / IP(src=CLIENT, dst=VIP, options=[IPOption_Router_Alert()])
          / TCP(sport=40000, dport=80, flags="S")),
    bytes(ether() / Dot1Q(vlan=7) / IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80,
                                                                   flags="S")),
    bytes(ether() / Dot1AD(vlan=9) / IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80,
                                                                    flags="S") / b"x"),
    bytes(ether() / Dot1Q(vlan=7) / IP(src=CLIENT, dst=VIP, options=[IPOption_Router_Alert()])
          / UDP(sport=40000, dport=53) / b"q"),
], ids=["ip-options", "802.1q", "802.1ad", "802.1q-options-udp"])
def test_dnat_with_options_and_vlan(lb: Harness, frame: bytes) -> None:
    lb.apply(plan_of(TCP_LST, UDP_LST))
    r = lb.xdp(frame)
    assert r.retval == XDP_PASS
    target = UB1 if UDP in Ether(frame) else B1
    assert r.data == dnat(frame, *target)
    assert len(lb.ct()) == 1


def test_reply_with_options_and_vlan(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    lb.xdp(syn())
    reply = bytes(Ether() / Dot1Q(vlan=7) / IP(src=B1[0], dst=CLIENT,
                                              options=[IPOption_Router_Alert()])
                  / TCP(sport=B1[1], dport=40000, flags="SA"))
    r = lb.tc(reply)
    assert r.data == reply_snat(reply, VIP, 80)


# --- 5. traffic that is not ours ------------------------------------------------------------

NODE = "127.0.0.1"  # the address of the harness's interface (INV): the node's own
UNTOUCHED = {
    "arp": bytes(ether() / ARP(psrc=CLIENT, pdst=VIP)),
    "ipv6": bytes(ether() / IPv6(src="2001:db8::1", dst="2001:db8::10")
                  / TCP(sport=40000, dport=80, flags="S")),
    "other-address": syn(dst="192.0.2.99"),
    "node-address-other-port": syn(dst=NODE, dport=22),
    "node-address-icmp": bytes(ether() / IP(src=CLIENT, dst=NODE) / ICMP()),
    "node-address-gre": bytes(ether() / IP(src=CLIENT, dst=NODE, proto=47) / b"gre"),
    "vlan-ipv6": bytes(ether() / Dot1Q(vlan=3) / IPv6() / UDP(dport=53)),
    "later-fragment-not-to-a-vip": bytes(ether() / IP(src=CLIENT, dst=NODE, frag=3, proto=17)
                                         / bytes(24)),
}


@pytest.mark.parametrize("name", list(UNTOUCHED))
def test_not_for_a_listener_passes_untouched(lb: Harness, name: str) -> None:
    frame = UNTOUCHED[name]
    lb.apply(plan_of(TCP_LST, UDP_LST))
    before = lb.stats()
    r = lb.xdp(frame)
    assert (r.retval, r.data, r.meta) == (XDP_PASS, frame, b"")
    assert lb.ct() == {}
    assert stats_delta(before, lb.stats()) == {Stat.NOMATCH: 1}
    assert lb.all_flow_stats() == (0, 0, 0)


# A VIP is the load balancer's: what no listener serves there must not reach the node
# (an SNI listener makes the VIP local: ssh and the kubelet would answer on it), nor be
# routed back toward the router that sent it (a VIP routed to the node would loop).
AT_A_VIP = {
    "other-port": (syn(dport=22), Stat.VIP_CLOSED),
    "udp-to-tcp-port": (udp(dport=80), Stat.VIP_CLOSED),
    "tcp-to-udp-port": (syn(dport=53), Stat.VIP_CLOSED),
    "gre": (bytes(ether() / IP(src=CLIENT, dst=VIP, proto=47) / b"gre"), Stat.VIP_CLOSED),
    "icmp-timestamp": (bytes(ether() / IP(src=CLIENT, dst=VIP) / ICMP(type=13)),
                       Stat.VIP_CLOSED),
    "icmp-error-of-no-flow": (bytes(ether() / IP(src="10.10.1.254", dst=VIP)
                                    / ICMP(type=3, code=4)
                                    / IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000)),
                              Stat.VIP_CLOSED),
    "later-fragment-without-its-first": (bytes(ether() / IP(src=CLIENT, dst=VIP, frag=3,
                                                             proto=17) / bytes(24)),
                                         Stat.FRAG_MISSED),
}


@pytest.mark.parametrize("name", list(AT_A_VIP))
def test_a_vip_drops_what_no_listener_serves(lb: Harness, name: str) -> None:
    frame, stat = AT_A_VIP[name]
    lb.apply(plan_of(TCP_LST, UDP_LST))
    before = lb.stats()
    r = lb.xdp(frame)
    assert r.retval == XDP_DROP
    assert lb.ct() == {} and lb.replies() == {}
    assert stats_delta(before, lb.stats()) == {stat: 1}


def test_a_vip_answers_pings(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    frame = bytes(ether() / IP(src=CLIENT, dst=VIP, ttl=9, id=5)
                  / ICMP(type=8, id=77, seq=3) / b"ping payload")
    before = lb.stats()
    r = lb.xdp(frame)
    assert r.sent_back
    want = Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=VIP, dst=CLIENT, ttl=64, id=5) \
        / ICMP(type=0, id=77, seq=3) / b"ping payload"
    assert r.data == bytes(want)  # scapy computed both checksums
    assert stats_delta(before, lb.stats()) == {Stat.VIP_PING: 1}


def test_a_listener_address_of_the_node_itself_is_no_vip(lb: Harness) -> None:
    # A listener on one of the node's own addresses must leave the node's other ports
    # (ssh on it) alone.
    lb.apply(plan_of(listener("tcp", 80, [backend(*B1)], address=NODE)))
    frame = syn(dst=NODE, dport=22)
    before = lb.stats()
    assert lb.xdp(frame).retval == XDP_PASS
    assert stats_delta(before, lb.stats()) == {Stat.NOMATCH: 1}


# --- 6. expiry and closed flows --------------------------------------------------------------

OLD = ("10.99.0.1", 7777)  # where a stale entry points: never a backend of the plan


def test_expired_entry_non_syn_is_selected_again(short: Harness) -> None:
    short.apply(plan_of(TCP_LST))
    put_flow(short, OLD, flags=L.CT_REPLIED | L.CT_ESTABLISHED, seen=BOOT)
    before = short.stats()
    frame = segment()
    r = short.xdp(frame)
    assert (r.retval, r.data) == (XDP_PASS, dnat(frame, *B1))
    assert stats_delta(before, short.stats()) == {Stat.RESELECTED: 1}
    f = short.ct()[fwd_key()]
    assert (L.from_ip(f.nat_addr), L.from_be16(f.nat_port)) == B1
    assert f.flags == 0 and list(f.packets) == [1, 0]


@pytest.mark.parametrize("flags, state", [("A", 0), ("PA", 0), ("FA", L.CT_FIN_FWD),
                                          ("R", L.CT_RST), ("RA", L.CT_RST)])
def test_lost_state_segment_lands_on_the_backend_a_syn_would(lb: Harness, flags: str,
                                                              state: int) -> None:
    # No entry at all (evicted, flushed, or the flow was rehashed to this node):
    # the table picks what it picked for the SYN, and the entry is created again.
    lb.apply(plan_of(listener("tcp", 80, [backend(*B1), backend(*B2),
                                          backend("10.20.3.2", 8080)])))
    for sport in range(40000, 40012):
        first = syn(sport=sport)
        chosen = lb.xdp(first).data
        lb.flush_ct()
        before = lb.stats()
        frame = segment(sport=sport, flags=flags, payload=b"x" if "P" in flags else b"")
        r = lb.xdp(frame)
        assert r.retval == XDP_PASS
        assert r.data == dnat(frame, IP(chosen[14:]).dst, TCP(chosen[34:]).dport)
        assert stats_delta(before, lb.stats()) == {Stat.RESELECTED: 1}
        f = lb.ct()[fwd_key(sport=sport)]
        assert f.flags == state and list(f.packets) == [1, 0]
        lb.flush_ct()


def test_expired_entry_syn_starts_new_flow(short: Harness) -> None:
    short.apply(plan_of(TCP_LST))
    put_flow(short, OLD, flags=L.CT_REPLIED | L.CT_ESTABLISHED, seen=BOOT)
    before = short.stats()
    t0 = L.ct_now_ns()
    frame = syn()
    r = short.xdp(frame)
    assert r.data == dnat(frame, *B1)
    assert stats_delta(before, short.stats()) == {Stat.NEW_DEFAULT: 1}
    f = short.ct()[fwd_key()]
    assert (L.from_ip(f.nat_addr), L.from_be16(f.nat_port)) == B1
    assert f.created_s >= t0 // 10**9 and f.flags == 0 and list(f.packets) == [1, 0]


def test_expired_entry_reply_untouched(short: Harness) -> None:
    short.apply(plan_of(TCP_LST))
    put_flow(short, B1, flags=L.CT_REPLIED | L.CT_ESTABLISHED, seen=BOOT)
    before = short.stats()
    reply = reply_tcp(flags="A")
    r = short.tc(reply)
    assert (r.retval, r.data) == (TC_ACT_OK, reply)
    assert stats_delta(before, short.stats()) == {Stat.REPLY_EXPIRED: 1}


def test_entry_stamped_after_the_clock_was_read_is_live(lb: Harness) -> None:
    """Another CPU may stamp last_ns after this packet read the clock: an entry whose
    last_ns is ahead of now is live, not expired by a wrapped subtraction."""
    lb.apply(plan_of(TCP_LST))
    put_flow(lb, OLD, flags=L.CT_REPLIED | L.CT_ESTABLISHED, seen=AHEAD)
    before = lb.stats()
    frame = segment()
    assert lb.xdp(frame).data == dnat(frame, *OLD)
    reply = reply_tcp(b=OLD, flags="A")
    put_flow(lb, OLD, flags=L.CT_REPLIED | L.CT_ESTABLISHED, seen=AHEAD)
    assert lb.tc(reply).data == reply_snat(reply, VIP, 80)
    assert stats_delta(before, lb.stats()) == {Stat.ESTABLISHED: 1, Stat.REPLY_NAT: 1}


EST = L.CT_REPLIED | L.CT_ESTABLISHED
WAIT = 1.3  # seconds: past SHORT's closing, unreplied and UDP timeouts, within established's


@pytest.mark.parametrize(("flags", "wait", "proto", "alive"), [
    (EST | L.CT_RST, False, 6, False),
    (EST | L.CT_FIN_FWD | L.CT_FIN_REV, False, 6, False),
    (EST | L.CT_FIN_FWD, True, 6, True),       # half closed: still the same flow
    (EST, False, 6, True),
    (0, True, 6, False),                        # unreplied SYN timeout
    (L.CT_REPLIED, True, 6, False),             # answered, never acknowledged: the same
    (EST, True, 6, True),                       # established timeout
    (L.CT_RST, True, 6, False),
    (0, False, 17, True),
    (0, True, 17, False),                       # UDP timeout
], ids=["rst", "fin-both", "fin-one", "established", "syn-timeout", "half-open-timeout",
        "est-alive", "rst-old", "udp-alive", "udp-expired"])
def test_new_packet_on_old_entry(short: Harness, flags: int, wait: bool, proto: int,
                                 alive: bool) -> None:
    """A SYN (or UDP datagram) on an entry follows it while the entry lives, and
    starts a new flow once the entry is closed or expired."""
    short.apply(plan_of(TCP_LST, UDP_LST))
    vip_port = 80 if proto == 6 else 53
    # A UDP flow stays only on a live backend (UB1): its packets go there either way.
    nat = OLD if proto == 6 else UB1
    put_flow(short, nat, flags=flags, proto=proto, vip_port=vip_port,
             backend_id=short.writer.backend_ids.get(nat, 0))
    if wait:
        time.sleep(WAIT)
    before = short.stats()
    frame = syn() if proto == 6 else udp()
    r = short.xdp(frame)
    assert r.retval == XDP_PASS
    if alive:
        assert r.data == dnat(frame, *nat)
        assert stats_delta(before, short.stats()) == {Stat.ESTABLISHED: 1}
    else:
        assert r.data == dnat(frame, *(B1 if proto == 6 else UB1))
        assert stats_delta(before, short.stats()) == {Stat.NEW_DEFAULT: 1}
        assert short.ct()[fwd_key(dport=vip_port, proto=proto)].flags == 0


# --- 7. source-CIDR routes ---------------------------------------------------------------------

def test_source_routes_longest_prefix_wins(lb: Harness) -> None:
    lb.apply(plan_of(listener("tcp", 80, [backend(*B1)], sourceRoutes=[
        {"cidr": "10.10.0.0/16", "backends": [backend("10.20.3.2", 8080)]},
        {"cidr": "10.10.2.0/24", "backends": [backend("10.20.4.2", 8080)]},
        {"cidr": "10.10.2.128/25", "backends": [backend("10.20.5.2", 8081)]},
        {"cidr": "10.10.2.200/32", "backends": [backend("10.20.6.2", 8082)]},
    ])))
    cases = [("10.10.1.5", ("10.20.3.2", 8080), Stat.NEW_SRC_ROUTE),
             ("10.10.255.255", ("10.20.3.2", 8080), Stat.NEW_SRC_ROUTE),
             ("10.10.2.5", ("10.20.4.2", 8080), Stat.NEW_SRC_ROUTE),
             ("10.10.2.127", ("10.20.4.2", 8080), Stat.NEW_SRC_ROUTE),
             ("10.10.2.128", ("10.20.5.2", 8081), Stat.NEW_SRC_ROUTE),
             ("10.10.2.200", ("10.20.6.2", 8082), Stat.NEW_SRC_ROUTE),
             ("10.10.2.201", ("10.20.5.2", 8081), Stat.NEW_SRC_ROUTE),
             ("10.11.0.1", B1, Stat.NEW_DEFAULT),
             ("10.9.255.255", B1, Stat.NEW_DEFAULT)]
    for client, target, stat in cases:
        before = lb.stats()
        frame = syn(src=client)
        r = lb.xdp(frame)
        assert r.retval == XDP_PASS
        assert r.data == dnat(frame, *target), client
        assert stats_delta(before, lb.stats()) == {stat: 1}, client


# --- 8. no eligible backend ------------------------------------------------------------------

def _check_rst(frame: bytes, out: bytes, ip_off: int = 14) -> None:
    sent, rst = Ether(frame), Ether(out)
    ihl = sent[IP].ihl * 4
    assert len(out) == ip_off + ihl + 20
    assert (rst.src, rst.dst) == (sent.dst, sent.src)
    assert (rst[IP].src, rst[IP].dst) == (sent[IP].dst, sent[IP].src)
    assert rst[IP].len == ihl + 20 and rst[IP].ttl == 64 and rst[IP].frag == 0
    assert int(rst[IP].flags) == 0
    t = rst[TCP]
    assert (t.sport, t.dport) == (sent[TCP].dport, sent[TCP].sport)
    assert str(t.flags) == "RA"
    # RFC 793: it acknowledges the SYN and whatever data came with it.
    assert t.seq == 0 and t.ack == (sent[TCP].seq + 1 + len(sent[TCP].payload)) & 0xFFFFFFFF
    assert t.dataofs == 5 and t.window == 0 and t.urgptr == 0
    assert bytes(t.payload) == b""
    assert checksums_valid(out)


@pytest.mark.parametrize("frame", [
    syn(),
    syn(seq=0xFFFFFFFF),
    bytes(ether() / IP(src=CLIENT, dst=VIP, ttl=3, flags="DF")
          / TCP(sport=40000, dport=80, flags="S", seq=77,
                options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]) / (b"d" * 50)),
    bytes(ether() / IP(src=CLIENT, dst=VIP, options=[IPOption_Router_Alert()])
          / TCP(sport=40000, dport=80, flags="S", seq=5)),
], ids=["plain", "seq-wraps", "options-payload", "ip-options"])
def test_syn_without_backend_gets_rst(lb: Harness, frame: bytes) -> None:
    lb.apply(plan_of(listener("tcp", 80, [backend(*B1, weight=0), backend(*B2, weight=0)])))
    before = lb.stats()
    r = lb.xdp(frame)
    assert r.sent_back
    _check_rst(frame, r.data)
    assert stats_delta(before, lb.stats()) == {Stat.NO_BACKEND_RST: 1}
    assert lb.ct() == {}
    assert lb.listener_stats(VIP, 80) == (0, 0, 0)


def test_rst_through_vlan(lb: Harness) -> None:
    lb.apply(plan_of(listener("tcp", 80, [backend(*B1, weight=0)])))
    frame = bytes(ether() / Dot1Q(vlan=5) / IP(src=CLIENT, dst=VIP)
                  / TCP(sport=40000, dport=80, flags="S", seq=9) / b"abc")
    r = lb.xdp(frame)
    assert r.sent_back
    _check_rst(frame, r.data, ip_off=18)
    assert Ether(r.data)[Dot1Q].vlan == 5


def test_udp_without_backend_dropped(lb: Harness) -> None:
    lb.apply(plan_of(listener("udp", 53, [backend(*UB1, weight=0)], protocol="UDP")))
    before = lb.stats()
    r = lb.xdp(udp())
    assert r.retval == XDP_DROP
    assert stats_delta(before, lb.stats()) == {Stat.NO_BACKEND_DROP: 1}
    assert lb.ct() == {}


def test_weight_zero_backend_gets_no_new_flows(lb: Harness) -> None:
    lb.apply(plan_of(listener("tcp", 80, [backend(*B1), backend(*B2, weight=0)])))
    for sport in range(41000, 41064):
        frame = syn(sport=sport)
        assert lb.xdp(frame).data == dnat(frame, *B1)


# --- 9. session affinity ---------------------------------------------------------------------

def test_client_ip_affinity(lb: Harness) -> None:
    backends = [backend(f"10.20.{i}.2", 8080) for i in range(1, 6)]
    lb.apply(plan_of(listener("tcp", 80, backends, sessionAffinity="ClientIP")))

    def target(client: str, sport: int) -> tuple[str, int]:
        r = lb.xdp(syn(src=client, sport=sport))
        assert r.retval == XDP_PASS
        ihl = (r.data[14] & 0xF) * 4
        return (".".join(map(str, r.data[30:34])),
                struct.unpack_from("!H", r.data, 14 + ihl + 2)[0])

    for client in ("10.10.1.2", "10.10.7.9", "172.16.0.1"):
        assert len({target(client, p) for p in range(42000, 42040)}) == 1, client
    assert len({target(f"10.30.{i}.1", 50000) for i in range(40)}) > 1


# --- 10. fuzzing --------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
PAYLOAD_SYN = bytes(ether() / IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S")
                    / b"payload")
TEMPLATES = [
    (syn(), 14),
    (bytes(ether() / IP(src=CLIENT, dst=VIP, options=[IPOption_Router_Alert()])
           / TCP(sport=40000, dport=80, flags="S")), 14),
    (bytes(ether() / Dot1Q(vlan=7) / IP(src=CLIENT, dst=VIP)
           / TCP(sport=40000, dport=80, flags="S")), 18),
]


def _set_ihl(frame: bytes, ip_off: int, ihl: int) -> bytes:
    b = bytearray(frame)
    b[ip_off] = 0x40 | ihl
    return bytes(b)


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    frame, ip_off = draw(st.sampled_from(TEMPLATES))
    kind = draw(st.sampled_from(["truncated", "random", "random-ipv4", "ihl", "doff",
                                 "tot_len", "version"]))
    ihl = (frame[ip_off] & 0xF) * 4
    if kind == "truncated":  # shorter than its headers (the kernel wants >= 14 bytes)
        return frame[:draw(st.integers(14, len(frame) - 1))]
    if kind == "random":
        return draw(st.binary(min_size=14, max_size=128))
    if kind == "random-ipv4":
        return frame[:12] + b"\x08\x00" + draw(st.binary(min_size=0, max_size=80))
    if kind == "ihl":  # < 5, or L4 header beyond the end of the frame
        bad = draw(st.sampled_from([*range(5), *range(ihl // 4 + 1, 16)]))
        return _set_ihl(frame, ip_off, bad)
    b = bytearray(frame)
    if kind == "doff":
        b[ip_off + ihl + 12] = draw(st.integers(0, 4)) << 4 | (b[ip_off + ihl + 12] & 0xF)
    elif kind == "tot_len":
        struct.pack_into("!H", b, ip_off + 2, draw(st.integers(0, ihl - 1)))
    else:
        b[ip_off] = draw(st.sampled_from([0, 1, 5, 6, 15])) << 4 | (b[ip_off] & 0xF)
    return bytes(b)


@FUZZ
@given(frame=malformed())
def test_fuzz_malformed_passes_untouched(lb: Harness, frame: bytes) -> None:
    """`lb` is reset once for the whole run: no example may leave a trace."""
    h = lb
    if not h.writer.plan.listeners:
        h.apply(plan_of(TCP_LST, UDP_LST))
    before = h.stats()
    r = h.xdp(frame)
    assert (r.retval, r.data) == (XDP_PASS, frame)
    assert h.ct() == {}
    assert not set(stats_delta(before, h.stats())) & NEW_STATS
    assert h.all_flow_stats() == (0, 0, 0)


def _ones(*words: int) -> int:
    """One's complement sum, mod 0xffff (0 and 0xffff are the same number)."""
    return sum(words) % 0xFFFF


def _words(b: bytes) -> list[int]:
    b = b + b"\0" * (len(b) % 2)
    return list(struct.unpack(f"!{len(b) // 2}H", b))


def _check_dnat(frame: bytes, out: bytes, target: tuple[str, int]) -> None:
    """`out` is `frame` DNATted to target: only the destination, the destination port
    and the two checksums differ, and each checksum moved by exactly the change of the
    fields it covers (so a checksum that was wrong stays wrong by the same amount)."""
    ip_off = 18 if frame[12:14] in (b"\x81\x00", b"\x88\xa8") else 14
    ihl = (frame[ip_off] & 0xF) * 4
    l4 = ip_off + ihl
    proto = frame[ip_off + 9]
    csum = l4 + (16 if proto == 6 else 6)
    changed = {*range(ip_off + 16, ip_off + 20), l4 + 2, l4 + 3, ip_off + 10, ip_off + 11,
               csum, csum + 1}
    assert len(out) == len(frame)
    assert [i for i in range(len(frame)) if frame[i] != out[i] and i not in changed] == []
    assert (".".join(map(str, out[ip_off + 16:ip_off + 20])),
            struct.unpack_from("!H", out, l4 + 2)[0]) == target

    def covered(b: bytes) -> tuple[int, int]:
        dst = _words(b[ip_off + 16:ip_off + 20])
        ip_sum = _ones(*dst, *_words(b[ip_off + 10:ip_off + 12]))
        l4_sum = _ones(*dst, *_words(b[l4 + 2:l4 + 4]), *_words(b[csum:csum + 2]))
        return ip_sum, l4_sum
    if proto == 17 and frame[csum:csum + 2] == b"\0\0":
        assert out[csum:csum + 2] == b"\0\0"
        assert covered(frame)[0] == covered(out)[0]
    else:
        assert covered(frame) == covered(out)
    try:
        exact = checksums_valid(frame) and dnat(frame, *target)
    except Exception:  # scapy cannot take this frame apart and put it back as it was
        exact = None
    event("dnat, checked by scapy" if exact else "dnat, checked by checksum deltas")
    if exact:
        assert out == exact


@FUZZ
@given(template=st.sampled_from([*TEMPLATES, (PAYLOAD_SYN, 14)]),
       mutations=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1,
                          max_size=4),
       fix_checksums=st.booleans())
def test_fuzz_mutated_syn_is_untouched_dropped_answered_or_exact_dnat(
        lb: Harness, template: tuple[bytes, int], mutations: list[tuple[int, int]],
        fix_checksums: bool) -> None:
    h = lb
    if not h.writer.plan.listeners:
        h.apply(plan_of(TCP_LST, UDP_LST))
    frame, _ = template
    b = bytearray(frame)
    for pos, value in mutations:
        b[pos % len(b)] = value
    frame = bytes(b)
    if fix_checksums:
        try:
            pkt = Ether(frame)
            if bytes(pkt) == frame and IP in pkt:
                del pkt[IP].chksum
                if TCP in pkt:
                    del pkt[TCP].chksum
                elif UDP in pkt and pkt[UDP].chksum:
                    del pkt[UDP].chksum
                fixed = bytes(pkt)
                frame = fixed if len(fixed) == len(frame) else frame
        except Exception:
            pass
    h.flush_ct()
    before = h.stats()
    r = h.xdp(frame)
    if r.retval == XDP_DROP:  # to the VIP, where no listener serves it
        event("dropped")
        assert h.ct() == {} and h.replies() == {}
        assert set(stats_delta(before, h.stats())) <= {Stat.VIP_CLOSED, Stat.FRAG_MISSED}
        return
    if r.sent_back:  # a ping of the VIP answered
        event("answered")
        assert stats_delta(before, h.stats()) == {Stat.VIP_PING: 1}
        assert checksums_valid(r.data) or not checksums_valid(frame)
        return
    assert r.retval == XDP_PASS
    if r.data == frame:
        assert h.replies() == {}
        if r.meta:  # a checksum that looks partial: TC ingress rewrites it
            event("left to TC")
            assert L.DeferMeta.from_buffer_copy(r.meta).magic == L.DEFER_MAGIC
            assert len(h.ct()) == 1
        else:
            event("untouched")
            assert h.ct() == {}
        return
    assert r.meta == b""
    (_key, val), = h.ct().items()
    target = (L.from_ip(val.nat_addr), L.from_be16(val.nat_port))
    assert target in (B1, UB1)
    _check_dnat(frame, r.data, target)


# --- ICMP errors about tracked flows ---------------------------------------------------------

ROUTER_CLIENT_SIDE = "10.10.1.254"
ROUTER_BACKEND_SIDE = "10.20.1.1"


def icmp_error(src: str, dst: str, quote: bytes, kind: tuple[int, int] = (3, 4)) -> bytes:
    """An ICMP error (default: fragmentation needed, MTU 1400) quoting `quote`."""
    return bytes(ether() / IP(src=src, dst=dst)
                 / ICMP(type=kind[0], code=kind[1], nexthopmtu=1400) / quote)


def quoted_tcp(src: tuple[str, int], dst: tuple[str, int], payload: bytes = b"x" * 64) -> bytes:
    return bytes(IP(src=src[0], dst=dst[0], id=77)
                 / TCP(sport=src[1], dport=dst[1], flags="PA", seq=5000, ack=1001) / payload)


def quoted_udp(src: tuple[str, int], dst: tuple[str, int], chksum: int | None = None) -> bytes:
    return bytes(IP(src=src[0], dst=dst[0], id=78)
                 / UDP(sport=src[1], dport=dst[1], chksum=chksum) / b"query")


@pytest.mark.parametrize("cut", [None, 28], ids=["whole quote", "8 bytes of TCP"])
@pytest.mark.parametrize("kind", [(3, 4), (11, 0)], ids=["frag needed", "time exceeded"])
def test_icmp_error_about_a_reply_goes_to_the_backend(lb: Harness, cut: int | None,
                                                       kind: tuple[int, int]) -> None:
    # A router on the client side could not forward the LB's reply (VIP:80 ->
    # client). The backend sent it, so the backend must hear about it, about its
    # own packet: outer destination and quoted source become the backend.
    lb.apply(plan_of(TCP_LST))
    put_flow(lb, B1, flags=L.CT_REPLIED)
    frame = icmp_error(ROUTER_CLIENT_SIDE, VIP, quoted_tcp((VIP, 80), (CLIENT, 40000))[:cut],
                       kind)
    want = icmp_error(ROUTER_CLIENT_SIDE, B1[0], quoted_tcp(B1, (CLIENT, 40000))[:cut], kind)
    before = lb.stats()
    r = lb.xdp(frame)
    assert r.retval == XDP_PASS
    assert r.data == want  # scapy built want: outer, quoted IP/TCP and ICMP checksums
    assert stats_delta(before, lb.stats()) == {Stat.ICMP_IN: 1}


@pytest.mark.parametrize("chksum", [None, 0], ids=["udp checksum", "no udp checksum"])
def test_icmp_error_about_a_udp_reply_keeps_a_zero_checksum(lb: Harness,
                                                            chksum: int | None) -> None:
    lb.apply(plan_of(UDP_LST))
    put_flow(lb, UB1, proto=17, vip_port=53)
    frame = icmp_error(ROUTER_CLIENT_SIDE, VIP, quoted_udp((VIP, 53), (CLIENT, 40000), chksum))
    r = lb.xdp(frame)
    assert r.data == icmp_error(ROUTER_CLIENT_SIDE, UB1[0],
                                quoted_udp(UB1, (CLIENT, 40000), chksum))
    quoted = IP(bytes(Ether(r.data)[ICMP].payload))
    assert (quoted[UDP].chksum == 0) == (chksum == 0)


@pytest.mark.parametrize("sender", ["router", "backend"])
def test_icmp_error_about_a_forwarded_packet_goes_to_the_client(lb: Harness,
                                                                 sender: str) -> None:
    # Fragmentation needed from a router between LB and backend, or a port
    # unreachable from the backend itself, about client -> backend: the client
    # must see it about its own packet to VIP:80, and never the backend's address.
    lb.apply(plan_of(TCP_LST))
    put_flow(lb, B1, flags=L.CT_REPLIED)
    src = ROUTER_BACKEND_SIDE if sender == "router" else B1[0]
    kind = (3, 4) if sender == "router" else (3, 3)
    frame = icmp_error(src, CLIENT, quoted_tcp((CLIENT, 40000), B1), kind)
    want = icmp_error(src if sender == "router" else VIP, CLIENT,
                      quoted_tcp((CLIENT, 40000), (VIP, 80)), kind)
    before = lb.stats()
    r = lb.tc(frame)
    assert r.data == want  # scapy built want: outer, quoted IP/TCP and ICMP checksums
    assert stats_delta(before, lb.stats()) == {Stat.ICMP_OUT: 1}


@pytest.mark.parametrize("to_vip", [True, False], ids=["to the VIP", "to another address"])
def test_icmp_errors_of_unknown_or_expired_flows_are_untranslated(short: Harness,
                                                                  to_vip: bool) -> None:
    # Addressed to the VIP, such an error has nowhere to go (dropped, as anything there
    # that no listener serves); to another address, it passes untouched.
    short.apply(plan_of(TCP_LST))
    put_flow(short, B1, flags=EST, sport=40001, seen=BOOT)  # expired
    dst = VIP if to_vip else "192.0.2.99"
    cases = [
        icmp_error(ROUTER_CLIENT_SIDE, dst, quoted_tcp((VIP, 80), (CLIENT, 40000))),  # unknown
        icmp_error(ROUTER_CLIENT_SIDE, dst, quoted_tcp((VIP, 80), (CLIENT, 40001))),  # expired
        bytes(ether() / IP(src=ROUTER_CLIENT_SIDE, dst=dst)  # a later fragment: no ports
              / ICMP(type=3, code=4) / bytes(IP(src=VIP, dst=CLIENT, frag=10, proto=6)
                                              / (b"y" * 16))),
        bytes(ether() / IP(src=ROUTER_CLIENT_SIDE, dst=dst) / ICMP(type=3, code=4)
              / quoted_tcp((VIP, 80), (CLIENT, 40000))[:24]),  # quote too short for ports
    ]
    for frame in cases:
        before = short.stats()
        r = short.xdp(frame)
        if to_vip:
            assert r.retval == XDP_DROP
            assert stats_delta(before, short.stats()) == {Stat.VIP_CLOSED: 1}
        else:
            assert (r.retval, r.data) == (XDP_PASS, frame)
            assert stats_delta(before, short.stats()) == {Stat.NOMATCH: 1}
    back = icmp_error(ROUTER_BACKEND_SIDE, CLIENT, quoted_tcp((CLIENT, 40001), B1))
    before = short.stats()
    assert short.tc(back).data == back
    assert stats_delta(before, short.stats()) == {}


# --- 12. source NAT (sourceNAT: Node) ------------------------------------------------------------

def test_snat_new_flow_rewrites_both_ends_and_tracks_both_translations(lb: Harness) -> None:
    lb.apply(snat_plan(TCP_LST), SNAT_INV)
    frame = syn()
    before = lb.stats()
    r = lb.xdp(frame)
    assert r.retval == XDP_PASS
    port = snat_port_of(lb)
    assert CAPS.snat_port_min <= port <= CAPS.snat_port_max
    assert r.data == rewritten(frame, dst=B1, src=(NODE_B1, port))
    assert stats_delta(before, lb.stats()) == {Stat.NEW_DEFAULT: 1}
    rv = lb.replies()[(B1[0], B1[1], NODE_B1, port, 6)]
    assert rv.flags == L.CT_SNAT
    assert (L.from_ip(rv.client), L.from_be16(rv.cport)) == (CLIENT, 40000)
    assert (L.from_ip(rv.vip), L.from_be16(rv.vport)) == (VIP, 80)
    assert rev_key() not in lb.replies()  # no reply entry toward the client itself

    data = segment(flags="PA", payload=b"GET /")
    assert lb.xdp(data).data == rewritten(data, dst=B1, src=(NODE_B1, port))

    reply = bytes(Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=B1[0], dst=NODE_B1)
                  / TCP(sport=B1[1], dport=port, flags="SA", seq=5000, ack=1001))
    before = lb.stats()
    r = lb.xdp(reply)
    assert r.retval == XDP_PASS
    assert r.data == rewritten(reply, src=(VIP, 80), dst=(CLIENT, 40000))
    assert stats_delta(before, lb.stats()) == {Stat.SNAT_REPLY: 1}
    f = lb.ct()[fwd_key()]
    assert f.flags & L.CT_REPLIED and list(f.packets) == [2, 1]


def test_snat_udp_keeps_a_zero_checksum_and_replies_come_from_the_listener(
        lb: Harness) -> None:
    lb.apply(snat_plan(UDP_LST), SNAT_INV)
    frame = udp(chksum=0)
    r = lb.xdp(frame)
    f = lb.ct()[fwd_key(dport=53, proto=17)]
    port = L.from_be16(f.snat_port)
    assert r.data == rewritten(frame, dst=UB1, src=(NODE_B1, port))
    reply = bytes(Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=UB1[0], dst=NODE_B1)
                  / UDP(sport=UB1[1], dport=port) / b"answer")
    assert lb.xdp(reply).data == rewritten(reply, src=(VIP, 53), dst=(CLIENT, 40000))


def test_snat_reply_to_an_unknown_port_is_untouched(lb: Harness) -> None:
    lb.apply(snat_plan(TCP_LST), SNAT_INV)
    lb.xdp(syn())
    port = snat_port_of(lb)
    other = 32768 if port != 32768 else 32769
    stray = bytes(Ether() / IP(src=B1[0], dst=NODE_B1) / TCP(sport=B1[1], dport=other, flags="A"))
    before = lb.stats()
    r = lb.xdp(stray)
    assert (r.retval, r.data) == (XDP_PASS, stray)
    assert stats_delta(before, lb.stats()) == {Stat.NOMATCH: 1}


def test_snat_without_a_route_to_the_backend_drops_and_says_so(lb: Harness) -> None:
    res = lb.apply(snat_plan(TCP_LST), INV, problems=True)
    assert res.problems == [f"default/web/tcp: no route from this node to backend {B1[0]}: "
                            "its new flows are dropped"]
    before = lb.stats()
    assert lb.xdp(syn()).retval == XDP_DROP
    assert stats_delta(before, lb.stats()) == {Stat.SNAT_NO_SOURCE: 1}
    assert lb.ct() == {}


def test_snat_ports_never_collide_across_10000_flows() -> None:
    lb = Harness(replace(CAPS, conntrack=16384))  # the shared one holds 4,096 flows
    try:
        lb.reset()
        lb.apply(snat_plan(TCP_LST), SNAT_INV)
        n = 10_000
        template = bytearray(syn())
        for i in range(n):  # 10,000 clients: only the source address changes (bytes 26-29)
            template[26:30] = bytes([10, 10, 1 + i // 250, 1 + i % 250])
            assert lb.xdp(bytes(template)).retval == XDP_PASS
        fwd, rev = list(lb.ct().values()), list(lb.replies())
    finally:
        lb.close()
    ports = {L.from_be16(v.snat_port) for v in fwd}
    assert len(fwd) == len(rev) == len(ports) == n
    assert {k[3] for k in rev} == ports


def test_snat_port_exhaustion_is_counted_and_never_takes_a_live_port() -> None:
    small = Harness(replace(CAPS, snat_port_min=40000, snat_port_max=40003))
    try:
        small.reset()
        small.apply(snat_plan(TCP_LST), SNAT_INV)
        for sport in range(50000, 50004):
            assert small.xdp(syn(sport=sport)).retval == XDP_PASS
        def taken() -> dict[object, bytes]:
            return {k: bytes(v) for m in (small.ct(), small.replies()) for k, v in m.items()}

        held = taken()
        assert sorted(k[3] for k in small.replies()) == [40000, 40001, 40002, 40003]
        before = small.stats()
        assert small.xdp(syn(sport=50004)).retval == XDP_DROP
        assert stats_delta(before, small.stats()) == {Stat.SNAT_EXHAUSTED: 1}
        assert taken() == held
    finally:
        small.close()


def test_snat_keeps_the_client_port_and_reuses_ports_of_finished_flows_only() -> None:
    # Timeouts of seconds: an entry stamped at boot has expired, the others live on
    # for the test.
    small = Harness(replace(CAPS, snat_port_min=40000, snat_port_max=40003),
                    Timeouts(tcp_established=5, tcp_closing=5, tcp_unreplied=5, udp=5))
    try:
        small.reset()
        small.apply(snat_plan(TCP_LST), SNAT_INV)
        # A client port in the range is kept, as MASQUERADE does.
        frame = syn(sport=40001)
        assert small.xdp(frame).data == rewritten(frame, dst=B1, src=(NODE_B1, 40001))
        for sport in (50000, 50001, 50002):  # outside the range: the other three ports
            small.xdp(syn(sport=sport))
        ports = {s: L.from_be16(small.ct()[fwd_key(sport=s)].snat_port)
                 for s in (50000, 50001, 50002)}
        assert sorted(ports.values()) == [40000, 40002, 40003]

        def close(sport: int, port: int) -> None:
            small.xdp(segment(sport=sport, flags="FA"))
            small.xdp(bytes(Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=B1[0], dst=NODE_B1)
                            / TCP(sport=B1[1], dport=port, flags="FA", seq=5000, ack=1002)))

        # Closed flows keep their ports from other clients' ports: the backend's
        # TIME_WAIT would refuse a SYN whose timestamps belong to another connection.
        close(50000, ports[50000])
        before = small.stats()
        assert small.xdp(syn(sport=50003)).retval == XDP_DROP
        assert stats_delta(before, small.stats()) == {Stat.SNAT_EXHAUSTED: 1}
        # ... but the same client port starting again takes its own port back.
        close(40001, 40001)
        frame = syn(sport=40001, seq=9000)
        assert small.xdp(frame).data == rewritten(frame, dst=B1, src=(NODE_B1, 40001))
        rv = small.replies()[(B1[0], B1[1], NODE_B1, 40001, 6)]
        assert L.from_ip(rv.client) == CLIENT
        assert small.ct()[fwd_key(sport=40001)].flags == L.CT_SNAT  # a new flow: no FIN
        # A flow idle past its timeout gives up its port once the sweeper has removed
        # its entries: the data path never hands one client's port to another.
        small.put_ct(fwd_key(sport=50001), replace_val(small.ct()[fwd_key(sport=50001)],
                                                       last_ns=0))
        before = small.stats()
        assert small.xdp(syn(sport=50004)).retval == XDP_DROP
        assert stats_delta(before, small.stats()) == {Stat.SNAT_EXHAUSTED: 1}
        assert sweep(small).deleted == 2  # the expired flow's two entries
        frame = syn(sport=50004)
        assert small.xdp(frame).data == rewritten(frame, dst=B1, src=(NODE_B1, ports[50001]))
    finally:
        small.close()


def replace_val(v: L.CtVal, **fields: int) -> L.CtVal:
    out = L.CtVal.from_buffer_copy(bytes(v))
    for name, value in fields.items():
        setattr(out, name, value)
    return out


def test_hairpin_flow_of_a_backend_to_itself_is_source_natted(lb: Harness) -> None:
    # B1 connects to its own listener and is picked: without source NAT it would
    # answer itself directly, from B1:8080 instead of VIP:80.
    lb.apply(plan_of(TCP_LST), SNAT_INV)
    frame = syn(src=B1[0], sport=41000)
    r = lb.xdp(frame)
    f = lb.ct()[fwd_key(src=B1[0], sport=41000)]
    assert f.flags & L.CT_SNAT and L.from_ip(f.snat_addr) == NODE_B1
    assert r.data == rewritten(frame, dst=B1, src=(NODE_B1, L.from_be16(f.snat_port)))
    other = syn(src=B2[0], sport=41000)  # another host keeps its address (no source NAT)
    assert lb.xdp(other).data == dnat(other, *B1)


@pytest.mark.parametrize("backend_side", ["xdp", "tc"])
def test_icmp_errors_of_source_nat_flows_are_translated_both_ways(lb: Harness,
                                                                   backend_side: str) -> None:
    # backend_side: the program on the interface toward the backend, XDP where a
    # listener uses it too, else the TC ingress filter.
    lb.apply(snat_plan(TCP_LST), SNAT_INV)
    lb.xdp(syn())
    port = snat_port_of(lb)
    # A router between node and backend: "fragmentation needed" about node:port -> B1,
    # sent to the node. The client must hear it about its own packet to VIP:80.
    frame = icmp_error(ROUTER_BACKEND_SIDE, NODE_B1, quoted_tcp((NODE_B1, port), B1))
    before = lb.stats()
    r = lb.xdp(frame) if backend_side == "xdp" else lb.tc_in(frame)
    assert r.retval == (XDP_PASS if backend_side == "xdp" else TC_ACT_OK)
    assert r.data == icmp_error(ROUTER_BACKEND_SIDE, CLIENT,
                                quoted_tcp((CLIENT, 40000), (VIP, 80)))
    assert stats_delta(before, lb.stats()) == {Stat.ICMP_IN: 1}
    # A router on the client side, about the reply VIP:80 -> client: the backend must
    # hear it about its own packet, which went to the node's address and port.
    frame = icmp_error(ROUTER_CLIENT_SIDE, VIP, quoted_tcp((VIP, 80), (CLIENT, 40000)))
    r = lb.xdp(frame)
    assert r.data == icmp_error(ROUTER_CLIENT_SIDE, B1[0], quoted_tcp(B1, (NODE_B1, port)))


@pytest.mark.parametrize("proto", ["TCP", "UDP", "UDP without checksum"])
def test_snat_reply_on_a_backend_side_interface_is_translated_by_tc(lb: Harness,
                                                                    proto: str) -> None:
    # Where no listener needs XDP, a TC ingress filter takes the replies of source-NAT
    # flows, with the bytes XDP would produce.
    tcp = proto == "TCP"
    lb.apply(snat_plan(TCP_LST if tcp else UDP_LST), SNAT_INV)
    no_sum = {"chksum": 0} if "without" in proto else {}
    lb.xdp(syn() if tcp else udp(**no_sum))
    vport, b = (80, B1) if tcp else (53, UB1)
    f = lb.ct()[fwd_key(dport=vport, proto=6 if tcp else 17)]
    port = L.from_be16(f.snat_port)
    l4 = (TCP(sport=b[1], dport=port, flags="PA", seq=5000, ack=1001) if tcp
          else UDP(sport=b[1], dport=port, **no_sum))
    reply = bytes(Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=b[0], dst=NODE_B1) / l4
                  / b"answer")
    before = lb.stats()
    r = lb.tc_in(reply)
    assert r.retval == TC_ACT_OK
    assert r.data == rewritten(reply, src=(VIP, vport), dst=(CLIENT, 40000))
    assert stats_delta(before, lb.stats()) == {Stat.SNAT_REPLY: 1}
    assert list(lb.ct()[fwd_key(dport=vport, proto=6 if tcp else 17)].packets) == [1, 1]
    stray = bytes(Ether() / IP(src=b[0], dst=NODE_B1)
                  / (TCP(sport=b[1], dport=port ^ 1, flags="A") if tcp
                     else UDP(sport=b[1], dport=port ^ 1)))
    assert lb.tc_in(stray).data == stray  # no flow at that port: untouched


# --- 13. replies of flows whose entries were lost --------------------------------------------


@pytest.mark.parametrize("flags", ["SA", "A", "PA", "FA", "R"])
def test_a_backends_segment_without_a_flow_is_never_touched(lb: Harness, flags: str) -> None:
    # A connection made to B1:8080 itself (not through the listener), opened before
    # the agent started, idle past any timeout, or whose entries were flushed: nothing
    # proves it is the load balancer's, so it is left alone, and no entry is made.
    # (A listener flow whose entries were lost recovers when the client next sends.)
    lb.apply(plan_of(TCP_LST))
    before = lb.stats()
    frame = reply_tcp(flags=flags, payload=b"x" if "P" in flags else b"")
    r = lb.tc(frame)
    assert (r.retval, r.data) == (TC_ACT_OK, frame)
    assert stats_delta(before, lb.stats()) == {}
    assert lb.ct() == {} and lb.replies() == {}


def test_a_lost_flow_recovers_when_the_client_sends(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST))
    reply = reply_tcp(flags="A", payload=b"more data")
    assert lb.tc(reply).data == reply  # the backend first: no proof yet
    data = segment(flags="PA", payload=b"next")
    before = lb.stats()
    assert lb.xdp(data).data == dnat(data, *B1)
    assert stats_delta(before, lb.stats()) == {Stat.RESELECTED: 1}
    assert lb.tc(reply).data == reply_snat(reply, VIP, 80)


def test_direct_connection_from_a_closed_flows_port_is_left_alone(lb: Harness) -> None:
    # The client's flow to VIP:80 on B1 has closed, and its entries live on for the
    # closing timeout. The client reuses the port to reach B1:8080 directly: B1's
    # SYN|ACK belongs to that new connection, not to the old flow.
    lb.apply(plan_of(TCP_LST))
    lb.xdp(syn())
    lb.tc(reply_tcp(flags="SA"))
    lb.xdp(segment(flags="FA"))
    fin = reply_tcp(flags="FA")
    assert lb.tc(fin).data == reply_snat(fin, VIP, 80)  # while open: restored
    assert lb.ct()[fwd_key()].flags & (L.CT_FIN_FWD | L.CT_FIN_REV) == \
        L.CT_FIN_FWD | L.CT_FIN_REV
    before = lb.stats()
    for flags in ("SA", "A", "PA"):
        frame = reply_tcp(flags=flags, payload=b"x" if "P" in flags else b"")
        assert lb.tc(frame).data == frame
    assert stats_delta(before, lb.stats()) == {}
    assert fwd_key() not in lb.ct()


def test_reply_of_a_backend_behind_two_listeners_is_not_guessed(lb: Harness) -> None:
    lb.apply(plan_of(TCP_LST, listener("tcp2", 81, [backend(*B1)])))
    reply = reply_tcp(flags="A", payload=b"x")
    before = lb.stats()
    assert lb.tc(reply).data == reply
    assert stats_delta(before, lb.stats()) == {}
    assert lb.ct() == {}
