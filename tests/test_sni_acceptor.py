"""The SNI acceptor on loopback, IPv4 and IPv6, with real sockets: routing by the hello, bytes
both ways and half-closes through splice(2) (and the sockmap, as root), the PROXY v2 header
of either family, its bounds (pending hellos, pairs, per client, descriptors), the idle
timeout, keepalive, a wake-up below SO_RCVLOWAT, and the acceptor's process (it dies with
the agent). The agent around it is tested end to end in test_sni_e2e."""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import os
import resource
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xdplb.dataplane.entries import Inventory
from xdplb.plan.planner import build_plan
from xdplb.sni import service as sni_service
from xdplb.sni.acceptor import Acceptor, Conn, _written, client_key
from xdplb.sni.pipes import PipePool
from xdplb.sni.routes import Backend, GroupTable, Route, RoutingUpdate
from xdplb.sni.service import SniService
from xdplb.sni.settings import SniSettings
from xdplb.sni.worker import Worker, WorkerError
from xdplb.spec.load import parse_manifests

HOSTS = ("127.0.0.1", "::1")
PROXY_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
MIB = 1 << 20


def hello(name: str | None, alpn: int = 0) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols([f"proto-{i:03d}" for i in range(alpn)])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(65536):
        out += chunk
    return bytes(out)


class Backend_:
    """A TCP server in a thread. Each connection: the PROXY header if any is noted, then
    `mode` "sink" reads to the end and answers `name sha n proxy`; "speak" sends `speak`
    bytes, half-closes, reads to the end and notes `sha n` ("talk": the same, but it
    half-closes only after the client has); "hold" keeps it open."""

    def __init__(self, host: str, name: str, mode: str = "sink", speak: int = 0) -> None:
        self.name, self.mode, self.speak = name, mode, speak
        self.ls = socket.socket(family(host))
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind((host, 0))
        self.ls.listen(256)
        self.addr = self.ls.getsockname()[:2]
        self.seen: list[str] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        if self.mode == "hold":
            self.held.append(c)
            return
        with c:
            try:
                if self.mode in ("speak", "talk"):
                    c.sendall(bytes(range(256)) * (self.speak // 256))
                if self.mode == "speak":
                    c.shutdown(socket.SHUT_WR)
                data = recv_all(c)
            except OSError as e:
                self.seen.append(f"error {e}")
                return
            proxy = "-"
            if data.startswith(PROXY_SIG):
                fam, n = data[13], struct.unpack("!H", data[14:16])[0]
                body = data[16:16 + n]
                size = 4 if fam == 0x11 else 16
                af = socket.AF_INET if fam == 0x11 else socket.AF_INET6
                sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
                proxy = (f"{socket.inet_ntop(af, body[:size])}:{sport}>"
                         f"{socket.inet_ntop(af, body[size:2 * size])}:{dport}")
                data = data[16 + n:]
            digest = hashlib.sha256(data).hexdigest()
            self.seen.append(f"{digest} {len(data)}")
            if self.mode == "sink":
                with contextlib.suppress(OSError):
                    c.sendall(f"{self.name} {digest} {len(data)} {proxy}".encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.ls.shutdown(socket.SHUT_RDWR)  # wakes the accept(); then no one listens
        self.ls.close()
        for c in self.held:
            c.close()


class Running:
    """An acceptor's loop in a thread of the test process, until stop()."""

    def __init__(self, settings: SniSettings, listen: dict[tuple[str, int], Route],
                 groups: dict[int, list[tuple[str, int]]], names: dict[int, dict[str, int]],
                 splicer: Any = None, before: Callable[[Acceptor], None] | None = None,
                 start: bool = True) -> None:
        self.acc = Acceptor(settings, splicer)
        tables = {t: GroupTable(array("H", range(len(addrs))),
                                tuple(Backend(family(a[0]), a) for a in addrs))
                  for t, addrs in groups.items()}
        self.acc.routes.apply(RoutingUpdate(
            tables, {r.listener_id: (1, names.get(r.listener_id, {})) for r in listen.values()}))
        assert self.acc.set_listeners(listen) == []
        if before:
            before(self.acc)
        self._r, self._w = os.pipe()
        self.acc.watch(self._r, select.EPOLLIN, lambda *_: self.acc.stop())
        self.thread = threading.Thread(target=self.acc.run, daemon=True)
        self.stopped = False
        if start:
            self.thread.start()

    def step(self, what: str, cond: Callable[[], bool], connect: bool = False) -> None:
        """Before start(): run the loop's handlers by hand until `cond`; a backend
        connection is taken further only with `connect`."""
        end = time.monotonic() + 5
        while not cond():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            for fd, ev in self.acc.ep.poll(0.05):
                h = self.acc.handlers.get(fd)
                if h is not None and (connect or h[0] != self.acc._connected):
                    h[0](h[1], fd, ev)

    def conns(self) -> list[Conn]:
        return list({id(h[1]): h[1] for h in list(self.acc.handlers.values())
                     if isinstance(h[1], Conn)}.values())

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if not self.thread.is_alive():
            self.thread.start()
        os.write(self._w, b"x")
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.acc.close()
        os.close(self._r)
        os.close(self._w)


def free_port(host: str) -> int:
    with socket.socket(family(host)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def splicer() -> Iterator[Any]:
    """The sockmap splice (root, and bcc to compile it), shared by this module's tests."""
    if os.geteuid() != 0 or not os.path.isdir("/sys/fs/bpf"):
        pytest.skip("the sockmap splice needs root and a bpffs")
    from xdplb.sni.splice import Splicer

    sp = Splicer("/sys/fs/bpf")
    yield sp
    sp.close()


@pytest.fixture(params=["pipe", "sockmap"])
def forward(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Either forwarder: None for splice(2) through a pipe, or the sockmap's Splicer."""
    yield request.getfixturevalue("splicer") if request.param == "sockmap" else None


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., tuple[Running, tuple[str, int], dict[str, Backend_]]]]:
    made: list[tuple[Running, list[Backend_]]] = []

    def make(host: str = "127.0.0.1", settings: SniSettings | None = None,
             proxy: bool = False, modes: tuple[str, str] = ("sink", "sink"), speak: int = 0,
             splicer: Any = None, before: Callable[[Acceptor], None] | None = None,
             start: bool = True) -> tuple[Running, tuple[str, int], dict[str, Backend_]]:
        b1, b2 = (Backend_(host, "b1", modes[0], speak), Backend_(host, "b2", modes[1], speak))
        addr = (host, free_port(host))
        run = Running(settings or SniSettings(), {addr: Route(7, "test", False, proxy)},
                      {1: [b1.addr], 2: [b2.addr]}, {7: {"a.example.com": 2}}, splicer, before,
                      start)
        made.append((run, [b1, b2]))
        return run, addr, {"b1": b1, "b2": b2}

    yield make
    for run, backends in made:
        run.stop()
        for b in backends:
            b.close()


def wait(what: str, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- routing and forwarding ---------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("proxy", [False, True])
def test_each_name_reaches_its_group_with_every_byte(lab_factory: Any, host: str,
                                                      proxy: bool, forward: Any) -> None:
    run, addr, _ = lab_factory(host, proxy=proxy, splicer=forward)
    for name, backend in [("a.example.com", "b2"), ("A.Example.COM", "b2"),
                          ("other.example.com", "b1"), (None, "b1")]:
        payload = os.urandom(3 * MIB)
        h = hello(name)
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(h + payload)
            s.shutdown(socket.SHUT_WR)
            got, digest, n, via = recv_all(s).decode().split()
            local = s.getsockname()[:2]
        assert (got, digest, int(n)) == (backend, hashlib.sha256(h + payload).hexdigest(),
                                          len(h) + len(payload)), name
        # The PROXY header of the connection's own family: the client's address and
        # the listener's.
        assert via == (f"{local[0]}:{local[1]}>{addr[0]}:{addr[1]}" if proxy else "-")
    wait("pairs closed", lambda: run.acc.pairs == 0)
    st = run.acc.stats
    assert (st["accepted"], st["spliced"], st["closed"], st["reset"]) == (4, 4, 4, 0)


@pytest.mark.parametrize("host", HOSTS)
def test_server_speaks_first_and_half_closes(lab_factory: Any, host: str,
                                             forward: Any) -> None:
    run, addr, backends = lab_factory(host, modes=("speak", "speak"), speak=4 * MIB,
                                      splicer=forward)
    payload = os.urandom(2 * MIB)
    h = hello("x.example.com")
    step = "the server's bytes"
    try:
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(h)
            got = recv_all(s)                   # the server's bytes, then its FIN
            assert got == bytes(range(256)) * (4 * MIB // 256)
            step = "the end"
            s.sendall(payload)                  # the client's direction is still open
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
    except TimeoutError as e:
        raise AssertionError(f"no {step}: {run.acc.stats} " + str(
            [(c.phase, c.spliced, c.eof, c.done) for c in run.conns()])) from e
    wait("the backend's digest", lambda: bool(backends["b1"].seen))
    assert backends["b1"].seen == [f"{hashlib.sha256(h + payload).hexdigest()} "
                                   f"{len(h) + len(payload)}"]
    wait("the pair to close", lambda: run.acc.stats["closed"] == 1)


def test_a_hello_in_many_small_segments_then_a_slow_reader(lab_factory: Any) -> None:
    """Bytes a full destination cannot take wait in the pair's pipe, with the source not
    read meanwhile: nothing is lost."""
    _run, addr, _ = lab_factory()
    h = hello("a.example.com", alpn=60)
    with socket.create_connection(addr, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(h), 97):
            s.sendall(h[i:i + 97])
            time.sleep(0.002)
        payload = os.urandom(8 * MIB)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.3)                         # the reply waits in the kernel meanwhile
        got, digest, _n, _ = recv_all(s).decode().split()
    assert (got, digest) == ("b2", hashlib.sha256(h + payload).hexdigest())


def _connecting(run: Running) -> Conn:
    """The connection whose backend socket is connecting."""
    (c,) = [c for c in run.conns() if c.up is not None]
    return c


def test_sockmap_splices_through_a_pipe_what_cannot_join(lab_factory: Any,
                                                         splicer: Any) -> None:
    """A client that half-closed before its pair joined cannot join the sockhash (only
    established sockets can): the pair is spliced through a pipe instead. The loop is
    driven by hand up to the join, so that the client's FIN surely comes first."""
    run, addr, _ = lab_factory(splicer=splicer, start=False)
    h = hello("a.example.com")
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(h)
        run.step("a backend connection", lambda: any(c.up for c in run.conns()))
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.1)
        run.step("the pair", lambda: run.acc.pairs == 1, connect=True)
        run.thread.start()
        reply = recv_all(s).decode().split()
    assert reply[:2] == ["b2", hashlib.sha256(h).hexdigest()], run.acc.stats
    wait("the pair to close", lambda: run.acc.stats["closed"] == 1)
    assert (run.acc.stats["relayed"], run.acc.stats["spliced"]) == (1, 0)


@pytest.mark.parametrize("mode", ["talk", "speak"])
def test_sockmap_moves_what_a_backend_sent_before_the_join(lab_factory: Any, splicer: Any,
                                                           mode: str) -> None:
    """Bytes of a backend that speaks first, queued before its socket joined, reach the
    client (the join tells both sockets that data is there); one that half-closed as well
    ("speak") cannot join, and its pair is spliced through a pipe."""
    run, addr, _ = lab_factory(splicer=splicer, modes=(mode, mode), speak=4096, start=False)
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(hello("x.example.com"))
        run.step("a backend connection", lambda: any(c.up for c in run.conns()))
        time.sleep(0.2)                         # the backend has spoken (and ended)
        c = _connecting(run)
        assert c.up is not None and len(c.up.recv(65536, socket.MSG_PEEK)) == 4096
        run.step("the pair", lambda: run.acc.pairs == 1, connect=True)
        run.thread.start()
        s.settimeout(5)
        got = b""
        while len(got) < 4096 and (chunk := s.recv(65536)):
            got += chunk
        s.shutdown(socket.SHUT_WR)
        assert got + recv_all(s) == bytes(range(256)) * 16
    assert (run.acc.stats["relayed"], run.acc.stats["spliced"]) == \
        ((1, 0) if mode == "speak" else (0, 1))


def test_sockmap_loses_nothing_a_client_sends_during_the_join(
        lab_factory: Any, splicer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes of the client that arrive between the join's two map updates reach the
    backend: a socket in the map before its peer would have them dropped by the verdict,
    and the client (who speaks first in TLS) joins second."""
    run, addr, _ = lab_factory(splicer=splicer, start=False)
    h = hello("a.example.com")
    put = splicer._put
    with socket.create_connection(addr, timeout=5) as s:
        puts: list[int] = []

        def put_then_send(key: int, sock: Any) -> None:
            put(key, sock)
            if not puts:
                s.sendall(b"late")
                time.sleep(0.1)                 # it has arrived
            puts.append(key)

        monkeypatch.setattr(splicer, "_put", put_then_send)
        s.sendall(h)
        run.step("the pair", lambda: run.acc.pairs == 1, connect=True)
        monkeypatch.undo()
        run.thread.start()
        s.shutdown(socket.SHUT_WR)
        reply = recv_all(s).decode().split()
    assert len(puts) == 2 and run.acc.stats["spliced"] == 1
    assert reply[:3] == ["b2", hashlib.sha256(h + b"late").hexdigest(), str(len(h) + 4)]


def test_bytes_written_count_no_syn() -> None:
    """The sockmap's drain check compares what a side received with what its peer was
    given to send; the acknowledged count of a connecting socket includes its SYN."""
    with socket.create_server(("127.0.0.1", 0)) as ls:
        with socket.create_connection(ls.getsockname()) as out:
            inn, _ = ls.accept()
            with inn:
                assert (_written(out, True), _written(inn, False)) == (0, 0)
                out.sendall(b"abc")
                inn.sendall(b"de")
                assert inn.recv(3) == b"abc" and out.recv(2) == b"de"
                assert (_written(out, True), _written(inn, False)) == (3, 2)


# -- what ends a connection ---------------------------------------------------------------


def test_not_tls_is_closed_with_a_fin_and_no_backend_with_a_reset(lab_factory: Any) -> None:
    run, addr, _ = lab_factory()
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(10) == b""
    run.acc.routes.apply(RoutingUpdate({1: GroupTable(array("H"), ())}, {7: (1, {})}))
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(hello("b.example.com"))
        with pytest.raises(ConnectionResetError):
            s.recv(10)
    assert (run.acc.stats["not_tls"], run.acc.stats["no_backend"]) == (1, 1)


def test_a_refusing_backend_resets_the_client(lab_factory: Any) -> None:
    run, addr, backends = lab_factory()
    backends["b1"].close()                      # nothing listens there any more
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(hello(None))
        with pytest.raises(ConnectionResetError):
            s.recv(10)
    assert run.acc.stats["backend_failed"] == 1


def test_a_wake_up_below_the_low_water_mark_is_no_end() -> None:
    """epoll may report a socket readable with fewer bytes than SO_RCVLOWAT asks for
    (memory pressure, a window under one segment): without an end of stream the reader
    waits on. The loop's handlers are driven by hand here, with such a wake-up."""
    backend = Backend_("127.0.0.1", "b1")
    acc = Acceptor(SniSettings())
    addr = ("127.0.0.1", free_port("127.0.0.1"))
    try:
        acc.routes.apply(RoutingUpdate({1: GroupTable(array("H", [0]), (
            Backend(socket.AF_INET, backend.addr),))}, {7: (1, {})}))
        acc.set_listeners({addr: Route(7, "t")})
        lst = acc.listeners[addr]
        h = hello("a.example.com", alpn=40)
        with socket.create_connection(addr, timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(h[:100])
            time.sleep(0.1)
            acc._accept(lst, lst.sock.fileno(), select.EPOLLIN)
            (c,) = [h_[1] for h_ in acc.handlers.values() if isinstance(h_[1], Conn)]
            assert c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == len(h)
            s.sendall(h[100:200])
            time.sleep(0.1)
            acc._hello_ready(c, c.fds[0], select.EPOLLIN)    # 200 bytes of len(h)
            assert (c.reader is not None, acc.stats["closed_early"]) == (True, 0)
            s.sendall(h[200:])
            time.sleep(0.1)
            acc._hello_ready(c, c.fds[0], select.EPOLLIN)
            assert c.reader is None and c.up is not None     # routed, connecting
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(h[:100])
            s.shutdown(socket.SHUT_WR)
            time.sleep(0.1)
            acc._accept(lst, lst.sock.fileno(), select.EPOLLIN)
            (c2,) = [h_[1] for h_ in acc.handlers.values()
                     if isinstance(h_[1], Conn) and h_[1] is not c]
            acc._hello_ready(c2, c2.fds[0], select.EPOLLIN | select.EPOLLRDHUP)
            assert acc.stats["closed_early"] == 1            # an end is an end
    finally:
        acc.close()
        backend.close()


def test_idle_pairs_close_and_busy_ones_stay(lab_factory: Any, forward: Any) -> None:
    run, addr, _ = lab_factory(settings=SniSettings(idle_timeout=1.0), splicer=forward)
    idle = socket.create_connection(addr, timeout=10)
    busy = socket.create_connection(addr, timeout=10)
    t0 = time.monotonic()
    idle.sendall(hello("a.example.com"))
    busy.sendall(hello("a.example.com"))
    while time.monotonic() - t0 < 2.5:
        busy.sendall(b"tick")
        time.sleep(0.2)
    idle.settimeout(5)
    assert idle.recv(10) == b""                 # closed, while the busy one went on
    wait("the idle pair's count", lambda: run.acc.stats["idle_timeout"] == 1)
    busy.shutdown(socket.SHUT_WR)
    assert recv_all(busy).split()[0] == b"b2"
    idle.close()
    busy.close()


def test_keepalive_and_nodelay_on_both_sides(lab_factory: Any, forward: Any) -> None:
    run, addr, _ = lab_factory(modes=("hold", "hold"), splicer=forward)
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(hello("a.example.com"))
        wait("the pair", lambda: run.acc.pairs == 1)
        (c,) = run.conns()
        for sock in (c.sock, c.up):
            assert sock is not None
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


class CountingEpoll:
    """The acceptor's epoll, counting the loop's turns."""

    def __init__(self, ep: select.epoll) -> None:
        self.ep, self.polls = ep, 0

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        self.polls += 1
        return self.ep.poll(timeout, maxevents)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ep, name)


def counting(acc: Acceptor) -> None:
    acc.ep = CountingEpoll(acc.ep)  # type: ignore[assignment]


def test_urgent_data_resets_the_pair_without_spinning(lab_factory: Any) -> None:
    """splice(2) stops at the urgent mark with EAGAIN while the socket stays readable: the
    pair is reset (TLS has no urgent data) instead of the loop turning until idle."""
    run, addr, _ = lab_factory(modes=("hold", "hold"), before=counting)
    with socket.create_connection(addr, timeout=2) as s:
        s.sendall(hello("a.example.com"))
        wait("the pair", lambda: run.acc.pairs == 1)
        turns = run.acc.ep.polls
        s.send(b"u", socket.MSG_OOB)
        with pytest.raises(ConnectionResetError):
            s.send(b"v")    # the reset may be here already
            s.recv(1)
    assert run.acc.ep.polls - turns < 20, "the loop spins"
    assert (run.acc.stats["reset"], run.acc.pairs) == (1, 0)


class NoPipes(PipePool):
    """A pipe pool that cannot make a pipe while `full`, as when out of descriptors."""

    __slots__ = ("full",)

    def __init__(self) -> None:
        super().__init__()
        self.full = True

    def new(self) -> tuple[int, int]:
        if self.full:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super().new()


def _served(addr: tuple[str, int]) -> bool:
    with socket.create_connection(addr, timeout=3) as s:
        try:
            s.sendall(hello("a.example.com"))
            s.shutdown(socket.SHUT_WR)      # ENOTCONN once reset
            return recv_all(s).split()[:1] == [b"b2"]
        except OSError:
            return False


def test_no_pipe_resets_that_pair_only(lab_factory: Any) -> None:
    pool = NoPipes()
    run, addr, _ = lab_factory(before=lambda acc: setattr(acc, "pipes", pool))
    assert not _served(addr)
    assert run.acc.stats["reset"] == 1
    pool.full = False
    assert _served(addr), "the loop died"


def test_an_error_in_a_handler_resets_that_connection_only(lab_factory: Any) -> None:
    run, addr, _ = lab_factory()
    route = run.acc._route

    def broken(c: Conn, name: str | None) -> None:
        run.acc._route = route      # type: ignore[method-assign]
        raise RuntimeError("a bug")

    run.acc._route = broken         # type: ignore[method-assign]
    assert not _served(addr)
    assert _served(addr), "the loop died"
    wait("all closed", lambda: run.acc.waiting == run.acc.pairs == 0)


def test_finished_connections_are_let_go(lab_factory: Any) -> None:
    """A finished connection keeps no hello buffer, and nothing keeps it once its hello
    and connect deadlines have passed (the idle check holds live pairs only)."""
    run, addr, _ = lab_factory(settings=SniSettings(hello_timeout=1.0, connect_timeout=0.3))
    lst = run.acc.listeners[addr]

    def ours() -> list[Conn]:
        return [o for o in gc.get_objects() if isinstance(o, Conn) and o.lst is lst]

    for _ in range(3):
        assert _served(addr)
    with socket.create_connection(addr) as s:
        s.sendall(hello("a.example.com", alpn=40)[:100])    # a hello begun, then gone
        wait("its wait", lambda: run.acc.waiting == 1)
    wait("the early close", lambda: run.acc.stats["closed_early"] == 1)
    held = ours()
    assert held and all(c.reader is None for c in held)
    del held
    time.sleep(1.5)                             # past every hello and connect deadline
    run.stop()
    assert ours() == []


# -- bounds -------------------------------------------------------------------------------


def _refused(addr: tuple[str, int], source: str | None = None) -> bool:
    """Whether a connection with a hello is reset."""
    s = socket.socket(family(addr[0]))
    if source:
        s.bind((source, 0))
    with s:
        s.connect(addr)
        s.settimeout(1)
        s.sendall(hello("a.example.com"))
        try:
            s.recv(1)
        except ConnectionResetError:
            return True
        except TimeoutError:
            pass
        return False


def test_pending_hellos_are_bounded_the_oldest_making_room(lab_factory: Any) -> None:
    """At the bound, the connection that has waited longest for the rest of its hello is
    reset for a new one: a flood of clients that send a byte each and then nothing cannot
    keep out one that sends its hello."""
    run, addr, _ = lab_factory(settings=SniSettings(max_pending=3))
    half: list[socket.socket] = []
    for _ in range(3):
        half.append(socket.create_connection(addr, timeout=2))
        half[-1].sendall(hello("a.example.com")[:20])   # a hello begun, never finished
        wait("its wait", lambda: run.acc.waiting == len(half))
    assert _served(addr)
    assert (run.acc.stats["evicted"], run.acc.stats["refused"]) == (1, 0)
    with pytest.raises(ConnectionResetError):
        half[0].recv(1)
    for s in half[1:]:
        s.setblocking(False)
        with pytest.raises(BlockingIOError):            # still waiting
            s.recv(1)
    for s in half:
        s.close()
    wait("the slots free", lambda: run.acc.waiting == 0)


def test_clients_are_counted_by_ipv4_address_and_ipv6_slash_64() -> None:
    v6, v4 = socket.AF_INET6, socket.AF_INET
    assert client_key(v6, "2001:db8:1:2::1") == client_key(v6, "2001:db8:1:2:ffff::9")
    assert client_key(v6, "2001:db8:1:2::1") != client_key(v6, "2001:db8:1:3::1")
    assert client_key(v6, "fe80::1%lo") == client_key(v6, "fe80::2")
    assert client_key(v4, "192.0.2.1") != client_key(v4, "192.0.2.2")


def test_pairs_and_per_client_connections_are_bounded(lab_factory: Any) -> None:
    run, addr, _ = lab_factory(settings=SniSettings(max_pairs=4, max_per_client=2),
                               modes=("hold", "hold"))
    held = []
    for src in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"):
        s = socket.socket()
        s.bind((src, 0))
        s.connect(addr)
        s.sendall(hello("a.example.com"))
        held.append(s)
    wait("four pairs", lambda: run.acc.pairs == 4)
    assert _refused(addr, "127.0.0.3")          # pairs at their bound
    gone = held.pop()                           # a reset ends its pair at once (a FIN
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.close()                                # would leave the backend's side open)
    wait("three pairs", lambda: run.acc.pairs == 3)
    assert _refused(addr, "127.0.0.1")          # that client has two already
    assert not _refused(addr, "127.0.0.3")
    assert run.acc.stats["refused"] == 2
    for s in held:
        s.close()


def _cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(os.geteuid() != 0, reason="lowers another process's file limit")
def test_out_of_descriptors_refuses_without_spinning() -> None:
    """EMFILE at accept leaves the connection in the listen queue, which wakes the loop
    again at once: the acceptor takes it off with a spare descriptor and resets it.
    Clients that sent half a hello hold one descriptor each until the limit is reached."""
    backend = Backend_("127.0.0.1", "b1", "hold")
    worker = Worker(SniSettings(hello_timeout=60), "/nonexistent")
    addr = ("127.0.0.1", free_port("127.0.0.1"))
    try:
        worker.ask("routes", RoutingUpdate({1: GroupTable(array("H", [0]), (
            Backend(socket.AF_INET, backend.addr),))}, {7: (1, {})}))
        assert worker.ask("listen", {addr: Route(7, "t")}) == []
        resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (40, 40))
        held, outcomes = [], []
        for _ in range(50):
            s = socket.create_connection(addr, timeout=5)
            s.sendall(hello("a.example.com")[:20])
            held.append(s)
        time.sleep(0.5)
        cpu0, t0 = _cpu(worker.pid), time.monotonic()
        time.sleep(1.0)
        spent = _cpu(worker.pid) - cpu0
        for s in held:
            s.setblocking(False)
            try:
                outcomes.append("data" if s.recv(1) else "closed")
            except ConnectionResetError:
                outcomes.append("reset")
            except BlockingIOError:
                outcomes.append("open")
        stats, _ = worker.ask("stats")
        assert stats["refused"] > 5 and outcomes.count("reset") == stats["refused"], outcomes
        assert outcomes.count("open") + stats["refused"] == len(held), outcomes
        assert spent < 0.2 * (time.monotonic() - t0), f"{spent:.2f} s CPU: the loop spins"
        for s in held:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(hello("a.example.com"))
            wait("served again", lambda: worker.ask("stats")[1] == 1)
    finally:
        worker.stop()
        backend.close()


# -- the acceptor's process ---------------------------------------------------------------


def test_the_acceptor_process_dies_with_its_agent() -> None:
    code = ("import sys, time; from xdplb.sni.worker import Worker; "
            "from xdplb.sni.settings import SniSettings; "
            "w = Worker(SniSettings(), '/nonexistent'); print(w.pid, flush=True); "
            "time.sleep(60)")
    agent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
        assert os.path.exists(f"/proc/{pid}")
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        wait("the acceptor to exit", lambda: not os.path.exists(f"/proc/{pid}") or
             open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z")
    finally:
        agent.kill()
        agent.wait()


def test_a_worker_that_cannot_start_says_why() -> None:
    with pytest.raises(WorkerError, match="compiling the splice failed"):
        Worker(SniSettings(forward="sockmap"), "/proc/xdplb-nowhere")


def test_a_worker_that_does_not_answer_in_time_is_ended() -> None:
    """Its late answer would be read as the next request's: the process goes instead."""
    worker = Worker(SniSettings(), "/nonexistent")
    try:
        worker.sock.settimeout(0.3)
        os.kill(worker.pid, signal.SIGSTOP)
        with pytest.raises(WorkerError, match="did not answer"):
            worker.ask("stats")
        assert not worker.alive()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGCONT)
        worker.kill()


class NoLocalRoutes(SniService):
    """The agent's SNI service, its VIP an address of the node already: the local
    routes (the machine's, which this test leaves alone) are not its part here."""

    def _add_routes(self, addrs: set[str]) -> None:
        assert not addrs

    def _remove_routes(self, keep: set[str]) -> None:
        pass


def test_an_acceptor_that_could_not_start_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sni_service, "RETRY_FIRST", 0.3)
    port = free_port("127.0.0.1")
    plan = build_plan(parse_manifests(f"""
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: tls}}
spec:
  interfaces: [lo]
  listeners:
  - {{name: tls, protocol: TCP, port: {port}, address: 127.0.0.1,
      backends: [{{address: 127.0.0.1, port: 9}}],
      sniRoutes: [{{hostname: a.example.com, backends: [{{address: 127.0.0.1, port: 9}}]}}]}}
"""))
    inv = Inventory(ifindex={"lo": 1}, addresses={"lo": ("127.0.0.1",)}, default_interface="lo")
    ids = {lst.identity: i for i, lst in enumerate(plan.listeners)}
    bad = SniSettings()
    object.__setattr__(bad, "max_pairs", 0)     # the acceptor process refuses to start
    svc = NoLocalRoutes("/nonexistent", bad)
    try:
        (problem,) = svc.apply(plan, inv, ids)
        assert "not served" in problem and svc.worker is None
        svc.settings = SniSettings()            # what failed it is gone
        svc.check()
        assert svc.worker is None               # not before its time
        time.sleep(0.4)
        svc.check()
        assert svc.worker is not None and svc.worker.alive()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        svc.stop()
