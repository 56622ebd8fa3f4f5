"""Reading, sweeping and flushing conntrack from user space, by the data path's own
rules (bpf/conntrack.h): a flow's forward entry in `ct`, its reply entry (if any) in
`ct_reply`."""

from __future__ import annotations

from dataclasses import dataclass

from xdplb.dataplane import layout as L
from xdplb.dataplane.bpfsys import BpfMap
from xdplb.dataplane.config import Timeouts
from xdplb.plan.model import hostport

SEC_NS = 1_000_000_000
UDP = 17


@dataclass(frozen=True)
class Flow:
    key: L.CtKey
    val: L.CtVal

    @property
    def proto(self) -> str:
        return L.PROTO_NAME.get(self.key.proto, str(self.key.proto))

    def state(self) -> str:
        f = self.val.flags
        if self.key.proto == UDP:
            return "udp"
        if f & L.CT_RST:
            return "reset"
        if f & L.CT_FIN_FWD and f & L.CT_FIN_REV:
            return "closed"
        if f & (L.CT_FIN_FWD | L.CT_FIN_REV):
            return "closing"
        if f & L.CT_ESTABLISHED:
            return "established"
        return "syn-received" if f & L.CT_REPLIED else "syn-sent"

    def describe(self, now_ns: int) -> str:
        k, v = self.key, self.val
        via = (f" from {endpoint(v.snat_addr, v.snat_port)}" if v.flags & L.CT_SNAT else "")
        return (f"{self.proto} {endpoint(k.src, k.sport)} -> {endpoint(k.dst, k.dport)} => "
                f"{endpoint(v.nat_addr, v.nat_port)}{via} {self.state()} "
                f"idle={(now_ns - v.last_ns) / 1e9:.1f}s "
                f"packets={v.packets[0]}/{v.packets[1]} bytes={v.bytes[0]}/{v.bytes[1]}")


def endpoint(addr: L.Addr, port: int) -> str:
    """address:port, an IPv6 address in brackets."""
    return hostport(L.from_ip(addr), L.from_be16(port))


def closing(v: L.CtVal) -> bool:
    return bool(v.flags & L.CT_RST) or (v.flags & (L.CT_FIN_FWD | L.CT_FIN_REV)
                                        == L.CT_FIN_FWD | L.CT_FIN_REV)


def timeout_s(v: L.CtVal, proto: int, t: Timeouts) -> int:
    """ct_timeout_ns: how long a forward entry may stay idle in its state."""
    if proto == UDP:
        return t.udp
    if closing(v):
        return t.tcp_closing
    if not v.flags & L.CT_ESTABLISHED:
        return t.tcp_unreplied
    return t.tcp_established


def max_timeout_s(proto: int, t: Timeouts) -> int:
    """ct_max_timeout_ns: what a reply entry whose forward entry is gone waits for."""
    return t.udp if proto == UDP else t.tcp_established


def idle_past(last_ns: int, timeout: int, now: int) -> bool:
    """ct_idle_past: a stamp ahead of now (another CPU's) is never expired."""
    return now > last_ns and now - last_ns > timeout * SEC_NS


def forward_key(rv: L.CtReplyVal, proto: int) -> L.CtKey:
    """ct_forward_key: the forward key of the flow a reply entry belongs to."""
    return L.CtKey(rv.client, rv.vip, rv.cport, rv.vport, proto)


def pairs(f: L.CtVal, rk: L.CtKey, rv: L.CtReplyVal) -> bool:
    """ct_pairs: whether forward entry f is the flow of reply entry (rk, rv)."""
    if bytes(f.nat_addr) != bytes(rk.src) or f.nat_port != rk.sport:
        return False
    if rv.flags & L.CT_SNAT:
        return (bool(f.flags & L.CT_SNAT) and bytes(f.snat_addr) == bytes(rk.dst)
                and f.snat_port == rk.dport)
    return bool(f.flags & L.CT_PAIRED)


def reply_dead(rk: L.CtKey, rv: L.CtReplyVal, f: L.CtVal | None, t: Timeouts, now: int) -> bool:
    """Whether a reply entry may go: its flow's forward entry has expired, or it is gone
    (evicted) and the reply entry has been idle for as long as any flow may be."""
    if f is not None and pairs(f, rk, rv):
        return idle_past(f.last_ns, timeout_s(f, rk.proto, t), now)
    return idle_past(rv.last_ns, max_timeout_s(rk.proto, t), now)


def read(ct: BpfMap) -> list[tuple[L.CtKey, L.CtVal]]:
    return [(L.CtKey.from_buffer_copy(k), L.CtVal.from_buffer_copy(v)) for k, v in ct.items()]


def read_replies(ct_reply: BpfMap) -> list[tuple[L.CtKey, L.CtReplyVal]]:
    return [(L.CtKey.from_buffer_copy(k), L.CtReplyVal.from_buffer_copy(v))
            for k, v in ct_reply.items()]


def flows(ct: BpfMap) -> list[Flow]:
    return [Flow(k, v) for k, v in read(ct)]


@dataclass
class Sweep:
    left: int       # entries left, both maps
    deleted: int
    # (rev_nat key, vip, vport) of every live flow that rev_nat finds from its replies:
    # the rev_nat entries these flows rely on (MapWriter.release_rev_nat)
    relied: set[tuple[bytes, bytes, int]]


def sweep(ct: BpfMap, ct_reply: BpfMap, t: Timeouts, limit: int = 100_000) -> Sweep:
    """Delete expired flows and the reply entries of flows that are gone.

    A batch read is no snapshot: a packet may refresh an entry after its batch was
    read, and a new flow's forward entry may be missing from the batches that saw its
    reply entry. So each entry is looked up again, and judged again, right before it
    is deleted; and a reply entry whose forward entry is missing goes only once it has
    been idle for as long as any flow may be, which also spares new ones."""
    now = L.ct_now_ns()
    fwd = {bytes(k): (k, v) for k, v in read(ct)}
    replies = read_replies(ct_reply)

    def fwd_dead(k: L.CtKey, v: L.CtVal, now: int) -> bool:
        return idle_past(v.last_ns, timeout_s(v, k.proto, t), now)

    def forward_of(rk: L.CtKey, rv: L.CtReplyVal) -> L.CtVal | None:
        found = fwd.get(bytes(forward_key(rv, rk.proto)))
        return found[1] if found else None

    doomed_fwd = [kb for kb, (k, v) in fwd.items() if fwd_dead(k, v, now)]
    doomed_rev = [rk for rk, rv in replies if reply_dead(rk, rv, forward_of(rk, rv), t, now)]
    deleted = 0
    # Reply entries first: judged again against their forward entries, still there.
    for rk in doomed_rev[:limit]:
        raw = ct_reply.lookup(bytes(rk))
        if raw is None:
            continue
        rv = L.CtReplyVal.from_buffer_copy(raw)
        f_raw = ct.lookup(bytes(forward_key(rv, rk.proto)))
        f = L.CtVal.from_buffer_copy(f_raw) if f_raw is not None else None
        if reply_dead(rk, rv, f, t, L.ct_now_ns()):
            deleted += _delete(ct_reply, bytes(rk))
    for kb in doomed_fwd[:limit]:
        raw = ct.lookup(kb)
        if raw is not None and fwd_dead(fwd[kb][0], L.CtVal.from_buffer_copy(raw),
                                        L.ct_now_ns()):
            deleted += _delete(ct, kb)
    gone = set(doomed_fwd)
    relied = {(bytes(L.RevNatKey(v.nat_addr, v.nat_port, k.proto, 0)), bytes(k.dst), k.dport)
              for kb, (k, v) in fwd.items()
              if kb not in gone and not v.flags & (L.CT_SNAT | L.CT_PAIRED)}
    return Sweep(len(fwd) + len(replies) - deleted, deleted, relied)


def _delete(m: BpfMap, key: bytes) -> int:
    try:
        m.delete(key)
    except OSError:  # gone meanwhile (an LRU eviction, the data path)
        return 0
    return 1


def flush(ct: BpfMap, ct_reply: BpfMap) -> int:
    """Delete every entry of both maps; returns how many."""
    n = 0
    for m in (ct, ct_reply):
        keys = [k for k, _v in m.items()]
        for i in range(0, len(keys), 4096):
            chunk = keys[i:i + 4096]
            try:
                m.delete_batch(chunk)
            except OSError:  # one went meanwhile: one by one
                for k in chunk:
                    _delete(m, k)
        n += len(keys)
    return n
