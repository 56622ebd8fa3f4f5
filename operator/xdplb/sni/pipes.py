"""Pipes for splice(2): socket -> pipe -> socket moves a pair's bytes by page reference,
never through user memory. A pipe is borrowed for one move and given back at once when
the destination took every byte (the usual case), so a few pipes serve every pair; only
a direction whose destination is full keeps one until it drains."""

from __future__ import annotations

import fcntl
import os

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20      # bytes a pipe holds (fs.pipe-max-size's default): fewer moves per GiB
KEEP = 64                # idle pipes kept for reuse


class PipePool:
    __slots__ = ("_free", "size")

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        """An empty pipe (read end, write end), both non-blocking."""
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:      # above fs.pipe-max-size without CAP_SYS_RESOURCE: the default
            pass
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        """Give back an empty pipe."""
        if len(self._free) < KEEP:
            self._free.append(pipe)
        else:
            discard(pipe)

    def close(self) -> None:
        for p in self._free:
            discard(p)
        self._free.clear()


def discard(pipe: tuple[int, int]) -> None:
    """Close a pipe (and drop what it holds)."""
    os.close(pipe[0])
    os.close(pipe[1])
