"""Flow hashes, bit for bit the same as the data path's (dataplane/bpf/hash.h).

An IPv4 address goes in as one 32-bit word, an IPv6 address as its four words in
order; ports in host order."""

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


def address_words(address: str) -> tuple[int, ...]:
    """The words an address mixes in: one for IPv4, four for IPv6."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return (int(ip),)
    n = int(ip)
    return tuple((n >> shift) & _M32 for shift in (96, 64, 32, 0))


def mix_address(h: int, address: str) -> int:
    for word in address_words(address):
        h = mix32(h ^ word)
    return h


def flow_hash(saddr: str, daddr: str, sport: int, dport: int, protocol: str) -> int:
    h = mix32(HASH_SEED ^ PROTO_NUMBERS[protocol])
    h = mix32(h ^ ((sport << 16) | dport))
    return mix_address(mix_address(h, daddr), saddr)


def client_hash(saddr: str) -> int:
    return mix_address(mix32(HASH_SEED), saddr)
