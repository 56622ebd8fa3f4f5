"""Allocators for map slots: small ids and regions of the Maglev slot pool."""

from __future__ import annotations

import bisect
from collections import deque

from xdplb.errors import XdplbError


class IdAllocator:
    """Ids in [0, capacity): never-used ids first, then the least recently freed.

    Conntrack entries keep counting into the id of a backend or listener that
    is gone until they expire; reusing its id as late as possible keeps those
    packets from being credited to whatever takes the id next."""

    def __init__(self, capacity: int, what: str) -> None:
        self.capacity = capacity
        self.what = what
        self._used: set[int] = set()
        self._fresh = 0  # every id >= _fresh has never been handed out
        self._freed: deque[int] = deque()

    def allocate(self) -> int:
        while self._fresh in self._used:
            self._fresh += 1
        if self._fresh < self.capacity:
            i = self._fresh
            self._fresh += 1
        else:
            while self._freed and self._freed[0] in self._used:
                self._freed.popleft()  # reserved again since it was freed
            if not self._freed:
                raise CapacityError(f"more than {self.capacity} {self.what}")
            i = self._freed.popleft()
        self._used.add(i)
        return i

    def reserve(self, i: int) -> None:
        self._used.add(i)

    def free(self, i: int) -> None:
        if i in self._used:
            self._used.discard(i)
            self._freed.append(i)

    def __len__(self) -> int:
        return len(self._used)


class RegionAllocator:
    """First-fit allocation of contiguous slot ranges, coalescing on free."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)] if size else []  # sorted (offset, length)

    def allocate(self, length: int) -> int:
        for i, (off, n) in enumerate(self._free):
            if n >= length:
                if n == length:
                    del self._free[i]
                else:
                    self._free[i] = (off + length, n - length)
                return off
        raise CapacityError(f"no {length} free table slots (--table-slots {self.size})")

    def reserve(self, offset: int, length: int) -> None:
        for i, (off, n) in enumerate(self._free):
            if off <= offset and offset + length <= off + n:
                parts = [(off, offset - off), (offset + length, off + n - offset - length)]
                self._free[i:i + 1] = [p for p in parts if p[1] > 0]
                return

    def free(self, offset: int, length: int) -> None:
        if length == 0:
            return
        i = bisect.bisect(self._free, (offset, length))
        self._free.insert(i, (offset, length))
        merged: list[tuple[int, int]] = []
        for off, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((off, n))
        self._free = merged

    @property
    def free_slots(self) -> int:
        return sum(n for _, n in self._free)


class CapacityError(XdplbError):
    """A plan needs more map entries than the capacity flags allow."""
