"""Flow hashes, bit for bit the same as the data path's (dataplane/bpf/hash.h)."""

from __future__ import annotations

import ipaddress

HASH_SEED = 0x9E3779B9
_M32 = 0xFFFFFFFF
PROTO_NUMBERS = {"TCP": 6, "UDP": 17}


def mix32(h: int) -> int:
    """murmur3's 32-bit finaliser."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def ip_int(address: str) -> int:
    return int(ipaddress.IPv4Address(address))


def flow_hash(saddr: str, daddr: str, sport: int, dport: int, protocol: str) -> int:
    h = mix32(HASH_SEED ^ PROTO_NUMBERS[protocol])
    h = mix32(h ^ ((sport << 16) | dport))
    h = mix32(h ^ ip_int(daddr))
    return mix32(h ^ ip_int(saddr))


def client_hash(saddr: str) -> int:
    return mix32(mix32(HASH_SEED) ^ ip_int(saddr))
