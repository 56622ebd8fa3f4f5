"""Maglev tables: consistency under change, weighted shares, determinism."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from xdplb.plan import maglev
from xdplb.plan.flowhash import flow_hash
from xdplb.plan.model import Backend, Group


def backends(n: int, weights: list[int] | None = None) -> list[Backend]:
    ws = weights or [1] * n
    return [Backend(f"10.0.{i // 250}.{i % 250 + 1}", 8080, ws[i]) for i in range(n)]


def flows(seed: int, n: int) -> list[tuple[str, str, int, int, str]]:
    rng = random.Random(seed)
    return [(f"198.51.{rng.randrange(256)}.{rng.randrange(1, 255)}", "192.0.2.10",
             rng.randrange(1024, 65536), 80, "TCP") for _ in range(n)]


def assign(group: Group, fl: list[tuple[str, str, int, int, str]]) -> list[Backend]:
    table = group.table
    return [group.backends[table[flow_hash(*f) % len(table)]] for f in fl]


def test_table_size_is_prime_and_bounded() -> None:
    for n in (2, 3, 10, 100, 300, 600, 1024):
        m = maglev.table_size(n)
        assert maglev.is_prime(m)
        assert m >= min(100 * n, 65537) or m == maglev.MAX_TABLE
        assert m <= 65537
    assert maglev.table_size(1) == 1
    # Stable within a power of two: 9, 10, 11 backends share one size.
    assert maglev.table_size(9) == maglev.table_size(10) == maglev.table_size(11)


def test_every_slot_filled_and_deterministic() -> None:
    g = Group.of(backends(10))
    assert len(g.table) == maglev.table_size(10)
    assert set(g.table) == set(range(10))
    # Same input, fresh object: the same table (no per-process hashing).
    assert Group.of(list(reversed(backends(10)))).table == g.table


def test_removing_one_of_ten_moves_at_most_one_percent_of_the_others() -> None:
    fl = flows(1, 20000)
    full = Group.of(backends(10))
    removed = backends(10)[3]
    less = Group.of([b for b in backends(10) if b != removed])
    before, after = assign(full, fl), assign(less, fl)
    others = [(a, b) for a, b in zip(before, after, strict=True) if a != removed]
    moved = sum(a != b for a, b in others)
    assert moved / len(others) <= 0.01
    # The removed backend's flows spread over the others in proportion to weight (equal).
    spread = Counter(b for a, b in zip(before, after, strict=True) if a == removed)
    share = [n / sum(spread.values()) for n in spread.values()]
    assert len(spread) == 9 and max(share) - min(share) < 0.12


def test_adding_an_eleventh_moves_at_most_its_share() -> None:
    fl = flows(2, 20000)
    ten = Group.of(backends(10))
    eleven = Group.of(backends(11))
    before, after = assign(ten, fl), assign(eleven, fl)
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    assert moved / len(fl) <= 1 / 11 + 0.01
    new = backends(11)[10]
    assert all(b == new for a, b in zip(before, after, strict=True) if a != b) or \
        sum(a != b and b != new for a, b in zip(before, after, strict=True)) / len(fl) < 0.01


def test_weighted_spread_of_removed_backend() -> None:
    ws = [1, 2, 3, 4]
    fl = flows(5, 20000)
    full = Group.of(backends(5, [*ws, 2]))
    less = Group.of(backends(4, ws))
    before, after = assign(full, fl), assign(less, fl)
    gone = backends(5, [*ws, 2])[4]
    spread = Counter(b.weight for a, b in zip(before, after, strict=True) if a == gone)
    total = sum(spread.values())
    for w in ws:
        assert abs(spread[w] / total - w / sum(ws)) < 0.05


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_weights_one_to_ten_and_zero_shares(seed: int) -> None:
    ws = [*range(1, 11), 0]
    g = Group.of(backends(11, ws))
    got = Counter(b.weight for b in assign(g, flows(seed, 20000)))
    assert got[0] == 0
    for w in range(1, 11):
        assert abs(100 * got[w] / 20000 - 100 * w / 55) <= 1.0, (w, got[w])


def test_no_eligible_backend_gives_an_empty_table() -> None:
    assert Group.of(backends(3, [0, 0, 0])).table == ()
    assert Group.of(backends(1, [0])).table == ()


def test_large_group_fits_the_maximum() -> None:
    g = Group.of(backends(1024))
    assert len(g.table) == 65537
    assert len(set(g.table)) == 1024
