"""The kernel side of an L2 announcement: make the address local, so that the kernel
answers ARP for it, and send gratuitous ARP when this node takes it over.

Why a local route rather than a proxy neighbour entry (``ip neigh add proxy``): the
kernel consults proxy entries only for addresses it routes out through *another*
interface (net/ipv4/arp.c: ``rt->dst.dev != dev``), and an announced address lies in the
very subnet of the interface the request comes in on; proxy replies also wait a random
0..proxy_delay (0.8 s by default). A ``local`` route in the local table (on lo, as the
SNI acceptor already adds for its VIPs) is the kernel's own "this address is mine": it
answers at once, from softirq, whatever the agent is doing (bench/arp.py measures
both). Packets to the address still meet XDP first: listener traffic is rewritten there,
other ports are dropped, pings answered, so nothing else of the node is exposed.

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

from xdplb.dataplane.entries import Inventory

log = logging.getLogger("xdplb.agent")

RTPROT_XDPLB_L2 = 0xB6  # the SNI acceptor's local routes are 0xb5
RT_TABLE_LOCAL = 255
RT_SCOPE_HOST = 254
ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def garp_frame(mac: bytes, address: str) -> bytes:
    """A gratuitous ARP request (RFC 5227 announcement): sender and target are both the
    address, to the broadcast MAC; receivers that know the address take the new MAC."""
    ip = socket.inet_aton(address)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\0" * 6, ip)
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


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
    """Local routes and gratuitous ARP, through rtnetlink and a packet socket."""

    def local_routes(self) -> dict[str, int]:
        """Address -> protocol of every IPv4 host route in the local table on lo that is
        not an interface address's (ours, the SNI acceptor's, an admin's)."""
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            return {r.get_attr("RTA_DST"): r["proto"]
                    for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_LOCAL)
                    if r["type"] == 2 and r["dst_len"] == 32 and r.get_attr("RTA_OIF") == lo
                    and r["proto"] != 2}  # 2: the kernel's own, for interface addresses

    def ours(self) -> set[str]:
        return {a for a, proto in self.local_routes().items() if proto == RTPROT_XDPLB_L2}

    def add(self, address: str) -> None:
        """Make ``address`` local, unless it is already (an SNI VIP's route answers too)."""
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            try:
                ipr.route("add", dst=address, dst_len=32, type="local", table=RT_TABLE_LOCAL,
                          proto=RTPROT_XDPLB_L2, scope=RT_SCOPE_HOST, oif=lo)
            except NetlinkError as e:
                if e.code != 17:  # EEXIST
                    raise

    def remove(self, address: str) -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            try:
                ipr.route("del", dst=address, dst_len=32, type="local", table=RT_TABLE_LOCAL,
                          proto=RTPROT_XDPLB_L2, scope=RT_SCOPE_HOST, oif=lo)
            except NetlinkError as e:
                if e.code not in (3, 2):  # ESRCH, ENOENT: gone, or not ours
                    raise

    def macs(self, names: Iterable[str]) -> Mapping[str, bytes]:
        wanted = set(names)
        with IPRoute() as ipr:
            return {link.get_attr("IFLA_IFNAME"): bytes.fromhex(
                        link.get_attr("IFLA_ADDRESS").replace(":", ""))
                    for link in ipr.get_links()
                    if link.get_attr("IFLA_IFNAME") in wanted and link.get_attr("IFLA_ADDRESS")}

    def garp(self, address: str, interfaces: Iterable[str]) -> list[str]:
        """One gratuitous ARP on each interface; the problems, if any."""
        problems = []
        for name, mac in self.macs(interfaces).items():
            try:
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                   socket.htons(ETH_P_ARP)) as s:
                    s.bind((name, ETH_P_ARP))
                    s.send(garp_frame(mac, address))
            except OSError as e:
                problems.append(f"gratuitous ARP for {address} on {name}: {e.strerror or e}")
        return problems
