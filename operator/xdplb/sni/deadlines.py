"""Deadline queues of the acceptor. Every item of one queue waits the same delay, so the
order of arrival is the order of expiry: a plain FIFO, with no heap and no timer object
per connection. Items are not removed when they no longer wait (a hello that came in
time): the acceptor checks, when an item falls due, whether it still waits for that."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Deadlines(Generic[T]):
    __slots__ = ("_q", "delay")

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._q: deque[tuple[float, T]] = deque()

    def add(self, now: float, item: T) -> float:
        """Queue `item`; returns when it falls due."""
        due = now + self.delay
        self._q.append((due, item))
        return due

    def due(self, now: float) -> Iterator[T]:
        """The items whose deadline has passed, oldest first (taken off the queue)."""
        q = self._q
        while q and q[0][0] <= now:
            yield q.popleft()[1]

    def head(self, waits: Callable[[T], bool]) -> tuple[float, T] | None:
        """The oldest item that still `waits`, and its deadline, left on the queue; items
        before it that no longer wait are dropped."""
        q = self._q
        while q and not waits(q[0][1]):
            q.popleft()
        return q[0] if q else None

    def pop(self) -> None:
        """Drop the oldest item."""
        self._q.popleft()

    def next_at(self) -> float | None:
        return self._q[0][0] if self._q else None
