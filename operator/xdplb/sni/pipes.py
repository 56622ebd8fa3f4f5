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
    """`free` holds empty pipes; the acceptor's move takes one and puts it back itself
    (two list operations, no call), so that list grows only through put()."""

    __slots__ = ("free", "size")

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.size = size
        self.free: list[tuple[int, int]] = []

    def new(self) -> tuple[int, int]:
        """An empty pipe (read end, write end), both non-blocking."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:      # above fs.pipe-max-size without CAP_SYS_RESOURCE: the default
            pass
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        """Give back an empty pipe."""
        if len(self.free) < KEEP:
            self.free.append(pipe)
        else:
            discard(pipe)

    def close(self) -> None:
        for p in self.free:
            discard(p)
        self.free.clear()


def discard(pipe: tuple[int, int]) -> None:
    """Close a pipe (and drop what it holds)."""
    os.close(pipe[0])
    os.close(pipe[1])
