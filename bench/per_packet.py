"""Per-packet cost of the XDP data path, measured with BPF_PROG_TEST_RUN.

Four packets, each timed through the real program (loaded by DataPlane) and
through a parse-only floor program, both behind the same wrapper
(bench/bpf/restore.c) that restores the original frame before every
repetition and, for SYNs, gives every repetition a new source address/port so
that each one creates a new flow. The data path's per-path counters prove
that every repetition took the path measured.

    sudo .venv/bin/python bench/per_packet.py [--rounds 5] [--repeat 1000000]
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PIN_BASE,
    fmt_stat,
    header,
    median,
    mount_bpffs,
    require_root,
    table,
)

FRAME_LEN = 96  # an IPv6 SYN is 74 bytes
XDP_DROP, XDP_PASS = 1, 2
VIP = "192.0.2.10"
VIP6 = "2001:db8::10"
BACKENDS = ("10.20.1.2", "10.20.2.2", "10.20.3.2", "2001:db8:20::2", "2001:db8:21::2")
TCPF_SYN, TCPF_ACK = 0x02, 0x10

MANIFEST = """\
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: bench, namespace: default}}
spec:
  interfaces: [lo]
  listeners:
  - name: tcp
    protocol: TCP
    port: 80
    address: {vip}
    backends:
    - {{address: 10.20.1.2, port: 8080}}
    - {{address: 10.20.2.2, port: 8080}}
  - name: src
    protocol: TCP
    port: 81
    address: {vip}
    backends:
    - {{address: 10.20.1.2, port: 8080}}
    - {{address: 10.20.2.2, port: 8080}}
    sourceRoutes:
    - cidr: 10.30.0.0/16
      backends: [{{address: 10.20.3.2, port: 8080}}]
{filler}  - name: snat
    protocol: TCP
    port: 82
    address: {vip}
    sourceNAT: Node
    backends:
    - {{address: 10.20.1.2, port: 8080}}
    - {{address: 10.20.2.2, port: 8080}}
  - name: tcp6
    protocol: TCP
    port: 80
    address: {vip6}
    backends:
    - {{address: 2001:db8:20::2, port: 8080}}
    - {{address: 2001:db8:21::2, port: 8080}}
"""
# Where source NAT sends from (the Inventory's routes; no real route is needed here).
SNAT_SOURCES = {"10.20.1.2": "10.20.1.1", "10.20.2.2": "10.20.2.1"}
# A new source-NAT flow takes one of the 32,768 ports per (node address, backend),
# probing up to 32 ports in a row from a random start: the SYN case fills a third of
# them (at 61 %, 2 flows of 20,000 once found no free port).
SNAT_NEW_FLOWS = 10_000


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_frame(src: str, sport: int, dst: str, dport: int, flags: int,
              payload: bytes = b"") -> bytes:
    """Ethernet + IPv4 (no options) + TCP with valid checksums, padded to FRAME_LEN."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000 if flags & TCPF_ACK else 0,
                      5 << 4, flags, 65535, 0, 0) + payload
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64,
                     socket.IPPROTO_TCP, 0, s, d)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    eth = bytes.fromhex("020000000001" "020000000002") + struct.pack("!H", 0x0800)
    frame = eth + ip + tcp
    assert len(frame) <= FRAME_LEN
    return frame.ljust(FRAME_LEN, b"\0")


def tcp6_frame(src: str, sport: int, dst: str, dport: int, flags: int,
               payload: bytes = b"") -> bytes:
    """Ethernet + IPv6 (no extension header) + TCP with a valid checksum, padded."""
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000 if flags & TCPF_ACK else 0,
                      5 << 4, flags, 65535, 0, 0) + payload
    pseudo = s + d + struct.pack("!IxxxB", len(tcp), socket.IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64, s, d)
    eth = bytes.fromhex("020000000001" "020000000002") + struct.pack("!H", 0x86DD)
    frame = eth + ip + tcp
    assert len(frame) <= FRAME_LEN
    return frame.ljust(FRAME_LEN, b"\0")


def dst_of(frame: bytes) -> str:
    """The destination address of an IPv4 or IPv6 frame."""
    if frame[12:14] == b"\x86\xdd":
        return socket.inet_ntop(socket.AF_INET6, frame[38:54])
    return socket.inet_ntoa(frame[30:34])


def src_of(frame: bytes) -> str:
    if frame[12:14] == b"\x86\xdd":
        return socket.inet_ntop(socket.AF_INET6, frame[22:38])
    return socket.inet_ntoa(frame[26:30])


@dataclass
class Case:
    name: str
    frame: bytes
    stat: str           # layout.Stat member every repetition must count
    vary: str           # a new flow per repetition: "v4" or "v6" (its family); "": no
    goal_ns: float | None
    snat: bool = False  # the output must leave from the node's address
    max_repeat: int | None = None
    entries: int = 1    # conntrack entries a new flow writes
    verdict: int = XDP_PASS


def build_cases() -> list[Case]:
    return [
        Case("non-matching (TCP to another address)",
             tcp_frame("10.10.1.2", 40000, "10.99.0.1", 22, TCPF_ACK), "NOMATCH", "",
             None),
        Case("to a VIP's closed port (TCP to :22)",
             tcp_frame("10.10.1.2", 40000, VIP, 22, TCPF_ACK), "VIP_CLOSED", "", None,
             verdict=XDP_DROP),
        Case("established segment (ACK, 10 B)",
             tcp_frame("10.10.1.2", 40000, VIP, 80, TCPF_ACK, b"0123456789"),
             "ESTABLISHED", "", 60),
        Case("established segment, IPv6 (ACK, 10 B)",
             tcp6_frame("2001:db8:1::2", 40000, VIP6, 80, TCPF_ACK, b"0123456789"),
             "ESTABLISHED", "", None),
        Case("SYN, new flow (default group)",
             tcp_frame("10.40.0.1", 0, VIP, 80, TCPF_SYN), "NEW_DEFAULT", "v4", 200),
        Case("SYN, new flow, IPv6 (default group)",
             tcp6_frame("2001:db8:40::1", 0, VIP6, 80, TCPF_SYN), "NEW_DEFAULT", "v6", None),
        Case("SYN, new flow (source-CIDR route)",
             tcp_frame("10.30.0.1", 0, VIP, 81, TCPF_SYN), "NEW_SRC_ROUTE", "v4", 200),
        # Backends 1 and 2 serve :80 and :81; rev_nat names :80, so a flow to :81 on
        # them also writes a reply entry.
        Case("SYN, new flow with a reply entry",
             tcp_frame("10.40.0.1", 0, VIP, 81, TCPF_SYN), "NEW_DEFAULT", "v4", None,
             entries=2),
        Case("established segment, source NAT",
             tcp_frame("10.10.1.2", 40000, VIP, 82, TCPF_ACK, b"0123456789"),
             "ESTABLISHED", "", 80, snat=True),
        Case("SYN, new flow, source NAT",
             tcp_frame("10.40.0.1", 0, VIP, 82, TCPF_SYN), "NEW_DEFAULT", "v4", None,
             snat=True, max_repeat=SNAT_NEW_FLOWS, entries=2),
    ]


def in_order(cases: list[Case], rnd: int) -> list[Case]:
    """Every other round runs each IPv6 case before its IPv4 twin (the case before it):
    a new-flow case meets the conntrack map as the one before left it (its LRU lists,
    the flush of a million entries), which must not favour one family."""
    if rnd % 2 == 0:
        return cases
    out = list(cases)
    for i, c in enumerate(cases):
        if "IPv6" in c.name and i > 0:
            out[i - 1], out[i] = c, cases[i - 1]
    return out


class Bench:
    def __init__(self, pin_root: str, filler_routes: int) -> None:
        from bcc import BPF

        from xdplb.dataplane.entries import Inventory
        from xdplb.dataplane.layout import BPF_DIR
        from xdplb.dataplane.loader import DataPlane, load_xdp_frags
        from xdplb.dataplane.writer import MapWriter
        from xdplb.plan.planner import build_plan
        from xdplb.spec.load import parse_manifests

        self.ifindex = socket.if_nametoindex("lo")
        self.dp = DataPlane(pin_root)
        self.dp.load()
        filler = "".join(f"    - cidr: 172.{16 + i // 256}.{i % 256}.0/24\n"
                         f"      backends: [{{address: 10.20.3.2, port: 8080}}]\n"
                         for i in range(filler_routes))
        lbs = parse_manifests(MANIFEST.format(vip=VIP, vip6=VIP6, filler=filler), "per_packet")
        inv = Inventory(ifindex={"lo": self.ifindex}, addresses={"lo": ("127.0.0.1",)},
                        default_interface="lo",
                        routes={b: (src, "lo") for b, src in SNAT_SOURCES.items()})
        res = MapWriter(self.dp.maps, self.dp.caps).apply(build_plan(lbs), inv)
        self.apply_summary = res.summary()
        src = str(Path(__file__).resolve().parent / "bpf" / "restore.c")
        base = [f"-I{BPF_DIR}", f"-DFRAME_LEN={FRAME_LEN}"]
        self.wrappers = {"": BPF(src_file=src, cflags=base),
                         "v4": BPF(src_file=src, cflags=[*base, "-DVARY"]),
                         "v6": BPF(src_file=src, cflags=[*base, "-DVARY6"])}
        # Tail calls need caller and callee alike multi-buffer aware, as xdplb is.
        self.restore_fd = {v: load_xdp_frags(w, "restore").fd
                           for v, w in self.wrappers.items()}
        self.floor_fd = load_xdp_frags(self.wrappers[""], "parse_floor").fd
        # xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        self.ctx = struct.pack("=6I", 0, FRAME_LEN, 0, self.ifindex, 0, 0)

    def close(self) -> None:
        for w in self.wrappers.values():
            w.cleanup()
        self.dp.close()

    def stats(self) -> dict[str, int]:
        from xdplb.agent.metrics import percpu_sum
        from xdplb.dataplane.layout import Stat

        m = self.dp.maps["stats"]
        out = {}
        for st in Stat:
            raw = m.lookup(int(st).to_bytes(4, "little"))
            out[st.name] = percpu_sum(raw, 1)[0] if raw else 0
        return out

    def ct_entries(self) -> int:
        """Forward and reply entries."""
        return sum(len(self.dp.maps[m].keys()) for m in ("ct", "ct_reply"))

    def flush_ct(self) -> None:
        from xdplb.dataplane import conntrack

        conntrack.flush(self.dp.maps["ct"], self.dp.maps["ct_reply"])

    def set_target(self, vary: str, fd: int, frame: bytes) -> None:
        w = self.wrappers[vary]
        t = w["frame"]
        t[t.Key(0)] = t.Leaf.from_buffer_copy(frame)
        w["progs"][ctypes.c_int(0)] = ctypes.c_int(fd)

    def run(self, case: Case, fd: int,
            repeat: int) -> tuple[float, dict[str, int], bytes, int, bool]:
        """ns per run, counter deltas, and the last run's frame (without the metadata it
        put in front), verdict, and whether it left the rewrite to TC."""
        from xdplb.dataplane import bpfsys

        self.set_target(case.vary, fd, case.frame)
        before = self.stats()
        r = bpfsys.prog_test_run(self.restore_fd[case.vary], case.frame, repeat, self.ctx)
        after = self.stats()
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        meta_len = struct.unpack_from("=I", r.ctx)[0]  # xdp_md.data, from data_meta
        return float(r.duration_ns), delta, r.data[meta_len:], r.retval, meta_len > 0

    def prepare(self, case: Case) -> None:
        """Established: make sure the flow exists (a SYN through the real program)."""
        from xdplb.dataplane import bpfsys

        if case.vary or case.stat == "ESTABLISHED":
            # Every repetition must find no entry for its flow; an established flow needs
            # room for its entries (a million new flows before may have filled ct_reply).
            self.flush_ct()
        if case.stat == "ESTABLISHED":
            syn = bytearray(case.frame)
            flags_at = 67 if syn[12:14] == b"\x86\xdd" else 47  # behind IPv6's / IPv4's header
            syn[flags_at] = TCPF_SYN  # the checksum is not checked by the data path
            bpfsys.prog_test_run(self.dp.xdp_fn.fd, bytes(syn), 1, self.ctx)


def jit_state() -> str:
    try:
        v = Path("/proc/sys/net/core/bpf_jit_enable").read_text().strip()
    except OSError:
        return "unknown"
    return {"0": "off", "1": "on", "2": "on (debug)"}.get(v, v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--filler-routes", type=int, default=1000,
                    help="extra /24 source routes in the LPM trie (172.16.0.0/12)")
    ap.add_argument("--seconds", type=float, default=None, help="unused (common flag)")
    a = ap.parse_args()
    require_root()
    mount_bpffs()
    pin_root = f"{PIN_BASE}/per_packet"
    shutil.rmtree(pin_root, ignore_errors=True)
    cases = build_cases()
    b = Bench(pin_root, a.filler_routes)
    failures: list[str] = []
    floor: dict[str, list[float]] = {c.name: [] for c in cases}
    prog: dict[str, list[float]] = {c.name: [] for c in cases}
    added: dict[str, list[float]] = {c.name: [] for c in cases}
    ct_fill: dict[str, list[float]] = {}  # case -> conntrack entries per new flow
    deferred_total = {c.name: 0 for c in cases}
    try:
        b.flush_ct()
        for rnd in range(a.rounds):
            for c in in_order(cases, rnd):
                order = ("floor", "xdplb") if rnd % 2 == 0 else ("xdplb", "floor")
                got = {}
                repeat = min(a.repeat, c.max_repeat or a.repeat)
                for which in order:
                    if which == "xdplb":
                        b.prepare(c)
                    fd = b.floor_fd if which == "floor" else b.dp.xdp_fn.fd
                    ns, delta, out, retval, left_to_tc = b.run(c, fd, repeat)
                    got[which] = ns
                    if which == "xdplb":
                        # A full checksum equal to the pseudo-header sum (1 in 65,536 of
                        # the varied frames) is taken for partial: same path, rewrite
                        # left to TC.
                        deferred = delta.pop("CSUM_DEFERRED", 0)
                        deferred_total[c.name] += deferred
                        if delta != {c.stat: repeat} or deferred > repeat // 1000:
                            failures.append(f"round {rnd + 1} {c.name}: counter deltas {delta},"
                                            f" expected {{{c.stat!r}: {repeat}}}")
                        if retval != c.verdict:
                            failures.append(f"round {rnd + 1} {c.name}: verdict {retval}")
                        dst = dst_of(out)
                        translated = c.stat.startswith("NEW") or c.stat == "ESTABLISHED"
                        if translated and dst not in BACKENDS and not left_to_tc:
                            failures.append(f"round {rnd + 1} {c.name}: not DNATed ({dst})")
                        src = src_of(out)
                        if c.snat and not left_to_tc and src != SNAT_SOURCES.get(dst):
                            failures.append(f"round {rnd + 1} {c.name}: not source-NATed "
                                            f"({src} -> {dst})")
                        if c.vary:
                            # The LRU map may evict a few once it nears its capacity.
                            n = b.ct_entries()
                            cap = 2 * b.dp.caps.conntrack
                            want = c.entries * repeat
                            if not min(want, cap) - cap // 1000 <= n <= want:
                                failures.append(f"round {rnd + 1} {c.name}: {n} conntrack "
                                                f"entries, expected {want}")
                            ct_fill.setdefault(c.name, []).append(n / repeat)
                    elif delta:
                        failures.append(f"round {rnd + 1} {c.name}: floor moved counters")
                floor[c.name].append(got["floor"])
                prog[c.name].append(got["xdplb"])
                added[c.name].append(got["xdplb"] - got["floor"])
    finally:
        b.close()
        shutil.rmtree(pin_root, ignore_errors=True)

    print(header("xdplb per-packet cost (BPF_PROG_TEST_RUN)",
                 "none attached (programs run by BPF_PROG_TEST_RUN)",
                 [f"repeat {a.repeat:,} per run, {a.rounds} rounds (floor/xdplb order "
                  f"alternated), frame {FRAME_LEN} B, ingress ifindex {b.ifindex} (lo)",
                  f"maps: {b.apply_summary}",
                  f"BPF JIT: {jit_state()}",
                  "ns/packet = kernel's mean per repetition, wrapper (frame restore + "
                  "tail call) included on both sides"]))
    rows = []
    for c in cases:
        med = median(added[c.name])
        if c.goal_ns is None:
            goal, verdict = "—", ""
        else:
            goal = f"floor + {c.goal_ns:.0f}"
            verdict = "met" if med <= c.goal_ns else "NOT met"
        rows.append([c.name, c.stat, fmt_stat(floor[c.name]), fmt_stat(prog[c.name]),
                     fmt_stat(added[c.name]), goal, verdict])
    print()
    print(table(["packet", "path counted", "floor ns", "xdplb ns", "xdplb - floor ns",
                 "goal", ""], rows))
    print()
    # IPv6 against IPv4 on the same path, round by round (each round ran both).
    pairs = [("established segment, IPv6 (ACK, 10 B)", "established segment (ACK, 10 B)", 15),
             ("SYN, new flow, IPv6 (default group)", "SYN, new flow (default group)", 40)]
    v6rows = []
    for v6, v4, goal in pairs:
        if v6 in added and v4 in added:
            diff = [a - b for a, b in zip(added[v6], added[v4], strict=True)]
            v6rows.append([v6, fmt_stat(diff), f"≤ {goal}",
                           "met" if median(diff) <= goal else "NOT met"])
    if v6rows:
        print(table(["IPv6 case", "IPv6 - IPv4 ns (per round)", "goal", ""], v6rows))
        print()
    if failures:
        print("PATH CHECK FAILED:")
        for f in failures:
            print("  " + f)
        return 1
    cap = 2 * b.dp.caps.conntrack
    fill = "; ".join(f"{name}: {min(v):.4f}–{max(v):.4f}" for name, v in ct_fill.items())
    print(f"path check: every timed repetition counted on its path (counter delta == "
          f"{a.repeat:,}, no other counter moved); DNAT seen in the output; conntrack "
          f"entries per new flow ({fill}; map capacity {cap:,}, so fewer is LRU eviction)")
    left = ", ".join(f"{name}: {n}" for name, n in deferred_total.items() if n)
    if left:
        print(f"rewrites left to TC (a complete checksum that looks partial, 1 in 65,536): "
              f"{left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
