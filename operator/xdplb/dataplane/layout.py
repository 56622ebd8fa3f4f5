"""Python mirror of bpf/layout.h: one ctypes structure per map key/value.

Addresses and ports are stored as they lie on the wire (network order); the
helpers below convert. tests/test_layout.py checks sizes and offsets against
the structures bcc builds from the C source."""

from __future__ import annotations

import ctypes
import enum
import hashlib
import ipaddress
import socket
import sys
from pathlib import Path

BPF_DIR = Path(__file__).parent / "bpf"

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class ListenerKey(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("addr", u32), ("port", u16), ("proto", u8), ("pad", u8)]


LF_SNI, LF_CLIENT_IP, LF_SRC_ROUTES = 1, 2, 4


class ListenerVal(ctypes.Structure):
    _fields_ = [("id", u32), ("group", u32), ("flags", u32)]


class LpmKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("listener", u32), ("addr", u32)]


GF_IN_USE = 1


class GroupVal(ctypes.Structure):
    _fields_ = [("offset", u32), ("size", u32), ("flags", u32)]


class BackendSlot(ctypes.Structure):
    _fields_ = [("addr", u32), ("port", u16), ("id", u16)]


class CtKey(ctypes.Structure):
    _fields_ = [("src", u32), ("dst", u32), ("sport", u16), ("dport", u16), ("proto", u8),
                ("dir", u8), ("pad", u16)]


CT_REPLIED, CT_FIN_FWD, CT_FIN_REV, CT_RST = 1, 2, 4, 8


class CtVal(ctypes.Structure):
    _fields_ = [("nat_addr", u32), ("nat_port", u16), ("backend", u16), ("listener", u32),
                ("flags", u32), ("created_ns", u64), ("last_ns", u64),
                ("packets", u64 * 2), ("bytes", u64 * 2)]


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
    UNTRACKED = 7
    NO_BACKEND_RST = 8
    NO_BACKEND_DROP = 9
    CT_FULL = 10
    REPLY_NAT = 11
    REPLY_EXPIRED = 12


# (map name, key type, value type) for every map with a fixed layout.
MAP_LAYOUTS: list[tuple[str, type[ctypes.Structure] | type, type[ctypes.Structure] | type]] = [
    ("listeners", ListenerKey, ListenerVal),
    ("src_routes", LpmKey, u32),
    ("groups", u32, GroupVal),
    ("pool", u32, BackendSlot),
    ("ct", CtKey, CtVal),
    ("listener_stats", u32, FlowStats),
    ("backend_stats", u32, FlowStats),
    ("port_filter", u32, u32),
    ("stats", u32, u64),
]

PROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in PROTO.items()}


def be32(address: str) -> int:
    """An IPv4 address as the u32 whose memory holds it in network order."""
    return int.from_bytes(ipaddress.IPv4Address(address).packed, sys.byteorder)


def be32_int(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "big"), sys.byteorder)


def from_be32(value: int) -> str:
    return str(ipaddress.IPv4Address(value.to_bytes(4, sys.byteorder)))


def be16(port: int) -> int:
    return socket.htons(port)


def from_be16(value: int) -> int:
    return socket.ntohs(value)


def layout_hash() -> str:
    """Changes whenever a map layout does: part of the pin directory name."""
    return hashlib.sha256((BPF_DIR / "layout.h").read_bytes()
                          + (BPF_DIR / "maps.h").read_bytes()).hexdigest()[:10]
