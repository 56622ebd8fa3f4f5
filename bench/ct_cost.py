"""What the conntrack map itself costs a new flow, apart from the data path.

A minimal XDP program (bench/bpf/ct_ops.c) keyed and valued exactly like the
data path's conntrack (layout.h), run with BPF_PROG_TEST_RUN: every repetition
takes the next key of a per-CPU counter, so each is a new flow, and performs
OPS map operations: 1 = a lookup that misses (what every SYN does first),
2 = that lookup and the forward entry's insert (`ct`, LRU), 3 = both entries of a
flow: the reply entry goes into `ct_reply`, which never evicts, so the program
deletes the one made CAPACITY / 2 flows earlier, as the sweeper would (a steady
state at half full; that delete is counted). A program with no map operation is
the floor. The capacities: the data path's default (1,000,000 flows, each map)
beside a cache-sized 65,536.

    sudo .venv/bin/python bench/ct_cost.py [--rounds 5] [--repeat 1000000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt_stat, header, require_root, table

from xdplb.dataplane import bpfsys
from xdplb.dataplane.layout import BPF_DIR

SOURCE = Path(__file__).resolve().parent / "bpf" / "ct_ops.c"
OPS = {0: "floor (no map operation)", 1: "lookup (miss)", 2: "lookup + forward insert",
       3: "lookup + both inserts + a reply delete"}


def run_once(ops: int, capacity: int, repeat: int) -> int:
    from bcc import BPF

    b = BPF(src_file=str(SOURCE).encode(),
            cflags=[f"-I{BPF_DIR}", f"-DOPS={ops}", f"-DCAPACITY={capacity}"])
    try:
        fn = b.load_func(b"ct_ops", BPF.XDP)
        res = bpfsys.prog_test_run(fn.fd, bytes(64), repeat=repeat)
        counter = b[b"done"]
        done = sum(counter[0])  # per-CPU sum: one increment per repetition
        if done != repeat:
            raise SystemExit(f"ops={ops}: {done} of {repeat} repetitions counted")
        return res.duration_ns
    finally:
        b.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=None, help="unused (common flag)")
    a = ap.parse_args()
    require_root()
    capacities = (65_536, 1_000_000)
    ns: dict[tuple[int, int], list[float]] = {}
    for rnd in range(a.rounds):
        order = [(o, c) for c in capacities for o in OPS]
        for ops, cap in order if rnd % 2 == 0 else reversed(order):
            ns.setdefault((ops, cap), []).append(run_once(ops, cap, a.repeat))
        print(f"round {rnd + 1} done", file=sys.stderr)
    print(header("conntrack map cost per new flow (BPF_PROG_TEST_RUN)", "— (test run)",
                 [f"{a.rounds} rounds, {a.repeat:,} repetitions each, a new key every "
                  "repetition; ns = kernel's mean per repetition"]))
    rows = []
    for ops, what in OPS.items():
        row: list[object] = [what]
        for cap in capacities:
            base = ns[(0, cap)]
            row += [fmt_stat(ns[(ops, cap)], 0),
                    fmt_stat([x - f for x, f in zip(ns[(ops, cap)], base, strict=True)], 0)]
        rows.append(row)
    heads = ["operations"]
    for cap in capacities:
        heads += [f"ns, {cap:,} entries", "minus floor"]
    print()
    print(table(heads, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
