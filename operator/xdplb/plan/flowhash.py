"""Flow hashes, bit for bit the same as the data path's (dataplane/bpf/hash.h).

An address enters the hash as 32-bit words in network order, the most significant
first: one word for IPv4, four for IPv6 (``mix32(h ^ word)`` per word, daddr's then
saddr's); ports in host order."""

from __future__ import annotations

import ipaddress

HASH_SEED = 0x9E3779B9
_M32 = 0xFFFFFFFF
PROTO_NUMBERS = {"TCP": 6, "UDP": 17}
IPV4_WORDS, IPV6_WORDS = 1, 4


def mix32(h: int) -> int:
    """murmur3's 32-bit finaliser."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def address_words(address: str) -> tuple[int, int]:
    """(the address as an integer, how many 32-bit words it has). An IPv4-mapped IPv6
    address is its IPv4 address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return int(ip), IPV4_WORDS if ip.version == 4 else IPV6_WORDS


def _fold(h: int, addr: int, words: int) -> int:
    if words == IPV4_WORDS:
        return mix32(h ^ addr)
    for shift in (96, 64, 32, 0):
        h = mix32(h ^ ((addr >> shift) & _M32))
    return h


def flow_hash_ints(saddr: int, daddr: int, sport: int, dport: int, proto: int,
                   words: int = IPV4_WORDS) -> int:
    """The flow hash of addresses given as integers of `words` 32-bit words."""
    h = mix32(mix32(HASH_SEED ^ proto) ^ ((sport << 16) | dport))
    return _fold(_fold(h, daddr, words), saddr, words)


def client_hash_int(saddr: int, words: int = IPV4_WORDS) -> int:
    return _fold(mix32(HASH_SEED), saddr, words)


def flow_hash(saddr: str, daddr: str, sport: int, dport: int, protocol: str) -> int:
    (s, words), (d, dwords) = address_words(saddr), address_words(daddr)
    if words != dwords:
        raise ValueError(f"{saddr} and {daddr} are not of one address family")
    return flow_hash_ints(s, d, sport, dport, PROTO_NUMBERS[protocol], words)


def client_hash(saddr: str) -> int:
    return client_hash_int(*address_words(saddr))
