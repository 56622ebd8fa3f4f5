"""Reading, sweeping and flushing the conntrack map from user space."""

from __future__ import annotations

from dataclasses import dataclass

from xdplb.dataplane import layout as L
from xdplb.dataplane.bpfsys import BpfMap
from xdplb.dataplane.config import Timeouts


@dataclass(frozen=True)
class Flow:
    key: L.CtKey
    val: L.CtVal

    @property
    def proto(self) -> str:
        return L.PROTO_NAME.get(self.key.proto, str(self.key.proto))

    def state(self) -> str:
        f = self.val.flags
        if self.key.proto == 17:
            return "udp"
        if f & L.CT_RST:
            return "reset"
        if f & L.CT_FIN_FWD and f & L.CT_FIN_REV:
            return "closed"
        if f & (L.CT_FIN_FWD | L.CT_FIN_REV):
            return "closing"
        return "established" if f & L.CT_REPLIED else "syn-sent"

    def describe(self, now_ns: int) -> str:
        k, v = self.key, self.val
        via = (f" from {L.from_be32(v.snat_addr)}:{L.from_be16(v.snat_port)}"
               if v.flags & L.CT_SNAT else "")
        return (f"{self.proto} {L.from_be32(k.src)}:{L.from_be16(k.sport)} -> "
                f"{L.from_be32(k.dst)}:{L.from_be16(k.dport)} => "
                f"{L.from_be32(v.nat_addr)}:{L.from_be16(v.nat_port)}{via} {self.state()} "
                f"idle={(now_ns - v.last_ns) / 1e9:.1f}s "
                f"packets={v.packets[0]}/{v.packets[1]} bytes={v.bytes[0]}/{v.bytes[1]}")


def timeout_s(flow: Flow, t: Timeouts) -> int:
    """The data path's rule (bpf/conntrack.h), for the dir-0 entry."""
    f = flow.val.flags
    if flow.key.proto == 17:
        return t.udp
    if f & L.CT_RST or (f & L.CT_FIN_FWD and f & L.CT_FIN_REV):
        return t.tcp_closing
    if not f & L.CT_REPLIED:
        return t.tcp_unreplied
    return t.tcp_established


def read(ct: BpfMap) -> list[tuple[L.CtKey, L.CtVal]]:
    return [(L.CtKey.from_buffer_copy(k), L.CtVal.from_buffer_copy(v)) for k, v in ct.items()]


def flows(ct: BpfMap) -> list[Flow]:
    return [Flow(k, v) for k, v in read(ct) if k.dir == 0]


@dataclass
class Sweep:
    left: int       # entries left
    deleted: int
    # (rev_nat key, vip, vport) of every live flow without source NAT: the rev_nat
    # entries these flows may rely on (MapWriter.release_rev_nat)
    relied: set[tuple[bytes, int, int]]


def sweep(ct: BpfMap, t: Timeouts, limit: int = 100_000) -> Sweep:
    """Delete expired flows and orphaned reply entries."""
    now = L.ct_now_ns()
    entries = read(ct)
    live_fwd = {}
    relied_by: set[tuple[int, int, int, int, int]] = set()  # backend, port, proto, vip, vport
    doomed: list[bytes] = []
    for k, v in entries:
        if k.dir == 0:
            if now - v.last_ns > timeout_s(Flow(k, v), t) * 1_000_000_000:
                doomed.append(bytes(k))
            elif v.flags & L.CT_SNAT:  # its reply entry is keyed by the node's address
                live_fwd[(v.snat_addr, v.snat_port, k.proto, v.nat_addr, v.nat_port)] = True
            else:
                live_fwd[(k.src, k.sport, k.proto, v.nat_addr, v.nat_port)] = True
                relied_by.add((v.nat_addr, v.nat_port, k.proto, k.dst, k.dport))
    for k, v in entries:
        if k.dir == 1 and v.flags & L.CT_DIRECT:  # no forward entry: idle time decides
            if now - v.last_ns > t.tcp_established * 1_000_000_000:
                doomed.append(bytes(k))
        # A reply entry whose flow is gone or points elsewhere is an orphan.
        elif k.dir == 1 and (k.dst, k.dport, k.proto, k.src, k.sport) not in live_fwd:
            doomed.append(bytes(k))
    doomed = doomed[:limit]
    for i in range(0, len(doomed), 4096):
        _delete_some(ct, doomed[i:i + 4096])
    relied = {(bytes(L.RevNatKey(a, p, proto, 0)), vip, vport)
              for a, p, proto, vip, vport in relied_by}
    return Sweep(len(entries) - len(doomed), len(doomed), relied)


def _delete_some(ct: BpfMap, keys: list[bytes]) -> None:
    try:
        ct.delete_batch(keys)
    except OSError:
        # Another CPU's LRU eviction removed one first: delete one by one.
        for k in keys:
            try:
                ct.delete(k)
            except OSError:
                pass


def flush(ct: BpfMap) -> int:
    keys = [k for k, _v in ct.items()]
    for i in range(0, len(keys), 4096):
        _delete_some(ct, keys[i:i + 4096])
    return len(keys)
