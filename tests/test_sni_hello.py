"""The ClientHello reader on real hellos from Python's ssl module, re-framed into several
records and cut into segments; the fast path for a hello in one record against the full
parser (a differential fuzz), the incremental reader against parsing from the first byte,
and a fuzz that they only ever raise their own error."""

from __future__ import annotations

import itertools
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdplb.sni.clienthello import (
    MAX_HELLO,
    ClientHello,
    HelloError,
    HelloReader,
    Incomplete,
    fast_parse,
    parse,
)


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
    # The first record gives the message's length: every byte still missing, and the
    # header of the record that will carry them, is asked for at once.
    assert parse(first_segment) == Incomplete(len(two))
    assert parse(two[:5 + 40]) == Incomplete(len(two))
    assert parse(two[:5 + 20]) == Incomplete(5 + 40)
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


# --- the fast path and the incremental reader ------------------------------------------


@pytest.mark.parametrize("name, alpn", [
    ("api.example.com", None), (None, None), ("X.Example.ORG.", ["h2", "http/1.1"]),
    ("long." * 40 + "example.com", [f"p{i}" for i in range(90)])])
def test_fast_path_reads_real_hellos_as_the_full_parser(name: str | None,
                                                       alpn: list[str] | None) -> None:
    hello = real_hello(name, alpn)
    assert fast_parse(hello) == parse(hello) == ClientHello(
        name.lower().rstrip(".") if name else None, len(hello))
    assert fast_parse(hello + b"\x17\x03\x03more") == parse(hello)


def test_fast_path_leaves_several_records_to_the_full_parser() -> None:
    hello = real_hello("two.example.com")
    two = reframe(hello, [100])
    assert fast_parse(two) is None
    assert parse(two) == ClientHello("two.example.com", len(two))
    for n in (0, 5, 8, 9, 50, len(hello) - 1):
        assert fast_parse(hello[:n]) is None


def _differ(data: bytes) -> None:
    """fast_parse either leaves the bytes to parse(), or says what parse() says."""
    fast = fast_parse(data)
    try:
        full: ClientHello | Incomplete | None = parse(data)
    except HelloError:
        full = None
    if fast is not None:
        assert fast == full, data.hex()


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_HELLO) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(_HELLO) + 8), st.binary(max_size=8))
def test_differential_fast_path_on_mutated_hellos(flips: list[tuple[int, int]], cut: int,
                                                 tail: bytes) -> None:
    data = bytearray(_HELLO + tail)
    for i, v in flips:
        data[i] = v
    _differ(bytes(data[:cut]))


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=9, max_size=300))
def test_differential_fast_path_on_random_records(body: bytes) -> None:
    """A well-formed record and handshake header around random contents, so that the
    fast path gets past its first checks."""
    msg = bytes([1]) + len(body).to_bytes(3, "big") + body
    _differ(bytes([22, 3, 1]) + len(msg).to_bytes(2, "big") + msg)


def _vec(n: int, body: bytes, skew: int) -> bytes:
    """A TLS vector: an n-byte length (off by `skew`) and the body."""
    return max(len(body) + skew, 0).to_bytes(n, "big")[-n:] + body


_names = st.lists(st.tuples(st.sampled_from([0, 0, 1, 255]),
                            st.one_of(st.sampled_from([b"a.example.com", b"B.Ex.", b"",
                                                       b"\xfc.x", b"."]),
                                      st.binary(max_size=12)),
                            st.sampled_from([0, 0, 0, 1, -1])), max_size=3)
_exts = st.lists(st.tuples(st.sampled_from([0, 0, 10, 16, 43, 0xFFFF]), _names,
                           st.binary(max_size=6), st.sampled_from([0, 0, 0, 1, -1, 3]),
                           st.sampled_from([0, 0, 0, 1, -1])), max_size=4)


@settings(max_examples=1500, deadline=None)
@given(_exts, st.binary(max_size=33), st.sampled_from([0, 0, 0, 1, -1]),
       st.sampled_from([0, 0, 0, 1, -2]), st.binary(max_size=3), st.integers(0, 3))
def test_differential_fast_path_on_built_hellos(exts: list[tuple[int, list[tuple[int, bytes,
                                                int]], bytes, int, int]], session: bytes,
                                                list_skew: int, msg_skew: int, tail: bytes,
                                                trail: int) -> None:
    """ClientHellos built field by field, with a length here and there off by a little:
    the cases where the two parsers could part ways."""
    blocks = b""
    for etype, names, other, ext_skew, inner_skew in exts:
        if etype == 0:
            entries = b"".join(bytes([t]) + _vec(2, n, sk) for t, n, sk in names)
            body = _vec(2, entries + bytes(trail), inner_skew)
        else:
            body = other
        blocks += etype.to_bytes(2, "big") + _vec(2, body, ext_skew)
    body = (b"\x03\x03" + bytes(32) + _vec(1, session, 0) + _vec(2, b"\x13\x01", 0)
            + _vec(1, b"\x00", 0) + _vec(2, blocks, list_skew) + tail)
    msg = bytes([1]) + max(len(body) + msg_skew, 0).to_bytes(3, "big") + body
    _differ(bytes([22, 3, 1]) + len(msg).to_bytes(2, "big") + msg)


def _feed_as_a_socket_would(stream: bytes, segment: int) -> tuple[ClientHello, int]:
    """Bytes arrive `segment` at a time; the reader is woken only once it has what it
    asked for (SO_RCVLOWAT). Returns its answer and how often it was woken."""
    reader, need, wakes = HelloReader(), 1, 0
    for have in range(segment, len(stream) + segment, segment):
        have = min(have, len(stream))
        if have < need:
            continue
        wakes += 1
        res = reader.feed(stream[:have])
        # The incremental answer is parse()'s from the first byte.
        assert res == parse(stream[:have])
        if isinstance(res, ClientHello):
            return res, wakes
        need = res.need
    raise AssertionError("no answer")


def test_incremental_reader_in_tiny_records_wakes_a_few_dozen_times() -> None:
    hello = real_hello("tiny.example.com", alpn=[f"proto-{i:03d}" for i in range(60)])
    msg_len = len(hello) - 5
    many = reframe(hello, list(range(1, msg_len, 1)))      # one byte per record
    assert len(many) > 5000
    res, wakes = _feed_as_a_socket_would(many, 1)
    assert res == ClientHello("tiny.example.com", len(many))
    # Once per record would be over 900; asking for every byte still missing bounds it.
    assert wakes < 60, wakes


def test_incremental_reader_resumes_where_it_stopped() -> None:
    hello = real_hello("resume.example.com")
    three = reframe(hello, [30, 200])
    reader = HelloReader()
    assert reader.feed(three[:40]) == Incomplete(len(three))
    taken = reader.pos
    assert taken == 35
    # What it took is not read again: a changed first record goes unnoticed.
    assert reader.feed(b"\x00" * taken + three[taken:]) == parse(three)
