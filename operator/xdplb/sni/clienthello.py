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
    return HelloReader(limit).feed(data)


class HelloReader:
    """The parser of one connection, fed the stream from its first byte each time more of
    it has arrived. It resumes at the first record it has not taken yet, so a hello in
    many small records costs its length once, not once per wake-up; and once the
    handshake's length is known it asks for every byte still missing at once (plus one
    record header), so a hello in many small records wakes the reader a few dozen
    times at most, not once per record."""

    __slots__ = ("handshake", "limit", "pos", "total")

    def __init__(self, limit: int = MAX_HELLO) -> None:
        self.limit = limit
        self.pos = 0                    # records taken, in bytes from the stream's start
        self.handshake = bytearray()    # their payload
        self.total = 0                  # the handshake message's length, 0 while unknown

    def feed(self, data: bytes) -> ClientHello | Incomplete:
        hs = self.handshake
        while True:
            if hs:
                if hs[0] != HANDSHAKE_CLIENT_HELLO:
                    raise HelloError(f"handshake type {hs[0]} is not a ClientHello")
                if not self.total and len(hs) >= 4:
                    self.total = 4 + int.from_bytes(hs[1:4], "big")
                if self.total and len(hs) >= self.total:
                    return ClientHello(_server_name(bytes(hs[4:self.total])), self.pos)
            pos = self.pos
            missing = self.total - len(hs) if self.total else 0
            if len(data) > pos and data[pos] != CONTENT_HANDSHAKE:
                raise HelloError(f"record type {data[pos]} is not a handshake")
            if len(data) > pos + 1 and data[pos + 1] != 3:
                raise HelloError(f"record version major {data[pos + 1]} is not TLS")
            if len(data) < pos + RECORD_HEADER:
                return self._need(pos + RECORD_HEADER + missing)
            if not hs and len(data) > pos + RECORD_HEADER \
                    and data[pos + RECORD_HEADER] != HANDSHAKE_CLIENT_HELLO:
                raise HelloError(f"handshake type {data[pos + RECORD_HEADER]} is not a "
                                 "ClientHello")
            rlen = int.from_bytes(data[pos + 3:pos + 5], "big")
            if not 0 < rlen <= MAX_RECORD:
                raise HelloError(f"record length {rlen} out of range")
            end = pos + RECORD_HEADER + rlen
            if len(data) < end:
                after = missing - rlen
                return self._need(end + (RECORD_HEADER + after if after > 0 else 0))
            hs += data[pos + RECORD_HEADER:end]
            self.pos = end

    def _need(self, n: int) -> Incomplete:
        if n > self.limit:
            raise HelloTooLong(f"ClientHello longer than {self.limit} bytes")
        return Incomplete(n)


def fast_parse(data: bytes) -> ClientHello | None:
    """The common case, a whole ClientHello in the first record, read in place: its
    server name as parse() gives it. None whenever the full parser must decide (a hello
    over several records, too short, or anything it would refuse)."""
    n = len(data)
    if n < 9 or data[0] != CONTENT_HANDSHAKE or data[1] != 3 \
            or data[5] != HANDSHAKE_CLIENT_HELLO:
        return None
    rend = RECORD_HEADER + ((data[3] << 8) | data[4])
    end = 9 + ((data[6] << 16) | (data[7] << 8) | data[8])
    if rend > n or rend - RECORD_HEADER > MAX_RECORD or end > rend:
        return None
    p = 9 + 34                                      # legacy_version, random
    if p >= end:
        return None
    p += 1 + data[p]                                # legacy_session_id
    if p + 2 > end:
        return None
    p += 2 + ((data[p] << 8) | data[p + 1])         # cipher_suites
    if p >= end:
        return None
    p += 1 + data[p]                                # legacy_compression_methods
    if p > end:
        return None
    if p == end:
        return ClientHello(None, rend)              # no extensions
    if p + 2 > end:
        return None
    eend = p + 2 + ((data[p] << 8) | data[p + 1])
    if eend > end:
        return None
    p += 2
    while p + 4 <= eend:
        etype = (data[p] << 8) | data[p + 1]
        elen = (data[p + 2] << 8) | data[p + 3]
        p += 4
        if p + elen > eend:
            return None
        if etype == EXT_SERVER_NAME:
            return _fast_host_name(data, p, p + elen, rend)
        p += elen
    return ClientHello(None, rend) if p == eend else None


def _fast_host_name(data: bytes, p: int, end: int, length: int) -> ClientHello | None:
    if p + 2 > end:
        return None
    lend = p + 2 + ((data[p] << 8) | data[p + 1])
    if lend > end:
        return None
    q = p + 2
    while q + 3 <= lend:
        ntype, nlen = data[q], (data[q + 1] << 8) | data[q + 2]
        q += 3
        if q + nlen > lend:
            return None
        if ntype == NAME_TYPE_HOST:
            name = data[q:q + nlen]
            if not name.isascii():
                return None
            return ClientHello(name.decode("ascii").lower().rstrip(".") or None, length)
        q += nlen
    return ClientHello(None, length) if q == lend else None


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
