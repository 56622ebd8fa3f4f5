"""The SNI acceptor: accept -> peek at the ClientHello -> pick a backend -> connect ->
(PROXY v2 header) -> splice. No payload byte passes through Python.

One epoll loop, no asyncio: a dict of descriptor -> (handler, connection), and FIFO
deadline queues (every connection of a queue waits the same time). Listening sockets have
TCP_DEFER_ACCEPT, so a connection is accepted once its first bytes (the ClientHello,
nearly always whole) are there: accept, peek, parse, pick and a non-blocking connect
happen in one go. While a ClientHello is incomplete its socket's SO_RCVLOWAT is the bytes
still missing, so epoll stays quiet until they arrive and a slow or silent client costs
nothing but its place in a queue.

Forwarding (`forward` setting):
- pipe (default): splice(2) through a pipe, socket -> pipe -> socket, pages moved by
  reference. Every move wakes the loop once (two system calls), and the loop sees each
  end of stream, reset and idle period directly.
- sockmap: both sockets join a sockhash whose sk_skb verdict sends what one receives out
  of the other (dataplane/bpf/splice.c); the loop sleeps until a side ends (EPOLLRDHUP,
  edge-triggered, without EPOLLIN), then passes the FIN on once the side's bytes have
  reached its peer's send queue. A connection that cannot join is spliced through a pipe.
bench/README.md says which is faster here and why.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable
from typing import Any

from xdplb.sni.clienthello import (
    MAX_HELLO,
    HelloError,
    HelloReader,
    HelloTooLong,
    Incomplete,
    fast_parse,
)
from xdplb.sni.deadlines import Deadlines
from xdplb.sni.pipes import PipePool, discard
from xdplb.sni.proxyproto import header as proxy_header
from xdplb.sni.routes import Address, Backend, Route, RoutingReceiver, pick_for
from xdplb.sni.settings import OUTCOMES, SniSettings
from xdplb.sni.splice import JoinBroken, Splicer

__all__ = ["OUTCOMES", "Acceptor", "listen_socket"]

log = logging.getLogger("xdplb.sni")

IN, OUT, RDHUP, ERR, HUP, ET, PRI = (select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP,
                                     select.EPOLLERR, select.EPOLLHUP, select.EPOLLET,
                                     select.EPOLLPRI)
READ = IN | RDHUP
# A pair's source: PRI too. splice(2) stops at the urgent mark and then fails with EAGAIN
# while EPOLLIN stays set: a level-triggered loop would spin. TLS never sends urgent data.
PAIR_READ = READ | PRI
BACKLOG = 4096
IP_FREEBIND, IPV6_FREEBIND = 15, 78
DEFER_ACCEPT = 1         # seconds the kernel holds a connection that has sent nothing yet
ACCEPT_BURST = 1024      # accepts per wake-up at most, so that a flood starves nobody
CHUNK = 1 << 20          # bytes asked of one splice
SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
TCP = socket.IPPROTO_TCP
# Keepalive: a peer gone without a word is found within about two minutes. Accepted
# sockets inherit all of it from the listener; a backend socket gets what differs most
# from the kernel's defaults (2 h idle), one option per system call.
KEEPALIVE = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (TCP, socket.TCP_KEEPIDLE, 60),
             (TCP, socket.TCP_KEEPINTVL, 10), (TCP, socket.TCP_KEEPCNT, 6))
BACKEND_OPTIONS = ((TCP, socket.TCP_NODELAY, 1), *KEEPALIVE[:2])
LINGER_RESET = struct.pack("ii", 1, 0)
DRAIN_DELAYS = (0.002, 0.01, 0.05, 0.25, 1.0)   # sockmap: re-checks of a side's draining
IDLE_CHECKS = 10         # an idle pair is looked at this many times per idle timeout
WARN_EVERY = 10.0        # seconds between two warnings of one kind

WAIT_HELLO, CONNECTING, PAIRED, DONE = range(4)
TCP_ESTABLISHED = 1
HOLD = 1 << 30           # SO_RCVLOWAT that holds the sockmap verdict back during a join
INF = float("inf")
# Connections are sockets of the C type under socket.socket: no Python-level __init__, no
# enum conversion of their family at every accept (about 5 µs a connection here).
Sock = _socket.socket


def listen_socket(address: str, port: int) -> socket.socket:
    """A listening socket on address:port; FREEBIND lets it bind a VIP that is made local
    by a route rather than an interface address. Accepted sockets inherit TCP_NODELAY
    (the splice sends each segment on as it arrives: Nagle's algorithm would hold a small
    one until the peer's delayed ACK) and keepalive."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.setsockopt(TCP, socket.TCP_NODELAY, 1)
        for opt in KEEPALIVE:
            s.setsockopt(*opt)
        s.setsockopt(TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
        s.bind((address, port))
        s.listen(BACKLOG)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class Listening:
    __slots__ = ("accept", "family", "local", "local_int", "port", "route", "sock")

    def __init__(self, sock: socket.socket, route: Route, address: Address) -> None:
        self.sock, self.route, self.port = sock, route, address[1]
        # (descriptor, peer address): accept(2) without making a socket.socket of it.
        self.accept: Callable[[], tuple[int, Any]] = sock._accept  # type: ignore[attr-defined]
        self.family = sock.family
        self.local = socket.inet_pton(self.family, address[0])
        self.local_int = int.from_bytes(self.local, "big")


class Conn:
    """One client connection, from accept to close; its backend socket and, once paired,
    the state of both directions (0: client -> backend, 1: backend -> client)."""

    __slots__ = ("backend", "client_key", "cookies", "done", "eof", "extra", "fds", "last",
                 "lst", "masks", "peer", "pending", "phase", "pipes", "reader", "reading",
                 "sock", "spliced", "up")

    def __init__(self, sock: Sock, peer: Any, lst: Listening) -> None:
        self.sock, self.peer, self.lst = sock, peer, lst
        self.up: Sock | None = None
        self.phase = WAIT_HELLO
        self.reader: HelloReader | None = None
        self.client_key: bytes | None = None
        self.backend: Backend | None = None
        self.fds = (sock.fileno(), -1)
        self.spliced = False       # sockmap: joined in the kernel
        self.extra = 0             # bytes the acceptor wrote to the backend (PROXY header)
        self.last = 0.0            # pipe: when a byte last moved

    def start_pair(self) -> None:
        self.masks = [0, 0]
        self.pipes: list[tuple[int, int] | None] = [None, None]
        self.pending = [0, 0]      # bytes a direction holds in its pipe
        self.reading = [True, True]
        self.eof = [False, False]  # its source ended
        self.done = [False, False]  # ... and the FIN was passed on


Handler = Callable[[Any, int, int], None]


class Acceptor:
    """Listens where `set_listeners` says, routes by `routes` (a RoutingReceiver the
    agent's updates go to), forwards. `run` is the loop; `stop` ends it from within."""

    def __init__(self, settings: SniSettings, splicer: Splicer | None = None) -> None:
        self.settings = settings
        self.splicer = splicer
        self.stats = dict.fromkeys(OUTCOMES, 0)
        self.routes = RoutingReceiver()
        self.ep = select.epoll()
        self.handlers: dict[int, tuple[Handler, Any]] = {}
        self.listeners: dict[Address, Listening] = {}
        self.pairs = 0
        self.waiting = 0                                  # for a hello or a backend
        self.per_client: dict[bytes, int] = {}
        self.pipes = PipePool()
        s = settings
        self.hellos: Deadlines[Conn] = Deadlines(s.hello_timeout)
        # Accepted after TCP_DEFER_ACCEPT with nothing sent: their wait began earlier.
        self.late_hellos: Deadlines[Conn] = Deadlines(max(s.hello_timeout - DEFER_ACCEPT,
                                                          0.05))
        self.connects: Deadlines[Conn] = Deadlines(s.connect_timeout)
        # Pairs are looked at by a sweep over `live` every idle_timeout / IDLE_CHECKS:
        # a queue entry per pair would keep finished ones alive that long.
        self.live: dict[Conn, None] = {}
        self.idle: Deadlines[None] = Deadlines(s.idle_timeout / IDLE_CHECKS
                                               if s.idle_timeout else 3600.0)
        self._sweeping = False
        self.drains = [Deadlines[tuple[Conn, int]](d) for d in DRAIN_DELAYS]
        self.queues: list[Deadlines[Any]] = [self.hellos, self.late_hellos, self.connects,
                                             self.idle, *self.drains]
        self.now = time.monotonic()
        self._wake_at = INF          # the earliest deadline of any queue, or later
        self.running = True
        self._closing: list[Sock] = []
        self._spare: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._warned: dict[str, float] = {}

    # -- the loop --------------------------------------------------------------------
    def watch(self, fd: int, mask: int, handler: Handler, obj: Any = None) -> None:
        """Call handler(obj, fd, events) when fd is ready (the worker's control socket)."""
        self.handlers[fd] = (handler, obj)
        self.ep.register(fd, mask)

    def run(self) -> None:
        handlers = self.handlers
        poll = self.ep.poll
        while self.running:
            events = poll(self._timeout(), 1024)
            self.now = time.monotonic()
            for fd, ev in events:
                h = handlers.get(fd)
                if h is not None:
                    try:
                        h[0](h[1], fd, ev)
                    except Exception as e:      # one connection's bug ends that one only
                        self._failed(h[1], e)
            if self.now >= self._wake_at:
                try:
                    self._expire()
                except Exception as e:
                    self._failed(None, e)
            if self._closing:
                # Closed only now: a descriptor number freed while later events of this
                # batch still name it could be reused by an accept of the same batch.
                for s in self._closing:
                    s.close()
                self._closing.clear()

    def _failed(self, obj: Any, e: Exception) -> None:
        """A handler raised: log it (now and then) and reset its connection, if it has
        one, rather than let the loop die with every other pair."""
        now = time.monotonic()
        last = self._warned.get("internal")
        if last is None or now - last >= WARN_EVERY:
            self._warned["internal"] = now
            log.error("SNI: unexpected error, its connection reset: %r", e, exc_info=e)
        if isinstance(obj, Conn) and obj.phase != DONE:
            with contextlib.suppress(Exception):
                self._finish(obj, reset=True)

    def _timeout(self) -> float:
        if self._wake_at == INF:
            return -1
        return max(self._wake_at - time.monotonic(), 0.0)

    def _later(self, queue: Deadlines[Any], item: Any) -> None:
        due = queue.add(self.now, item)
        if due < self._wake_at:
            self._wake_at = due

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        """Close listeners and every connection (clients see their connections end)."""
        self.set_listeners({})
        for h in list(self.handlers.values()):
            c = h[1]
            if isinstance(c, Conn) and c.phase != DONE:
                self._finish(c, reset=c.phase == PAIRED)
        for s in self._closing:
            s.close()
        self._closing.clear()
        self.pipes.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        self.ep.close()

    # -- listeners -------------------------------------------------------------------
    def set_listeners(self, want: dict[Address, Route]) -> list[str]:
        """Listen on exactly `want`; returns problems (addresses that cannot be bound)."""
        problems = []
        for addr in [a for a in self.listeners if a not in want]:
            lst = self.listeners.pop(addr)
            del self.handlers[lst.sock.fileno()]
            lst.sock.close()
            log.info("SNI: stopped listening on %s port %d", *addr)
        for addr, route in want.items():
            if addr in self.listeners:
                self.listeners[addr].route = route
                continue
            try:
                sock = listen_socket(*addr)
            except OSError as e:
                problems.append(f"{route.label}: cannot listen on {addr[0]} port {addr[1]}: "
                                f"{e.strerror}")
                continue
            lst = self.listeners[addr] = Listening(sock, route, addr)
            self.watch(sock.fileno(), IN, self._accept, lst)
            log.info("SNI: listening on %s port %d for %s", addr[0], addr[1], route.label)
        return problems

    # -- accept and hello ------------------------------------------------------------
    def _accept(self, lst: Listening, _fd: int, _ev: int) -> None:
        accept = lst.accept
        family = lst.family
        stats = self.stats
        s = self.settings
        for _ in range(ACCEPT_BURST):
            try:
                fd, peer = accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if self._refuse_one(lst, e):
                        continue
                    return        # no spare descriptor either: not 1024 futile tries
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                self._warn("accept", f"SNI: accept on {lst.route.label}: {e}")
                return
            sock = Sock(family, socket.SOCK_STREAM, 0, fd)
            stats["accepted"] += 1
            why = "pairs (--sni-max-pairs)" if self.pairs >= s.max_pairs else ""
            key = None
            if s.max_per_client:
                key = client_key(family, peer[0])
                if self.per_client.get(key, 0) >= s.max_per_client:
                    why = "connections of one client (--sni-max-per-client)"
            if not why and self.waiting >= s.max_pending and not self._evict():
                why = "connections waiting for a backend"
            if why:
                self._refuse(sock, why)
                continue
            c = Conn(sock, peer, lst)
            if key is not None:
                c.client_key = key
                self.per_client[key] = self.per_client.get(key, 0) + 1
            self.waiting += 1
            try:
                data = sock.recv(MAX_HELLO, PEEK)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            try:
                if not data:
                    if data is None:        # accepted on the kernel's timeout, nothing sent
                        self._wait_hello(c, b"", self.late_hellos)
                        continue
                    stats["closed_early"] += 1
                    self._finish(c)
                    continue
                hello = fast_parse(data)
                if hello is not None:
                    self._route(c, hello.server_name)
                else:
                    self._wait_hello(c, data, self.hellos)
            except Exception as e:   # a bug met by this connection ends it, no other
                self._failed(c, e)

    def _wait_hello(self, c: Conn, data: bytes, queue: Deadlines[Conn]) -> None:
        """The slow path: a hello in several records or segments, or not yet sent."""
        c.reader = HelloReader()
        if self._read_hello(c, data):
            self._later(queue, c)
            self.handlers[c.fds[0]] = (self._hello_ready, c)
            self.ep.register(c.fds[0], READ | ET)

    def _read_hello(self, c: Conn, data: bytes) -> bool:
        """Parse what has arrived; True while more must come."""
        assert c.reader is not None
        try:
            res = c.reader.feed(data)
        except HelloTooLong:
            self.stats["hello_too_long"] += 1
            self._hello_done(c, None)
            return False
        except HelloError as e:
            self.stats["not_tls"] += 1
            log.debug("SNI: %s port %d is not TLS (%s): closed", c.peer[0], c.peer[1], e)
            self._finish(c, drain=True)
            return False
        if isinstance(res, Incomplete):
            if data:    # woken only once `need` bytes are there (or at an end or error)
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, res.need)
            return True
        self._hello_done(c, res.server_name)
        return False

    def _hello_ready(self, c: Conn, fd: int, ev: int) -> None:
        ended = ev & (RDHUP | HUP | ERR)
        try:
            data = c.sock.recv(MAX_HELLO, PEEK)
        except BlockingIOError:
            if not ended:
                return
            data = b""
        except OSError:
            data = b""
        # A wake-up short of SO_RCVLOWAT without an end (memory pressure, a small
        # window) is no end of stream: the reader waits on.
        if data and (not self._read_hello(c, data) or not ended):
            return
        if c.phase == WAIT_HELLO:   # the client ended its side, its hello incomplete
            self.stats["closed_early"] += 1
            self._finish(c)

    def _hello_done(self, c: Conn, name: str | None) -> None:
        if c.reader is not None and c.fds[0] in self.handlers:
            # Off the slow path: forget the hello's watch; the pair watches anew.
            del self.handlers[c.fds[0]]
            self.ep.unregister(c.fds[0])
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        c.reader = None
        self._route(c, name)

    # -- backend ---------------------------------------------------------------------
    def _route(self, c: Conn, name: str | None) -> None:
        lst = c.lst
        backend = pick_for(self.routes.routing, lst.route, name, lst.family, c.peer,
                           lst.local_int, lst.port)
        if backend is None:     # closed with a RST, as XDP answers such a SYN
            self.stats["no_backend"] += 1
            self._finish(c, reset=True)
            return
        c.backend = backend
        try:
            up = Sock(backend.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self._refuse(c.sock, f"backend sockets ({e.strerror})", c)
            return
        c.up = up
        try:
            for opt in BACKEND_OPTIONS:
                up.setsockopt(*opt)
            err = up.connect_ex(backend.address)
        except OSError as e:
            err = e.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            self._backend_failed(c, os.strerror(err))
            return
        c.phase = CONNECTING
        c.fds = (c.fds[0], up.fileno())
        self.handlers[c.fds[1]] = (self._connected, c)
        self.ep.register(c.fds[1], OUT | RDHUP)   # RDHUP: a backend that spoke and ended
        self._later(self.connects, c)

    def _connected(self, c: Conn, fd: int, ev: int) -> None:
        assert c.up is not None
        if ev & (ERR | HUP):
            err = c.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._backend_failed(c, os.strerror(err) if err else "closed")
            return
        if self.pairs >= self.settings.max_pairs:
            self._refuse(c.sock, "pairs (--sni-max-pairs)", c)
            return
        lst = c.lst
        if lst.route.proxy_protocol:
            hdr = proxy_header(lst.family, socket.inet_pton(lst.family, c.peer[0]), lst.local,
                               c.peer[1], lst.port)
            try:
                sent = c.up.send(hdr)
            except OSError:
                sent = -1
            if sent != len(hdr):
                self._backend_failed(c, "cannot send the PROXY header")
                return
            c.extra = sent
        self.waiting -= 1
        self.pairs += 1
        c.phase = PAIRED
        c.start_pair()
        c.last = self.now
        self.live[c] = None
        if self.settings.idle_timeout and not self._sweeping:
            self._sweeping = True
            self._later(self.idle, None)
        if self.splicer is not None and self._join(c, ev):
            return
        self._pipe_pair(c, counted=self.splicer is not None)

    def _backend_failed(self, c: Conn, why: str) -> None:
        self.stats["backend_failed"] += 1
        b = c.backend
        self._warn(f"backend {b}", f"SNI: {c.lst.route.label}: backend "
                   f"{b.address[0] if b else '?'} port {b.address[1] if b else 0}: {why}")
        self._finish(c, reset=True)

    # -- pipe forwarding -------------------------------------------------------------
    def _pipe_pair(self, c: Conn, counted: bool = False) -> None:
        c.sock.setblocking(False)     # a full client must not block the loop
        if not counted:
            self.stats["spliced"] += 1
        self.handlers[c.fds[0]] = self.handlers[c.fds[1]] = (self._on_pair, c)
        c.masks = [PAIR_READ, PAIR_READ]
        self.ep.register(c.fds[0], PAIR_READ)
        self.ep.modify(c.fds[1], PAIR_READ)
        self._move(c, 0)              # the ClientHello is there: no need to wait for epoll

    def _on_pair(self, c: Conn, fd: int, ev: int) -> None:
        if ev & PRI:
            log.debug("SNI: %s port %d: urgent data, reset", *c.peer[:2])
            self._reset(c)
            return
        i = 0 if fd == c.fds[0] else 1
        if ev & OUT and c.pending[1 - i]:
            self._flush(c, 1 - i)
            if c.phase != PAIRED:
                return
        if c.reading[i] and ev & (IN | RDHUP | HUP | ERR):
            self._move(c, i)
        elif ev & (ERR | HUP):    # a socket not read that failed: both sides go
            self._reset(c)

    def _move(self, c: Conn, d: int) -> None:
        """Move what side d received to the other side."""
        free = self.pipes.free
        if free:
            pipe = free.pop()
        else:
            try:
                pipe = self.pipes.new()
            except OSError as e:    # out of descriptors or pipe memory: this pair goes
                self._warn("pipes", f"SNI: cannot make a pipe ({e.strerror}): pairs reset")
                self._reset(c)
                return
        try:
            n = os.splice(c.fds[d], pipe[1], CHUNK, flags=SPLICE)
        except BlockingIOError:
            free.append(pipe)
            return
        except OSError:
            free.append(pipe)
            self._reset(c)
            return
        if not n:
            free.append(pipe)
            self._end_of(c, d)
            return
        c.last = self.now
        try:
            m = os.splice(pipe[0], c.fds[1 - d], n, flags=SPLICE)
        except BlockingIOError:
            m = 0
        except OSError:
            discard(pipe)
            self._reset(c)
            return
        if m == n:
            free.append(pipe)     # empty again: the next move takes it
            return
        # The destination is full: hold the rest, stop reading until it drains.
        c.pipes[d], c.pending[d], c.reading[d] = pipe, n - m, False
        self._watch(c)

    def _flush(self, c: Conn, d: int) -> None:
        """Direction d's destination can take more: send what its pipe holds."""
        pipe = c.pipes[d]
        assert pipe is not None
        try:
            m = os.splice(pipe[0], c.fds[1 - d], c.pending[d], flags=SPLICE)
        except BlockingIOError:
            return
        except OSError:
            self._reset(c)
            return
        c.pending[d] -= m
        c.last = self.now         # bytes moving out of a held pipe are no idleness
        if c.pending[d]:
            return
        self.pipes.put(pipe)
        c.pipes[d] = None
        if c.eof[d]:
            self._pass_fin(c, d)
        else:
            c.reading[d] = True
            self._watch(c)

    def _end_of(self, c: Conn, d: int) -> None:
        c.eof[d], c.reading[d] = True, False
        if not c.pending[d]:
            self._pass_fin(c, d)
        elif c.phase == PAIRED:
            self._watch(c)

    def _pass_fin(self, c: Conn, d: int) -> None:
        with contextlib.suppress(OSError):
            (c.up if d == 0 else c.sock).shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        c.done[d] = True
        if c.done[1 - d]:
            self.stats["closed"] += 1
            self._finish(c)
        else:
            self._watch(c)

    def _watch(self, c: Conn) -> None:
        """Each socket is watched for reading while its direction is open and free, and
        for room while the other direction holds bytes for it. A socket with nothing to
        watch leaves epoll: one whose peer has ended while its bytes wait for room would
        report EPOLLHUP at every turn of the loop."""
        for i in (0, 1):
            mask = (PAIR_READ if c.reading[i] else 0) | (OUT if c.pending[1 - i] else 0)
            cur = c.masks[i]
            if mask == cur:
                continue
            c.masks[i] = mask
            if not mask:
                self.ep.unregister(c.fds[i])
            elif not cur:
                self.ep.register(c.fds[i], mask)
            else:
                self.ep.modify(c.fds[i], mask)

    def _reset(self, c: Conn) -> None:
        self.stats["reset"] += 1
        if log.isEnabledFor(logging.DEBUG):
            errs = [s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if s else 0
                    for s in (c.sock, c.up)]
            log.debug("SNI: %s port %d: reset (client error %d, backend error %d, ended %s, "
                      "passed on %s)", c.peer[0], c.peer[1], *errs, c.eof, c.done)
        self._finish(c, reset=True)

    # -- sockmap forwarding ----------------------------------------------------------
    def _join(self, c: Conn, ev: int) -> bool:
        assert self.splicer is not None and c.up is not None
        # Only established sockets can join: a backend that spoke and half-closed
        # already, or a client that half-closed, is spliced through a pipe instead.
        if ev & RDHUP or _state(c.sock) != TCP_ESTABLISHED:
            self.stats["relayed"] += 1
            return False
        # Between the join's two map updates, the verdict would drop what the socket
        # already in receives (its peer is not found yet). A low-water mark above what
        # can arrive keeps TCP from waking the verdict at all until it is lowered below.
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, HOLD)
        c.up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, HOLD)
        try:
            self.splicer.join(c.sock, c.up)
        except JoinBroken as e:     # the client half-closed since: rare, and reset
            log.debug("SNI: %s port %d: %s", *c.peer[:2], e)
            self._reset(c)
            return True
        except OSError as e:        # a backend closing since, or a full sockhash
            self.stats["relayed"] += 1
            log.debug("SNI: %s port %d spliced through a pipe (%s)", *c.peer[:2], e)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            c.up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            return False
        c.spliced = True
        self.stats["spliced"] += 1
        # Bytes queued before the join (the ClientHello; a backend that speaks first)
        # move once the socket is told data is ready; lowering SO_RCVLOWAT tells it.
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        c.up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self.handlers[c.fds[0]] = self.handlers[c.fds[1]] = (self._on_spliced, c)
        self.ep.register(c.fds[0], RDHUP | ET)
        self.ep.modify(c.fds[1], RDHUP | ET)
        return True

    def _on_spliced(self, c: Conn, fd: int, ev: int) -> None:
        if c.phase != PAIRED:
            return
        if ev & ERR:
            self._reset(c)
            return
        i = 0 if fd == c.fds[0] else 1
        if not c.eof[i]:
            c.eof[i] = True
            self._shut_when_drained(c, i, 0)

    def _shut_when_drained(self, c: Conn, i: int, level: int) -> None:
        """Pass side i's FIN on once every byte it received has reached its peer's send
        queue: the verdict hands bytes to the peer through a work queue, and a shutdown
        before they are queued would lose them."""
        sock, peer = (c.sock, c.up) if i == 0 else (c.up, c.sock)
        assert sock is not None and peer is not None
        try:
            # The FIN that ended side i counts as one received byte.
            drained = _written(peer, i == 0) >= _received(sock) - 1 + (c.extra if i == 0 else 0)
        except OSError:
            drained = True
        if not drained:     # a peer that reads slowly is looked at less and less often
            self._later(self.drains[min(level, len(DRAIN_DELAYS) - 1)], (c, i))
            return
        c.done[i] = True
        with contextlib.suppress(OSError):
            peer.shutdown(socket.SHUT_WR)
        if c.done[1 - i]:
            self.stats["closed"] += 1
            self._finish(c)

    # -- time ------------------------------------------------------------------------
    def _expire(self) -> None:
        now = self.now
        for q in (self.hellos, self.late_hellos):
            for c in q.due(now):
                if c.phase == WAIT_HELLO:
                    self.stats["hello_timeout"] += 1
                    log.debug("SNI: %s port %d sent no ClientHello in time: closed",
                              *c.peer[:2])
                    self._finish(c, drain=True)
        for c in self.connects.due(now):
            if c.phase == CONNECTING:
                self._backend_failed(c, "no answer in time")
        for level, dq in enumerate(self.drains):
            for side in dq.due(now):
                if side[0].phase == PAIRED:
                    self._shut_when_drained(side[0], side[1], level + 1)
        for _ in self.idle.due(now):
            self._sweeping = False
            timeout = self.settings.idle_timeout
            for pair in list(self.live):
                if self._idle_for(pair) >= timeout:
                    self.stats["idle_timeout"] += 1
                    self._finish(pair)
            if self.live:
                self._sweeping = True
                self.idle.add(now, None)
        self._wake_at = min((t for q in self.queues if (t := q.next_at()) is not None),
                            default=INF)

    def _idle_for(self, c: Conn) -> float:
        """Seconds since a byte of the pair last moved."""
        if not c.spliced:
            return self.now - c.last
        try:    # the kernel moves the bytes: ask it when each side last received some
            ms = min(_last_data_recv(c.sock), _last_data_recv(c.up))  # type: ignore[arg-type]
        except OSError:
            return INF
        return ms / 1000

    # -- the end ---------------------------------------------------------------------
    def _refuse(self, sock: Sock, why: str, c: Conn | None = None) -> None:
        self.stats["refused"] += 1
        self._warn(why, f"SNI: new connections refused: too many {why}")
        if c is not None:
            self._finish(c, reset=True)
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.close()

    def _evict(self) -> bool:
        """Room for a new connection: the one that has waited longest for the rest of its
        hello is reset. Refusing the newest instead would let a few clients that send a
        byte each and then nothing keep every other one out."""
        heads = [(h[0], q) for q in (self.hellos, self.late_hellos)
                 if (h := q.head(_waits_hello)) is not None]
        if not heads:
            return False    # every one waits for its backend
        _due, q = min(heads, key=lambda h: h[0])
        head = q.head(_waits_hello)
        assert head is not None
        q.pop()
        self.stats["evicted"] += 1
        self._warn("evicted", "SNI: too many connections waiting for their ClientHello: "
                   "the one waiting longest reset for a new one")
        self._finish(head[1], reset=True)
        return True

    def _refuse_one(self, lst: Listening, e: OSError) -> bool:
        """Out of descriptors: a spare one, freed for an instant, lets the connection be
        taken off the queue and reset; left there, it would wake the loop forever.
        False when there was none to take off, or no spare to do it with."""
        if self._spare is None:
            with contextlib.suppress(OSError):
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if self._spare is None:
                return False
        os.close(self._spare)
        self._spare = None
        sock: Sock | None = None
        try:
            sock = Sock(lst.family, socket.SOCK_STREAM, 0, lst.accept()[0])
        except OSError:
            pass
        if sock is not None:
            self.stats["accepted"] += 1
            self._refuse(sock, f"open files ({e.strerror})")
        with contextlib.suppress(OSError):
            self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        return sock is not None

    def _finish(self, c: Conn, reset: bool = False, drain: bool = False) -> None:
        """Close a connection in whatever phase it is: RST with `reset`, a clean FIN
        otherwise (after dropping what the client sent, with `drain`)."""
        phase, c.phase = c.phase, DONE
        if phase == DONE:
            return
        # A deadline queue may hold c a while yet: keep nothing large alive through it.
        c.reader = None
        if phase == PAIRED:
            self.pairs -= 1
            del self.live[c]
            for pipe in c.pipes:
                if pipe is not None:
                    discard(pipe)
            c.pipes = [None, None]
        else:
            self.waiting -= 1
        if c.client_key is not None:
            n = self.per_client[c.client_key] - 1
            if n:
                self.per_client[c.client_key] = n
            else:
                del self.per_client[c.client_key]
        # Closing a descriptor takes it out of epoll (the acceptor never duplicates one).
        for fd in c.fds:
            self.handlers.pop(fd, None)
        for s in (c.sock, c.up):
            if s is None:
                continue
            if reset:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            elif drain and s is c.sock:
                _drain(s)
            self._closing.append(s)

    def _warn(self, kind: str, text: str) -> None:
        last = self._warned.get(kind)
        if last is None or self.now - last >= WARN_EVERY:
            self._warned[kind] = self.now
            log.warning("%s", text)


def _waits_hello(c: Conn) -> bool:
    return c.phase == WAIT_HELLO


def client_key(family: int, address: str) -> bytes:
    """What --sni-max-per-client counts by: an IPv4 address, or the /64 of an IPv6 one (a
    host is commonly given a whole /64, and takes a new address of it at will)."""
    if family == socket.AF_INET6:
        return socket.inet_pton(family, address.partition("%")[0])[:8]
    return socket.inet_pton(family, address)


def _drain(sock: Sock) -> None:
    """Drop what the client sent but nobody read: closing then sends a FIN, not a RST."""
    with contextlib.suppress(OSError):
        for _ in range(16):
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                break


def _state(sock: Sock) -> int:
    """tcp_info.tcpi_state."""
    try:
        return sock.getsockopt(TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return 0


def _received(sock: Sock) -> int:
    """tcp_info.tcpi_bytes_received: every in-order byte that arrived on the socket."""
    return int.from_bytes(sock.getsockopt(TCP, socket.TCP_INFO, 136)[128:136], "little")


def _written(sock: Sock, connected: bool) -> int:
    """Bytes handed to the socket for sending: acknowledged plus still queued. The
    acknowledged count (tcpi_bytes_acked) of a socket that connected includes its SYN."""
    acked = int.from_bytes(sock.getsockopt(TCP, socket.TCP_INFO, 128)[120:128], "little")
    outq = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return acked - connected + int.from_bytes(outq, sys.byteorder)


def _last_data_recv(sock: Sock) -> int:
    """tcp_info.tcpi_last_data_recv: milliseconds since data last arrived."""
    return int.from_bytes(sock.getsockopt(TCP, socket.TCP_INFO, 56)[52:56], sys.byteorder)
