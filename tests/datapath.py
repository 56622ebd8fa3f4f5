"""Shared helpers for the data-path tests: a loaded data plane driven with
BPF_PROG_TEST_RUN, map readers, and expected-packet builders (scapy)."""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from dataclasses import dataclass, replace
from typing import Any

import pytest
import yaml
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from xdplb.agent.metrics import percpu_sum
from xdplb.dataplane import bpfsys, conntrack
from xdplb.dataplane import layout as L
from xdplb.dataplane.config import Capacities, Timeouts
from xdplb.dataplane.entries import Inventory
from xdplb.dataplane.layout import Stat
from xdplb.dataplane.writer import ApplyResult, MapWriter
from xdplb.plan.model import Plan
from xdplb.plan.planner import build_plan
from xdplb.spec.load import parse_manifests

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
TC_ACT_OK = 0
LO = 1

CAPS = Capacities(conntrack=4096, table_slots=200_000, source_routes=1000, groups=1000,
                  listener_keys=256, listeners=256, backends=1024)
INV = Inventory(ifindex={"lo": LO}, addresses={"lo": ("127.0.0.1",)}, default_interface="lo")

CLIENT_MAC = "02:00:00:00:00:01"
LB_MAC = "02:00:00:00:00:02"

needs_bpf = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir("/sys/fs/bpf"),
    reason="needs root and a bpffs at /sys/fs/bpf")


# --- plans ---------------------------------------------------------------------------

def backend(address: str, port: int, weight: int = 1) -> dict[str, Any]:
    return {"address": address, "port": port, "weight": weight}


def listener(name: str, port: int, backends: list[dict[str, Any]], protocol: str = "TCP",
             address: str | None = "192.0.2.10", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "protocol": protocol, "port": port,
                           "backends": backends, **extra}
    if address is not None:
        out["address"] = address
    return out


def manifest(*listeners: dict[str, Any]) -> str:
    return yaml.safe_dump({
        "apiVersion": "xdplb.io/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"interfaces": ["lo"], "listeners": list(listeners)},
    }, sort_keys=False)


def plan_of(*listeners: dict[str, Any]) -> Plan:
    return build_plan(parse_manifests(manifest(*listeners)))


# --- the data plane under test --------------------------------------------------------

def xdp_ctx(length: int, ifindex: int = LO) -> bytes:
    """struct xdp_md for PROG_TEST_RUN: data at offset 0, data_end = the frame length,
    no metadata, queue 0, egress_ifindex 0 (the kernel rejects anything else)."""
    return struct.pack("=6I", 0, length, 0, ifindex, 0, 0)


# Timeouts short enough that an entry stamped at boot (last_ns 0) has expired on any
# machine that has been up for a few seconds: tests never compute a past time from the
# monotonic clock, which is small on a freshly booted machine.
SHORT = Timeouts(tcp_established=2, tcp_closing=1, tcp_unreplied=1, udp=1)


@dataclass(frozen=True)
class XdpRun:
    retval: int
    data: bytes   # the frame as XDP left it
    meta: bytes   # the metadata it put in front (what it left to TC ingress)

    @property
    def sent_back(self) -> bool:
        """An answer made in place of the frame, for TC ingress to send back."""
        return self.retval == XDP_PASS and self.meta == bytes(
            L.DeferMeta(L.DEFER_MAGIC, L.DEFER_ANSWER))


class Harness:
    """One compiled and loaded data plane (not attached anywhere), pinned under a
    unique bpffs directory that `close` removes."""

    def __init__(self, caps: Capacities = CAPS, timeouts: Timeouts | None = None) -> None:
        from xdplb.dataplane.loader import DataPlane

        self.pin_root = f"/sys/fs/bpf/xdplb-t-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.caps = caps
        self.timeouts = timeouts or Timeouts()
        self.dp = DataPlane(pin_root=self.pin_root, caps=caps, timeouts=self.timeouts)
        try:
            self.dp.load(apart=False)  # keeps bcc's module: test_layout reads its tables
        except BaseException:
            self.dp.close()
            shutil.rmtree(self.pin_root, ignore_errors=True)
            raise
        self.maps = self.dp.maps
        self.writer = MapWriter(self.maps, caps)

    def close(self) -> None:
        self.dp.close()
        shutil.rmtree(self.pin_root, ignore_errors=True)

    # maps -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty listeners, routes, port filter, conntrack and counters; a fresh writer."""
        self.flush_ct()
        self.maps["frags"].delete_batch([k for k, _v in self.maps["frags"].items()])
        self.writer.apply(Plan(), INV)
        self.writer.apply(Plan(), INV)  # releases the groups retired by the first
        self.writer.release_rev_nat(set())  # no flow is left to rely on them
        self.writer = MapWriter(self.maps, self.caps)
        for name, n in (("stats", len(L.Stat)), ("listener_stats", self.caps.listeners),
                        ("backend_stats", self.caps.backends)):
            m = self.maps[name]
            m.update_batch([i.to_bytes(4, "little") for i in range(n)],
                           [bytes(m.value_size)] * n)

    def apply(self, plan: Plan, inv: Inventory = INV, problems: bool = False) -> ApplyResult:
        res = self.writer.apply(plan, inv)
        assert problems or not res.problems, res.problems
        return res

    def stats(self) -> dict[L.Stat, int]:
        raw = dict(self.maps["stats"].items())
        return {st: percpu_sum(raw[st.value.to_bytes(4, "little")], 1)[0] for st in L.Stat}

    def listener_stats(self, address: str | None, port: int,
                       protocol: str = "TCP") -> tuple[int, int, int]:
        lid = self.writer.listener_ids[(address, port, protocol)]
        return self._flow_stats("listener_stats", lid)

    def backend_stats(self, address: str, port: int) -> tuple[int, int, int]:
        return self._flow_stats("backend_stats", self.writer.backend_ids[(address, port)])

    def all_flow_stats(self) -> tuple[int, int, int]:
        """Sum of (packets, bytes, flows) over every listener and backend counter."""
        raw = b"".join(v for name in ("listener_stats", "backend_stats")
                       for _k, v in self.maps[name].items())
        words = memoryview(raw).cast("Q")  # per-CPU flow_stats back to back: 3 u64 each
        return sum(words[0::3]), sum(words[1::3]), sum(words[2::3])

    def _flow_stats(self, name: str, idx: int) -> tuple[int, int, int]:
        raw = self.maps[name].lookup(idx.to_bytes(4, "little"))
        assert raw is not None
        p, b, f = percpu_sum(raw, 3)
        return p, b, f

    def ct(self) -> dict[Tuple5, L.CtVal]:
        """Forward entries keyed (src, sport, dst, dport, proto)."""
        return {_tuple(k): v for k, v in conntrack.read(self.maps["ct"])}

    def replies(self) -> dict[Tuple5, L.CtReplyVal]:
        """Reply entries keyed (src, sport, dst, dport, proto) of the reply."""
        return {_tuple(k): v for k, v in conntrack.read_replies(self.maps["ct_reply"])}

    def put_ct(self, key: Tuple5, val: L.CtVal) -> None:
        self.maps["ct"].update(bytes(ct_key(*key)), bytes(val))

    def put_reply(self, key: Tuple5, val: L.CtReplyVal) -> None:
        self.maps["ct_reply"].update(bytes(ct_key(*key)), bytes(val))

    def flush_ct(self) -> None:
        conntrack.flush(self.maps["ct"], self.maps["ct_reply"])

    # programs -------------------------------------------------------------------------
    def xdp(self, frame: bytes, ifindex: int = LO) -> XdpRun:
        r = bpfsys.prog_test_run(self.dp.xdp_fn.fd, frame, ctx=xdp_ctx(len(frame), ifindex))
        meta_len = struct.unpack_from("=I", r.ctx)[0]  # xdp_md.data, from data_meta
        return XdpRun(r.retval, r.data[meta_len:], r.data[:meta_len])

    def tc(self, frame: bytes) -> bpfsys.TestRun:
        return bpfsys.prog_test_run(self.dp.tc_fn.fd, frame)

    def tc_in(self, frame: bytes) -> bpfsys.TestRun:
        """TC ingress on a backend-side interface (source-NAT replies)."""
        return bpfsys.prog_test_run(self.dp.tc_in_fn.fd, frame)


Tuple5 = tuple[str, int, str, int, int]


def ct_key(src: str, sport: int, dst: str, dport: int, proto: int) -> L.CtKey:
    return L.CtKey(L.ip(src), L.ip(dst), L.be16(sport), L.be16(dport), proto)


def _tuple(k: L.CtKey) -> Tuple5:
    return (L.from_ip(k.src), L.from_be16(k.sport), L.from_ip(k.dst), L.from_be16(k.dport),
            k.proto)


def stats_delta(before: dict[L.Stat, int], after: dict[L.Stat, int]) -> dict[L.Stat, int]:
    """Only the counters that moved."""
    return {st: after[st] - before[st] for st in L.Stat if after[st] != before[st]}


# --- packets -------------------------------------------------------------------------

def ether() -> Ether:
    return Ether(src=CLIENT_MAC, dst=LB_MAC)


def syn(src: str = "10.10.1.2", sport: int = 40000, dst: str = "192.0.2.10", dport: int = 80,
        seq: int = 1000, **tcp: Any) -> bytes:
    return bytes(ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S",
                                                      seq=seq, **tcp))


def segment(src: str = "10.10.1.2", sport: int = 40000, dst: str = "192.0.2.10",
            dport: int = 80, flags: str = "A", payload: bytes = b"hello") -> bytes:
    return bytes(ether() / IP(src=src, dst=dst)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=1001, ack=5000) / payload)


def udp(src: str = "10.10.1.2", sport: int = 40000, dst: str = "192.0.2.10", dport: int = 53,
        payload: bytes = b"query", chksum: int | None = None) -> bytes:
    return bytes(ether() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport, chksum=chksum)
                 / payload)


def _l4(pkt: Ether) -> TCP | UDP:
    return pkt[TCP] if TCP in pkt else pkt[UDP]


def rewritten(frame: bytes, *, dst: tuple[str, int] | None = None,
              src: tuple[str, int] | None = None) -> bytes:
    """The frame with its destination (DNAT) or source (reply SNAT) address and port
    replaced and both checksums recomputed by scapy; a UDP checksum of 0 (none) stays 0."""
    pkt = Ether(frame)
    assert bytes(pkt) == frame, "scapy does not rebuild this frame byte for byte"
    ip, l4 = pkt[IP], _l4(pkt)
    if dst:
        ip.dst, l4.dport = dst
    if src:
        ip.src, l4.sport = src
    del ip.chksum
    if not (isinstance(l4, UDP) and l4.chksum == 0):
        del l4.chksum
    return bytes(pkt)


def dnat(frame: bytes, addr: str, port: int) -> bytes:
    return rewritten(frame, dst=(addr, port))


def reply_snat(frame: bytes, addr: str, port: int) -> bytes:
    return rewritten(frame, src=(addr, port))


def checksums_valid(frame: bytes) -> bool:
    """scapy recomputes the IP and L4 checksums to the values in the frame."""
    pkt = Ether(frame)
    return rewritten(frame) == bytes(pkt)


def dst_of(frame: bytes, ip_off: int = 14) -> tuple[str, int]:
    """Destination address and port of an IPv4/TCP-or-UDP frame."""
    ihl = (frame[ip_off] & 0xF) * 4
    addr = ".".join(str(b) for b in frame[ip_off + 16:ip_off + 20])
    port = struct.unpack_from("!H", frame, ip_off + ihl + 2)[0]
    return addr, port



# --- the flows of the data-path tests -------------------------------------------------

VIP = "192.0.2.10"
CLIENT = "10.10.1.2"
B1 = ("10.20.1.2", 8080)
B2 = ("10.20.2.2", 8080)
UB1 = ("10.20.1.2", 5353)
TCP_LST = listener("tcp", 80, [backend(*B1)])
UDP_LST = listener("udp", 53, [backend(*UB1)], protocol="UDP")
NEW_STATS = {Stat.NEW_DEFAULT, Stat.NEW_SRC_ROUTE, Stat.ESTABLISHED, Stat.SNI_PASS,
             Stat.NO_BACKEND_RST, Stat.NO_BACKEND_DROP, Stat.CT_FULL}


def fwd_key(src: str = CLIENT, sport: int = 40000, dst: str = VIP, dport: int = 80,
            proto: int = 6) -> Tuple5:
    return (src, sport, dst, dport, proto)


def rev_key(b: tuple[str, int] = B1, client: str = CLIENT, cport: int = 40000,
            proto: int = 6) -> Tuple5:
    return (b[0], b[1], client, cport, proto)


def reply_tcp(b: tuple[str, int] = B1, client: str = CLIENT, cport: int = 40000,
              flags: str = "SA", payload: bytes = b"") -> bytes:
    return bytes(Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=b[0], dst=client)
                 / TCP(sport=b[1], dport=cport, flags=flags, seq=5000, ack=1001) / payload)


def reply_udp(b: tuple[str, int] = UB1, client: str = CLIENT, cport: int = 40000,
              payload: bytes = b"answer", chksum: int | None = None) -> bytes:
    return bytes(Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=b[0], dst=client)
                 / UDP(sport=b[1], dport=cport, chksum=chksum) / payload)


# When an entry was last seen: now, at boot (expired for the SHORT timeouts on any
# machine up for more than a few seconds), or ahead of now (another CPU's stamp).
NOW, BOOT, AHEAD = "now", "boot", "ahead"


def stamp(when: str) -> int:
    return {NOW: L.ct_now_ns(), BOOT: 0, AHEAD: L.ct_now_ns() + 5 * 10**9}[when]


def ct_val(nat: tuple[str, int], listener_id: int = 0, backend_id: int = 0, flags: int = 0,
           seen: str = NOW) -> L.CtVal:
    last = stamp(seen)
    return L.CtVal(nat_addr=L.ip(nat[0]), nat_port=L.be16(nat[1]), backend=backend_id,
                   listener=listener_id, flags=flags, created_s=last // 10**9, last_ns=last)


def sweep(lb: Harness) -> conntrack.Sweep:
    return conntrack.sweep(lb.maps["ct"], lb.maps["ct_reply"], lb.timeouts)


def put_flow(lb: Harness, nat: tuple[str, int], flags: int = 0, seen: str = NOW,
             sport: int = 40000, proto: int = 6, vip_port: int = 80,
             backend_id: int = 0) -> None:
    """A flow CLIENT:sport -> VIP:vip_port tracked to `nat`, with a reply entry."""
    lb.put_ct(fwd_key(sport=sport, dport=vip_port, proto=proto),
              ct_val(nat, backend_id=backend_id, flags=flags | L.CT_PAIRED, seen=seen))
    last = stamp(seen)
    lb.put_reply(rev_key(nat, cport=sport, proto=proto), L.CtReplyVal(
        client=L.ip(CLIENT), vip=L.ip(VIP), cport=L.be16(sport), vport=L.be16(vip_port),
        created_s=last // 10**9, last_ns=last))


NODE_B1 = "10.20.1.1"  # the node's address on the link to B1
SNAT_INV = replace(INV, routes={B1[0]: (NODE_B1, "lo"), B2[0]: ("10.20.2.1", "lo")})


def snat_plan(*listeners: dict[str, object]) -> Plan:
    return Plan(tuple(replace(lst, source_nat=True) for lst in plan_of(*listeners).listeners))


def snat_port_of(lb: Harness, sport: int = 40000, dport: int = 80, proto: int = 6) -> int:
    f = lb.ct()[fwd_key(sport=sport, dport=dport, proto=proto)]
    assert f.flags & L.CT_SNAT and L.from_ip(f.snat_addr) == NODE_B1
    return L.from_be16(f.snat_port)
