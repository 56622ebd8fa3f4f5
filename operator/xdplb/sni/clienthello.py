"""A TLS ClientHello reader that extracts the server name (SNI), pure.

It works on the bytes a socket holds so far (read with MSG_PEEK): the answer
is the server name, or how many bytes are needed before it can say more, or
a HelloError when the bytes are not a ClientHello within the bounds. The
handshake message may span several TLS records, and the records any number
of TCP segments; the extension may sit anywhere in the extension list.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdplb.errors import XdplbError

MAX_HELLO = 16 * 1024           # bytes of records read before giving up
RECORD_HEADER = 5
MAX_RECORD = 16 * 1024          # TLSPlaintext.length limit (RFC 8446 5.1)
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
NAME_TYPE_HOST = 0


class HelloError(XdplbError, ValueError):
    """The bytes are not a TLS ClientHello."""


class HelloTooLong(HelloError):
    """A ClientHello so far, but longer than the bound."""


@dataclass(frozen=True)
class Incomplete:
    need: int   # total bytes from the start of the stream before parsing can go on


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None   # lower-cased, trailing dot removed; None: no SNI extension
    length: int               # bytes of records that carried the hello


def parse(data: bytes, limit: int = MAX_HELLO) -> ClientHello | Incomplete:
    """Parse the start of a TLS stream. Raises HelloError as soon as the first
    bytes rule out a ClientHello, so plain-text protocols are recognised at once."""
    handshake = bytearray()
    pos = 0
    while True:
        if handshake:
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                raise HelloError(f"handshake type {handshake[0]} is not a ClientHello")
            if len(handshake) >= 4:
                total = 4 + int.from_bytes(handshake[1:4], "big")
                if len(handshake) >= total:
                    return ClientHello(_server_name(bytes(handshake[4:total])), pos)
        if len(data) > pos and data[pos] != CONTENT_HANDSHAKE:
            raise HelloError(f"record type {data[pos]} is not a handshake")
        if len(data) > pos + 1 and data[pos + 1] != 3:
            raise HelloError(f"record version major {data[pos + 1]} is not TLS")
        if len(data) < pos + RECORD_HEADER:
            return _need(pos + RECORD_HEADER, limit)
        if not handshake and len(data) > pos + RECORD_HEADER \
                and data[pos + RECORD_HEADER] != HANDSHAKE_CLIENT_HELLO:
            raise HelloError(f"handshake type {data[pos + RECORD_HEADER]} is not a ClientHello")
        rlen = int.from_bytes(data[pos + 3:pos + 5], "big")
        if not 0 < rlen <= MAX_RECORD:
            raise HelloError(f"record length {rlen} out of range")
        end = pos + RECORD_HEADER + rlen
        if len(data) < end:
            return _need(end, limit)
        handshake += data[pos + RECORD_HEADER:end]
        pos = end


def _need(n: int, limit: int) -> Incomplete:
    if n > limit:
        raise HelloTooLong(f"ClientHello longer than {limit} bytes")
    return Incomplete(n)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise HelloError("truncated ClientHello")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, len_bytes: int) -> bytes:
        return self.take(self.uint(len_bytes))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _server_name(body: bytes) -> str | None:
    r = _Reader(body)
    r.take(2 + 32)          # legacy_version, random
    r.vector(1)             # legacy_session_id
    r.vector(2)             # cipher_suites
    r.vector(1)             # legacy_compression_methods
    if not r.left:
        return None         # a hello without extensions (SSL 3.0 style)
    exts = _Reader(r.vector(2))
    while exts.left:
        ext_type = exts.uint(2)
        ext = exts.vector(2)
        if ext_type == EXT_SERVER_NAME:
            return _host_name(ext)
    return None


def _host_name(ext: bytes) -> str | None:
    names = _Reader(_Reader(ext).vector(2))
    while names.left:
        name_type = names.uint(1)
        name = names.vector(2)
        if name_type == NAME_TYPE_HOST:
            try:
                host = name.decode("ascii")
            except UnicodeDecodeError as e:
                raise HelloError("server name is not ASCII") from e
            return host.lower().rstrip(".") or None
    return None
