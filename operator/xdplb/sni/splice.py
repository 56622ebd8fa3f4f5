"""The in-kernel splice of two TCP sockets (dataplane/bpf/splice.c): a sockhash with
an sk_skb stream verdict that redirects every received byte to the peer socket."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

from xdplb.dataplane.bpfsys import BpfError, BpfMap
from xdplb.dataplane.layout import BPF_DIR

SO_COOKIE = 57


def cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def _u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


class Splicer:
    """Compiled once per agent; sockets joined here belong to the agent process, so they
    live as long as it does."""

    def __init__(self, max_sockets: int = 65536) -> None:
        from bcc import BPF, BPFAttachType, libbcc  # system package, imported late

        self.bpf: Any = BPF(src_file=str(BPF_DIR / "splice.c").encode(),
                            cflags=[f"-DMAX_SPLICED={max_sockets}"])
        parser = self.bpf.load_func(b"splice_parser", BPF.SK_SKB)
        verdict = self.bpf.load_func(b"splice_verdict", BPF.SK_SKB)
        socks_fd = libbcc.lib.bpf_table_fd(self.bpf.module, b"socks")
        BPF.attach_func(parser, socks_fd, BPFAttachType.SK_SKB_STREAM_PARSER)
        BPF.attach_func(verdict, socks_fd, BPFAttachType.SK_SKB_STREAM_VERDICT)
        self.socks = BpfMap(os.dup(socks_fd), "socks")
        self.peers = BpfMap(os.dup(libbcc.lib.bpf_table_fd(self.bpf.module, b"peers")), "peers")

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
        self.bpf.cleanup()
