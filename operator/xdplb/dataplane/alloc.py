"""Allocators for map slots: small ids and regions of the Maglev slot pool."""

from __future__ import annotations

import bisect


class IdAllocator:
    """Lowest free id in [0, capacity)."""

    def __init__(self, capacity: int, what: str) -> None:
        self.capacity = capacity
        self.what = what
        self._used: set[int] = set()
        self._next = 0

    def allocate(self) -> int:
        while self._next in self._used:
            self._next += 1
        if self._next >= self.capacity:
            raise CapacityError(f"more than {self.capacity} {self.what}")
        self._used.add(self._next)
        return self._next

    def reserve(self, i: int) -> None:
        self._used.add(i)

    def free(self, i: int) -> None:
        self._used.discard(i)
        self._next = min(self._next, i)

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


class CapacityError(Exception):
    pass
