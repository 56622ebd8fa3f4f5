"""Writes a plan into the data-plane maps as a diff.

The units are a listener entry, an LPM entry, a port-filter word and a group
(its Maglev table and its record). Groups are immutable and shared by content:
a changed group is a new group whose table is written whole into free pool
slots before the one entry that refers to it is switched, so the data path
never sees a half-written table. Replaced groups are released one apply later,
after any packet still reading them has finished.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from xdplb.dataplane import layout as L
from xdplb.dataplane.alloc import CapacityError, IdAllocator, RegionAllocator
from xdplb.dataplane.config import Capacities
from xdplb.dataplane.entries import Inventory, expand
from xdplb.plan.model import Group, Plan

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


def _bytes(obj: ctypes._CData) -> bytes:
    return bytes(memoryview(obj).cast("B"))  # type: ignore[arg-type]


def _u32(v: int) -> bytes:
    return int(v).to_bytes(4, "little")


def listener_key(ifindex: int, address: str, port: int, protocol: str) -> bytes:
    return _bytes(L.ListenerKey(ifindex, L.be32(address), L.be16(port), L.PROTO[protocol], 0))


def lpm_key(listener_id: int, cidr: str) -> bytes:
    addr, _, plen = cidr.partition("/")
    return _bytes(L.LpmKey(32 + int(plen), L.be32_int(listener_id), L.be32(addr)))


class MapWriter:
    def __init__(self, maps: Mapping[str, MapLike], caps: Capacities) -> None:
        self.maps = maps
        self.caps = caps
        self.listener_ids: dict[tuple[str | None, int, str], int] = {}
        self.backend_ids: dict[tuple[str, int], int] = {}
        self.groups: dict[Group, GroupSlot] = {}
        self.current: dict[str, dict[bytes, bytes]] = {"listeners": {}, "src_routes": {},
                                                       "port_filter": {}}
        self._lid_alloc = IdAllocator(caps.listeners, "listeners (--max-listeners)")
        self._bid_alloc = IdAllocator(caps.backends, "backends (--max-backends)")
        self._gid_alloc = IdAllocator(caps.groups, "groups (--max-groups)")
        self._pool = RegionAllocator(caps.table_slots)
        self._retired: list[GroupSlot] = []      # released at the next apply
        self._port_filter_known = True
        self.plan = Plan()

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
        for k, v in self.maps["groups"].items():
            g = L.GroupVal.from_buffer_copy(v)
            if g.flags & L.GF_IN_USE:
                gid = int.from_bytes(k, "little")
                self._gid_alloc.reserve(gid)
                self._pool.reserve(g.offset, g.size)
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
            for g in [lst.default, *(r.group for r in lst.source_routes)]:
                if g not in live:
                    live[g] = self.groups.get(g) or self._write_group(g, res)

        want_listeners: dict[bytes, bytes] = {}
        want_ports: dict[int, int] = {}
        for (ifindex, addr, port, proto), lst in exp.keys.items():
            flags = ((L.LF_SNI if lst.sni else 0)
                     | (L.LF_CLIENT_IP if lst.client_ip_affinity else 0)
                     | (L.LF_SRC_ROUTES if lst.source_routes else 0))
            val = L.ListenerVal(lids[lst.identity], live[lst.default].id, flags)
            want_listeners[listener_key(ifindex, addr, port, proto)] = _bytes(val)
            want_ports[port] = want_ports.get(port, 0) | (1 << L.PROTO[proto])
        want_routes = {lpm_key(lids[lst.identity], r.cidr): _u32(live[r.group].id)
                       for lst in plan.listeners for r in lst.source_routes}
        if len(want_routes) > self.caps.source_routes:
            raise CapacityError(f"{len(want_routes)} source routes exceed the capacity "
                                f"{self.caps.source_routes} (--max-source-routes)")

        self._sync("src_routes", want_routes, res, delete=False)
        self._sync("listeners", want_listeners, res, delete=False)
        self._sync_ports(want_ports, res)
        self._sync("listeners", want_listeners, res, delete=True)
        self._sync("src_routes", want_routes, res, delete=True)

        for g, slot in list(self.groups.items()):
            if g not in live:
                self._retired.append(slot)
                del self.groups[g]
        self._release(retired, res)
        self._release_ids(plan, lids)
        self.plan = plan

        res.listeners = len(plan.listeners)
        res.backends = len({(b.address, b.port) for g in live for b in g.backends})
        res.routes = len(want_routes)
        res.syscalls = sum(m.syscalls for m in self.maps.values()) - sys0
        res.ms = (time.monotonic() - t0) * 1000
        return res

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
        offset = self._pool.allocate(len(table)) if table else 0
        slots = [_bytes(L.BackendSlot(L.be32(g.backends[i].address), L.be16(g.backends[i].port),
                                      self._backend_id(g.backends[i].address,
                                                       g.backends[i].port)))
                 for i in table]
        self.maps["pool"].update_batch([_u32(offset + i) for i in range(len(slots))], slots)
        self.maps["groups"].update(_u32(gid), _bytes(L.GroupVal(offset, len(table), L.GF_IN_USE)))
        res.written += len(slots) + 1
        slot = GroupSlot(gid, offset, len(table))
        self.groups[g] = slot
        return slot

    def _sync(self, name: str, want: dict[bytes, bytes], res: ApplyResult, delete: bool) -> None:
        cur = self.current[name]
        m = self.maps[name]
        if delete:
            for k in [k for k in cur if k not in want]:
                m.delete(k)
                del cur[k]
                res.deleted += 1
            return
        changed = [(k, v) for k, v in want.items() if cur.get(k) != v]
        if len(changed) > 1:
            try:  # one syscall for many entries where the map type allows it
                m.update_batch([k for k, _ in changed], [v for _, v in changed])
            except OSError:
                for k, v in changed:
                    m.update(k, v)
        elif changed:
            m.update(*changed[0])
        cur.update(changed)
        res.written += len(changed)

    def _sync_ports(self, want: dict[int, int], res: ApplyResult) -> None:
        cur = self.current["port_filter"]
        if not self._port_filter_known:
            # After adoption the filter's content is unknown: rewrite all of it at once.
            keys = [_u32(p) for p in range(65536)]
            values = [_u32(want.get(p, 0)) for p in range(65536)]
            self.maps["port_filter"].update_batch(keys, values)
            self.current["port_filter"] = {k: v for k, v in zip(keys, values, strict=True)
                                           if v != _u32(0)}
            self._port_filter_known = True
            res.written += len(keys)
            return
        desired = {_u32(p): _u32(mask) for p, mask in want.items()}
        changed = [k for k in set(cur) | set(desired) if cur.get(k) != desired.get(k)]
        for k in changed:
            v = desired.get(k, _u32(0))
            self.maps["port_filter"].update(k, v)
            if k in desired:
                cur[k] = v
            else:
                cur.pop(k, None)
            res.written += 1

    def _release(self, slots: list[GroupSlot], res: ApplyResult) -> None:
        for s in slots:
            self.maps["groups"].update(_u32(s.id), _bytes(L.GroupVal(0, 0, 0)))
            self._gid_alloc.free(s.id)
            self._pool.free(s.offset, s.size)
            res.written += 1

    def _release_ids(self, plan: Plan, lids: dict[tuple[str | None, int, str], int]) -> None:
        live_ids = {lst.identity for lst in plan.listeners}
        for ident in [i for i in lids if i not in live_ids]:
            self._lid_alloc.free(lids.pop(ident))
        # A retired table may still name a freed id for one apply: only its
        # counters could be misattributed, never a packet.
        used = {(b.address, b.port) for g in self.groups for b in g.backends}
        for key in [k for k in self.backend_ids if k not in used]:
            self._bid_alloc.free(self.backend_ids.pop(key))

    def _zero_stats(self, name: str, idx: int) -> None:
        m = self.maps[name]
        m.update(_u32(idx), bytes(m.value_size))
