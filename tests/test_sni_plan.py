"""SNI entries of the map writer; the acceptor's routing snapshot (it must pick what the
maps the data path reads hold: the plan's Maglev table and flow hash), sent once per table;
the flow hash on integers, IPv4 and IPv6; the listening addresses of SNI listeners and the
PROXY v2 header; all without a kernel."""

from __future__ import annotations

import socket
import sys
from array import array
from collections.abc import Mapping

import pytest

from tests.memory_map import MemoryMap
from xdplb.dataplane import layout as L
from xdplb.dataplane.alloc import CapacityError
from xdplb.dataplane.config import Capacities
from xdplb.dataplane.entries import Inventory
from xdplb.dataplane.layout import sni_key
from xdplb.dataplane.writer import MapWriter
from xdplb.plan.flowhash import (
    HASH_SEED,
    client_hash,
    client_hash_int,
    flow_hash,
    flow_hash_ints,
    mix32,
)
from xdplb.plan.planner import build_plan
from xdplb.sni.proxyproto import proxy_v2_header
from xdplb.sni.routes import (
    GroupTable,
    RoutingReceiver,
    RoutingSender,
    RoutingUpdate,
    pick,
)
from xdplb.sni.service import bindings, local_routes_needed
from xdplb.spec.load import SpecError, parse_manifests

INV = Inventory(ifindex={"eth0": 2, "eth1": 3},
                addresses={"eth0": ("10.0.0.1",), "eth1": ("10.1.0.1", "10.1.0.2")},
                default_interface="eth0")
NAMES = [name for name, _key, _value in L.MAP_LAYOUTS]


def manifest(hosts: dict[str, list[str]], address: str | None = "192.0.2.10",
             extra: str = "") -> str:
    routes = "".join(
        f"    - hostname: {h}\n      backends: ["
        + ", ".join(f"{{address: {a}, port: 443}}" for a in addrs) + "]\n"
        for h, addrs in hosts.items())
    addr = f"    address: {address}\n" if address else ""
    return f"""
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: tls}}
spec:
  interfaces: [eth0, eth1]
  listeners:
  - name: tls
    protocol: TCP
    port: 443
{addr}    backends: [{{address: 10.9.0.1, port: 443}}, {{address: 10.9.0.2, port: 443}}]
    sniRoutes:
{routes}{extra}"""


HOSTS = {"a.example.com": ["10.9.1.1", "10.9.1.2", "10.9.1.3"], "b.example.com": ["10.9.2.1"]}


def applied(text: str) -> tuple[MapWriter, dict[str, MemoryMap]]:
    maps = {n: MemoryMap() for n in NAMES}
    w = MapWriter(maps, Capacities(table_slots=100_000))
    w.apply(build_plan(parse_manifests(text)), INV)
    return w, maps


def test_sni_entries_name_each_hostname_and_the_default() -> None:
    w, maps = applied(manifest(HOSTS))
    lid = next(iter(w.listener_ids.values()))
    assert set(maps["sni_routes"].data) == {sni_key(lid, h) for h in ["", *HOSTS]}
    gid_of = {g.backends[0].address: slot.id for g, slot in w.groups.items()}
    entry = maps["sni_routes"].data
    assert entry[sni_key(lid, "a.example.com")] == gid_of["10.9.1.1"].to_bytes(4, "little")
    assert entry[sni_key(lid, "")] == gid_of["10.9.0.1"].to_bytes(4, "little")
    # The key is the lower-cased name; the listener entry marks the SNI path.
    assert sni_key(lid, "A.Example.COM") == sni_key(lid, "a.example.com")
    val = L.ListenerVal.from_buffer_copy(next(iter(maps["listeners"].data.values())))
    assert val.flags & L.LF_SNI


def test_sni_entries_are_diffs_and_removed_with_the_listener() -> None:
    w, maps = applied(manifest(HOSTS))
    plan = build_plan(parse_manifests(manifest({**HOSTS, "c.example.com": ["10.9.2.1"]})))
    r = w.apply(plan, INV)
    # one new SNI entry; group 10.9.2.1 is shared with b.example.com: no new table
    assert (r.written, r.deleted) == (1, 0), r.summary()
    rev_before = len(maps["rev_nat"].data)
    r = w.apply(build_plan(parse_manifests(manifest({}, extra="").replace(
        "    sniRoutes:\n", ""))), INV)
    assert maps["sni_routes"].data == {}
    assert r.deleted == 4 + 4  # the four SNI entries, the four backends only routes used
    # The reverse-NAT entries of backends only the routes used go once no flow of
    # theirs is left.
    assert len(maps["rev_nat"].data) == rev_before
    assert w.release_rev_nat(set()) == 4
    assert rev_before - len(maps["rev_nat"].data) == 4


def test_hash_collision_is_refused_and_nothing_written(monkeypatch: pytest.MonkeyPatch) -> None:
    maps = {n: MemoryMap() for n in NAMES}
    w = MapWriter(maps, Capacities(table_slots=100_000))
    monkeypatch.setattr(L, "sni_hash", lambda name: 7 if name else 1)
    with pytest.raises(CapacityError,
                       match=r"'a\.example\.com' and 'b\.example\.com' have the same"):
        w.apply(build_plan(parse_manifests(manifest(HOSTS))), INV)
    assert maps["listeners"].data == {} and maps["sni_routes"].data == {}


def test_fnv1a_64_reference_values() -> None:
    assert L.sni_hash("") == 0xCBF29CE484222325
    assert L.sni_hash("a") == 0xAF63DC4C8601EC8C
    assert L.sni_hash("foobar") == 0x85944171F73967E8


def maps_pick(maps: Mapping[str, MemoryMap], lid: int, hostname: str | None,
              h: int) -> tuple[str, int] | None:
    """What the data path reads for a flow hash: sni_routes -> groups -> pool -> backends."""
    sni = maps["sni_routes"].data
    gid = sni.get(sni_key(lid, hostname)) if hostname else None
    gid = gid or sni.get(sni_key(lid, ""))
    if gid is None:
        return None
    raw = maps["groups"].data.get(gid[:4])
    group = L.GroupVal.from_buffer_copy(raw) if raw else None
    if group is None or not group.size:
        return None
    slot = group.offset + h % group.size
    elem = L.PoolIds.from_buffer_copy(maps["pool"].data[L.encode_u32(slot // L.POOL_IDS)])
    b = L.BackendVal.from_buffer_copy(
        maps["backends"].data[L.encode_u32(elem.id[slot % L.POOL_IDS])])
    return L.from_ip(b.addr), L.from_be16(b.port)


def receiver_for(text: str) -> tuple[RoutingReceiver, MapWriter, dict[str, MemoryMap]]:
    w, maps = applied(text)
    recv = RoutingReceiver()
    recv.apply(RoutingSender().update(w.plan, w.listener_ids))
    return recv, w, maps


@pytest.mark.parametrize("affinity", [False, True])
def test_snapshot_picks_what_the_maps_hold(affinity: bool) -> None:
    extra = "    sessionAffinity: ClientIP\n" if affinity else ""
    recv, w, maps = receiver_for(manifest(HOSTS, extra=extra))
    lst = w.plan.listeners[0]
    lid = w.listener_ids[lst.identity]
    table = recv.routing[lid]
    local = ("192.0.2.10", 443)
    seen: set[str] = set()
    for i in range(300):
        client = (f"10.10.{i % 7}.{i % 250 + 1}", 1024 + 37 * i)
        h = client_hash_int(int.from_bytes(socket.inet_aton(client[0]), "big")) if affinity \
            else flow_hash_ints(int.from_bytes(socket.inet_aton(client[0]), "big"),
                                int.from_bytes(socket.inet_aton(local[0]), "big"),
                                client[1], local[1], 6)
        assert h == (client_hash(client[0]) if affinity
                     else flow_hash(client[0], local[0], client[1], local[1], "TCP"))
        for host in ["a.example.com", "b.example.com", "nope.example.com", None]:
            got = pick(table, host, h)
            assert got is not None
            assert got.address == maps_pick(maps, lid, host, h), (host, client)
            assert got.family == socket.AF_INET
            seen.add(got.address[0])
    assert {"10.9.1.1", "10.9.1.2", "10.9.1.3", "10.9.0.1", "10.9.0.2"} <= seen


def test_a_group_without_eligible_backend_picks_none() -> None:
    empty = RoutingReceiver()
    empty.apply(RoutingUpdate({1: GroupTable(array("H"), ())}, {3: (1, {})}))
    assert pick(empty.routing[3], "a.example.com", 12345) is None


def test_tables_travel_once_and_are_forgotten_when_unused() -> None:
    plan = build_plan(parse_manifests(manifest(HOSTS)))
    ids = {plan.listeners[0].identity: 4}
    sender, recv = RoutingSender(), RoutingReceiver()
    first = sender.update(plan, ids)
    assert len(first.tables) == 3          # the default, a's and b's groups
    recv.apply(first)
    # The same plan again: names only, no table.
    again = sender.update(plan, ids)
    assert again.tables == {} and again.listeners == first.listeners
    recv.apply(again)
    # b's group changes: one new table; the old one is forgotten by both sides.
    plan2 = build_plan(parse_manifests(manifest({**HOSTS, "b.example.com": ["10.9.2.9"]})))
    upd = sender.update(plan2, ids)
    assert len(upd.tables) == 1
    recv.apply(upd)
    assert len(recv.tables) == 3
    assert pick(recv.routing[4], "b.example.com", 7).address == ("10.9.2.9", 443)  # type: ignore[union-attr]
    # A new acceptor process has nothing: everything is sent again.
    sender.forget()
    assert len(sender.update(plan2, ids).tables) == 3


def _fold_reference(h: int, address: str) -> int:
    """The documented IPv6 rule, spelled out: every 32-bit word, most significant first."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    for i in range(0, len(packed), 4):
        h = mix32(h ^ int.from_bytes(packed[i:i + 4], "big"))
    return h


@pytest.mark.parametrize("src, dst", [("10.10.1.2", "192.0.2.10"),
                                      ("2001:db8::1", "2001:db8:0:ffff::10"),
                                      ("::ffff:10.10.1.2", "::ffff:192.0.2.10")])
def test_flow_hash_of_both_families(src: str, dst: str) -> None:
    h = mix32(HASH_SEED ^ 6)
    h = mix32(h ^ ((40000 << 16) | 443))
    want = _fold_reference(_fold_reference(h, dst.replace("::ffff:", "")),
                           src.replace("::ffff:", ""))
    assert flow_hash(src, dst, 40000, 443, "TCP") == want
    assert client_hash(src) == _fold_reference(mix32(HASH_SEED), src.replace("::ffff:", ""))
    if ":" in src and "ffff" not in src:
        # The IPv6 hash is not the IPv4 one of some word: all 128 bits count.
        assert flow_hash(src, dst, 40000, 443, "TCP") != flow_hash(
            src.replace("::1", "::2"), dst, 40000, 443, "TCP")


def test_flow_hash_refuses_mixed_families() -> None:
    with pytest.raises(ValueError, match="not of one address family"):
        flow_hash("10.0.0.1", "2001:db8::1", 1, 2, "TCP")


def test_bindings_exact_address_and_wildcard_on_interface_addresses() -> None:
    text = manifest(HOSTS) + """\
  - name: any
    protocol: TCP
    port: 443
    backends: [{address: 10.9.0.9, port: 443}]
    sniRoutes:
    - hostname: z.example.com
      backends: [{address: 10.9.0.8, port: 443}]
  - name: plain
    protocol: TCP
    port: 80
    backends: [{address: 10.9.0.9, port: 80}]
"""
    plan = build_plan(parse_manifests(text))
    ids = {lst.identity: i for i, lst in enumerate(plan.listeners)}
    got = bindings(plan, INV, ids)
    labels = {addr: r.label for addr, r in got.items()}
    assert labels == {("192.0.2.10", 443): "default/tls/tls",
                      ("10.0.0.1", 443): "default/tls/any",
                      ("10.1.0.1", 443): "default/tls/any",
                      ("10.1.0.2", 443): "default/tls/any"}
    assert local_routes_needed(got, INV) == {"192.0.2.10"}


def test_proxy_protocol_reaches_the_route() -> None:
    plan = build_plan(parse_manifests(manifest(HOSTS, extra="").replace(
        "    sniRoutes:", "    proxyProtocol: v2\n    sniRoutes:")))
    route = bindings(plan, INV, {plan.listeners[0].identity: 5})[("192.0.2.10", 443)]
    assert (route.listener_id, route.proxy_protocol) == (5, True)


def test_proxy_protocol_is_refused_with_source_routes() -> None:
    text = manifest(HOSTS).replace("    sniRoutes:", "    proxyProtocol: v2\n    sourceRoutes:\n"
                                   "    - cidr: 10.0.0.0/8\n      backends: [{address: 10.9.9.9, "
                                   "port: 443}]\n    sniRoutes:")
    with pytest.raises(SpecError, match=r"listeners\[0\]\.proxyProtocol: proxyProtocol cannot"):
        parse_manifests(text)


def test_proxy_v2_header_bytes_ipv6() -> None:
    h = proxy_v2_header(("2001:db8::2", 40000), ("2001:db8:1::10", 443))
    assert h[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    assert h[12:16] == bytes([0x21, 0x21, 0, 36])
    assert h[16:32] == socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    assert h[32:48] == socket.inet_pton(socket.AF_INET6, "2001:db8:1::10")
    assert h[48:52] == (40000).to_bytes(2, "big") + (443).to_bytes(2, "big")
    assert len(h) == 52


def test_proxy_v2_header_bytes() -> None:
    h = proxy_v2_header(("10.10.1.2", 40000), ("192.0.2.10", 443))
    assert h[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    assert h[12:16] == bytes([0x21, 0x11, 0, 12])
    assert h[16:20] == socket.inet_aton("10.10.1.2") and h[20:24] == socket.inet_aton(
        "192.0.2.10")
    assert h[24:28] == (40000).to_bytes(2, "big") + (443).to_bytes(2, "big")
    assert len(h) == 28


def test_explain_names_the_backend_of_a_server_name() -> None:
    """`xdplb explain --sni NAME`: the backend the acceptor picks (tested against the
    acceptor and XDP in test_sni_agree)."""
    import subprocess
    from pathlib import Path

    xdplb = str(Path(sys.executable).parent / "xdplb")
    config = str(Path(__file__).resolve().parent.parent / "examples/sni.yaml")

    def run(*extra: str) -> str:
        r = subprocess.run([xdplb, "explain", "--config", config, "--src", "10.1.2.3:40000",
                            "--dst", "192.0.2.20:443", "--any-local", *extra],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "left to the SNI path" in run()
    out = run("--sni", "WWW.example.com")
    assert "route sni www.example.com" in out and "backend 10.0.2.21:443" in out, out
    assert "the SNI acceptor connects to it" in out
    out = run("--sni", "other.example.com")
    assert "route sni default" in out and "backend 10.0.2.10:443" in out, out
    assert "route sni default" in run("--sni", "")
