"""Writes a plan into the data-plane maps as a diff.

The units are a listener entry, an LPM entry, an SNI entry, a port-filter word and a group
(its Maglev table and its record). Groups are immutable and shared by content:
a changed group is a new group whose table is written whole into free pool
slots before the one entry that refers to it is switched, so the data path
never sees a half-written table. Replaced groups are released one apply later,
after any packet still reading them has finished.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from xdplb.dataplane import layout as L
from xdplb.dataplane.alloc import CapacityError, IdAllocator, RegionAllocator
from xdplb.dataplane.config import Capacities
from xdplb.dataplane.entries import (
    Expansion,
    Inventory,
    backend_networks,
    expand,
    hairpin_listeners,
    translated_listeners,
)
from xdplb.plan.model import Group, Listener, Plan

log = logging.getLogger(__name__)


class MapLike(Protocol):
    syscalls: int
    value_size: int

    def update(self, key: bytes, value: bytes) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def update_batch(self, keys: list[bytes], values: list[bytes]) -> None: ...
    def items(self) -> list[tuple[bytes, bytes]]: ...


@dataclass(frozen=True)
class GroupSlot:
    id: int
    offset: int
    size: int


@dataclass
class ApplyResult:
    listeners: int = 0
    backends: int = 0
    routes: int = 0
    written: int = 0
    deleted: int = 0
    syscalls: int = 0
    ms: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"listeners={self.listeners} backends={self.backends} routes={self.routes} "
                f"entries_written={self.written} entries_deleted={self.deleted} "
                f"syscalls={self.syscalls} ms={self.ms:.1f}")


# A listener address and port as rev_nat holds them: struct addr bytes, port (network
# order, as the u16 the map holds).
VipPort = tuple[bytes, int]


def _rev_nat_val(bid: int, vips: dict[VipPort, int], vip: VipPort) -> bytes:
    return L.encode(L.RevNatVal(L.Addr.from_buffer_copy(vip[0]), vip[1], bid, vips[vip], 0))


def _pool_span(size: int) -> int:
    """The slots a table of ``size`` takes in the pool: whole elements (layout.h)."""
    return -(-size // L.POOL_IDS) * L.POOL_IDS


# Array maps, where an entry that goes is written as zeros.
ARRAYS = frozenset({"backends", "vip_bits"})


class MapWriter:
    def __init__(self, maps: Mapping[str, MapLike], caps: Capacities) -> None:
        self.maps = maps
        self.caps = caps
        self.listener_ids: dict[tuple[str | None, int, str], int] = {}
        self.backend_ids: dict[tuple[str, int], int] = {}
        self.groups: dict[Group, GroupSlot] = {}
        self.current: dict[str, dict[bytes, bytes]] = {
            name: {} for name in ("listeners", "src_routes", "sni_routes", "port_filter",
                                  "rev_nat", "backends", "backend_nets", "vips", "vip_bits")}
        self._lid_alloc = IdAllocator(caps.listeners, "listeners (--max-listeners)")
        self._bid_alloc = IdAllocator(caps.backends, "backends (--max-backends)")
        self._gid_alloc = IdAllocator(caps.groups, "groups (--max-groups)")
        self._pool = RegionAllocator(caps.table_slots)
        self._retired: list[GroupSlot] = []      # released at the next apply
        self._rev_next: dict[bytes, bytes | None] = {}  # see _rev_nat_entries
        self._port_filter_known = True
        self.plan = Plan()
        # id(listener) -> (listener, its id, its groups' ids, its LPM entries); see _route_entries
        self._routes_of: dict[int, tuple[Listener, int, tuple[int, ...], dict[bytes, bytes]]] = {}

    # -- adoption of maps pinned by an earlier agent --------------------------------------
    def adopt(self) -> int:
        """Take over pinned maps: what they hold stays live until the first
        apply has written its replacement beside it. Returns listener entries found."""
        found = self.maps["listeners"].items()
        self.current["listeners"] = dict(found)
        for _k, v in found:
            val = L.ListenerVal.from_buffer_copy(v)
            self._lid_alloc.reserve(val.id)
        self.current["src_routes"] = dict(self.maps["src_routes"].items())
        self.current["sni_routes"] = dict(self.maps["sni_routes"].items())
        self.current["rev_nat"] = dict(self.maps["rev_nat"].items())
        for name in ("backend_nets", "vips"):
            self.current[name] = dict(self.maps[name].items())
        for name in ARRAYS:
            self.current[name] = {k: v for k, v in self.maps[name].items() if any(v)}
        # The adopted tables name backends by id: the same backends keep their ids.
        for k, v in self.current["backends"].items():
            b, bid = L.BackendVal.from_buffer_copy(v), L.decode_u32(k)
            self._bid_alloc.reserve(bid)
            self.backend_ids[(L.from_ip(b.addr), L.from_be16(b.port))] = bid
        for k, v in self.maps["groups"].items():
            g = L.GroupVal.from_buffer_copy(v)
            if g.flags & L.GF_IN_USE:
                gid = L.decode_u32(k)
                self._gid_alloc.reserve(gid)
                self._pool.reserve(g.offset, _pool_span(g.size))
                self._retired.append(GroupSlot(gid, g.offset, g.size))
        self._port_filter_known = False
        return len(found)

    # -- apply --------------------------------------------------------------------------
    def apply(self, plan: Plan, inv: Inventory) -> ApplyResult:
        t0 = time.monotonic()
        sys0 = sum(m.syscalls for m in self.maps.values())
        res = ApplyResult()
        retired, self._retired = self._retired, []

        exp = expand(plan, inv)
        res.problems = exp.problems
        if len(exp.keys) > self.caps.listener_keys:
            raise CapacityError(f"{len(exp.keys)} listener entries exceed the capacity "
                                f"{self.caps.listener_keys} (--max-listener-keys)")

        lids = self._listener_ids(plan)
        live: dict[Group, GroupSlot] = {}
        for lst in plan.listeners:
            for g in lst.groups:
                if g not in live:
                    live[g] = self.groups.get(g) or self._write_group(g, res)

        hairpin = {id(lst) for lst in hairpin_listeners(plan, inv)}
        want_listeners: dict[bytes, bytes] = {}
        want_ports: dict[int, int] = {}
        for (ifindex, addr, port, proto), lst in exp.keys.items():
            flags = ((L.LF_SNI if lst.sni else 0)
                     | (L.LF_CLIENT_IP if lst.client_ip_affinity else 0)
                     | (L.LF_SRC_ROUTES if lst.source_routes else 0)
                     | (L.LF_SNAT if lst.source_nat else 0)
                     | (L.LF_HAIRPIN if id(lst) in hairpin else 0))
            val = L.ListenerVal(lids[lst.identity], live[lst.default].id, flags)
            want_listeners[L.listener_key(ifindex, addr, port, proto)] = L.encode(val)
            want_ports[port] = want_ports.get(port, 0) | L.pf_listener(L.PROTO[proto])
        want_routes: dict[bytes, bytes] = {}
        for lst in plan.listeners:
            want_routes.update(self._route_entries(lst, lids[lst.identity], live))
        if len(want_routes) > self.caps.source_routes:
            raise CapacityError(f"{len(want_routes)} source routes exceed the capacity "
                                f"{self.caps.source_routes} (--max-source-routes)")

        want_sni = self._sni_entries(plan, lids, live)
        translated = translated_listeners(plan, inv)
        nets = backend_networks(plan, inv)
        want_nets = {L.net_key(n): L.encode_u32(i) for n, i in nets.items()}
        want_backends = self._backend_entries(live, translated, inv, nets, res)
        want_vips, want_bits = _vip_entries(plan, inv)
        want_rev = self._rev_nat_entries(exp, lids)
        snat_bits = 0
        for lst in translated:
            snat_bits |= L.pf_snat(L.PROTO[lst.protocol])
        if snat_bits:  # backends' replies arrive at these ports of the node
            for port in range(self.caps.snat_port_min, self.caps.snat_port_max + 1):
                want_ports[port] = want_ports.get(port, 0) | snat_bits

        # What a listener refers to is written before the listener, and goes after it.
        stages = (("backends", want_backends), ("backend_nets", want_nets),
                  ("vips", want_vips), ("vip_bits", want_bits), ("src_routes", want_routes),
                  ("sni_routes", want_sni), ("rev_nat", want_rev))
        for name, want in stages:
            self._sync(name, want, res, delete=False)
        self._sync("listeners", want_listeners, res, delete=False)
        self._sync_ports(want_ports, res)
        self._sync("listeners", want_listeners, res, delete=True)
        for name, want in reversed(stages):
            self._sync(name, want, res, delete=True)

        for g, slot in list(self.groups.items()):
            if g not in live:
                self._retired.append(slot)
                del self.groups[g]
        self._release(retired, res)
        self._release_ids(plan, lids)
        live_listeners = {id(lst) for lst in plan.listeners}
        self._routes_of = {k: v for k, v in self._routes_of.items() if k in live_listeners}
        self.plan = plan

        res.listeners = len(plan.listeners)
        res.backends = len({(b.address, b.port) for g in live for b in g.backends})
        res.routes = len(want_routes)
        res.syscalls = sum(m.syscalls for m in self.maps.values()) - sys0
        res.ms = (time.monotonic() - t0) * 1000
        return res

    def _route_entries(self, lst: Listener, lid: int,
                       live: dict[Group, GroupSlot]) -> dict[bytes, bytes]:
        """The LPM entries of a listener's source routes, built again only when the
        listener, its id or the slots of its groups changed (a plan keeps the
        listeners of unchanged manifests)."""
        ids = tuple(live[g].id for g in lst.groups)
        known = self._routes_of.get(id(lst))
        if known is not None and known[0] is lst and known[1:3] == (lid, ids):
            return known[3]
        gid = {g: L.encode_u32(i) for g, i in zip(lst.groups, ids, strict=True)}
        entries = {L.lpm_key(lid, r.cidr): gid[r.group] for r in lst.source_routes}
        self._routes_of[id(lst)] = (lst, lid, ids, entries)
        return entries

    @staticmethod
    def _sni_entries(plan: Plan, lids: dict[tuple[str | None, int, str], int],
                     live: dict[Group, GroupSlot]) -> dict[bytes, bytes]:
        """Per SNI listener: its hostnames and, under the empty name, its default group.
        Keys are 64-bit hashes, so two names of one listener must not share one."""
        want: dict[bytes, bytes] = {}
        for lst in plan.listeners:
            if not lst.sni:
                continue
            names: dict[bytes, str] = {}
            for name, group in [("", lst.default),
                                *((r.hostname, r.group) for r in lst.sni_routes)]:
                key = L.sni_key(lids[lst.identity], name)
                if key in names:
                    raise CapacityError(f"{lst.label}: sniRoutes hostnames {names[key]!r} and "
                                        f"{name!r} have the same 64-bit hash; rename one")
                names[key] = name
                want[key] = L.encode_u32(live[group].id)
        if len(want) > L.MAX_SNI_ROUTES:
            raise CapacityError(f"{len(want)} SNI entries exceed the capacity "
                                f"{L.MAX_SNI_ROUTES}")
        return want

    def _backend_entries(self, live: dict[Group, GroupSlot], translated: list[Listener],
                         inv: Inventory, nets: dict[str, int],
                         res: ApplyResult) -> dict[bytes, bytes]:
        """Backend id -> where the backend is, whether a UDP flow may stay on it (in the
        plan, passing its checks), the node's address toward it (for source NAT) and the
        node's network it lies on (for hairpin)."""
        up = {(b.address, b.port) for g in live for b in g.backends if b.healthy}
        want: dict[bytes, bytes] = {}
        for g in live:
            for b in g.backends:
                route = inv.routes.get(b.address)
                src = L.ip(route[0]) if route is not None else L.Addr()
                address = ipaddress.ip_address(b.address)
                net = next((i for n, i in nets.items() if address in ipaddress.ip_network(n)), 0)
                flags = L.BF_LIVE if (b.address, b.port) in up else 0
                bid = self.backend_ids[(b.address, b.port)]
                want[L.encode_u32(bid)] = L.encode(L.BackendVal(
                    L.ip(b.address), L.be16(b.port), flags, src, net))
        for lst in translated:
            if lst.source_nat:
                res.problems += [f"{lst.label}: no route from this node to backend "
                                 f"{a}: its new flows are dropped"
                                 for a in sorted({b.address for b in lst.backends()})
                                 if a not in inv.routes]
        return want

    def _rev_nat_entries(self, exp: Expansion,
                         lids: dict[tuple[str | None, int, str], int]) -> dict[bytes, bytes]:
        """Backend endpoint -> a listener address it serves (see layout.h). The data path
        writes no reply entry for a flow to that address, so an entry keeps its address
        while flows may rely on it: an address the backend no longer serves (or a backend
        gone) stays until release_rev_nat() finds no live flow of it;
        `self._rev_next` holds what replaces it then (None: nothing)."""
        # backend key -> (backend id, {(vip, vport): listener id})
        serves: dict[bytes, tuple[int, dict[VipPort, int]]] = {}
        for (_ifindex, addr, port, proto), lst in exp.keys.items():
            if lst.source_nat:  # their replies arrive at the node, never at TC egress
                continue
            for b in lst.backends():
                key = L.encode(L.RevNatKey(L.ip(b.address), L.be16(b.port), L.PROTO[proto], 0))
                bid = self.backend_ids[(b.address, b.port)]
                serves.setdefault(key, (bid, {}))[1][(L.ip_bytes(addr), L.be16(port))] = \
                    lids[lst.identity]
        cur = self.current["rev_nat"]
        want: dict[bytes, bytes] = {}
        self._rev_next = {}
        for key, held in cur.items():
            if key not in serves:
                want[key] = held
                self._rev_next[key] = None
        room = 2 * self.caps.backends - len(cur)
        for key, (bid, vips) in serves.items():
            fresh = _rev_nat_val(bid, vips, min(vips))
            if key not in cur:
                if room > 0:  # else its flows get reply entries
                    want[key] = fresh
                    room -= 1
                continue
            named = L.RevNatVal.from_buffer_copy(cur[key])
            if (bytes(named.vip), named.vport) in vips:
                want[key] = _rev_nat_val(bid, vips, (bytes(named.vip), named.vport))
            else:
                want[key] = cur[key]
                self._rev_next[key] = fresh
        return want

    def release_rev_nat(self, relied: set[tuple[bytes, bytes, int]]) -> int:
        """Replace or delete the rev_nat entries kept for flows (see _rev_nat_entries)
        that no live flow relies on: ``relied`` holds (RevNatKey bytes, vip, vport) of
        every live flow without source NAT (conntrack.sweep). Returns entries changed."""
        done = 0
        cur = self.current["rev_nat"]
        for key, nxt in list(self._rev_next.items()):
            held = L.RevNatVal.from_buffer_copy(cur[key])
            if (key, bytes(held.vip), held.vport) in relied:
                continue
            if nxt is None:
                self.maps["rev_nat"].delete(key)
                del cur[key]
            else:
                self.maps["rev_nat"].update(key, nxt)
                cur[key] = nxt
            del self._rev_next[key]
            done += 1
        return done

    def _listener_ids(self, plan: Plan) -> dict[tuple[str | None, int, str], int]:
        for lst in plan.listeners:
            if lst.identity not in self.listener_ids:
                lid = self._lid_alloc.allocate()
                self._zero_stats("listener_stats", lid)
                self.listener_ids[lst.identity] = lid
        return self.listener_ids

    def _backend_id(self, address: str, port: int) -> int:
        key = (address, port)
        if key not in self.backend_ids:
            bid = self._bid_alloc.allocate()
            self._zero_stats("backend_stats", bid)
            self.backend_ids[key] = bid
        return self.backend_ids[key]

    def _write_group(self, g: Group, res: ApplyResult) -> GroupSlot:
        table = g.table
        gid = self._gid_alloc.allocate()
        offset = self._pool.allocate(_pool_span(len(table))) if table else 0
        ids = [self._backend_id(b.address, b.port) for b in g.backends]
        slots = [ids[i] for i in table]
        slots += [0] * (_pool_span(len(slots)) - len(slots))
        # POOL_IDS slots to an element (layout.h); offset is a multiple of POOL_IDS.
        elems = [struct.pack(f"={L.POOL_IDS}H", *slots[i:i + L.POOL_IDS])
                 for i in range(0, len(slots), L.POOL_IDS)]
        first = offset // L.POOL_IDS
        self.maps["pool"].update_batch([L.encode_u32(first + i) for i in range(len(elems))],
                                       elems)
        self.maps["groups"].update(L.encode_u32(gid),
                                   L.encode(L.GroupVal(offset, len(table), L.GF_IN_USE)))
        res.written += len(elems) + 1
        slot = GroupSlot(gid, offset, len(table))
        self.groups[g] = slot
        return slot

    def _sync(self, name: str, want: dict[bytes, bytes], res: ApplyResult, delete: bool) -> None:
        cur = self.current[name]
        if delete:
            zero = bytes(self.maps[name].value_size)
            for k in [k for k in cur if k not in want]:
                if name in ARRAYS:
                    self.maps[name].update(k, zero)
                else:
                    self.maps[name].delete(k)
                del cur[k]
                res.deleted += 1
            return
        changed = [(k, v) for k, v in want.items() if cur.get(k) != v]
        if not changed:
            return
        m = self.maps[name]
        if len(changed) > 1:
            try:  # one syscall for many entries where the map type allows it
                m.update_batch([k for k, _ in changed], [v for _, v in changed])
            except OSError:
                for k, v in changed:
                    m.update(k, v)
        else:
            m.update(*changed[0])
        cur.update(changed)
        res.written += len(changed)

    def _sync_ports(self, want: dict[int, int], res: ApplyResult) -> None:
        cur = self.current["port_filter"]
        if not self._port_filter_known:
            # After adoption the filter's content is unknown: rewrite all of it at once.
            keys = [L.encode_u32(p) for p in range(65536)]
            values = [L.encode_u32(want.get(p, 0)) for p in range(65536)]
            self.maps["port_filter"].update_batch(keys, values)
            self.current["port_filter"] = {k: v for k, v in zip(keys, values, strict=True)
                                           if v != L.encode_u32(0)}
            self._port_filter_known = True
            res.written += len(keys)
            return
        desired = {L.encode_u32(p): L.encode_u32(mask) for p, mask in want.items()}
        changed = [k for k in set(cur) | set(desired) if cur.get(k) != desired.get(k)]
        values = [desired.get(k, L.encode_u32(0)) for k in changed]
        if len(changed) > 1:
            self.maps["port_filter"].update_batch(changed, values)
        elif changed:
            self.maps["port_filter"].update(changed[0], values[0])
        self.current["port_filter"] = desired
        res.written += len(changed)

    def _release(self, slots: list[GroupSlot], res: ApplyResult) -> None:
        for s in slots:
            self.maps["groups"].update(L.encode_u32(s.id), L.encode(L.GroupVal(0, 0, 0)))
            self._gid_alloc.free(s.id)
            self._pool.free(s.offset, _pool_span(s.size))
            res.written += 1

    def _release_ids(self, plan: Plan, lids: dict[tuple[str | None, int, str], int]) -> None:
        live_ids = {lst.identity for lst in plan.listeners}
        for ident in [i for i in lids if i not in live_ids]:
            self._lid_alloc.free(lids.pop(ident))
        # A retired table may still name a freed id for one apply, but no listener
        # refers to it any more: the id is taken again no sooner than the next apply.
        used = {(b.address, b.port) for g in self.groups for b in g.backends}
        for key in [k for k in self.backend_ids if k not in used]:
            self._bid_alloc.free(self.backend_ids.pop(key))

    def _zero_stats(self, name: str, idx: int) -> None:
        m = self.maps[name]
        m.update(L.encode_u32(idx), bytes(m.value_size))


def _vip_entries(plan: Plan, inv: Inventory) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """The vips map and its vip_bits bitmap: every listener address that is no address
    of the node (see layout.h)."""
    own = {a for addrs in inv.addresses.values() for a in addrs}
    vips = {lst.address for lst in plan.listeners if lst.address and lst.address not in own}
    words: dict[int, int] = {}
    for a in vips:
        bit = L.vip_bit(L.addr_fold(a))
        words[bit // 32] = words.get(bit // 32, 0) | 1 << (bit % 32)
    return ({L.ip_bytes(a): L.encode_u32(1) for a in sorted(vips)},
            {L.encode_u32(w): L.encode_u32(v) for w, v in sorted(words.items())})
