"""Plan -> map entries as diffs, checked on in-memory maps with the real
encodings (the kernel side is covered by the PROG_TEST_RUN tests)."""

from __future__ import annotations

import ctypes

import pytest

from tests.memory_map import MemoryMap
from xdplb.dataplane import layout as L
from xdplb.dataplane.alloc import CapacityError, IdAllocator, RegionAllocator
from xdplb.dataplane.config import Capacities
from xdplb.dataplane.entries import Inventory, expand
from xdplb.dataplane.layout import listener_key, lpm_key
from xdplb.dataplane.writer import MapWriter
from xdplb.plan.planner import PlanMemo, build_plan
from xdplb.spec.load import DocumentCache, parse_manifests

NAMES = ["listeners", "src_routes", "sni_routes", "rev_nat", "groups", "pool", "backends",
         "backend_nets", "vips", "vip_bits", "port_filter", "listener_stats", "backend_stats"]
SIZES = {"backends": 16, "vip_bits": 4}  # the arrays whose entries go as zeros
INV = Inventory(ifindex={"eth0": 2, "eth1": 3}, addresses={"eth0": ("10.0.0.1",),
                                                           "eth1": ("10.1.0.1", "10.1.0.2")},
                default_interface="eth0")


def manifest(routes: int = 3, weight: int = 1, wildcard: bool = False) -> str:
    addr = "" if wildcard else "    address: 192.0.2.10\n"
    lines = "".join(f"    - cidr: 198.{i // 256}.{i % 256}.0/24\n      backends: [{{address: "
                    f"10.9.{i % 256}.{i // 256 + 2}, port: 80}}]\n" for i in range(routes))
    return f"""
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: web}}
spec:
  interfaces: [eth0, eth1]
  listeners:
  - name: http
    protocol: TCP
    port: 80
{addr}    backends:
    - {{address: 10.0.0.11, port: 8080, weight: {weight}}}
    - {{address: 10.0.0.12, port: 8080}}
    sourceRoutes:
{lines}"""


def writer() -> tuple[MapWriter, dict[str, MemoryMap]]:
    maps = {n: MemoryMap(SIZES.get(n, 8)) for n in NAMES}
    return MapWriter(maps, Capacities(table_slots=200_000)), maps


def plan_of(text: str):  # type: ignore[no-untyped-def]
    return build_plan(parse_manifests(text))


def test_first_apply_writes_everything_and_second_nothing() -> None:
    w, maps = writer()
    r1 = w.apply(plan_of(manifest()), INV)
    assert r1.written > 0 and r1.problems == []
    assert len(maps["listeners"].data) == 2          # VIP on eth0 and eth1
    assert len(maps["src_routes"].data) == 3
    r2 = w.apply(plan_of(manifest()), INV)
    assert (r2.written, r2.deleted, r2.syscalls) == (0, 0, 0)


def test_one_route_change_writes_a_handful_independent_of_size() -> None:
    for n in (10, 2000):
        w, _maps = writer()
        w.apply(plan_of(manifest(routes=n)), INV)
        changed = manifest(routes=n).replace("10.9.5.2,", "10.9.5.99,")
        r = w.apply(plan_of(changed), INV)
        # new 1-slot table + group record + LPM entry + the new backend's entry and its
        # reverse-NAT entry (the old backend's stays while its flows may rely on it);
        # the old backend's entry goes (old group released next time)
        assert r.written <= 5 and r.deleted <= 1, r.summary()
        assert r.syscalls <= 7


def test_changed_group_written_whole_before_switch() -> None:
    w, maps = writer()
    w.apply(plan_of(manifest()), INV)
    old = dict(maps["listeners"].data)
    w.apply(plan_of(manifest(weight=3)), INV)
    new = maps["listeners"].data
    old_gid = L.ListenerVal.from_buffer_copy(next(iter(old.values()))).group
    new_val = L.ListenerVal.from_buffer_copy(next(iter(new.values())))
    assert new_val.group != old_gid
    g = L.GroupVal.from_buffer_copy(maps["groups"].data[new_val.group.to_bytes(4, "little")])
    assert g.flags & L.GF_IN_USE and g.size == 16381  # every group of more than one backend
    by_id = {i: addr for (addr, _port), i in w.backend_ids.items()}
    assert g.offset % L.POOL_IDS == 0
    slots = [L.PoolIds.from_buffer_copy(
        maps["pool"].data[((g.offset + i) // L.POOL_IDS).to_bytes(4, "little")]).id[
        (g.offset + i) % L.POOL_IDS] for i in range(g.size)]
    counts = {by_id[s]: 0 for s in slots}
    for s in slots:
        counts[by_id[s]] += 1
    assert counts == {"10.0.0.11": 12286, "10.0.0.12": 4095}  # 3:1 by largest remainder
    # The replaced group is released one apply later, not while packets may read it.
    og = L.GroupVal.from_buffer_copy(maps["groups"].data[old_gid.to_bytes(4, "little")])
    assert og.flags & L.GF_IN_USE
    w.apply(plan_of(manifest(weight=3)), INV)
    og = L.GroupVal.from_buffer_copy(maps["groups"].data[old_gid.to_bytes(4, "little")])
    assert not og.flags & L.GF_IN_USE


def test_wildcard_expands_to_interface_addresses_and_exact_wins() -> None:
    plan = plan_of(manifest(wildcard=True))
    exp = expand(plan, INV)
    addrs = sorted({k[1] for k in exp.keys})
    assert addrs == ["10.0.0.1", "10.1.0.1", "10.1.0.2"]
    assert {k[0] for k in exp.keys} == {2, 3}
    both = plan_of(manifest(wildcard=True) + "---\n" + manifest(wildcard=False).replace(
        "name: web", "name: vip").replace("192.0.2.10", "10.0.0.1"))
    exp2 = expand(both, INV)
    assert exp2.keys[(2, "10.0.0.1", 80, "TCP")].owner == "default/vip"
    assert exp2.keys[(2, "10.1.0.1", 80, "TCP")].owner == "default/web"


def test_missing_interface_is_a_problem_not_a_crash() -> None:
    w, _ = writer()
    inv = Inventory(ifindex={"eth0": 2}, addresses={}, default_interface="eth0")
    r = w.apply(plan_of(manifest()), inv)
    assert r.problems == ["default/web/http: interface eth1 does not exist"]


def test_removed_listener_deletes_its_entries_and_port() -> None:
    w, maps = writer()
    w.apply(plan_of(manifest()), INV)
    assert maps["port_filter"].data[(80).to_bytes(4, "little")] == (1 << 6).to_bytes(4, "little")
    other = manifest(routes=0).replace("port: 80\n    address", "port: 81\n    address")
    other = other.replace("    sourceRoutes:\n", "")
    r = w.apply(plan_of(other), INV)
    assert r.deleted == 2 + 3 + 3  # two listener keys, three routes, their backends
    assert maps["port_filter"].data[(80).to_bytes(4, "little")] == bytes(4)
    assert maps["src_routes"].data == {}
    # The reverse-NAT entries stay for the flows to :80 (see the next test).
    assert len(maps["rev_nat"].data) == 2 + 3


def rev_nat(maps: dict[str, MemoryMap]) -> dict[tuple[str, int], tuple[str, int]]:
    """backend -> (vip, vport)"""
    out = {}
    for k, v in maps["rev_nat"].data.items():
        key, val = L.RevNatKey.from_buffer_copy(k), L.RevNatVal.from_buffer_copy(v)
        out[(L.from_ip(key.addr), L.from_be16(key.port))] = (
            L.from_ip(val.vip), L.from_be16(val.vport))
    return out


def test_reverse_nat_entries_stay_while_flows_rely_on_them() -> None:
    # A flow to the address of its backend's rev_nat entry has no reply entry: the
    # entry must outlive the listener address it names while such flows live.
    w, maps = writer()
    base = manifest(routes=0).replace("    sourceRoutes:\n", "")
    w.apply(plan_of(base), INV)
    b1, b2 = ("10.0.0.11", 8080), ("10.0.0.12", 8080)
    assert rev_nat(maps)[b1] == ("192.0.2.10", 80)
    moved = base.replace("port: 80\n", "port: 81\n")
    w.apply(plan_of(moved), INV)
    assert rev_nat(maps)[b1] == ("192.0.2.10", 80)  # kept
    vip80 = (L.ip_bytes("192.0.2.10"), L.be16(80))
    key = {b: bytes(L.RevNatKey(L.ip(b[0]), L.be16(b[1]), 6, 0)) for b in (b1, b2)}
    assert w.release_rev_nat({(key[b1], *vip80)}) == 1  # b2's flows are gone
    assert rev_nat(maps)[b1] == ("192.0.2.10", 80)
    assert rev_nat(maps)[b2] == ("192.0.2.10", 81)
    assert w.release_rev_nat(set()) == 1
    assert rev_nat(maps)[b1] == ("192.0.2.10", 81)
    # A backend that leaves: its entry goes once its flows have.
    w.apply(plan_of(moved.replace("    - {address: 10.0.0.12, port: 8080}\n", "")), INV)
    assert rev_nat(maps)[b2] == ("192.0.2.10", 81)
    assert w.release_rev_nat({(key[b2], L.ip_bytes("192.0.2.10"), L.be16(81))}) == 0
    assert w.release_rev_nat(set()) == 1
    assert b2 not in rev_nat(maps)


def test_encodings_are_network_order() -> None:
    k = L.ListenerKey.from_buffer_copy(listener_key(7, "192.0.2.10", 80, "TCP"))
    raw = bytes(k)
    mapped = bytes(10) + b"\xff\xff"  # an IPv4 address in 16 bytes: ::ffff:a.b.c.d
    assert raw[:4] == (7).to_bytes(4, "little") and raw[4:20] == mapped + bytes([192, 0, 2, 10])
    assert raw[20:22] == (80).to_bytes(2, "big") and raw[22] == 6
    lk = bytes(L.LpmKey.from_buffer_copy(lpm_key(5, "198.51.100.0/24")))
    assert lk[:4] == (32 + 96 + 24).to_bytes(4, "little") and lk[4:8] == (5).to_bytes(4, "big")
    assert lk[8:24] == mapped + bytes([198, 51, 100, 0])
    lk6 = bytes(L.LpmKey.from_buffer_copy(lpm_key(5, "2001:db8:7::/48")))
    assert lk6[:4] == (32 + 48).to_bytes(4, "little")
    assert lk6[8:24] == bytes.fromhex("20010db8000700000000000000000000")
    k6 = L.ListenerKey.from_buffer_copy(listener_key(7, "2001:db8::10", 443, "UDP"))
    assert bytes(k6)[4:20] == bytes.fromhex("20010db8000000000000000000000010")
    assert ctypes.sizeof(L.CtKey) == 40 and ctypes.sizeof(L.CtVal) == 96


def test_capacity_errors_name_the_flag() -> None:
    maps = {n: MemoryMap(SIZES.get(n, 8)) for n in NAMES}
    w = MapWriter(maps, Capacities(source_routes=2))
    with pytest.raises(CapacityError, match="--max-source-routes"):
        w.apply(plan_of(manifest(routes=3)), INV)
    w2 = MapWriter({n: MemoryMap(SIZES.get(n, 8)) for n in NAMES}, Capacities(table_slots=100))
    with pytest.raises(CapacityError, match="--table-slots"):
        w2.apply(plan_of(manifest()), INV)


def test_allocators() -> None:
    ids = IdAllocator(3, "things")
    assert [ids.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CapacityError):
        ids.allocate()
    ids.free(1)
    ids.free(0)
    assert ids.allocate() == 1  # the least recently freed comes back first
    ids.reserve(0)  # adopted from pinned maps meanwhile: never handed out twice
    with pytest.raises(CapacityError):
        ids.allocate()
    big = IdAllocator(4, "things")
    first = big.allocate()
    big.free(first)
    assert [big.allocate() for _ in range(3)] == [1, 2, 3]  # unused ids before a freed one
    assert big.allocate() == first
    r = RegionAllocator(100)
    a, b = r.allocate(30), r.allocate(30)
    assert (a, b) == (0, 30)
    r.free(a, 30)
    assert r.allocate(10) == 0
    r.free(0, 10)
    r.free(b, 30)
    assert r.free_slots == 100 and r.allocate(100) == 0
    r2 = RegionAllocator(100)
    r2.reserve(40, 20)
    assert r2.free_slots == 80
    assert r2.allocate(40) == 0 and r2.allocate(40) == 60


def two_documents(api_weight: int = 1) -> str:
    api = manifest(routes=50, weight=api_weight).replace("name: web", "name: api").replace(
        "port: 80\n    address: 192.0.2.10", "port: 8443\n    address: 192.0.2.10")
    return manifest(routes=2000) + "\n---\n" + api


def test_unchanged_documents_are_neither_parsed_nor_planned_again() -> None:
    cache, memo = DocumentCache(), PlanMemo()
    w, maps = writer()
    before = parse_manifests(two_documents(), cache=cache)
    first = build_plan(before, memo=memo)
    w.apply(first, INV)
    after = parse_manifests(two_documents(api_weight=3), cache=cache)
    second = build_plan(after, memo=memo)
    memo.keep_only(after)
    assert after[0] is before[0] and after[1] is not before[1]
    web = [lst for lst in second.listeners if lst.owner == "default/web"]
    assert web and all(any(lst is old for old in first.listeners) for lst in web)

    routes_syscalls = maps["src_routes"].syscalls
    r = w.apply(second, INV)
    # api's new default group (its table written whole) and its listener entries only
    assert maps["src_routes"].syscalls == routes_syscalls and r.deleted == 0, r.summary()
    # The maps say what a writer that never saw the first plan would write.
    fresh, fresh_maps = writer()
    fresh.apply(second, INV)
    assert meaning(w, maps) == meaning(fresh, fresh_maps)


def meaning(w: MapWriter, maps: dict[str, MemoryMap]) -> tuple[object, ...]:
    """Listener and LPM entries with group ids replaced by the groups they name."""
    groups = {slot.id: g for g, slot in w.groups.items()}
    listeners = {}
    for k, v in maps["listeners"].data.items():
        val = L.ListenerVal.from_buffer_copy(v)
        listeners[k] = (val.id, groups[val.group], val.flags)
    routes = {k: groups[int.from_bytes(v, "little")] for k, v in maps["src_routes"].data.items()}
    return listeners, routes, maps["port_filter"].data


def test_health_checked_groups_are_planned_again_each_time() -> None:
    text = manifest(routes=2).replace(
        "    backends:\n    - {address: 10.0.0.11",
        "    healthCheck: {protocol: TCP}\n    backends:\n    - {address: 10.0.0.11", 1)
    lbs, memo = parse_manifests(text), PlanMemo()
    (listener,) = build_plan(lbs, memo=memo).listeners
    target = next(t for t in listener.health_targets if t.address == "10.0.0.11")
    (again,) = build_plan(lbs, memo=memo, down=frozenset({target})).listeners
    assert {b.address: b.weight for b in again.default.backends} == {
        "10.0.0.11": 0, "10.0.0.12": 1}
    assert {b.weight for b in listener.default.backends} == {1}


def test_routes_naming_the_same_backends_share_one_list_and_group() -> None:
    text = manifest(routes=3).replace("10.9.1.2,", "10.9.0.2,").replace("10.9.2.2,", "10.9.0.2,")
    (lb,) = parse_manifests(text)
    routes = lb.spec.listeners[0].source_routes
    assert routes[0].backends is routes[1].backends is routes[2].backends
    (listener,) = build_plan([lb]).listeners
    assert listener.source_routes[0].group is listener.source_routes[2].group
    assert len(listener.groups) == 2  # the default group and the routes' one
