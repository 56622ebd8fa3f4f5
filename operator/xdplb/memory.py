"""Memory of a process that holds large, acyclic data: 100,000 routes.

Reading, validating and planning them allocates millions of objects and no
reference cycle; every few hundred allocations would otherwise start a
collection that walks all of them again (a 100,000-route file read 3× slower),
and later full collections would walk them too, stalling the agent for a
second now and then. What a change leaves behind is freed to the C allocator,
which keeps it; an agent that lives for months should give it back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

__all__ = ["gc_paused", "return_free_memory", "settle"]


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (the data built has no cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def return_free_memory() -> None:
    """Give the free memory of glibc's heaps back to the system (malloc_trim(3));
    nothing happens with another C library."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def settle() -> None:
    """After applying a change: what lives now is left out of later collections
    (gc.freeze; it is still freed when its last reference goes, and the data
    has no cycles that would need a collection), and free heap is returned."""
    gc.freeze()
    return_free_memory()
