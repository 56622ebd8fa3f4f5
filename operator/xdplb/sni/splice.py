"""The in-kernel splice of two TCP sockets (dataplane/bpf/splice.c): a sockhash with
an sk_skb stream verdict that redirects every received byte to the peer socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid

from xdplb.dataplane.apart import run_apart
from xdplb.dataplane.bpfsys import BpfError, BpfMap, obj_pin
from xdplb.dataplane.layout import BPF_DIR
from xdplb.errors import XdplbError

SO_COOKIE = 57


def cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def _u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


class SpliceError(XdplbError):
    pass


class Splicer:
    """Compiled once per agent, in a child process (as the data path: the agent never
    maps the compiler), which attaches the programs to the sockhash and pins both maps
    under `pin_dir` for the agent to open; the pins then go. Sockets joined here belong
    to the agent process, so they live as long as it does."""

    def __init__(self, pin_dir: str, max_sockets: int = 65536) -> None:
        # Unique by uuid, not by pid: in a pod every agent is PID 1.
        work = f"{pin_dir}/splice-{uuid.uuid4().hex[:12]}"
        try:
            if error := run_apart(f"{__name__}:compile_splice", work, str(max_sockets)):
                raise SpliceError(f"compiling the splice failed: {error}")
            self.socks = BpfMap.pinned(f"{work}/socks")
            try:
                self.peers = BpfMap.pinned(f"{work}/peers")
            except OSError:
                self.socks.close()
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def join(self, client: socket.socket, backend: socket.socket) -> tuple[int, int]:
        """Splice two connected sockets. The backend joins first: a TLS server speaks only
        after the ClientHello, which moves across as soon as the client joins."""
        cc, bc = cookie(client), cookie(backend)
        self.peers.update(_u64(cc), _u64(bc))
        self.peers.update(_u64(bc), _u64(cc))
        width = self.socks.value_size
        try:
            self.socks.update(_u64(bc), backend.fileno().to_bytes(width, "little"))
            self.socks.update(_u64(cc), client.fileno().to_bytes(width, "little"))
        except BpfError:
            # Leaving the map gives a socket its ordinary receive path back.
            for c in (cc, bc):
                with contextlib.suppress(BpfError):
                    self.socks.delete(_u64(c))
            self.part((cc, bc))
            raise
        return cc, bc

    def part(self, cookies: tuple[int, int]) -> None:
        """Forget a pair; closing a socket removes it from the sockhash by itself."""
        for c in cookies:
            try:
                self.peers.delete(_u64(c))
            except BpfError:
                pass

    def close(self) -> None:
        self.socks.close()
        self.peers.close()


def compile_splice(work: str, max_sockets: str) -> None:
    """The child's part of Splicer(): compile, attach the programs to the sockhash, pin
    the maps (a sockhash holds its programs)."""
    from bcc import BPF, BPFAttachType, libbcc  # system package, imported late

    b = BPF(src_file=str(BPF_DIR / "splice.c").encode(),
            cflags=[f"-DMAX_SPLICED={int(max_sockets)}"])
    parser = b.load_func(b"splice_parser", BPF.SK_SKB)
    verdict = b.load_func(b"splice_verdict", BPF.SK_SKB)
    socks_fd = libbcc.lib.bpf_table_fd(b.module, b"socks")
    BPF.attach_func(parser, socks_fd, BPFAttachType.SK_SKB_STREAM_PARSER)
    BPF.attach_func(verdict, socks_fd, BPFAttachType.SK_SKB_STREAM_VERDICT)
    os.makedirs(work, exist_ok=True)
    obj_pin(socks_fd, f"{work}/socks")
    obj_pin(libbcc.lib.bpf_table_fd(b.module, b"peers"), f"{work}/peers")
