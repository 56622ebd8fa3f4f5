"""Consistent, weighted backend selection: a Maglev lookup table per group.

Every node and every restart builds the same table for the same backends:
the permutation of each backend comes from a keyed BLAKE2 hash of its address
and port (never Python's hash()), and backends are taken in a canonical order.
Weights are relative: a backend's share of the table is its share of the sum
of weights, and weight 0 gets no slot (no new flows).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol

MAX_TABLE = 65537  # prime
_KEY = b"xdplb-maglev-v1"


class Weighted(Protocol):
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def weight(self) -> int: ...


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def next_prime(n: int) -> int:
    while not is_prime(n):
        n += 1
    return n


SLOTS_PER_BACKEND = 1000


def table_size(n_backends: int) -> int:
    """A prime >= 1000 x the backend count rounded up to a power of two,
    at most 65,537.

    Rounding keeps the size, and so every backend's permutation, unchanged
    while a group grows or shrinks within a power of two: removing or adding
    one backend then moves only the flows Maglev must move. 1000 slots per
    backend (not Maglev's usual 100) keep that movement under 1 % of the other
    backends' flows; a one-backend group needs a single slot.
    """
    if n_backends <= 1:
        return n_backends
    rounded = 1 << (n_backends - 1).bit_length()
    return min(next_prime(SLOTS_PER_BACKEND * rounded), MAX_TABLE)


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
    m = table_size(len(backends))
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
