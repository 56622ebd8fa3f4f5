"""SNI routing end to end: the standalone agent in a namespace lab, backends that are real
TLS servers with distinct self-signed certificates (CN = backend name), and clients that
are Python ssl, curl and openssl s_client, over IPv4 and (a listener per family) IPv6.

This module is also the lab's TLS backend and raw client (``python test_sni_e2e.py serve
...``), so the servers and clients run inside the namespaces with nothing but the venv.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.lab import Lab
from tests.test_e2e import XDPLB, mount_bpffs
from tests.test_e2e import Agent as _Agent

PIN_ROOT = "/run/xdplb-sni/bpf"
VIP, VIP6 = Lab.VIP, Lab.VIP6
TLS_PORT, RAW_PORT, PROXY_PORT = 443, 9443, 7443       # listeners on the VIP
B_TLS, B_RAW = 8443, 9000                                # backend servers
MIB = 1024 * 1024
HOSTS = {"a.example.com": "b1", "b.example.com": "b2"}   # default group: b3
PROXY_SIG = b"\r\n\r\n\x00\r\nQUIT\n"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and XDP"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
    pytest.mark.skipif(not XDPLB.exists(), reason="needs .venv/bin/xdplb (scripts/setup.sh)"),
]


def config_yaml(hosts: dict[str, str] | None = None) -> str:
    hosts = HOSTS if hosts is None else hosts
    addr = {f"b{k}": Lab.backend_addr(k) for k in (1, 2, 3)}
    addr6 = {f"b{k}": Lab.backend6_addr(k) for k in (1, 2, 3)}
    sni = "".join(f"    - hostname: {h}\n      backends: [{{address: {addr[b]}, port: {B_TLS}}}]\n"
                  for h, b in hosts.items())
    sni6 = "    sniRoutes:\n" + "".join(
        f"    - hostname: {h}\n      backends: [{{address: {addr6[b]}, port: {B_TLS}}}]\n"
        for h, b in HOSTS.items())
    return f"""\
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: tls, namespace: default}}
spec:
  interfaces: [{Lab.lb_client_if}, {Lab.lb_client2_if}]
  listeners:
  - name: tls
    protocol: TCP
    port: {TLS_PORT}
    address: {VIP}
    backends: [{{address: {addr['b3']}, port: {B_TLS}}}]
    sourceRoutes:
    - cidr: 10.10.2.0/24
      backends: [{{address: {addr['b1']}, port: {B_TLS}}}]
    sniRoutes:
{sni}  - name: raw
    protocol: TCP
    port: {RAW_PORT}
    address: {VIP}
    backends: [{{address: {addr['b2']}, port: {B_RAW}}}]
    sniRoutes:
    - hostname: half.example.com
      backends: [{{address: {addr['b1']}, port: {B_RAW}}}]
  - name: proxied
    protocol: TCP
    port: {PROXY_PORT}
    address: {VIP}
    proxyProtocol: v2
    backends: [{{address: {addr['b3']}, port: {B_RAW}}}]
    sniRoutes:
    - hostname: p.example.com
      backends: [{{address: {addr['b1']}, port: {B_RAW}}}]
  - name: tls6
    protocol: TCP
    port: {TLS_PORT}
    address: {VIP6}
    backends: [{{address: {addr6['b3']}, port: {B_TLS}}}]
{sni6}  - name: proxied6
    protocol: TCP
    port: {PROXY_PORT}
    address: {VIP6}
    proxyProtocol: v2
    backends: [{{address: {addr6['b3']}, port: {B_RAW}}}]
    sniRoutes:
    - hostname: p.example.com
      backends: [{{address: {addr6['b2']}, port: {B_RAW}}}]
"""


# ---------------------------------------------------------------------- in-namespace tools


def _recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def _stream(name: str, n: int) -> bytes:
    """n deterministic bytes that depend on the backend's name."""
    out = bytearray()
    seed = name.encode()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + i.to_bytes(8, "big")).digest() * 64
        i += 1
    return bytes(out[:n])


def serve_tls(name: str, port: int, cert: str, key: str) -> None:
    """Lines: `name` -> the name; `bulk N` -> read N bytes, answer their SHA-256 and N
    bytes of _stream(name); `GET ...` (curl) -> an HTTP answer naming the backend."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def handle(raw: socket.socket) -> None:
        try:
            with ctx.wrap_socket(raw, server_side=True) as s:
                f = s.makefile("rb")
                while line := f.readline():
                    cmd = line.decode().split()
                    if not cmd:
                        continue
                    if cmd[0] == "name":
                        s.sendall(f"{name}\n".encode())
                    elif cmd[0] == "bulk":
                        n = int(cmd[1])
                        digest = hashlib.sha256(f.read(n)).hexdigest()
                        s.sendall(f"{digest}\n".encode() + _stream(name, n))
                    elif cmd[0] == "GET":
                        while f.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        body = f"{name}\n".encode()
                        s.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                                  + str(len(body)).encode() + b"\r\n\r\n" + body)
                        return
        except (OSError, ssl.SSLError):
            pass

    _serve(port, handle)


def serve_raw(name: str, port: int, log: str) -> None:
    """Plain TCP after a ClientHello (optionally behind a PROXY v2 header). Mode line
    `last`: read to EOF, answer `name sha n proxy`. Mode `first`: answer the name and
    half-close at once, then read to EOF and append `name sha n` to the log file."""
    from xdplb.sni.clienthello import ClientHello, parse

    def handle(s: socket.socket) -> None:
        with s:
            buf = b""
            proxy = "-"
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return
                buf += chunk
                if buf.startswith(PROXY_SIG) and len(buf) >= 16 + buf[15]:
                    # TCP over IPv4 (0x11): 4-byte addresses; over IPv6 (0x21): 16.
                    n, fam = (4, socket.AF_INET) if buf[13] == 0x11 else (16, socket.AF_INET6)
                    src = socket.inet_ntop(fam, buf[16:16 + n])
                    dst = socket.inet_ntop(fam, buf[16 + n:16 + 2 * n])
                    sport, dport = struct.unpack("!HH", buf[16 + 2 * n:20 + 2 * n])
                    proxy = f"{src}:{sport}>{dst}:{dport}"
                    buf = buf[16 + buf[15]:]
                try:
                    res = parse(buf)
                except ValueError:
                    return
                if isinstance(res, ClientHello) and b"\n" in buf[res.length:]:
                    break
            mode, _, rest = buf[res.length:].partition(b"\n")
            if mode == b"first":
                s.sendall(f"{name}\n".encode())
                s.shutdown(socket.SHUT_WR)
                data = rest + _recv_all(s)
                with open(log, "a") as f:
                    f.write(f"{name} {hashlib.sha256(data).hexdigest()} {len(data)}\n")
            else:
                data = rest + _recv_all(s)
                s.sendall(f"{name} {hashlib.sha256(data).hexdigest()} {len(data)} {proxy}\n"
                          .encode())

    _serve(port, handle)


def _serve(port: int, handle: Any) -> None:
    ls = socket.socket(socket.AF_INET6)  # both families
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("::", port))
    ls.listen(1024)
    print("ready", flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_name(host: str | None, port: int = TLS_PORT, timeout: float = 10,
             vip: str = VIP) -> str:
    with socket.create_connection((vip, port), timeout=timeout) as raw, \
            client_context().wrap_socket(raw, server_hostname=host) as s:
        s.sendall(b"name\n")
        return s.makefile("rb").readline().decode().strip()


def hello_bytes(host: str, alpn: int = 0) -> bytes:
    ctx = client_context()
    if alpn:
        ctx.set_alpn_protocols([f"proto-{i:03d}" for i in range(alpn)])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def two_records(hello: bytes, cut: int) -> bytes:
    msg = hello[5:]
    return b"".join(bytes([22, 3, 1]) + len(p).to_bytes(2, "big") + p
                    for p in (msg[:cut], msg[cut:]))


async def concurrent_names(count: int) -> dict[str, Any]:
    """`count` TLS connections open at the same time (all have read their backend's name
    before any closes), one asyncio loop so that every hello leaves right after its
    handshake; every third has no SNI."""
    all_open = asyncio.Event()
    opened = 0

    async def held(i: int) -> str:
        nonlocal opened
        host = list(HOSTS)[i % 2] if i % 3 else None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                VIP, TLS_PORT, ssl=client_context(), server_hostname=host or ""), 30)
            writer.write(b"name\n")
            got = (await asyncio.wait_for(reader.readline(), 30)).decode().strip()
            opened += 1
            if opened == count:
                all_open.set()
            await asyncio.wait_for(all_open.wait(), 60)
            writer.close()
        except Exception as e:
            return f"{host}: {e!r}"
        want = HOSTS.get(host or "", "b3")
        return "ok" if got == want else f"{host}: {got} != {want}"

    results = await asyncio.gather(*(held(i) for i in range(count)))
    return {"ok": results.count("ok"), "bad": [r for r in results if r != "ok"]}


def tls_name_split_hello(host: str) -> str:
    """A real TLS session whose ClientHello is re-framed into two records, the second
    (with the SNI extension) sent 200 ms after the first as its own TCP segment."""
    ctx = client_context()
    ctx.set_alpn_protocols([f"proto-{i:03d}" for i in range(40)] + ["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    with socket.create_connection((VIP, TLS_PORT), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        data = two_records(outgoing.read(), 40)
        s.sendall(data[:45])
        time.sleep(0.2)
        s.sendall(data[45:])
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    s.sendall(pending)
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(chunk)
        tls.write(b"name\n")
        s.sendall(outgoing.read())
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                reply += tls.read(100)
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    s.sendall(pending)
                incoming.write(s.recv(65536))
        return reply.decode().strip()


def client_main(args: argparse.Namespace) -> None:
    out: dict[str, Any] = {}
    if args.cmd == "names":
        def one(i: int) -> str:
            return tls_name(args.host or None, vip=args.vip)
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as ex:
            names = list(ex.map(one, range(args.count)))
        out = {"names": names}
    elif args.cmd == "concurrent":
        out = asyncio.run(concurrent_names(args.count))
    elif args.cmd == "bulk":
        payload = os.urandom(MIB)
        with socket.create_connection((VIP, TLS_PORT), timeout=30) as raw, \
                client_context().wrap_socket(raw, server_hostname=args.host) as s:
            s.sendall(b"bulk %d\n" % MIB + payload)
            f = s.makefile("rb")
            digest = f.readline().decode().strip()
            body = f.read(MIB)
        out = {"sent_ok": digest == hashlib.sha256(payload).hexdigest(),
               "received_ok": body == _stream(HOSTS[args.host], MIB), "received": len(body)}
    elif args.cmd == "segments":
        # The SNI extension only in the second record, sent 200 ms after the first.
        data = two_records(hello_bytes(args.host, alpn=40), 40)
        with socket.create_connection((VIP, RAW_PORT), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(data[:45])
            time.sleep(0.2)
            s.sendall(data[45:] + b"last\n")
            s.shutdown(socket.SHUT_WR)
            out = {"reply": _recv_all(s).decode().split()}
    elif args.cmd == "segments-tls":
        out = {"name": tls_name_split_hello(args.host)}
    elif args.cmd == "half-close":
        payload = os.urandom(MIB)
        with socket.create_connection((args.vip, args.port), timeout=20) as s:
            if args.mode == "last":      # client half-closes first, server answers after
                s.sendall(hello_bytes(args.host) + b"last\n" + payload)
                s.shutdown(socket.SHUT_WR)
                reply = _recv_all(s).decode().split()
            else:                        # server half-closes first, client sends after
                s.sendall(hello_bytes(args.host) + b"first\n")
                reply = _recv_all(s).decode().split()
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(20)
                assert s.recv(1) == b""
        out = {"reply": reply, "sha": hashlib.sha256(payload).hexdigest(), "n": len(payload)}
    elif args.cmd == "plain":
        with socket.create_connection((VIP, TLS_PORT), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.settimeout(10)
            t0 = time.monotonic()
            try:
                data = _recv_all(s)
                how = "eof"
            except ConnectionResetError:
                data, how = b"", "reset"
            out = {"data": data.decode(errors="replace"), "how": how,
                   "seconds": time.monotonic() - t0}
    elif args.cmd == "silent":
        # Connects, then stays silent (or sends half a ClientHello); measures when the
        # agent closes the connection while another client is served meanwhile.
        socks = []
        t_connect = time.monotonic()
        for i in range(args.count):
            s = socket.create_connection((VIP, TLS_PORT), timeout=10)
            if i % 2:
                s.sendall(hello_bytes("a.example.com")[:60])
            socks.append(s)
        t0 = time.monotonic()
        served = tls_name("a.example.com")
        served_s = time.monotonic() - t0
        closed = []
        for s in socks:
            s.settimeout(args.timeout + 5)
            try:
                closed.append((s.recv(1), time.monotonic() - t_connect))
            except OSError as e:
                closed.append((str(e).encode(), time.monotonic() - t_connect))
            s.close()
        out = {"served": served, "served_s": served_s,
               "closed": [[d.decode(errors="replace"), t] for d, t in closed]}
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------- test harness


METRICS_PORT = 9479


HELLO_TIMEOUT = 3  # --sni-hello-timeout (default 5)


class Agent(_Agent):
    def __init__(self, lab: Lab, name: str, config: str) -> None:
        super().__init__(lab, name, config, "--metrics-port", str(METRICS_PORT),
                         "--sni-hello-timeout", str(HELLO_TIMEOUT))
        self.pin_dir = f"{PIN_ROOT}/{name}"

    def acceptor_pid(self) -> int:
        """The SNI acceptor's process: a child of the agent."""
        assert self.proc is not None
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == self.proc.pid and b"xdplb.sni.worker" in cmd:
                return int(pid)
        raise AssertionError(f"no SNI acceptor process under the agent\n{self.tail()}")

    def cpu_seconds(self) -> float:
        """CPU of the agent and its acceptor process."""
        assert self.proc is not None
        total = 0
        for pid in (self.proc.pid, self.acceptor_pid()):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")


class Env:
    def __init__(self, lab: Lab, agent: Agent) -> None:
        self.lab, self.agent = lab, agent

    def client(self, *args: str, ns: str = "cli", timeout: float = 120) -> dict[str, Any]:
        res = self.lab.exec(ns, sys.executable, __file__, "client", *args, timeout=timeout,
                            check=False)
        assert res.returncode == 0, f"client {args}: {res.stderr[-3000:]}\n{self.agent.tail()}"
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))

    def py(self, code: str, ns: str = "cli") -> str:
        res = self.lab.exec(ns, sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                            "from test_sni_e2e import *\n" + code, check=False, timeout=60)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout.strip()


def _start_servers(lab: Lab) -> None:
    for k in (1, 2, 3):
        b = f"b{k}"
        cert, key = lab.workdir / f"{b}.crt", lab.workdir / f"{b}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "2", "-subj", f"/CN={b}"],
                       check=True, capture_output=True)
        for argv in (["tls", b, str(B_TLS), str(cert), str(key)],
                     ["raw", b, str(B_RAW), str(lab.workdir / f"{b}-raw.log")]):
            p = lab.popen(b, sys.executable, __file__, "serve", *argv, stdout=subprocess.PIPE,
                          text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    mount_bpffs(PIN_ROOT)
    lab = Lab(backends=3, prefix="xn", ipv6=True).setup()
    agent = Agent(lab, "xn", config_yaml())
    try:
        _start_servers(lab)
        agent.start()
        agent.wait_log("SNI: listening on", 0, 10)
        yield Env(lab, agent)
    finally:
        agent.cleanup()
        lab.close()


@pytest.fixture
def sni(env: Env) -> Iterator[Env]:
    """The baseline configuration in effect before and after."""
    env.agent.assert_running()
    if env.agent.config.read_text() != config_yaml():
        env.agent.apply(config_yaml(), within=2)
    yield env
    if env.agent.proc is not None and env.agent.proc.poll() is None \
            and env.agent.config.read_text() != config_yaml():
        env.agent.apply(config_yaml(), within=2)


# ---------------------------------------------------------------------- tests


def test_python_ssl_each_hostname_reaches_its_group(sni: Env) -> None:
    for host, backend in [*HOSTS.items(), ("A.Example.COM", "b1"), ("B.example.com", "b2"),
                          ("unknown.example.com", "b3"), ("", "b3")]:
        res = sni.client("names", "--host", host, "--count", "4")
        assert res["names"] == [backend] * 4, (host, res)


def test_curl_resolve_reaches_the_group_of_its_hostname(sni: Env) -> None:
    for host, backend in [*HOSTS.items(), ("C.example.com", "b3")]:
        res = sni.lab.exec("cli", "curl", "-sk", "--max-time", "10", "--resolve",
                           f"{host}:{TLS_PORT}:{VIP}", f"https://{host}:{TLS_PORT}/",
                           check=False)
        assert res.returncode == 0 and res.stdout.strip() == backend, (host, res)


def test_openssl_s_client_sees_the_certificate_of_the_group(sni: Env) -> None:
    for host, backend in [("b.example.com", "b2"), ("MiXeD.a.example.com", "b3"),
                          ("A.EXAMPLE.com", "b1")]:
        res = sni.lab.exec("cli", "openssl", "s_client", "-connect", f"{VIP}:{TLS_PORT}",
                           "-servername", host, input="", check=False, timeout=20)
        m = re.search(r"subject=\s*CN\s*=\s*(\w+)", res.stdout)
        assert m and m.group(1) == backend, (host, res.stdout[-2000:])
    res = sni.lab.exec("cli", "openssl", "s_client", "-connect", f"{VIP}:{TLS_PORT}",
                       "-noservername", input="", check=False, timeout=20)
    assert re.search(r"subject=\s*CN\s*=\s*b3", res.stdout), res.stdout[-2000:]


def test_sni_in_the_second_segment_routes_by_it(sni: Env) -> None:
    res = sni.client("segments", "--host", "half.example.com")
    assert res["reply"][0] == "b1", res
    res = sni.client("segments", "--host", "other.example.com")
    assert res["reply"][0] == "b2", res


def test_real_tls_with_sni_in_the_second_record_and_segment(sni: Env) -> None:
    for host, backend in [("b.example.com", "b2"), ("A.example.COM", "b1"),
                          ("z.example.com", "b3")]:
        assert sni.client("segments-tls", "--host", host) == {"name": backend}, host


def test_non_tls_bytes_are_closed_cleanly(sni: Env) -> None:
    res = sni.client("plain")
    assert res == {"data": "", "how": "eof", "seconds": res["seconds"]}
    assert res["seconds"] < 2


def sni_metrics(env: Env) -> dict[str, float]:
    """The agent's SNI metrics: connections by outcome, and "pairs" spliced now."""
    text = env.py(f"import urllib.request; print(urllib.request.urlopen("
                  f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())",
                  ns="lb")
    found = {m[1] or "pairs": float(m[2]) for m in re.finditer(
        r'^xdplb_sni_(?:connections_total\{outcome="(\w+)"\}|spliced_pairs) (\S+)$',
        text, re.M)}
    assert "pairs" in found and "spliced" in found, text[-2000:]
    return found


def test_metrics_count_what_became_of_connections(sni: Env) -> None:
    before = sni_metrics(sni)
    assert sni.client("plain")["how"] == "eof"
    for host, backend in HOSTS.items():
        assert sni.client("names", "--host", host, "--count", "2")["names"] == [backend] * 2
    after = sni_metrics(sni)
    assert after["not_tls"] - before["not_tls"] == 1
    assert after["spliced"] - before["spliced"] == 2 * len(HOSTS)
    assert after["accepted"] - before["accepted"] == 2 * len(HOSTS) + 1


def test_silent_clients_time_out_without_delaying_others_or_spinning(sni: Env) -> None:
    cpu0 = sni.agent.cpu_seconds()
    t0 = time.monotonic()
    res = sni.client("silent", "--count", "40", "--timeout", str(HELLO_TIMEOUT))
    wall = time.monotonic() - t0
    cpu = sni.agent.cpu_seconds() - cpu0
    assert res["served"] == "b1" and res["served_s"] < 1, res
    for data, t in res["closed"]:
        assert data == "" and HELLO_TIMEOUT - 0.5 <= t <= HELLO_TIMEOUT + 2, res["closed"]
    # Silent and half-hello clients are parked in epoll: the agent stays near idle.
    assert cpu < 0.15 * wall, f"agent used {cpu:.2f} s CPU in {wall:.1f} s"


def test_one_mib_each_way_after_the_splice(sni: Env) -> None:
    for host in HOSTS:
        res = sni.client("bulk", "--host", host)
        assert res == {"sent_ok": True, "received_ok": True, "received": MIB}, res
    # The data path was compiled in a child process: neither the agent nor the acceptor
    # splicing these bytes ever mapped the compiler.
    assert sni.agent.proc is not None
    for pid in (sni.agent.proc.pid, sni.agent.acceptor_pid()):
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libbcc" not in maps and "LLVM" not in maps


def _tcp_sockets_of(pid: int) -> list[socket.socket]:
    """Copies of the IPv4 TCP sockets process `pid` holds (pidfd_getfd, as root)."""
    pidfd_getfd = 438
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    out = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(pidfd_getfd, pidfd, int(name), 0)
            if fd < 0:
                continue
            s = socket.socket(fileno=fd)
            if s.family == socket.AF_INET and s.type == socket.SOCK_STREAM:
                out.append(s)
            else:
                s.close()
    finally:
        os.close(pidfd)
    return out


def test_spliced_sockets_send_small_segments_at_once(sni: Env) -> None:
    """Nagle's algorithm would hold a small segment the splice sends while an earlier one
    waits for an ACK, and the peer delays its ACK (40 ms): a stall in every TLS
    handshake. The listening socket, the client's and the backend's side all have
    TCP_NODELAY."""
    code = f"""
import socket
raw = socket.create_connection(({VIP!r}, {TLS_PORT}), timeout=20)
s = client_context().wrap_socket(raw, server_hostname="a.example.com")
s.sendall(b"name\\n"); s.makefile("rb").readline()
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""
    held = sni.lab.popen("cli", sys.executable, "-c",
                         f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                         "from test_sni_e2e import *\n" + code, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert held.stdin is not None and held.stdout is not None
    try:
        cport = int(held.stdout.readline())
        nodelay: dict[str, list[int]] = {"listener": [], "client": [], "backend": []}
        for s in _tcp_sockets_of(sni.agent.acceptor_pid()):
            with s:
                try:
                    peer = s.getpeername()
                except OSError:
                    peer = None
                side = ("listener" if peer is None and s.getsockname() == (VIP, TLS_PORT)
                        else "client" if peer == (Lab.client_addr, cport)
                        else "backend" if peer == (Lab.backend_addr(1), B_TLS) else None)
                if side:
                    nodelay[side].append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        # Other tests' pairs to b1 may still be closing: every backend socket counts.
        assert nodelay["listener"] == [1] and nodelay["client"] == [1], nodelay
        assert nodelay["backend"] and set(nodelay["backend"]) == {1}, nodelay
    finally:
        held.stdin.close()
        sni.lab.stop(held)


def test_200_concurrent_connections(sni: Env) -> None:
    res = sni.client("concurrent", "--count", "200", timeout=180)
    assert res == {"ok": 200, "bad": []}, f"{res['bad'][:5]}\n{sni.agent.tail()}"


def test_half_close_client_first(sni: Env) -> None:
    res = sni.client("half-close", "--host", "half.example.com", "--mode", "last",
                     "--port", str(RAW_PORT))
    assert res["reply"] == ["b1", res["sha"], str(res["n"]), "-"], res


def test_half_close_server_first(sni: Env) -> None:
    log = sni.lab.workdir / "b2-raw.log"
    before = log.read_text() if log.exists() else ""
    res = sni.client("half-close", "--host", "nothing.example.com", "--mode", "first",
                     "--port", str(RAW_PORT))
    assert res["reply"] == ["b2"], res
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and log.read_text() == before:
        time.sleep(0.05)
    assert log.read_text()[len(before):].split() == ["b2", res["sha"], str(res["n"])]


def test_proxy_protocol_v2_carries_the_client_address(sni: Env) -> None:
    res = sni.client("half-close", "--host", "p.example.com", "--mode", "last",
                     "--port", str(PROXY_PORT))
    name, _sha, _n, proxy = res["reply"]
    assert name == "b1"
    assert re.fullmatch(rf"{re.escape(Lab.client_addr)}:\d+>{re.escape(VIP)}:{PROXY_PORT}",
                        proxy), proxy


def test_ipv6_each_hostname_reaches_its_group(sni: Env) -> None:
    for host, want in [*HOSTS.items(), ("other.example.com", "b3")]:
        res = sni.client("names", "--host", host, "--count", "4", "--vip", VIP6)
        assert res["names"] == [want] * 4, (host, res)


def test_proxy_protocol_v2_of_the_ipv6_kind(sni: Env) -> None:
    res = sni.client("half-close", "--host", "p.example.com", "--mode", "last",
                     "--port", str(PROXY_PORT), "--vip", VIP6)
    name, sha, n, proxy = res["reply"]
    assert (name, sha, int(n)) == ("b2", res["sha"], res["n"])
    assert re.fullmatch(rf"{re.escape(Lab.client6_addr)}:\d+>{re.escape(VIP6)}:{PROXY_PORT}",
                        proxy), proxy


def test_source_cidr_route_beats_sni(sni: Env) -> None:
    res = sni.client("names", "--host", "b.example.com", "--count", "3", ns="cli2")
    assert res["names"] == ["b1"] * 3, res
    res = sni.client("names", "--host", "b.example.com", "--count", "3")
    assert res["names"] == ["b2"] * 3, res


def test_changing_sni_routes_keeps_open_connections(sni: Env) -> None:
    code = f"""
import socket, sys
raw = socket.create_connection(({VIP!r}, {TLS_PORT}), timeout=20)
s = client_context().wrap_socket(raw, server_hostname="a.example.com")
f = s.makefile("rb")
s.sendall(b"name\\n"); print(f.readline().decode().strip(), flush=True)
sys.stdin.readline()
s.sendall(b"name\\n"); print(f.readline().decode().strip(), flush=True)
"""
    held = sni.lab.popen("cli", sys.executable, "-c",
                         f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                         "from test_sni_e2e import *\n" + code,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert held.stdin is not None and held.stdout is not None
    assert held.stdout.readline().strip() == "b1"
    sni.agent.apply(config_yaml({"a.example.com": "b2", "b.example.com": "b2"}), within=2)
    assert sni.client("names", "--host", "a.example.com", "--count", "3")["names"] == ["b2"] * 3
    held.stdin.write("\n")
    held.stdin.flush()
    assert held.stdout.readline().strip() == "b1"
    sni.lab.stop(held)


def test_clean_stop_removes_the_local_route(sni: Env) -> None:
    def local_routes() -> str:
        return sni.lab.exec("lb", "ip", "route", "show", "table", "local", VIP).stdout
    assert VIP in local_routes()
    sni.agent.terminate()
    try:
        assert VIP not in local_routes()
    finally:
        sni.agent.start()    # "applied" comes after the SNI listeners are up
    assert VIP in local_routes()


def test_agent_restart_ends_spliced_connections_and_serves_new_ones(sni: Env) -> None:
    """Spliced sockets belong to the agent process: a SIGKILL closes them (the client
    sees the end at once, nothing hangs); the next agent serves new connections."""
    code = f"""
import socket
raw = socket.create_connection(({VIP!r}, {TLS_PORT}), timeout=20)
s = client_context().wrap_socket(raw, server_hostname="b.example.com")
s.sendall(b"name\\n"); print(s.makefile("rb").readline().decode().strip(), flush=True)
try:
    print(repr(s.recv(1)), flush=True)
except OSError as e:
    print(type(e).__name__, flush=True)
"""
    held = sni.lab.popen("cli", sys.executable, "-c",
                         f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                         "from test_sni_e2e import *\n" + code, stdout=subprocess.PIPE, text=True)
    assert held.stdout is not None
    assert held.stdout.readline().strip() == "b2"
    sni.agent.kill()
    t0 = time.monotonic()
    ended = held.stdout.readline().strip()
    assert ended in ("b''", "SSLEOFError", "ConnectionResetError", "SSLZeroReturnError"), ended
    assert time.monotonic() - t0 < 5
    sni.lab.stop(held)
    offset = sni.agent.size()
    sni.agent.start()
    assert "adopted pinned maps" in sni.agent.text(offset)
    assert sni.client("names", "--host", "b.example.com", "--count", "3")["names"] == ["b2"] * 3
    routes = sni.lab.exec("lb", "ip", "route", "show", "table", "local", VIP).stdout
    assert routes.count(VIP) == 1, routes


# ---------------------------------------------------------------------- entry point


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("serve")
    s.add_argument("kind", choices=["tls", "raw"])
    s.add_argument("rest", nargs="+")
    c = sub.add_parser("client")
    c.add_argument("cmd")
    c.add_argument("--host", default="")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--concurrency", type=int, default=1)
    c.add_argument("--timeout", type=float, default=5)
    c.add_argument("--mode", default="last")
    c.add_argument("--port", type=int, default=RAW_PORT)
    c.add_argument("--vip", default=VIP)
    args = ap.parse_args()
    if args.what == "serve":
        if args.kind == "tls":
            name, port, cert, key = args.rest
            serve_tls(name, int(port), cert, key)
        else:
            name, port, log = args.rest
            serve_raw(name, int(port), log)
    else:
        client_main(args)


if __name__ == "__main__":
    main()
