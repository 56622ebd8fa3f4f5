"""An in-memory stand-in for a BPF map, for writer tests: it counts what would be
syscalls, so a test can check how many writes a change costs."""

from __future__ import annotations


class MemoryMap:
    def __init__(self, value_size: int = 8) -> None:
        self.data: dict[bytes, bytes] = {}
        self.syscalls = 0
        self.value_size = value_size

    def update(self, key: bytes, value: bytes) -> None:
        self.syscalls += 1
        self.data[key] = value

    def delete(self, key: bytes) -> None:
        self.syscalls += 1
        del self.data[key]

    def update_batch(self, keys: list[bytes], values: list[bytes]) -> None:
        self.syscalls += 1
        self.data.update(zip(keys, values, strict=True))

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self.data.items())

    def lookup(self, key: bytes) -> bytes | None:
        return self.data.get(key)
