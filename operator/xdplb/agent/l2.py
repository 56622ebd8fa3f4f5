"""The kernel side of an L2 announcement: make the address local, so that the kernel
answers ARP (IPv4) or Neighbour Solicitations (IPv6) for it, and send gratuitous ARP or
unsolicited Neighbour Advertisements (RFC 4861 7.2.6) when this node takes it over.

Why a local route rather than a proxy neighbour entry (``ip neigh add proxy``): the
kernel consults proxy entries only for addresses it routes out through *another*
interface (net/ipv4/arp.c: ``rt->dst.dev != dev``), and an announced address lies in the
very subnet of the interface the request comes in on; proxy replies also wait a random
0..proxy_delay (0.8 s by default). A ``local`` route in the local table (on lo, as the
SNI acceptor already adds for its VIPs) is the kernel's own "this address is mine": it
answers at once, from softirq, whatever the agent is doing (bench/arp.py measures
both). Packets to the address still meet XDP first: listener traffic is rewritten there,
other ports are dropped, pings answered, so nothing else of the node is exposed.

IPv6 differs: the kernel answers a Neighbour Solicitation only for an address of the
interface it arrives on, never for a local route (net/ipv6/ndisc.c). An IPv6 address
gets the local route too (the packets are the node's own, as for IPv4) and a proxy
neighbour entry on each announcing interface (``ip -6 neigh add proxy``), which IPv6
consults whatever the route, with ``proxy_ndp`` on and ``proxy_delay`` 0 on the
interface (else a random delay up to 0.8 s). An interface address (``nodad``) would
answer too, but the node would then count the address as its own everywhere (its
inventory, source address selection, kubelet's node addresses). Proxy answers carry no
Override flag (RFC 4861 7.2.8), so a client that cached the previous node's MAC
learns the new one from our unsolicited advertisement, which carries it (bench/l2.py
measures the three).

Routes carry protocol RTPROT_XDPLB_L2, so that an agent that died can be told apart at
the next start: it keeps those it still holds the Lease for, and removes the others.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable, Mapping

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xdplb.agent.sysctl import answer_proxy_ndp
from xdplb.dataplane.entries import Inventory

log = logging.getLogger("xdplb.agent")

RTPROT_XDPLB_L2 = 0xB6  # the SNI acceptor's local routes are 0xb5
RT_TABLE_LOCAL = 255
RT_SCOPE_HOST = 254
ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
NTF_PROXY = 0x08
ALL_NODES = "ff02::1"
ND_NEIGHBOR_ADVERT = 136
NA_OVERRIDE = 0x20  # in the first byte of the flags: R 0x80, S 0x40, O 0x20


def garp_frame(mac: bytes, address: str) -> bytes:
    """A gratuitous ARP request (RFC 5227 announcement): sender and target are both the
    address, to the broadcast MAC; receivers that know the address take the new MAC."""
    ip = socket.inet_aton(address)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\0" * 6, ip)
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def unsolicited_na(mac: bytes, address: str) -> bytes:
    """An unsolicited Neighbour Advertisement (ICMPv6, checksum left to the kernel): not
    solicited, Override set, with the target link-layer address option, so that
    receivers that cache the address take the new MAC (RFC 4861 7.2.6)."""
    target = socket.inet_pton(socket.AF_INET6, address)
    return struct.pack("!BBHB3x", ND_NEIGHBOR_ADVERT, 0, 0, NA_OVERRIDE) + target \
        + struct.pack("!BB6s", 2, 1, mac)


def interfaces_for(address: str, inv: Inventory, configured: Iterable[str],
                   listeners: Iterable[str]) -> tuple[str, ...]:
    """Where to announce: the pool's l2Interfaces, else the interfaces whose network holds
    the address, else the listener's interfaces; only those the node has."""
    configured = [i for i in configured if i in inv.ifindex]
    if configured:
        return tuple(configured)
    addr = ipaddress.ip_address(address)
    on_link = sorted(name for name, nets in inv.networks.items()
                     if any(addr in ipaddress.ip_network(n) for n in nets))
    if on_link:
        return tuple(on_link)
    return tuple(sorted({i for i in listeners if i in inv.ifindex}))


class Kernel:
    """Local routes, proxy neighbour entries (IPv6), gratuitous ARP and unsolicited
    Neighbour Advertisements, through rtnetlink, sysctl and sockets."""

    def local_routes(self) -> dict[str, int]:
        """Address -> protocol of every host route (/32, /128) in the local table on lo
        that is not an interface address's (ours, the SNI acceptor's, an admin's)."""
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            return {r.get_attr("RTA_DST"): r["proto"]
                    for family, host in ((socket.AF_INET, 32), (socket.AF_INET6, 128))
                    for r in ipr.get_routes(family=family, table=RT_TABLE_LOCAL)
                    if r["type"] == 2 and r["dst_len"] == host
                    and r.get_attr("RTA_OIF") == lo
                    and r["proto"] != 2}  # 2: the kernel's own, for interface addresses

    def ours(self) -> set[str]:
        return {a for a, proto in self.local_routes().items() if proto == RTPROT_XDPLB_L2}

    def add(self, address: str, interfaces: Iterable[str] = ()) -> list[str]:
        """Make ``address`` local, unless it is already (an SNI VIP's route answers too);
        for IPv6, answer Neighbour Solicitations for it on ``interfaces`` (and no other).
        Returns the problems, if any."""
        with IPRoute() as ipr:
            try:
                _local_route(ipr, "add", address)
            except NetlinkError as e:
                if e.code != 17:  # EEXIST
                    raise
            if ":" not in address:
                return []
            return self._proxy(ipr, address, set(interfaces))

    def remove(self, address: str) -> None:
        with IPRoute() as ipr:
            try:
                _local_route(ipr, "del", address)
            except NetlinkError as e:
                if e.code not in (3, 2):  # ESRCH, ENOENT: gone, or not ours
                    raise
            if ":" in address:
                self._proxy(ipr, address, set())

    def _proxy(self, ipr: IPRoute, address: str, wanted: set[str]) -> list[str]:
        """Proxy entries for ``address`` on the ``wanted`` interfaces, none elsewhere
        (proxy entries cannot be dumped by address here: every link is visited)."""
        problems = []
        for link in ipr.get_links():
            name, index = link.get_attr("IFLA_IFNAME"), link["index"]
            op = "add" if name in wanted else "del"
            if op == "add":
                problems += answer_proxy_ndp(name)
            try:
                ipr.neigh(op, dst=address, ifindex=index, flags=NTF_PROXY,
                          family=socket.AF_INET6)
            except NetlinkError as e:
                if e.code not in (17, 2):  # EEXIST on add, ENOENT on del
                    problems.append(f"proxy neighbour {address} on {name}: {e}")
        return problems

    def macs(self, names: Iterable[str]) -> Mapping[str, bytes]:
        wanted = set(names)
        with IPRoute() as ipr:
            return {link.get_attr("IFLA_IFNAME"): bytes.fromhex(
                        link.get_attr("IFLA_ADDRESS").replace(":", ""))
                    for link in ipr.get_links()
                    if link.get_attr("IFLA_IFNAME") in wanted and link.get_attr("IFLA_ADDRESS")}

    def garp(self, address: str, interfaces: Iterable[str]) -> list[str]:
        """One gratuitous ARP (IPv4) or unsolicited Neighbour Advertisement (IPv6) on each
        interface; the problems, if any."""
        problems = []
        for name, mac in self.macs(interfaces).items():
            try:
                if ":" in address:
                    _send_na(name, mac, address)
                else:
                    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                       socket.htons(ETH_P_ARP)) as s:
                        s.bind((name, ETH_P_ARP))
                        s.send(garp_frame(mac, address))
            except OSError as e:
                what = "unsolicited NA" if ":" in address else "gratuitous ARP"
                problems.append(f"{what} for {address} on {name}: {e.strerror or e}")
        return problems


def _send_na(name: str, mac: bytes, address: str) -> None:
    """To all nodes, hop limit 255 (receivers drop any other), from the interface's
    link-local address (the kernel picks it for a link-local destination)."""
    index = socket.if_nametoindex(name)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        s.sendto(unsolicited_na(mac, address), (ALL_NODES, 0, 0, index))


def _local_route(ipr: IPRoute, command: str, address: str) -> None:
    """Add or delete the announcer's host route for ``address`` in the local table."""
    ipr.route(command, dst=address, dst_len=128 if ":" in address else 32, type="local",
              table=RT_TABLE_LOCAL, proto=RTPROT_XDPLB_L2, scope=RT_SCOPE_HOST,
              oif=ipr.link_lookup(ifname="lo")[0])
