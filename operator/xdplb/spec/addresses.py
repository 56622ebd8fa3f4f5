"""Address ranges of either family, as an address pool lists them (pure).

An entry is a CIDR (``192.0.2.0/28``, ``2001:db8::/120``) or an inclusive range
(``192.0.2.10-192.0.2.20``). Ranges are kept as integer bounds, so membership,
size and overlap cost the same for a /8 and for an IPv6 /64.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from xdplb.spec.errors import show_value

__all__ = ["AddressRange", "IPAddress", "count", "parse_range",
           "special_kind", "special_overlap"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never handed out, never a VIP: nothing can be served there, or it belongs to the node
# (loopback), to its link (link-local: the cloud metadata service is 169.254.169.254), or
# to everyone (multicast, broadcast, "this network").
SPECIAL: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (ipaddress.ip_network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (ipaddress.ip_network("255.255.255.255/32"), "the broadcast address"),
    (ipaddress.ip_network("::/128"), "the unspecified address (::)"),
    (ipaddress.ip_network("::1/128"), "loopback (::1)"),
    (ipaddress.ip_network("fe80::/10"), "link-local (fe80::/10)"),
    (ipaddress.ip_network("ff00::/8"), "multicast (ff00::/8)"),
)


@dataclass(frozen=True, order=True)
class AddressRange:
    """The addresses ``first``..``last`` (inclusive) of one family, as integers."""

    version: int
    first: int
    last: int
    text: str = field(default="", compare=False)  # as the pool spells it

    @classmethod
    def of(cls, first: IPAddress, last: IPAddress, text: str = "") -> AddressRange:
        return cls(first.version, int(first), int(last), text or _spell(first, last))

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, addr: object) -> bool:
        if isinstance(addr, str):
            try:
                addr = ipaddress.ip_address(addr)
            except ValueError:
                return False
        return (isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address)
                and addr.version == self.version and self.first <= int(addr) <= self.last)

    def overlap(self, other: AddressRange) -> AddressRange | None:
        """The addresses both hold, if any."""
        if other.version != self.version:
            return None
        first, last = max(self.first, other.first), min(self.last, other.last)
        if first > last:
            return None
        return AddressRange.of(_addr(self.version, first), _addr(self.version, last))

    def addresses(self) -> Iterator[IPAddress]:
        """Lowest first; lazily (an IPv6 range may hold 2**64)."""
        for n in range(self.first, self.last + 1):
            yield _addr(self.version, n)

    def __str__(self) -> str:
        return self.text


def _spell(first: IPAddress, last: IPAddress) -> str:
    """A CIDR when the range is one, else FIRST-LAST."""
    nets = list(ipaddress.summarize_address_range(first, last))
    return str(nets[0]) if len(nets) == 1 else f"{first}-{last}"


def _addr(version: int, n: int) -> IPAddress:
    return ipaddress.IPv4Address(n) if version == 4 else ipaddress.IPv6Address(n)


def parse_range(text: str) -> AddressRange:
    """A pool entry: a CIDR without host bits, or FIRST-LAST of one family, FIRST <= LAST.
    The range keeps the canonical spelling (``2001:DB8::/120`` becomes ``2001:db8::/120``)."""
    if not isinstance(text, str):
        raise ValueError(f"{show_value(text)} is not a string")
    shown = show_value(text)
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{shown} is not a valid CIDR") from None
        if net.network_address != ipaddress.ip_interface(text).ip:
            raise ValueError(f"{shown} has host bits set (the network is {str(net)!r})")
        return AddressRange.of(net.network_address, net.broadcast_address, str(net))
    if "-" in text:
        a, _, b = text.partition("-")
        try:
            first, last = ipaddress.ip_address(a.strip()), ipaddress.ip_address(b.strip())
        except ValueError:
            raise ValueError(f"{shown} is not a valid range: write FIRST-LAST, two addresses"
                             " of one family") from None
        if first.version != last.version:
            raise ValueError(f"{shown}: both ends of a range must be of one family")
        if int(last) < int(first):
            raise ValueError(f"{shown}: the range ends before it starts")
        return AddressRange.of(first, last, f"{first}-{last}")
    try:
        one = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{shown} is not a CIDR, a range (FIRST-LAST) or an address") from None
    return AddressRange.of(one, one, f"{one}/{one.max_prefixlen}")


def special_overlap(r: AddressRange) -> str | None:
    """The special block ``r`` reaches into, described, or None."""
    for net, what in SPECIAL:
        block = AddressRange.of(net.network_address, net.broadcast_address)
        if r.overlap(block) is not None:
            return what
    return None


def special_kind(addr: IPAddress) -> str | None:
    """What makes ``addr`` special (loopback, link-local, ...), or None."""
    for net, what in SPECIAL:
        if addr.version == net.version and addr in net:
            return what
    return None


def count(ranges: Iterable[AddressRange]) -> int:
    return sum(r.size for r in ranges)
