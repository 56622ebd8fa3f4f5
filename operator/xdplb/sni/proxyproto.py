"""The PROXY protocol v2 header (haproxy's proxy-protocol.txt, section 2.2) that opens a
backend connection of a `proxyProtocol: v2` listener: the client's and the listener's
address, so the backend sees who connected although the acceptor did."""

from __future__ import annotations

import socket
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21                  # version 2, command PROXY
TCP_OVER: dict[int, int] = {socket.AF_INET: 0x11, socket.AF_INET6: 0x21}


def header(family: int, client: bytes, local: bytes, cport: int, lport: int) -> bytes:
    """`client` and `local`: packed addresses (4 bytes for AF_INET, 16 for AF_INET6)."""
    body = client + local + struct.pack("!HH", cport, lport)
    return SIGNATURE + bytes((VERSION_PROXY, TCP_OVER[family])) + struct.pack("!H", len(body)) \
        + body


def proxy_v2_header(client: tuple[str, int], local: tuple[str, int]) -> bytes:
    """The header for two (address, port) pairs of one family."""
    family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
    return header(family, socket.inet_pton(family, client[0]),
                  socket.inet_pton(family, local[0]), client[1], local[1])
