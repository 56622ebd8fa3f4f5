"""The L2 announcer's election, against the API emulator (Leases as on a cluster), with
the kernel side recorded instead of done (test_l2.py does it for real)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr
from scapy.layers.l2 import ARP, Ether

from tests.k8s.cluster import KUBECTL, Cluster, wait_for
from xdplb.agent.announcer import Announcer, Candidate, lease_name
from xdplb.agent.l2 import garp_frame, interfaces_for, unsolicited_na
from xdplb.dataplane.entries import Inventory
from xdplb.k8s.client import Kube

pytestmark = pytest.mark.skipif(not KUBECTL.exists(), reason="run scripts/setup.sh for kubectl")

NS = "xdplb-system"
VIP = "192.0.2.50"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"


class FakeKernel:
    """Local routes (with the interfaces an IPv6 address is answered on) and gratuitous
    ARPs, recorded."""

    def __init__(self, routes: set[str] | None = None) -> None:
        self.routes = set(routes or ())
        self.answered: dict[str, tuple[str, ...]] = {}
        self.garps: list[tuple[str, tuple[str, ...], float]] = []

    def ours(self) -> set[str]:
        return set(self.routes)

    def local_routes(self) -> dict[str, int]:
        return dict.fromkeys(self.routes, 0xB6)

    def add(self, address: str, interfaces: tuple[str, ...] = ()) -> list[str]:
        self.routes.add(address)
        if ":" in address:
            self.answered[address] = interfaces
        return []

    def remove(self, address: str) -> None:
        self.routes.discard(address)
        self.answered.pop(address, None)

    def garp(self, address: str, interfaces: tuple[str, ...]) -> list[str]:
        self.garps.append((address, interfaces, time.monotonic()))
        return []


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Kube]:
    with Cluster(tmp_path) as cluster:
        yield Kube(str(cluster.admin_kubeconfig))


def candidate(interfaces: tuple[str, ...] = ("eth0",)) -> Candidate:
    return Candidate(VIP, "flat", "pool-uid", interfaces)


def holder(admin: Kube) -> str:
    return str(admin.get(f"{LEASES}/{lease_name(VIP)}")["spec"]["holderIdentity"])


def test_one_node_announces_and_another_takes_over_after_one_lease(admin: Kube) -> None:
    kernels = {n: FakeKernel() for n in ("n1", "n2")}
    nodes = {n: Announcer(admin, NS, n, kernels[n], lease_seconds=2) for n in kernels}
    try:
        for a in nodes.values():
            a.start()
            a.want({VIP: candidate()})
        first = wait_for("a holder", lambda: [n for n, k in kernels.items() if k.routes])
        assert len(first) == 1, first
        winner, loser = first[0], next(n for n in kernels if n != first[0])
        assert holder(admin) == winner
        lease = admin.get(f"{LEASES}/{lease_name(VIP)}")
        assert lease["metadata"]["ownerReferences"] == [{
            "apiVersion": "xdplb.io/v1alpha1", "kind": "AddressPool", "name": "flat",
            "uid": "pool-uid"}]
        assert lease["metadata"]["labels"]["xdplb.io/l2-address"] == VIP
        (announced,) = nodes[winner].announcements()
        assert (announced.address, announced.pool, announced.interfaces) == (
            VIP, "flat", ["eth0"])
        assert nodes[loser].announcements() == []
        # Gratuitous ARP at takeover, and twice more (the first may be lost).
        wait_for("three gratuitous ARPs", lambda: len(kernels[winner].garps) == 3)
        times = [t for _, _, t in kernels[winner].garps]
        assert times[2] - times[0] >= 1.9
        # Renewed every third of the Lease, while the other waits.
        renewed = admin.get(f"{LEASES}/{lease_name(VIP)}")["spec"]["renewTime"]
        wait_for("a renewal", lambda: admin.get(f"{LEASES}/{lease_name(VIP)}")["spec"][
            "renewTime"] != renewed, timeout=3)
        assert kernels[loser].routes == set()

        # The winner stops without releasing (a crash, a restart): the other takes over
        # once the Lease has expired, and not before.
        nodes[winner].stop(release=False)
        stopped = time.monotonic()
        assert kernels[winner].routes == {VIP}  # left for the next agent of its node
        wait_for("the takeover", lambda: kernels[loser].routes, timeout=5)
        took = time.monotonic() - stopped
        assert 2 - 2 / 3 - 0.1 < took < 3.0, took  # expiry: 2 s after the last renewal
        assert holder(admin) == loser
        assert admin.get(f"{LEASES}/{lease_name(VIP)}")["spec"]["leaseTransitions"] == 1

        # Its next agent finds the Lease taken and withdraws what its predecessor left.
        again = Announcer(admin, NS, winner, kernels[winner], lease_seconds=2)
        again.start()
        try:
            assert kernels[winner].routes == set()
            again.want({VIP: candidate()})
            time.sleep(1.0)  # it stands by
            assert kernels[winner].routes == set() and holder(admin) == loser
        finally:
            again.stop(release=True)

        # No longer wanted: released at once, and withdrawn.
        nodes[loser].want({})
        wait_for("released", lambda: holder(admin) == "" and not kernels[loser].routes)
    finally:
        for a in nodes.values():
            a.stop(release=True)


def test_a_restarted_agent_keeps_what_it_still_holds(admin: Kube) -> None:
    kernel = FakeKernel()
    first = Announcer(admin, NS, "n1", kernel, lease_seconds=2)
    first.start()
    first.want({VIP: candidate()})
    wait_for("announced", lambda: kernel.routes)
    first.stop(release=False)
    transitions = admin.get(f"{LEASES}/{lease_name(VIP)}")["spec"]["leaseTransitions"]
    # The next agent of the same node, before it has any plan: it keeps the route and
    # renews the Lease, with no takeover by anyone.
    again = Announcer(admin, NS, "n1", kernel, lease_seconds=2)
    again.start()
    try:
        assert kernel.routes == {VIP}
        renewed = admin.get(f"{LEASES}/{lease_name(VIP)}")["spec"]["renewTime"]
        wait_for("renewed before any plan", lambda: admin.get(
            f"{LEASES}/{lease_name(VIP)}")["spec"]["renewTime"] != renewed, timeout=3)
        assert [a.address for a in again.announcements()] == [VIP]
        spec = admin.get(f"{LEASES}/{lease_name(VIP)}")["spec"]
        assert spec["holderIdentity"] == "n1" and spec["leaseTransitions"] == transitions
        # The first plan no longer wants it: released.
        again.want({})
        wait_for("released", lambda: not kernel.routes and holder(admin) == "")
    finally:
        again.stop(release=True)


def test_an_announcer_without_interfaces_says_so_and_ipv6_is_announced(admin: Kube) -> None:
    kernel = FakeKernel()
    a = Announcer(admin, NS, "n1", kernel, lease_seconds=2)
    a.start()
    try:
        v6 = Candidate("2001:db8::5", "flat", "", ("eth0",))
        a.want({VIP: candidate(()), v6.address: v6})
        wait_for("the problem", lambda: a.problems)
        wait_for("both announced", lambda: len(a.announcements()) == 2)
        assert a.problems == [f"L2 {VIP}: no interface to announce it on"]
        assert kernel.routes == {VIP, v6.address}
        assert kernel.answered == {v6.address: ("eth0",)}
        wait_for("advertised", lambda: any(g[0] == v6.address for g in kernel.garps))
        # Its interfaces change: the kernel answers on the new ones.
        a.want({v6.address: Candidate(v6.address, "flat", "", ("eth1",))})
        wait_for("answered on eth1", lambda: kernel.answered == {v6.address: ("eth1",)})
        assert kernel.routes == {v6.address}  # the other one released
    finally:
        a.stop(release=True)
    assert kernel.routes == set() and kernel.answered == {}


# --- pure parts ------------------------------------------------------------------------------


def test_garp_frame_is_an_arp_announcement() -> None:
    mac = bytes.fromhex("020000000001")
    frame = garp_frame(mac, "10.70.0.100")
    assert len(frame) == 42
    parsed = Ether(frame)
    assert parsed.dst == "ff:ff:ff:ff:ff:ff" and parsed.src == "02:00:00:00:00:01"
    arp = parsed[ARP]
    assert (arp.op, arp.hwsrc, arp.psrc, arp.pdst, arp.hwdst) == (
        1, "02:00:00:00:00:01", "10.70.0.100", "10.70.0.100", "00:00:00:00:00:00")
    assert struct.unpack("!H", frame[12:14])[0] == 0x0806
    assert frame[28:32] == frame[38:42] == socket.inet_aton("10.70.0.100")


def test_unsolicited_na_overrides_with_the_new_mac() -> None:
    mac = bytes.fromhex("020000000001")
    payload = unsolicited_na(mac, "2001:db8::5")
    # As the kernel sends it from a raw ICMPv6 socket (it fills in the checksum).
    na = ICMPv6ND_NA(payload)
    assert (na.type, na.R, na.S, na.O, na.tgt) == (136, 0, 0, 1, "2001:db8::5")
    assert na[ICMPv6NDOptDstLLAddr].lladdr == "02:00:00:00:00:01"
    assert len(payload) == 32


def test_announcement_interfaces() -> None:
    inv = Inventory(ifindex={"eth0": 2, "eth1": 3, "bond0": 4},
                    addresses={"eth0": ("10.0.0.5",), "eth1": ("10.70.0.11",)},
                    default_interface="eth0",
                    networks={"eth0": ("10.0.0.0/24",), "eth1": ("10.70.0.0/24",)})
    # The pool's, where the node has them; else where the address is on link; else the
    # listener's.
    assert interfaces_for("10.70.0.100", inv, ["bond0", "nope"], ["eth0"]) == ("bond0",)
    assert interfaces_for("10.70.0.100", inv, [], ["eth0"]) == ("eth1",)
    assert interfaces_for("203.0.113.1", inv, [], ["eth0", "gone"]) == ("eth0",)
