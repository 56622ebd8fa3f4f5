"""The user-space side of conntrack on real pinned maps: sweep and flush, by the data
path's rules. Entries are stamped now or at boot (last_ns 0) and judged with timeouts
of seconds, so the tests never compute a past time from the monotonic clock."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.datapath import SHORT
from xdplb.dataplane import conntrack
from xdplb.dataplane import layout as L
from xdplb.dataplane.bpfsys import BpfMap
from xdplb.dataplane.config import Capacities
from xdplb.dataplane.loader import DataPlane

PIN_ROOT = "/sys/fs/bpf/xdplb-test-ct"
CLIENT, VIP, B1, NODE = "10.10.1.2", "192.0.2.10", ("10.20.1.2", 8080), "10.20.1.1"
EST = L.CT_REPLIED | L.CT_ESTABLISHED


@pytest.fixture(scope="module")
def dp() -> Iterator[DataPlane]:
    d = DataPlane(PIN_ROOT, Capacities(conntrack=1024, table_slots=1024, source_routes=16,
                                       groups=16, listener_keys=16, listeners=16, backends=16))
    d.load()
    yield d
    d.close()
    shutil.rmtree(PIN_ROOT, ignore_errors=True)


@pytest.fixture
def maps(dp: DataPlane) -> dict[str, BpfMap]:
    conntrack.flush(dp.maps["ct"], dp.maps["ct_reply"])
    return dp.maps


def stamp(boot: bool) -> int:
    return 0 if boot else L.ct_now_ns()


def fkey(cport: int, proto: int = 6) -> bytes:
    return bytes(L.CtKey(L.ip(CLIENT), L.ip(VIP), L.be16(cport), L.be16(80), proto))


def put_flow(maps: dict[str, BpfMap], cport: int, boot: bool = False, flags: int = EST,
             proto: int = 6, paired: bool = True) -> None:
    """A flow CLIENT:cport -> VIP:80 on B1; with its reply entry when ``paired``."""
    last = stamp(boot)
    v = L.CtVal(nat_addr=L.ip(B1[0]), nat_port=L.be16(B1[1]), last_ns=last,
                flags=flags | (L.CT_PAIRED if paired else 0))
    maps["ct"].update(fkey(cport, proto), bytes(v))
    if paired:
        put_reply(maps, cport, last, proto)


def rkey(cport: int, proto: int = 6, dst: str = CLIENT) -> bytes:
    return bytes(L.CtKey(L.ip(B1[0]), L.ip(dst), L.be16(B1[1]), L.be16(cport), proto))


def put_reply(maps: dict[str, BpfMap], cport: int, last: int, proto: int = 6) -> None:
    r = L.CtReplyVal(client=L.ip(CLIENT), vip=L.ip(VIP), cport=L.be16(cport),
                     vport=L.be16(80), last_ns=last)
    maps["ct_reply"].update(rkey(cport, proto), bytes(r))


def ports(maps: dict[str, BpfMap]) -> set[int]:
    return {L.from_be16(f.key.sport) for f in conntrack.flows(maps["ct"])}


def reply_ports(maps: dict[str, BpfMap]) -> set[int]:
    return {L.from_be16(k.dport) for k, _v in conntrack.read_replies(maps["ct_reply"])}


def sweep(maps: dict[str, BpfMap]) -> conntrack.Sweep:
    return conntrack.sweep(maps["ct"], maps["ct_reply"], SHORT)


def test_sweep_deletes_expired_flows_and_their_reply_entries(maps: dict[str, BpfMap]) -> None:
    put_flow(maps, 1000)                                              # established, fresh
    put_flow(maps, 1001, boot=True)                                   # established, expired
    put_flow(maps, 1002, boot=True, flags=0)                          # never replied
    put_flow(maps, 1003, flags=EST | L.CT_FIN_FWD | L.CT_FIN_REV)     # closed, fresh
    put_flow(maps, 1004, boot=True, flags=EST | L.CT_FIN_FWD)         # half-closed, expired
    put_flow(maps, 1005, boot=True, flags=0, proto=17)                # UDP, expired
    put_flow(maps, 1006, paired=False)                                # one entry (rev_nat)
    swept = sweep(maps)
    assert ports(maps) == {1000, 1003, 1006}
    assert reply_ports(maps) == {1000, 1003}
    assert (swept.left, swept.deleted) == (5, 8)
    # Only the flow without a reply entry relies on B1's rev_nat entry for VIP:80.
    b1 = bytes(L.RevNatKey(L.ip(B1[0]), L.be16(B1[1]), 6, 0))
    assert swept.relied == {(b1, L.ip_bytes(VIP), L.be16(80))}
    states = {L.from_be16(f.key.sport): f.state() for f in conntrack.flows(maps["ct"])}
    assert states == {1000: "established", 1003: "closed", 1006: "established"}


def test_a_reply_entry_without_its_flow_goes_once_idle_as_long_as_any_flow(
        maps: dict[str, BpfMap]) -> None:
    # Its forward entry was evicted (or is not written yet): the reply entry, which
    # holds the port or the backend's end, stays until it has been idle for as long as
    # any flow may be, so that nothing of a live flow goes.
    put_reply(maps, 2000, stamp(boot=False))
    put_reply(maps, 2001, stamp(boot=True))
    swept = sweep(maps)
    assert reply_ports(maps) == {2000}
    assert (swept.left, swept.deleted) == (1, 1)


def test_a_reply_entry_of_another_flow_of_its_key_is_not_its_flows(
        maps: dict[str, BpfMap]) -> None:
    # The forward entry its key leads to goes elsewhere (a later flow of that client
    # port): the reply entry is judged by its own idle time.
    put_flow(maps, 2100)
    other = L.CtVal.from_buffer_copy(maps["ct"].lookup(fkey(2100)))
    other.nat_port = L.be16(9999)
    maps["ct"].update(fkey(2100), bytes(other))
    put_reply(maps, 2100, stamp(boot=True))
    sweep(maps)
    assert reply_ports(maps) == set() and ports(maps) == {2100}


def put_snat_flow(maps: dict[str, BpfMap], cport: int, node_port: int, boot: bool) -> None:
    last = stamp(boot)
    v = L.CtVal(nat_addr=L.ip(B1[0]), nat_port=L.be16(B1[1]), flags=EST | L.CT_SNAT,
                last_ns=last, snat_addr=L.ip(NODE), snat_port=L.be16(node_port))
    r = L.CtReplyVal(client=L.ip(CLIENT), vip=L.ip(VIP), cport=L.be16(cport),
                     vport=L.be16(80), flags=L.CT_SNAT, last_ns=last)
    maps["ct"].update(fkey(cport), bytes(v))
    maps["ct_reply"].update(rkey(node_port, dst=NODE), bytes(r))


def test_sweep_pairs_source_nat_entries_by_the_node_port(maps: dict[str, BpfMap]) -> None:
    put_snat_flow(maps, 3000, 40000, boot=False)     # live: both entries stay
    put_snat_flow(maps, 3001, 40001, boot=True)      # expired: both go, freeing port 40001
    swept = sweep(maps)
    assert (swept.left, swept.deleted) == (2, 2)
    assert reply_ports(maps) == {40000} and ports(maps) == {3000}
    (flow,) = conntrack.flows(maps["ct"])
    assert "=> 10.20.1.2:8080 from 10.20.1.1:40000 established" in flow.describe(L.ct_now_ns())


class Stale(BpfMap):
    """A map whose batch read returns what it held before ``change`` ran: the entries a
    packet refreshed, or created, after the sweeper read them."""

    def __init__(self, real: BpfMap, change: object) -> None:
        self.__dict__.update(real.__dict__)
        self.change = change

    def items(self, chunk: int = 4096) -> list[tuple[bytes, bytes]]:
        out = super().items(chunk)
        self.change()  # type: ignore[operator]
        return out


def test_sweep_judges_again_what_changed_after_it_read(maps: dict[str, BpfMap]) -> None:
    put_flow(maps, 5000, boot=True)
    put_reply(maps, 5001, stamp(boot=True))

    def packets() -> None:
        put_flow(maps, 5000)   # a packet refreshed the expired-looking flow
        put_flow(maps, 5001)   # and a new flow took the port of the orphan reply entry

    swept = conntrack.sweep(Stale(maps["ct"], packets), maps["ct_reply"], SHORT)
    assert swept.deleted == 0
    assert ports(maps) == {5000, 5001} and reply_ports(maps) == {5000, 5001}


def test_flush_empties_both_maps(maps: dict[str, BpfMap]) -> None:
    for p in range(3000, 3300):
        put_flow(maps, p)
    assert conntrack.flush(maps["ct"], maps["ct_reply"]) == 600
    assert conntrack.read(maps["ct"]) == [] and conntrack.read_replies(maps["ct_reply"]) == []


def test_metrics_read_kernel_counters(dp: DataPlane) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from xdplb.agent.metrics import DataPlaneCollector

    ncpu_value = bytes(dp.maps["stats"].value_size)
    one = (5).to_bytes(8, "little") + ncpu_value[8:]
    dp.maps["stats"].update(int(L.Stat.NEW_DEFAULT).to_bytes(4, "little"), one)
    fs = bytes(L.FlowStats(7, 700, 3))
    raw = fs + bytes(dp.maps["backend_stats"].value_size - len(fs))
    dp.maps["backend_stats"].update((2).to_bytes(4, "little"), raw)
    reg = CollectorRegistry()
    reg.register(DataPlaneCollector(dp.maps, lambda: ({}, {2: "10.20.1.2:8080"})))
    text = generate_latest(reg).decode()
    assert 'xdplb_packets_by_path_total{path="new_default"} 5.0' in text
    assert 'xdplb_backend_packets_total{backend="10.20.1.2:8080"} 7.0' in text
    assert 'xdplb_backend_new_flows_total{backend="10.20.1.2:8080"} 3.0' in text


def test_batch_reads_cross_chunk_boundaries(maps: dict[str, BpfMap]) -> None:
    """Hash maps page by bucket, the LPM trie and arrays by key: both must advance."""
    from xdplb.dataplane.layout import lpm_key

    for p in range(4000, 4010):
        put_flow(maps, p)
    assert len(maps["ct"].items(chunk=3)) == 10
    assert len(maps["ct_reply"].items(chunk=3)) == 10
    routes = maps["src_routes"]
    keys = [lpm_key(1, f"198.51.{i}.0/24") for i in range(10)]
    for i, k in enumerate(keys):
        routes.update(k, i.to_bytes(4, "little"))
    assert sorted(k for k, _v in routes.items(chunk=3)) == sorted(keys)
    for k in keys:
        routes.delete(k)
    assert len(maps["groups"].items(chunk=5)) == maps["groups"].info.max_entries
