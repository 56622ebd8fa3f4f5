"""The user-space side of conntrack on a real pinned map: sweep and flush."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from xdplb.dataplane import conntrack
from xdplb.dataplane import layout as L
from xdplb.dataplane.config import Capacities, Timeouts
from xdplb.dataplane.loader import DataPlane

PIN_ROOT = "/sys/fs/bpf/xdplb-test-ct"


@pytest.fixture(scope="module")
def dp() -> Iterator[DataPlane]:
    d = DataPlane(PIN_ROOT, Capacities(conntrack=1024, table_slots=1024, source_routes=16,
                                       groups=16, listener_keys=16, listeners=16, backends=16))
    d.load()
    yield d
    d.close()
    shutil.rmtree(PIN_ROOT, ignore_errors=True)


def put_flow(dp: DataPlane, client_port: int, idle_s: float, flags: int = L.CT_REPLIED,
             proto: int = 6) -> None:
    now = L.ct_now_ns()
    last = now - int(idle_s * 1e9)
    fwd = L.CtKey(L.be32("10.10.1.2"), L.be32("192.0.2.10"), L.be16(client_port), L.be16(80),
                  proto, 0, 0)
    rev = L.CtKey(L.be32("10.20.1.2"), L.be32("10.10.1.2"), L.be16(8080), L.be16(client_port),
                  proto, 1, 0)
    v = L.CtVal(nat_addr=L.be32("10.20.1.2"), nat_port=L.be16(8080), flags=flags, last_ns=last)
    r = L.CtVal(nat_addr=L.be32("192.0.2.10"), nat_port=L.be16(80), last_ns=last)
    dp.maps["ct"].update(bytes(fwd), bytes(v))
    dp.maps["ct"].update(bytes(rev), bytes(r))


def ports(dp: DataPlane) -> set[int]:
    return {L.from_be16(f.key.sport) for f in conntrack.flows(dp.maps["ct"])}


def test_sweep_deletes_expired_flows_and_their_reply_entries(dp: DataPlane) -> None:
    conntrack.flush(dp.maps["ct"])
    put_flow(dp, 1000, idle_s=10)                                  # established, fresh
    put_flow(dp, 1001, idle_s=400)                                 # established, expired
    put_flow(dp, 1002, idle_s=40, flags=0)                         # never replied: 30 s
    put_flow(dp, 1003, idle_s=20, flags=L.CT_FIN_FWD | L.CT_FIN_REV)  # closed: 10 s
    put_flow(dp, 1004, idle_s=20, flags=L.CT_REPLIED | L.CT_FIN_FWD)  # half-closed: 300 s
    put_flow(dp, 1005, idle_s=31, flags=0, proto=17)               # UDP: 30 s
    swept = conntrack.sweep(dp.maps["ct"], Timeouts())
    assert ports(dp) == {1000, 1004}
    assert (swept.left, swept.deleted) == (4, 8)
    # The live flows may rely on B1's rev_nat entry for VIP:80.
    b1 = bytes(L.RevNatKey(L.be32("10.20.1.2"), L.be16(8080), 6, 0))
    assert swept.relied == {(b1, L.be32("192.0.2.10"), L.be16(80))}
    assert sum(1 for k, _v in conntrack.read(dp.maps["ct"]) if k.dir == 1) == 2
    states = {L.from_be16(f.key.sport): f.state() for f in conntrack.flows(dp.maps["ct"])}
    assert states == {1000: "established", 1004: "closing"}


def test_sweep_removes_orphaned_reply_entries(dp: DataPlane) -> None:
    conntrack.flush(dp.maps["ct"])
    put_flow(dp, 2000, idle_s=1)
    fwd = L.CtKey(L.be32("10.10.1.2"), L.be32("192.0.2.10"), L.be16(2000), L.be16(80), 6, 0, 0)
    dp.maps["ct"].delete(bytes(fwd))
    swept = conntrack.sweep(dp.maps["ct"], Timeouts())
    assert (swept.left, swept.deleted) == (0, 1)


def put_snat_flow(dp: DataPlane, client_port: int, node_port: int, idle_s: float) -> None:
    last = L.ct_now_ns() - int(idle_s * 1e9)
    fwd = L.CtKey(L.be32("10.10.1.2"), L.be32("192.0.2.10"), L.be16(client_port), L.be16(80),
                  6, 0, 0)
    rev = L.CtKey(L.be32("10.20.1.2"), L.be32("10.20.1.1"), L.be16(8080), L.be16(node_port),
                  6, 1, 0)
    v = L.CtVal(nat_addr=L.be32("10.20.1.2"), nat_port=L.be16(8080),
                flags=L.CT_REPLIED | L.CT_SNAT, last_ns=last,
                snat_addr=L.be32("10.20.1.1"), snat_port=L.be16(node_port))
    r = L.CtVal(nat_addr=L.be32("192.0.2.10"), nat_port=L.be16(80), flags=L.CT_SNAT,
                last_ns=last, snat_addr=L.be32("10.10.1.2"), snat_port=L.be16(client_port))
    dp.maps["ct"].update(bytes(fwd), bytes(v))
    dp.maps["ct"].update(bytes(rev), bytes(r))


def test_sweep_pairs_source_nat_entries_by_the_node_port(dp: DataPlane) -> None:
    conntrack.flush(dp.maps["ct"])
    put_snat_flow(dp, 3000, 40000, idle_s=1)     # live: both entries stay
    put_snat_flow(dp, 3001, 40001, idle_s=400)   # expired: both go, freeing port 40001
    swept = conntrack.sweep(dp.maps["ct"], Timeouts())
    assert (swept.left, swept.deleted) == (2, 2)
    left = {(k.dir, L.from_be16(k.dport)) for k, _v in conntrack.read(dp.maps["ct"])}
    assert left == {(0, 80), (1, 40000)}
    (flow,) = conntrack.flows(dp.maps["ct"])
    assert "=> 10.20.1.2:8080 from 10.20.1.1:40000 established" in flow.describe(L.ct_now_ns())


def test_sweep_keeps_direct_connection_markers_until_idle(dp: DataPlane) -> None:
    conntrack.flush(dp.maps["ct"])
    for port, idle in ((4000, 10), (4001, 400)):
        last = L.ct_now_ns() - idle * 1_000_000_000
        key = L.CtKey(L.be32("10.20.1.2"), L.be32("10.10.1.2"), L.be16(8080), L.be16(port),
                      6, 1, 0)
        val = L.CtVal(nat_addr=L.be32("10.20.1.2"), nat_port=L.be16(8080),
                      flags=L.CT_DIRECT | L.CT_REPLIED, last_ns=last)
        dp.maps["ct"].update(bytes(key), bytes(val))
    swept = conntrack.sweep(dp.maps["ct"], Timeouts())
    assert (swept.left, swept.deleted) == (1, 1)
    ((key, _val),) = conntrack.read(dp.maps["ct"])
    assert L.from_be16(key.dport) == 4000


def test_flush_empties_the_map(dp: DataPlane) -> None:
    for p in range(3000, 3300):
        put_flow(dp, p, idle_s=1)
    assert conntrack.flush(dp.maps["ct"]) >= 600
    assert conntrack.read(dp.maps["ct"]) == []


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


def test_batch_reads_cross_chunk_boundaries(dp: DataPlane) -> None:
    """Hash maps page by bucket, the LPM trie and arrays by key: both must advance."""
    from xdplb.dataplane.layout import lpm_key

    conntrack.flush(dp.maps["ct"])
    for p in range(4000, 4010):
        put_flow(dp, p, idle_s=1)
    assert len(dp.maps["ct"].items(chunk=3)) == 20
    routes = dp.maps["src_routes"]
    keys = [lpm_key(1, f"198.51.{i}.0/24") for i in range(10)]
    for i, k in enumerate(keys):
        routes.update(k, i.to_bytes(4, "little"))
    assert sorted(k for k, _v in routes.items(chunk=3)) == sorted(keys)
    for k in keys:
        routes.delete(k)
    assert len(dp.maps["groups"].items(chunk=5)) == dp.maps["groups"].info.max_entries
