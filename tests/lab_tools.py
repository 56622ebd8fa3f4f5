"""Traffic tools run inside lab namespaces (stdlib only, so any python3 can run them).

Usage (from the repo root): python -m tests.lab_tools <command> [options]
      or by path:           python tests/lab_tools.py <command> [options]

Servers print one line ``READY <proto> <port>`` to stdout once listening and log to stderr.

TCP request/response protocol (tcp-server / tcp-clients), integers are 8-byte big-endian:
  client -> server: L_up, L_down, then L_up bytes
  server -> client: tag (16 bytes, space padded), sha256(received up bytes) (32 bytes),
                    L_down, L_down bytes of down_stream(sha256(up), L_down),
                    sha256(down bytes) (32 bytes), then close.
The down stream is seeded by the up digest, so the client can regenerate and verify it
byte-exactly without relying on its source port (a NAT may change that).

Echo protocol (tcp-echo / tcp-chat): every byte comes back.

Sink protocol (tcp-sink / long-stream): client streams bytes, then shuts down writing.
  server -> client: b"A" + count (cumulative bytes received by the application), repeatedly;
                    at EOF b"F" + count + sha256(all received bytes), then close.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SOCK_TIMEOUT = 20.0
TAG_LEN = 16
CHUNK = 64 * 1024
U64 = struct.Struct("!Q")
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # not exported by Python 3.11
PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo
PKTINFO6 = struct.Struct("=16sI")  # struct in6_pktinfo
MAX_FAILURES = 100  # cap the JSON size when everything fails


def _log(msg: str) -> None:
    print(f"lab_tools[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def _hostport(value: str) -> tuple[str, int]:
    """IP:PORT, an IPv6 address in brackets: [2001:db8::10]:80."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {value!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _fmt(addr: tuple[Any, ...]) -> str:
    """host:port; an IPv4 peer of a dual-stack socket (::ffff:a.b.c.d) as IPv4, an IPv6
    one in brackets."""
    host = str(addr[0]).removeprefix("::ffff:")
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _any(host: str) -> str:
    """The wildcard address of host's family."""
    return "::" if ":" in host else "0.0.0.0"


def _pad_tag(tag: str) -> bytes:
    return tag.encode()[:TAG_LEN].ljust(TAG_LEN, b" ")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(n - len(buf), 1 << 20))
        if not part:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


def _stream(seed: bytes, total: int) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes; fixed chunking keeps both ends in lockstep."""
    rng = random.Random(seed)
    left = total
    while left > 0:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def _ready(proto: str, port: int) -> None:
    print(f"READY {proto} {port}", flush=True)


def _append_log(path: str | None, lock: threading.Lock, record: dict[str, Any]) -> None:
    if path is None:
        return
    with lock, open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024  # many concurrent SYNs from tcp-clients


class _DualServer(_Server):
    """Bound to "::": IPv6 and IPv4 clients alike."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _serve(port: int, bind: str, handler: Callable[[socket.socket], None]) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(SOCK_TIMEOUT)
            try:
                handler(sock)
            except Exception as e:  # one bad connection must not stop the server
                _log(f"connection from {_fmt(self.client_address)}: {type(e).__name__}: {e}")

    server = _DualServer if bind == "::" else _Server
    if ":" in bind and bind != "::":
        server = type("_V6Server", (_Server,), {"address_family": socket.AF_INET6})
    with server((bind, port), Handler) as srv:
        _ready("tcp", srv.server_address[1])
        srv.serve_forever()


# ---------------------------------------------------------------- tcp-server / tcp-clients


def cmd_tcp_server(args: argparse.Namespace) -> int:
    lock = threading.Lock()

    def handle(sock: socket.socket) -> None:
        # Default tag: the address the client reached, i.e. which backend answered.
        tag = args.tag or str(sock.getsockname()[0]).removeprefix("::ffff:")
        up_len, down_len = struct.unpack("!QQ", _recv_exact(sock, 16))
        h = hashlib.sha256()
        left = up_len
        while left:
            part = sock.recv(min(left, 1 << 20))
            if not part:
                raise ConnectionError(f"EOF with {left} of {up_len} up bytes missing")
            h.update(part)
            left -= len(part)
        up_digest = h.digest()
        sock.sendall(_pad_tag(tag) + up_digest + U64.pack(down_len))
        hd = hashlib.sha256()
        for block in _stream(up_digest, down_len):
            hd.update(block)
            sock.sendall(block)
        sock.sendall(hd.digest())
        _append_log(args.log, lock, {"peer": _fmt(sock.getpeername()),
                                     "local": _fmt(sock.getsockname()), "tag": tag,
                                     "up": up_len, "down": down_len})

    _serve(args.port, args.bind, handle)
    return 0


def _tcp_conn(dst: tuple[str, int], src: str | None, up: int, down: int,
              timeout: float, src_port: int = 0) -> tuple[str, str]:
    """One verified request/response; returns (tag, local address) or raises."""
    local = "?"
    with socket.socket(_family(dst[0]), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if src_port:  # reused on purpose: a new connection from a recent flow's port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if src or src_port:
            sock.bind((src or _any(dst[0]), src_port))
        try:
            sock.connect(dst)
            local = _fmt(sock.getsockname())
            sock.sendall(U64.pack(up) + U64.pack(down))
            h = hashlib.sha256()
            for block in _stream(os.urandom(16), up):
                h.update(block)
                sock.sendall(block)
            up_digest = h.digest()
            head = _recv_exact(sock, TAG_LEN + 32 + 8)
            tag = head[:TAG_LEN].decode(errors="replace").rstrip()
            if head[TAG_LEN:TAG_LEN + 32] != up_digest:
                raise ValueError(f"up sha256 mismatch (tag {tag})")
            if U64.unpack(head[TAG_LEN + 32:])[0] != down:
                raise ValueError(f"server announced wrong down length (tag {tag})")
            got = hashlib.sha256()
            left = down
            while left:
                part = sock.recv(min(left, 1 << 20))
                if not part:
                    raise ConnectionError(f"EOF with {left} of {down} down bytes missing")
                got.update(part)
                left -= len(part)
            want = hashlib.sha256()
            for block in _stream(up_digest, down):
                want.update(block)
            trailer = _recv_exact(sock, 32)
            if got.digest() != want.digest() or trailer != want.digest():
                raise ValueError(f"down sha256 mismatch (tag {tag})")
            if sock.recv(1):
                raise ValueError(f"unexpected bytes after reply (tag {tag})")
            return tag, local
        except Exception as e:
            raise RuntimeError(f"{local} -> {_fmt(dst)}: {type(e).__name__}: {e}") from e


def cmd_tcp_clients(args: argparse.Namespace) -> int:
    tags: Counter[str] = Counter()
    failures: list[str] = []
    conns: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        tag: str | None = None
        local: str | None = None
        err: str | None = None
        try:
            tag, local = _tcp_conn(args.dst, args.src, args.up, args.down, args.timeout,
                                   args.src_port)
        except Exception as e:
            err = f"conn {i}: {e}"
        with lock:
            if err is None:
                tags[str(tag)] += 1
            else:
                failures.append(err)
            if args.details:
                conns.append({"i": i, "local": local, "tag": tag, "error": err})

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        list(pool.map(one, range(args.count)))
    elapsed = time.monotonic() - t0
    ok_count = sum(tags.values())
    result: dict[str, Any] = {
        "ok": ok_count == args.count,
        "count": args.count,
        "succeeded": ok_count,
        "failed": len(failures),
        "tags": dict(tags),
        "failures": failures[:MAX_FAILURES],
        "bytes_up": ok_count * args.up,
        "bytes_down": ok_count * args.down,
        "elapsed_s": round(elapsed, 3),
    }
    if args.details:
        result["conns"] = sorted(conns, key=lambda c: c["i"])
    _emit(result, args.json)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- udp-server / udp-clients


def cmd_udp_server(args: argparse.Namespace) -> int:
    """Echoes each datagram behind its tag. Bound to "::", one socket per family."""
    tag = _pad_tag(args.tag)
    lock = threading.Lock()
    binds = ["0.0.0.0", "::"] if args.bind == "::" else [args.bind]
    socks = []
    for bind in binds:
        sock = socket.socket(_family(bind), socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # PKTINFO lets us reply from exactly the address the datagram was sent to.
        if ":" in bind:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((bind, args.port if not socks else socks[0].getsockname()[1]))
        socks.append(sock)
    _ready("udp", socks[0].getsockname()[1])

    def serve(sock: socket.socket) -> None:
        port = sock.getsockname()[1]
        while True:
            data, anc, _flags, peer = sock.recvmsg(65535, socket.CMSG_SPACE(PKTINFO6.size))
            reply_anc = []
            local = "?"
            for level, typ, cdata in anc:
                if level == socket.IPPROTO_IP and typ == IP_PKTINFO:
                    _ifindex, _spec, dst = PKTINFO.unpack(cdata[:PKTINFO.size])
                    local = socket.inet_ntoa(dst)
                    reply_anc = [(socket.IPPROTO_IP, IP_PKTINFO, PKTINFO.pack(0, dst, bytes(4)))]
                elif level == socket.IPPROTO_IPV6 and typ == socket.IPV6_PKTINFO:
                    dst6, _ifindex = PKTINFO6.unpack(cdata[:PKTINFO6.size])
                    local = f"[{socket.inet_ntop(socket.AF_INET6, dst6)}]"
                    reply_anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                                  PKTINFO6.pack(dst6, 0))]
            try:
                sock.sendmsg([tag + data], reply_anc, 0, peer)
            except OSError as e:
                _log(f"reply to {_fmt(peer)}: {e}")
            _append_log(args.log, lock, {"peer": _fmt(peer), "local": f"{local}:{port}",
                                         "tag": args.tag, "len": len(data)})

    for sock in socks[1:]:
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
    serve(socks[0])
    return 0


def _udp_one(i: int, dst: tuple[str, int], src: str | None, size: int, timeout: float,
             retries: int) -> tuple[str, str, int]:
    """Returns (tag, reply source, attempts used) or raises with a clear message."""
    payload = f"{i}:".encode() + os.urandom(max(8, size))
    with socket.socket(_family(dst[0]), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.bind((src or _any(dst[0]), 0))  # fresh socket => fresh source port per probe
        local = _fmt(sock.getsockname())
        for attempt in range(1, retries + 2):
            sock.sendto(payload, dst)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, peer = sock.recvfrom(65535)
                except TimeoutError:
                    break
                if data[TAG_LEN:] != payload:
                    continue  # stray or corrupted datagram; keep waiting for ours
                return data[:TAG_LEN].decode(errors="replace").rstrip(), _fmt(peer), attempt
        raise TimeoutError(f"{local} -> {_fmt(dst)}: no reply after {retries + 1} attempts")


def cmd_udp_clients(args: argparse.Namespace) -> int:
    tags: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    failures: list[str] = []
    retried = 0
    dst = _fmt(args.dst)
    for i in range(args.count):
        try:
            tag, source, attempts = _udp_one(i, args.dst, args.src, args.size, args.timeout,
                                             args.retries)
        except Exception as e:
            failures.append(f"probe {i}: {type(e).__name__}: {e}")
            continue
        sources[source] += 1
        retried += attempts > 1
        if source != dst:  # an un-NATed reply from a backend address is a bug
            failures.append(f"probe {i}: reply from {source}, expected {dst} (tag {tag})")
        else:
            tags[tag] += 1
    succeeded = sum(tags.values())
    result = {
        "ok": succeeded == args.count,
        "count": args.count,
        "succeeded": succeeded,
        "failed": args.count - succeeded,
        "dst": dst,
        "tags": dict(tags),
        "reply_sources": dict(sources),
        "retried": retried,
        "failures": failures[:MAX_FAILURES],
    }
    _emit(result, args.json)
    return 0 if result["ok"] else 1


def cmd_udp_session(args: argparse.Namespace) -> int:
    """One UDP flow (one socket, one source port) of `count` numbered datagrams, each
    answered by a udp-server's echo: an answer carrying anybody else's datagram is a
    crossed flow, counted in "foreign"."""
    me = f"{args.name}:".encode()
    answered, foreign, lost = 0, 0, 0
    failures: list[str] = []
    with socket.socket(_family(args.dst[0]), socket.SOCK_DGRAM) as sock:
        sock.bind((args.src or _any(args.dst[0]), 0))
        for i in range(args.count):
            payload = me + f"{i}:".encode() + os.urandom(max(8, args.size))
            sock.sendto(payload, args.dst)
            deadline = time.monotonic() + args.timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    break
                body = data[TAG_LEN:]
                if body == payload:
                    answered += 1
                    break
                if not body.startswith(me):
                    foreign += 1
                    failures.append(f"datagram {i}: got another client's {body[:24]!r}")
            else:
                lost += 1
            time.sleep(args.gap)
    result = {"ok": foreign == 0 and answered >= args.count * args.min_share,
              "count": args.count, "answered": answered, "foreign": foreign, "lost": lost,
              "failures": failures[:MAX_FAILURES]}
    _emit(result, args.json)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- tcp-echo / tcp-chat


def cmd_tcp_echo(args: argparse.Namespace) -> int:
    def handle(sock: socket.socket) -> None:
        while data := sock.recv(CHUNK):
            sock.sendall(data)

    _serve(args.port, args.bind, handle)
    return 0


def cmd_tcp_chat(args: argparse.Namespace) -> int:
    """One long-lived connection to a tcp-echo server: `rounds` exchanges, each after
    `gap` seconds (round `long_round` after `long_gap`), every echo checked."""
    ok_rounds = 0
    failures: list[str] = []
    with socket.create_connection(args.dst, timeout=args.timeout) as sock:
        for i in range(args.rounds):
            time.sleep(args.long_gap if i == args.long_round else args.gap)
            msg = f"round {i} ".encode() + os.urandom(32)
            try:
                sock.sendall(msg)
                if _recv_exact(sock, len(msg)) != msg:
                    failures.append(f"round {i}: wrong echo")
                    continue
            except OSError as e:
                failures.append(f"round {i}: {type(e).__name__}: {e}")
                break
            ok_rounds += 1
    result = {"ok": ok_rounds == args.rounds, "rounds": args.rounds, "ok_rounds": ok_rounds,
              "failures": failures}
    _emit(result, args.json)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- tcp-sink / long-stream


def cmd_tcp_sink(args: argparse.Namespace) -> int:
    def handle(sock: socket.socket) -> None:
        h = hashlib.sha256()
        total = acked = 0
        last = time.monotonic()
        while part := sock.recv(1 << 20):
            h.update(part)
            total += len(part)
            now = time.monotonic()
            # Ack often enough for 100 ms progress samples without flooding.
            if total - acked >= 256 * 1024 or now - last >= 0.05:
                sock.sendall(b"A" + U64.pack(total))
                acked, last = total, now
        sock.sendall(b"F" + U64.pack(total) + h.digest())

    _serve(args.port, args.bind, handle)
    return 0


def cmd_long_stream(args: argparse.Namespace) -> int:
    state: dict[str, Any] = {"sent": 0, "acked": 0, "final": None, "error": None}
    reader_done = threading.Event()
    stop_sampler = threading.Event()
    rate = args.rate_mbit * 1e6 / 8  # bytes/s; 0 = unlimited
    sent_digest = hashlib.sha256()
    stall = {"max_s": 0.0, "since": time.monotonic(), "acked": 0}

    def sampler() -> None:
        # Own thread: keeps sampling while sendall() blocks, so stalls show up as flat lines.
        progress = open(args.progress, "a", buffering=1) if args.progress else None
        try:
            while True:
                stopping = stop_sampler.wait(0.1)
                now = time.monotonic()
                if state["acked"] != stall["acked"]:
                    stall["acked"], stall["since"] = state["acked"], now
                stall["max_s"] = max(stall["max_s"], now - stall["since"])
                if progress:
                    progress.write(f"{time.monotonic_ns()} {state['acked']}\n")
                if stopping:
                    return
        finally:
            if progress:
                progress.close()

    def reader(sock: socket.socket) -> None:
        try:
            while True:
                kind = _recv_exact(sock, 1)
                if kind not in (b"A", b"F"):
                    raise ValueError(f"bad message type {kind!r}")
                state["acked"] = U64.unpack(_recv_exact(sock, 8))[0]
                if kind == b"F":
                    state["final"] = (state["acked"], _recv_exact(sock, 32))
                    return
        except Exception as e:
            state["error"] = state["error"] or f"reader: {type(e).__name__}: {e}"
        finally:
            reader_done.set()

    t0 = time.monotonic()
    st = threading.Thread(target=sampler, daemon=True)
    st.start()
    with socket.socket(_family(args.dst[0]), socket.SOCK_STREAM) as sock:
        sock.settimeout(args.timeout)
        if args.src:
            sock.bind((args.src, 0))
        try:
            sock.connect(args.dst)
            threading.Thread(target=reader, args=(sock,), daemon=True).start()
            rng = random.Random(os.urandom(16))
            while time.monotonic() - t0 < args.seconds and not reader_done.is_set():
                block = rng.randbytes(CHUNK)
                sent_digest.update(block)
                sock.sendall(block)
                state["sent"] += len(block)
                if rate and (ahead := t0 + state["sent"] / rate - time.monotonic()) > 0:
                    time.sleep(ahead)
            sock.shutdown(socket.SHUT_WR)
            if not reader_done.wait(args.timeout):
                state["error"] = state["error"] or "timeout waiting for the sink's final record"
        except Exception as e:
            state["error"] = state["error"] or f"writer: {type(e).__name__}: {e}"
    stop_sampler.set()
    st.join()

    final, error = state["final"], state["error"]
    if error is None:
        if final is None:
            error = "no final record from sink"
        elif final[0] != state["sent"]:
            error = f"sink received {final[0]} bytes, sent {state['sent']}"
        elif final[1] != sent_digest.digest():
            error = "sha256 mismatch between sent and received stream"
    result = {
        "ok": error is None,
        "error": error,
        "sent": state["sent"],
        "acked": state["acked"],
        "elapsed_s": round(time.monotonic() - t0, 3),
        "max_stall_s": round(stall["max_s"], 3),
    }
    _emit(result, True)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- CLI


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True), flush=True)
        return
    status = "OK" if result.get("ok") else "FAILED"
    summary = {k: v for k, v in result.items() if k not in ("failures", "conns", "ok")}
    print(f"{status} {summary}")
    for f in result.get("failures", []):
        print(f"  {f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab_tools", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def server(name: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name)
        sp.add_argument("--port", type=int, required=True, help="0 = pick a free port")
        sp.add_argument("--bind", default="::", help="default: every address, both families")
        sp.set_defaults(fn=fn)
        return sp

    sp = server("tcp-server", cmd_tcp_server)
    sp.add_argument("--tag", help="reply tag (default: the local address the client reached)")
    sp.add_argument("--log", help="append one JSON line per request (peer, local, tag)")
    sp = server("udp-server", cmd_udp_server)
    sp.add_argument("--tag", required=True)
    sp.add_argument("--log", help="append one JSON line per datagram (peer, local, tag)")
    server("tcp-sink", cmd_tcp_sink)
    server("tcp-echo", cmd_tcp_echo)

    sp = sub.add_parser("udp-session")
    sp.add_argument("--dst", type=_hostport, required=True)
    sp.add_argument("--name", required=True, help="marks this client's datagrams")
    sp.add_argument("--count", type=int, default=100)
    sp.add_argument("--size", type=int, default=64)
    sp.add_argument("--gap", type=float, default=0.01, help="seconds between datagrams")
    sp.add_argument("--min-share", type=float, default=0.9, help="answered, at least")
    sp.add_argument("--src")
    sp.add_argument("--timeout", type=float, default=0.5)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_udp_session)

    sp = sub.add_parser("tcp-chat")
    sp.add_argument("--dst", type=_hostport, required=True)
    sp.add_argument("--rounds", type=int, default=20)
    sp.add_argument("--gap", type=float, default=0.3)
    sp.add_argument("--long-round", type=int, default=-1)
    sp.add_argument("--long-gap", type=float, default=0.0)
    sp.add_argument("--timeout", type=float, default=SOCK_TIMEOUT)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_tcp_chat)

    sp = sub.add_parser("tcp-clients")
    sp.add_argument("--dst", type=_hostport, required=True)
    sp.add_argument("--count", type=int, default=1)
    sp.add_argument("--concurrency", type=int, default=1)
    sp.add_argument("--up", type=int, default=1024)
    sp.add_argument("--down", type=int, default=1024)
    sp.add_argument("--src")
    sp.add_argument("--src-port", type=int, default=0, help="bind this port (SO_REUSEADDR)")
    sp.add_argument("--timeout", type=float, default=SOCK_TIMEOUT)
    sp.add_argument("--details", action="store_true", help="add per-connection 'conns'")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_tcp_clients)

    sp = sub.add_parser("udp-clients")
    sp.add_argument("--dst", type=_hostport, required=True)
    sp.add_argument("--count", type=int, default=1)
    sp.add_argument("--size", type=int, default=64)
    sp.add_argument("--src")
    sp.add_argument("--timeout", type=float, default=1.0)
    sp.add_argument("--retries", type=int, default=3)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_udp_clients)

    sp = sub.add_parser("long-stream")
    sp.add_argument("--dst", type=_hostport, required=True)
    sp.add_argument("--seconds", type=float, required=True)
    sp.add_argument("--rate-mbit", type=float, default=0.0, help="0 = unlimited")
    sp.add_argument("--progress", help="append '<monotonic_ns> <acked_bytes>' every 100 ms")
    sp.add_argument("--src")
    sp.add_argument("--timeout", type=float, default=SOCK_TIMEOUT)
    sp.set_defaults(fn=cmd_long_stream)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return int(args.fn(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
