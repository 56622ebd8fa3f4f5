"""The ClientHello reader on real hellos from Python's ssl module, re-framed into several
records and cut into segments, plus a fuzz that it only ever raises its own error."""

from __future__ import annotations

import itertools
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdplb.sni.clienthello import MAX_HELLO, ClientHello, HelloError, Incomplete, parse


def real_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a real TLS client, as it would appear on the wire."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def reframe(hello: bytes, cuts: list[int]) -> bytes:
    """The same handshake message carried by several records, cut at `cuts`."""
    msg = hello[5:]
    bounds = [0, *cuts, len(msg)]
    out = b""
    for a, b in itertools.pairwise(bounds):
        out += bytes([22, 3, 1]) + (b - a).to_bytes(2, "big") + msg[a:b]
    return out


def test_real_hello_names_its_server() -> None:
    hello = real_hello("api.example.com")
    assert parse(hello) == ClientHello("api.example.com", len(hello))


def test_mixed_case_is_lowered_and_trailing_dot_dropped() -> None:
    assert parse(real_hello("API.Example.COM")).server_name == "api.example.com"  # type: ignore[union-attr]


def test_hello_without_sni() -> None:
    hello = real_hello(None)
    assert parse(hello) == ClientHello(None, len(hello))


def test_every_prefix_asks_for_more_and_never_for_less_than_it_has() -> None:
    hello = real_hello("www.example.org")
    for n in range(len(hello)):
        res = parse(hello[:n])
        assert isinstance(res, Incomplete), n
        assert n < res.need <= len(hello)


def test_hello_split_across_two_records_and_segments() -> None:
    """The SNI extension lands in the second record, which arrives in a later segment."""
    long_alpn = [f"proto-{i:03d}" for i in range(60)]
    hello = real_hello("second.example.net", alpn=long_alpn)
    assert len(hello) > 600
    two = reframe(hello, [40])               # the first record ends before the extensions
    assert two[5 + 40] == 22                 # a second record header follows
    first_segment = two[:5 + 40 + 3]
    res = parse(first_segment)
    assert isinstance(res, Incomplete) and res.need == 5 + 40 + 5
    assert parse(two[:res.need]) == Incomplete(len(two))
    assert parse(two) == ClientHello("second.example.net", len(two))


def test_hello_in_many_tiny_records() -> None:
    hello = real_hello("tiny.example.com")
    msg_len = len(hello) - 5
    many = reframe(hello, list(range(7, msg_len, 7)))
    assert parse(many) == ClientHello("tiny.example.com", len(many))


def test_bytes_after_the_hello_are_ignored() -> None:
    hello = real_hello("a.example.com")
    assert parse(hello + b"\x17\x03\x03garbage") == ClientHello("a.example.com", len(hello))


@pytest.mark.parametrize("data, why", [
    (b"G", "record type 71"),
    (b"GET / HTTP/1.1\r\n", "record type 71"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "record type 83"),
    (b"\x16\x02", "version major 2"),
    (b"\x16\x03\x01\x00\x00", "record length 0"),
    (b"\x16\x03\x01\x40\x01", "record length 16385"),
    (b"\x16\x03\x01\x00\x04\x02", "handshake type 2"),
    (b"\x15\x03\x03\x00\x02\x02\x28", "record type 21"),
])
def test_non_tls_is_recognised_from_the_first_bytes(data: bytes, why: str) -> None:
    with pytest.raises(HelloError, match=why):
        parse(data)


def test_a_hello_beyond_the_bound_is_refused() -> None:
    # A 20 KiB handshake message announced in full-size records.
    header = bytes([1]) + (20 * 1024).to_bytes(3, "big")
    record = bytes([22, 3, 1]) + (16 * 1024).to_bytes(2, "big") + header
    with pytest.raises(HelloError, match="longer than"):
        parse(record + bytes(16 * 1024 - 4))
    assert parse(record, limit=64 * 1024) == Incomplete(5 + 16 * 1024)
    assert MAX_HELLO == 16 * 1024


def test_truncated_body_inside_a_complete_message() -> None:
    msg = bytes([1, 0, 0, 10]) + bytes(10)          # claims to be complete, body too short
    with pytest.raises(HelloError, match="truncated"):
        parse(bytes([22, 3, 1, 0, len(msg)]) + msg)


def test_non_ascii_server_name() -> None:
    hello = bytearray(real_hello("zz.example.com"))
    i = hello.index(b"zz.example.com")
    hello[i] = 0xFC
    with pytest.raises(HelloError, match="ASCII"):
        parse(bytes(hello))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_only_raise_hello_error(data: bytes) -> None:
    try:
        res = parse(data)
    except HelloError:
        return
    assert isinstance(res, (ClientHello, Incomplete))


_HELLO = real_hello("fuzz.example.com", alpn=["h2", "http/1.1"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_HELLO) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(_HELLO)))
def test_fuzz_mutated_hellos_only_raise_hello_error(flips: list[tuple[int, int]],
                                                    cut: int) -> None:
    data = bytearray(_HELLO)
    for i, v in flips:
        data[i] = v
    try:
        res = parse(bytes(data[:cut]))
    except HelloError:
        return
    assert isinstance(res, (ClientHello, Incomplete))
