"""Consistent, weighted backend selection: a Maglev lookup table per group.

Every node and every restart builds the same table for the same backends:
the permutation of each backend comes from a keyed BLAKE2 hash of its address
and port (never Python's hash()), and backends are taken in a canonical order.
Weights are relative: a backend's share of the table is its share of the sum
of weights, and weight 0 gets no slot (no new flows).

Every group of more than one backend has a table of the same prime size,
TABLE_SIZE = 16,381 (Cilium's default); a one-backend group has one slot. A
backend's permutation depends on the table size, so a size that followed the
backend count would change every permutation when a group crosses a size step
(16 -> 17 backends, say) and move nearly all flows. With one size, adding or
removing a backend, or its weight going to 0 (draining, failing health checks)
and back, moves little more than the flows that must move. The size does not
depend on how many backends have weight 0, only on whether the group has one
backend or more.

The cost is pool slots (--table-slots): 16,381 per group of more than one
backend however few backends it has, so the default 4,194,304 slots hold 256
such tables, counting a changed group's new table until the next apply
releases its old one. Quotas round to whole slots: a backend's share is
its weight's share to within about one slot (1/16,381 of the flows), and a
positive weight always gets at least one slot.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol

TABLE_SIZE = 16381  # prime
_KEY = b"xdplb-maglev-v1"


class Weighted(Protocol):
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def weight(self) -> int: ...


def _permutation(address: str, port: int, m: int) -> tuple[int, int]:
    digest = hashlib.blake2b(f"{address}:{port}".encode(), digest_size=8, key=_KEY).digest()
    h1 = int.from_bytes(digest[:4], "big")
    h2 = int.from_bytes(digest[4:], "big")
    return h1 % m, h2 % (m - 1) + 1


def _quotas(weights: Sequence[int], m: int) -> list[int]:
    """Split m slots in proportion to weights (largest remainder); every
    positive weight gets at least one slot."""
    total = sum(weights)
    exact = [m * w / total for w in weights]
    quotas = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (quotas[i] - exact[i], i))
    for i in order[: m - sum(quotas)]:
        quotas[i] += 1
    for i, w in enumerate(weights):
        if w > 0 and quotas[i] == 0:
            donor = max(range(len(quotas)), key=lambda j: (quotas[j], -j))
            quotas[donor] -= 1
            quotas[i] = 1
    return quotas


def build_table(backends: Sequence[Weighted]) -> tuple[int, ...]:
    """Slot -> index into `backends`. Empty when no backend has weight > 0."""
    eligible = [i for i, b in enumerate(backends) if b.weight > 0]
    if not eligible:
        return ()
    if len(backends) == 1:
        return (0,)
    m = TABLE_SIZE
    quotas = _quotas([backends[i].weight for i in eligible], m)
    perms = [_permutation(backends[i].address, backends[i].port, m) for i in eligible]
    nexts = [0] * len(eligible)
    table = [-1] * m
    filled = 0
    while filled < m:
        for k, i in enumerate(eligible):
            if quotas[k] == 0:
                continue
            offset, skip = perms[k]
            slot = (offset + nexts[k] * skip) % m
            while table[slot] >= 0:
                nexts[k] += 1
                slot = (offset + nexts[k] * skip) % m
            table[slot] = i
            nexts[k] += 1
            quotas[k] -= 1
            filled += 1
    return tuple(table)
