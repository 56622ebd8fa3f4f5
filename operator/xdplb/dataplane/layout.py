"""Python mirror of bpf/layout.h: one ctypes structure per map key/value.

Addresses and ports are stored as they lie on the wire (network order); the
helpers below convert. tests/test_layout.py checks sizes and offsets against
the structures bcc builds from the C source, and every #define and enum of
layout.h against the constants here (same names; PF_X(proto) is pf_x(proto),
enum stat is Stat)."""

from __future__ import annotations

import ctypes
import enum
import hashlib
import ipaddress
import socket
import sys
import time
from pathlib import Path

from xdplb.plan.model import V4_MAPPED

# linux/time.h. The data path stamps conntrack with bpf_ktime_get_coarse_ns(),
# which reads this clock: compare ages and timestamps against it.
CLOCK_MONOTONIC_COARSE = 6


def ct_now_ns() -> int:
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)

BPF_DIR = Path(__file__).parent / "bpf"

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class Addr(ctypes.Structure):
    """struct addr: 16 bytes as on the wire, IPv4 mapped (::ffff:a.b.c.d)."""

    _fields_ = [("w", u32 * 4)]


V4_MAPPED_W2 = 0x0000FFFF  # layout.h: w[2] of a mapped IPv4 address, in host order


class ListenerKey(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("addr", Addr), ("port", u16), ("proto", u8), ("pad", u8)]


LF_SNI, LF_CLIENT_IP, LF_SRC_ROUTES, LF_SNAT, LF_HAIRPIN = 1, 2, 4, 8, 16


def pf_listener(proto: int) -> int:
    return 1 << (proto & 31)


def pf_snat(proto: int) -> int:
    return 1 << ((proto + 8) & 31)


class ListenerVal(ctypes.Structure):
    _fields_ = [("id", u32), ("group", u32), ("flags", u32)]


class LpmKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("listener", u32), ("addr", Addr)]


GF_IN_USE = 1
POOL_IDS = 4


class PoolIds(ctypes.Structure):
    _fields_ = [("id", u16 * POOL_IDS)]


class GroupVal(ctypes.Structure):
    _fields_ = [("offset", u32), ("size", u32), ("flags", u32)]


BF_LIVE = 1


class BackendVal(ctypes.Structure):
    _fields_ = [("addr", Addr), ("port", u16), ("flags", u16), ("snat_src", Addr),
                ("net", u32)]


class NetKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", Addr)]


MAX_SNI_ROUTES = 65536


class SniKey(ctypes.Structure):
    _fields_ = [("listener", u32), ("pad", u32), ("name_hash", u64)]


VIP_BITS = 65536


def vip_bit(fold_host: int) -> int:
    """The bit of vip_bits an address sets, from its addr_fold()."""
    return (fold_host ^ (fold_host >> 16)) & (VIP_BITS - 1)


def addr_fold(address: str) -> int:
    """The words of an address's struct addr xor-ed, in host order (what VIP_BIT takes)."""
    raw = ip_bytes(address)
    fold = 0
    for i in range(0, 16, 4):
        fold ^= int.from_bytes(raw[i:i + 4], "big")
    return fold


class RevNatKey(ctypes.Structure):
    _fields_ = [("addr", Addr), ("port", u16), ("proto", u8), ("pad", u8)]


class RevNatVal(ctypes.Structure):
    _fields_ = [("vip", Addr), ("vport", u16), ("backend", u16), ("listener", u16),
                ("pad", u16)]


class CtKey(ctypes.Structure):
    _fields_ = [("src", Addr), ("dst", Addr), ("sport", u16), ("dport", u16), ("proto", u8),
                ("pad", u8 * 3)]


(CT_REPLIED, CT_FIN_FWD, CT_FIN_REV, CT_RST, CT_SNAT, CT_PAIRED,
 CT_ESTABLISHED) = 1, 2, 4, 8, 16, 32, 64


class CtVal(ctypes.Structure):
    _fields_ = [("nat_addr", Addr), ("snat_addr", Addr), ("nat_port", u16), ("snat_port", u16),
                ("backend", u16), ("listener", u16), ("flags", u16), ("pad", u16),
                ("seq_end", u32 * 2), ("created_s", u32), ("last_ns", u64),
                ("packets", u64 * 2), ("bytes", u64 * 2)]


class CtReplyVal(ctypes.Structure):
    _fields_ = [("client", Addr), ("vip", Addr), ("cport", u16), ("vport", u16),
                ("flags", u16), ("pad", u16), ("created_s", u32), ("last_ns", u64)]


class FragKey(ctypes.Structure):
    _fields_ = [("src", Addr), ("dst", Addr), ("id", u32), ("proto", u8), ("pad", u8 * 3)]


class FragVal(ctypes.Structure):
    _fields_ = [("src", Addr), ("dst", Addr)]


class Scratch(ctypes.Structure):
    _fields_ = [("fwd", CtVal), ("reply", CtReplyVal), ("reply_key", CtKey), ("l4_off", u32),
                ("l4_len", u32), ("frag_id", u32), ("frag", u32)]


DEFER_MAGIC, DEFER_FORWARD, DEFER_REPLY, DEFER_ANSWER = 0x786C6230, 1, 2, 3


class DeferMeta(ctypes.Structure):
    _fields_ = [("magic", u32), ("kind", u32)]


class FlowStats(ctypes.Structure):
    _fields_ = [("packets", u64), ("bytes", u64), ("flows", u64)]


class Stat(enum.IntEnum):
    """Per-CPU counters (enum stat in layout.h), one per verdict, path and drop reason."""

    NOMATCH = 0
    MALFORMED = 1
    FRAGMENT = 2
    ESTABLISHED = 3
    NEW_DEFAULT = 4
    NEW_SRC_ROUTE = 5
    SNI_PASS = 6
    RESELECTED = 7
    NO_BACKEND_RST = 8
    NO_BACKEND_DROP = 9
    CT_FULL = 10
    REPLY_NAT = 11
    REPLY_EXPIRED = 12
    ICMP_IN = 13
    ICMP_OUT = 14
    SNAT_REPLY = 15
    SNAT_EXHAUSTED = 16
    SNAT_NO_SOURCE = 17
    SNAT_NO_FLOW = 18
    SNAT_PORT_LOST = 19
    VIP_CLOSED = 20
    VIP_PING = 21
    FRAG_MISSED = 22
    CSUM_DEFERRED = 23
    UDP_MOVED = 24
    RST_IGNORED = 25
    UNPARSED = 26


# (map name, key type, value type) for every map with a fixed layout.
MAP_LAYOUTS: list[tuple[str, type[ctypes.Structure] | type, type[ctypes.Structure] | type]] = [
    ("listeners", ListenerKey, ListenerVal),
    ("port_filter", u32, u32),
    ("vips", Addr, u32),
    ("vip_bits", u32, u32),
    ("src_routes", LpmKey, u32),
    ("groups", u32, GroupVal),
    ("pool", u32, PoolIds),
    ("backends", u32, BackendVal),
    ("backend_nets", NetKey, u32),
    ("sni_routes", SniKey, u32),
    ("rev_nat", RevNatKey, RevNatVal),
    ("ct", CtKey, CtVal),
    ("ct_reply", CtKey, CtReplyVal),
    ("frags", FragKey, FragVal),
    ("stats", u32, u64),
    ("scratch", u32, Scratch),
    ("listener_stats", u32, FlowStats),
    ("backend_stats", u32, FlowStats),
]

PROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in PROTO.items()}


def ip_bytes(address: str) -> bytes:
    """An address of either family as struct addr holds it: 16 bytes in network order,
    IPv4 mapped."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return V4_MAPPED + ip.packed
    return ip.packed


def ip(address: str) -> Addr:
    return Addr.from_buffer_copy(ip_bytes(address))


def from_ip(a: Addr) -> str:
    """The address a struct addr holds (an IPv4 one in dotted form); "" for all zeros."""
    raw = bytes(a)
    if raw == bytes(16):
        return ""
    v6 = ipaddress.IPv6Address(raw)
    return str(v6.ipv4_mapped or v6)


def prefix_bits(cidr: str) -> tuple[bytes, int]:
    """A CIDR as struct addr bytes and its length in the 128-bit form (IPv4: 96 + n)."""
    net = ipaddress.ip_network(cidr)
    return ip_bytes(str(net.network_address)), net.prefixlen + (96 if net.version == 4 else 0)


def be16(port: int) -> int:
    return socket.htons(port)


def from_be16(value: int) -> int:
    return socket.ntohs(value)


def sni_hash(hostname: str) -> int:
    """FNV-1a 64 of the lower-cased name: the sni_routes key (the empty name is the
    listener's default group)."""
    h = 0xCBF29CE484222325
    for byte in hostname.lower().encode("ascii"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def layout_hash() -> str:
    """Changes whenever a map layout does: part of the pin directory name."""
    return hashlib.sha256((BPF_DIR / "layout.h").read_bytes()
                          + (BPF_DIR / "maps.h").read_bytes()).hexdigest()[:10]


# --- key and value codecs: what the writer and the SNI acceptor put in or look up -----


def encode(obj: ctypes.Structure) -> bytes:
    """A structure's bytes, as the map holds them."""
    return bytes(memoryview(obj).cast("B"))


def encode_u32(v: int) -> bytes:
    """A u32 key or value (array indexes, ids) in host order."""
    return int(v).to_bytes(4, sys.byteorder)


def encode_u16(v: int) -> bytes:
    return int(v).to_bytes(2, sys.byteorder)


def decode_u32(raw: bytes) -> int:
    return int.from_bytes(raw[:4], sys.byteorder)


def sni_key(listener_id: int, hostname: str) -> bytes:
    return encode(SniKey(listener_id, 0, sni_hash(hostname)))


def listener_key(ifindex: int, address: str, port: int, protocol: str) -> bytes:
    return encode(ListenerKey(ifindex, ip(address), be16(port), PROTO[protocol], 0))




def lpm_key(listener_id: int, cidr: str) -> bytes:
    """An LpmKey's bytes, built directly: it is the one key written 100,000 times (an
    IPv4 CIDR without building an ipaddress object)."""
    addr, _, plen = cidr.partition("/")
    if ":" in addr:
        raw, bits = prefix_bits(cidr)
    else:
        raw, bits = V4_MAPPED + socket.inet_aton(addr), 96 + int(plen)
    return (32 + bits).to_bytes(4, sys.byteorder) + listener_id.to_bytes(4, "big") + raw


def net_key(cidr: str) -> bytes:
    raw, bits = prefix_bits(cidr)
    return bits.to_bytes(4, sys.byteorder) + raw
