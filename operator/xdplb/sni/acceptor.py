"""The SNI acceptor: accept -> peek at the ClientHello -> pick a backend -> connect ->
(PROXY v2 header) -> splice in the kernel. No payload byte passes through Python.

One asyncio loop in a thread of the agent. While a ClientHello is incomplete the socket's
SO_RCVLOWAT is set to the bytes still missing, so epoll stays quiet until they arrive
and a slow or silent client costs nothing but its timeout timer. After the splice the loop
only watches each socket for end of stream (the verdict moves all data away, so a spliced
socket turns readable only at FIN or on an error) and passes half-closes and resets on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import socket
import struct
import sys
import termios
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xdplb.errors import XdplbError
from xdplb.sni.clienthello import MAX_HELLO, ClientHello, HelloError, HelloTooLong, parse
from xdplb.sni.routes import Route
from xdplb.sni.splice import Splicer

log = logging.getLogger("xdplb.sni")

HELLO_TIMEOUT = 5.0      # seconds for a whole ClientHello after the handshake
CONNECT_TIMEOUT = 5.0    # seconds for the backend's handshake
BACKLOG = 4096
IP_FREEBIND = 15
DRAIN_POLL = 0.005       # seconds between checks that a half-closed side has drained
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

Address = tuple[str, int]
Picker = Callable[[Route, str | None, Address, Address], Address | None]


def proxy_v2_header(client: Address, local: Address) -> bytes:
    """PROXY protocol v2, PROXY command, TCP over IPv4: the client's and the listener's
    address, so the backend sees who connected although the agent did."""
    body = (socket.inet_aton(client[0]) + socket.inet_aton(local[0])
            + struct.pack("!HH", client[1], local[1]))
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def listen_socket(address: str, port: int) -> socket.socket:
    """A listening socket on address:port; IP_FREEBIND lets it bind a VIP that is made
    local by a route rather than an interface address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        s.bind((address, port))
        s.listen(BACKLOG)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def bytes_received(sock: socket.socket) -> int:
    """tcp_info.tcpi_bytes_received: every in-order byte that arrived on the socket."""
    return int.from_bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)[128:136],
                          "little")


def bytes_written(sock: socket.socket) -> int:
    """Bytes handed to the socket for sending: acknowledged plus still queued."""
    acked = int.from_bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128)[120:128],
                           "little")
    outq = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return acked + int.from_bytes(outq, sys.byteorder)


def _peek(sock: socket.socket) -> bytes:
    try:
        return sock.recv(MAX_HELLO, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def close_clean(sock: socket.socket) -> None:
    """Close with a FIN, not a RST: drop what the client sent but nobody read."""
    with contextlib.suppress(OSError):
        for _ in range(16):
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                break
    sock.close()


@dataclass(eq=False)
class _Pair:
    socks: tuple[socket.socket, socket.socket]      # (client, backend)
    cookies: tuple[int, int]
    extra: tuple[int, int] = (0, 0)   # bytes the agent itself wrote to each (PROXY header)
    eof: list[bool] = field(default_factory=lambda: [False, False])
    shut: list[bool] = field(default_factory=lambda: [False, False])


class ClosedEarly(XdplbError):
    """The client closed before its ClientHello was complete."""


# What became of the connections of SNI listeners (the acceptor's counters).
OUTCOMES = (
    "accepted",        # taken from a listening socket
    "spliced",         # joined to its backend in the kernel
    "relayed",         # copied through the agent: the client had half-closed already
    "hello_timeout",   # no complete ClientHello in time: closed
    "closed_early",    # the client went away before its ClientHello was complete
    "hello_too_long",  # a ClientHello beyond the bound: sent to the default group
    "not_tls",         # not a TLS ClientHello: closed
    "no_backend",      # no eligible backend in the group: reset
    "backend_failed",  # the backend refused or did not answer
    "reset",           # a spliced or relayed pair ended by a reset
    "closed",          # a pair ended, both sides done
)


class Acceptor:
    def __init__(self, pick: Picker, splicer: Splicer, hello_timeout: float = HELLO_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.pick = pick
        self.splicer = splicer
        self.hello_timeout = hello_timeout
        self.connect_timeout = connect_timeout
        self.stats: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        self.loop = asyncio.new_event_loop()
        self._listeners: dict[Address, tuple[socket.socket, Route]] = {}
        self._pairs: set[_Pair] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sni-acceptor",
                                        daemon=True)

    # -- control, from the agent's thread ------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def set_listeners(self, want: dict[Address, Route]) -> list[str]:
        """Listen on exactly `want`; returns problems (addresses that cannot be bound)."""
        problems: list[str] = self._call(self._set_listeners, want)
        return problems

    def stop(self) -> None:
        """Close listeners, pending and spliced connections; end the loop."""
        self._call(self._stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(30)

    # -- on the loop ----------------------------------------------------------------------
    def _set_listeners(self, want: dict[Address, Route]) -> list[str]:
        problems = []
        for addr in [a for a in self._listeners if a not in want]:
            sock, _ = self._listeners.pop(addr)
            self.loop.remove_reader(sock.fileno())
            sock.close()
            log.info("SNI: stopped listening on %s:%d", *addr)
        for addr, route in want.items():
            if addr in self._listeners:
                self._listeners[addr] = (self._listeners[addr][0], route)
                continue
            try:
                sock = listen_socket(*addr)
            except OSError as e:
                problems.append(f"{route.label}: cannot listen on {addr[0]}:{addr[1]}: "
                                f"{e.strerror}")
                continue
            self._listeners[addr] = (sock, route)
            self.loop.add_reader(sock.fileno(), self._accept, addr)
            log.info("SNI: listening on %s:%d for %s", addr[0], addr[1], route.label)
        return problems

    def _stop(self) -> None:
        self._set_listeners({})
        for task in list(self._pending):
            task.cancel()
        for pair in list(self._pairs):
            self._close(pair)

    def _accept(self, addr: Address) -> None:
        entry = self._listeners.get(addr)
        if entry is None:
            return
        lsock, route = entry
        for _ in range(64):      # a burst per wake-up, then let other work run
            try:
                conn, _peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("SNI: accept on %s:%d: %s", addr[0], addr[1], e)
                return
            conn.setblocking(False)
            self.stats["accepted"] += 1
            task = self.loop.create_task(self._handle(conn, route))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _handle(self, conn: socket.socket, route: Route) -> None:
        owned = [conn]  # closed on the way out, unless handed over (cleared)
        try:
            client, local = conn.getpeername()[:2], conn.getsockname()[:2]
            try:
                async with asyncio.timeout(self.hello_timeout):
                    name = await self._read_hello(conn)
            except TimeoutError:
                self.stats["hello_timeout"] += 1
                log.debug("SNI: %s:%d sent no ClientHello in %.0f s: closed", *client,
                          self.hello_timeout)
                close_clean(conn)
                owned.clear()
                return
            except ClosedEarly:
                self.stats["closed_early"] += 1
                return
            except HelloTooLong:
                self.stats["hello_too_long"] += 1
                name = None
            except HelloError as e:
                self.stats["not_tls"] += 1
                log.debug("SNI: %s:%d is not TLS (%s): closed", *client, e)
                close_clean(conn)
                owned.clear()
                return
            backend = self.pick(route, name, client, local)
            if backend is None:     # closed with a RST, as XDP answers such a SYN
                self.stats["no_backend"] += 1
                log.debug("SNI: %s:%d (%s): no eligible backend", *client, name)
                return
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            owned.append(upstream)
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.sock_connect(upstream, backend)
            header = proxy_v2_header(client, local) if route.proxy_protocol else b""
            if header:
                await self.loop.sock_sendall(upstream, header)
            try:
                cookies = self.splicer.join(conn, upstream)
            except OSError as e:
                # Only established sockets can join: a client that already half-closed
                # (or a full sockhash) is relayed by copying instead.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                self.stats["relayed"] += 1
                log.debug("SNI: %s:%d relayed by copy (%s)", *client, e)
                task = self.loop.create_task(self._relay(conn, upstream))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                owned.clear()
                return
            # Bytes queued before the join (the ClientHello) move only when the stream
            # parser is told data is ready; setting SO_RCVLOWAT tells it.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            pair = _Pair((conn, upstream), cookies, (0, len(header)))
            self._pairs.add(pair)
            for i in (0, 1):
                self.loop.add_reader(pair.socks[i].fileno(), self._on_readable, pair, i)
            self.stats["spliced"] += 1
            log.debug("SNI: %s:%d -> %s -> %s:%d", *client, name, *backend)
            owned.clear()  # the pair's now
        except (OSError, TimeoutError) as e:
            self.stats["backend_failed"] += 1
            log.warning("SNI: %s: backend connection failed: %s", route.label,
                        e.strerror if isinstance(e, OSError) and e.strerror else "timeout")
        finally:
            for s in owned:
                s.close()

    async def _read_hello(self, conn: socket.socket) -> str | None:
        need = 1
        data = _peek(conn)      # the hello is often there already: no epoll round trip
        while True:
            if len(data) >= need:
                res = parse(data)
                if isinstance(res, ClientHello):
                    return res.server_name
                need = res.need
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            await self._readable(conn)
            data = _peek(conn)
            if len(data) < need:    # readable below the low-water mark: FIN or error
                raise ClosedEarly

    async def _readable(self, sock: socket.socket) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_reader(sock.fileno(), ready)
        try:
            await fut
        finally:
            self.loop.remove_reader(sock.fileno())

    # -- spliced pairs --------------------------------------------------------------------
    def _on_readable(self, pair: _Pair, i: int) -> None:
        sock = pair.socks[i]
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:             # reset: pass it on
            self.stats["reset"] += 1
            self._close(pair, reset=True)
            return
        if data:
            # Bytes (and perhaps a FIN) that arrived before the socket joined: the stream
            # parser moves them shortly; never read them here, look again after it has.
            self.loop.remove_reader(sock.fileno())
            self.loop.call_later(DRAIN_POLL, self._rewatch, pair, i)
            return
        self.loop.remove_reader(sock.fileno())
        pair.eof[i] = True
        self._shut_when_drained(pair, i)

    def _rewatch(self, pair: _Pair, i: int) -> None:
        if pair in self._pairs and not pair.eof[i]:
            self.loop.add_reader(pair.socks[i].fileno(), self._on_readable, pair, i)

    def _shut_when_drained(self, pair: _Pair, i: int, delay: float = DRAIN_POLL) -> None:
        """Pass side i's FIN on once every byte it received has reached its peer's send
        queue: the verdict hands bytes to the peer asynchronously, and a shutdown before
        they are queued would lose them."""
        if pair not in self._pairs:
            return
        sock, peer = pair.socks[i], pair.socks[1 - i]
        try:
            # The FIN that ended side i counts as one received byte.
            drained = bytes_written(peer) >= bytes_received(sock) - 1 + pair.extra[1 - i]
        except OSError:
            drained = True
        if not drained:     # a peer that reads slowly is looked at less and less often
            self.loop.call_later(delay, self._shut_when_drained, pair, i, min(2 * delay, 1.0))
            return
        with contextlib.suppress(OSError):
            peer.shutdown(socket.SHUT_WR)
        pair.shut[i] = True
        if all(pair.shut):
            self._close(pair)

    async def _relay(self, a: socket.socket, b: socket.socket) -> None:
        async def pump(src: socket.socket, dst: socket.socket) -> None:
            while data := await self.loop.sock_recv(src, 65536):
                await self.loop.sock_sendall(dst, data)
            dst.shutdown(socket.SHUT_WR)

        try:
            await asyncio.gather(pump(a, b), pump(b, a))
        except OSError:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            a.close()
            b.close()

    def _close(self, pair: _Pair, reset: bool = False) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        self.splicer.part(pair.cookies)
        for s, done in zip(pair.socks, pair.eof, strict=True):
            if not done:
                self.loop.remove_reader(s.fileno())
            if reset:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        self.stats["closed"] += 1

    @property
    def open_pairs(self) -> int:
        return len(self._pairs)

