"""The in-kernel splice of two TCP sockets through a sockmap (dataplane/bpf/splice.c):
a sockhash with an sk_skb verdict that sends every received byte out of the peer
socket. Used with `--sni-forward sockmap`; the default forwarder is splice(2) through a
pipe (sni/pipes.py), which bench/sni.py measured faster here (bench/README.md)."""

from __future__ import annotations

import _socket
import ctypes
import os
import shutil
import socket
import struct
import uuid

from xdplb.dataplane.apart import run_apart
from xdplb.dataplane.bpfsys import MAP_UPDATE_ELEM, BpfMap, bpf, obj_pin
from xdplb.dataplane.layout import BPF_DIR
from xdplb.errors import XdplbError

SO_COOKIE = 57


def cookie(sock: _socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


class SpliceError(XdplbError):
    pass


class JoinBroken(SpliceError, OSError):
    """The backend joined, its client could not: the pair cannot go on."""


class Splicer:
    """Compiled once per acceptor, in a child process (the acceptor never maps the
    compiler), which attaches the verdict to the sockhash and pins the map under
    `pin_dir` for the acceptor to open; the pin then goes. Sockets joined here belong
    to the acceptor process, so they live as long as it does."""

    def __init__(self, pin_dir: str, max_sockets: int = 65536) -> None:
        # Unique by uuid, not by pid: in a pod every agent is PID 1.
        work = f"{pin_dir}/splice-{uuid.uuid4().hex[:12]}"
        try:
            if error := run_apart(f"{__name__}:compile_splice", work, str(max_sockets)):
                raise SpliceError(f"compiling the splice failed: {error}")
            self.socks = BpfMap.pinned(f"{work}/socks")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # One attribute block for every update: a join costs two bpf(2) calls, no more.
        self._key = ctypes.create_string_buffer(8)
        self._value = ctypes.create_string_buffer(self.socks.value_size)
        self._attr = ctypes.create_string_buffer(32)
        struct.pack_into("=IIQQQ", self._attr, 0, self.socks.fd, 0,
                         ctypes.addressof(self._key), ctypes.addressof(self._value), 0)

    def _put(self, key: int, sock: _socket.socket) -> None:
        struct.pack_into("=Q", self._key, 0, key)
        self._value.raw = sock.fileno().to_bytes(len(self._value), "little")
        bpf(MAP_UPDATE_ELEM, self._attr)

    def join(self, client: _socket.socket, backend: _socket.socket) -> None:
        """Splice two connected sockets, each under its peer's cookie. Once a socket is
        in, the verdict handles what it receives, and until its peer is in too that is
        dropped: so the backend joins first, as a TLS backend sends nothing before it has
        the ClientHello, which waits in the client's queue until the caller pokes it.
        Only an established socket can join: a backend that cannot (it is closing) is
        refused with nothing joined (OSError), so the pair can go another way. A socket
        that joined and left the map again does not get its ordinary receive path back at
        once, so a client that cannot join after its backend did (it half-closed just
        now; the caller checks before) fails the pair (JoinBroken)."""
        cc, bc = cookie(client), cookie(backend)
        self._put(cc, backend)
        try:
            self._put(bc, client)
        except OSError as e:
            raise JoinBroken(e.errno, f"the client socket cannot join: {e.strerror}") from e

    def close(self) -> None:
        self.socks.close()


def compile_splice(work: str, max_sockets: str) -> None:
    """The child's part of Splicer(): compile, attach the verdict to the sockhash, pin
    the map (a sockhash holds its program)."""
    from bcc import BPF, BPFAttachType, libbcc  # system package, imported late

    b = BPF(src_file=str(BPF_DIR / "splice.c").encode(),
            cflags=[f"-DMAX_SPLICED={int(max_sockets)}"])
    verdict = b.load_func(b"splice_verdict", BPF.SK_SKB)
    socks_fd = libbcc.lib.bpf_table_fd(b.module, b"socks")
    BPF.attach_func(verdict, socks_fd, BPFAttachType.SK_SKB_VERDICT)
    os.makedirs(work, exist_ok=True)
    obj_pin(socks_fd, f"{work}/socks")
