"""A network-namespace lab for xdplb: two client subnets, a load-balancer namespace and N
backends, all wired with veth pairs. Built with plain ``ip`` commands (root required).

    cli  [cli0 10.10.1.2] ---- [lb-cli  10.10.1.1]  \\
    cli2 [cli0 10.10.2.2] ---- [lb-cli2 10.10.2.1]   lb (ip_forward=1) --- [lb-bK 10.20.K.1]
                                                                          [eth0  10.20.K.2] bK

The VIP (192.0.2.10) is assigned nowhere: clients reach it through their default route
via the lb namespace, and backends route their replies back through the lb namespace too.

Traffic helpers run ``tests/lab_tools.py`` inside the namespaces (see that module's docstring
for the wire protocols and JSON results).
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

TOOLS = Path(__file__).resolve().with_name("lab_tools.py")

StrPath = str | os.PathLike[str]


class LabError(RuntimeError):
    pass


class Proc(subprocess.Popen[Any]):
    """Popen started by a Lab; ``log_path``/``progress_path`` are set by some helpers."""

    log_path: Path | None = None
    progress_path: Path | None = None


def hostport(host: str, port: int) -> str:
    """host:port for the lab tools; an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def read_progress(path: StrPath) -> list[tuple[int, int]]:
    """Parse a long-stream progress file into [(monotonic_ns, acked_bytes)]."""
    samples = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:  # the last line may be half-written while the stream runs
            samples.append((int(parts[0]), int(parts[1])))
    return samples


def bytes_since(path: StrPath, t_ns: int) -> int:
    """Bytes acknowledged by the sink application after ``t_ns`` (time.monotonic_ns(), a
    system-wide clock, so the test process and the namespaced tool agree on it)."""
    samples = read_progress(path)
    if not samples:
        return 0
    before = [b for t, b in samples if t <= t_ns]
    return samples[-1][1] - (before[-1] if before else 0)


class Lab:
    """Context manager building the namespace topology; ``close()`` tears it down.

    Namespaces are ``<prefix>-cli``, ``<prefix>-cli2``, ``<prefix>-lb``, ``<prefix>-b1``..``bN``,
    so labs with different prefixes coexist; leftovers of a crashed run with the same prefix
    are removed before building.

    router_mtu: put a router namespace ``<prefix>-rt`` between the LB and the last backend,
    whose link to that backend has this MTU (LB 10.30.N.1 -- 10.30.N.2 router 10.20.N.1 --
    10.20.N.2 backend). The backend still advertises an MSS for 1500 bytes, so clients
    send full-size segments and path MTU discovery must work through the LB.

    direct_return: the last backend's default route does not go through the LB (it points
    at an absent gateway), as on a LAN where backends answer clients directly: only source
    NAT, which makes the LB's own address the client, reaches it.

    tx_checksum_off: ``ethtool -K <dev> tx off`` on the client and backend ends, so packets
    crossing the LB carry full checksums. lb_tx_checksum_off: the same on the LB's ends,
    so the LB's kernel completes partial checksums in software on the way out (where a
    wrong partial value shows as the receiver's checksum errors). peer_gro: ``ethtool -K
    <dev> gro on`` on the client and backend ends.
    """

    VIP = "192.0.2.10"
    VIP6 = "2001:db8::10"
    client_addr = "10.10.1.2"
    client2_addr = "10.10.2.2"
    lb_client_addr = "10.10.1.1"
    lb_client2_addr = "10.10.2.1"
    client_if = "cli0"  # ns side, in cli
    client2_if = "cli0"  # ns side, in cli2
    lb_client_if = "lb-cli"
    lb_client2_if = "lb-cli2"
    backend_if = "eth0"  # ns side, in every backend

    def __init__(self, backends: int = 3, prefix: str = "xl",
                 tx_checksum_off: bool = False, peer_gro: bool = False,
                 router_mtu: int | None = None, direct_return: bool = False,
                 lb_tx_checksum_off: bool = False, ipv6: bool = False) -> None:
        if not 1 <= backends <= 254:
            raise ValueError("backends must be in 1..254")
        # Keep "<prefix>-cli2" a sane file name under /run/netns and "lb-bK" ≤ 15 chars.
        if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", prefix):
            raise ValueError(f"bad prefix {prefix!r}")
        self.lb_tx_checksum_off = lb_tx_checksum_off
        self.n_backends = backends
        self.prefix = prefix
        self.tx_checksum_off = tx_checksum_off
        self.peer_gro = peer_gro
        self.router_mtu = router_mtu
        self.direct_return = direct_return
        self.ipv6 = ipv6
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-lab-"))
        self._procs: list[Proc] = []
        self._created: list[str] = []
        self._closed = False
        self._built = False

    # ------------------------------------------------------------------ names/addresses

    def ns(self, name: str) -> str:
        """Full namespace name for a short one: cli, cli2, lb, b1..bN, rt (router_mtu)."""
        if name in ("cli", "cli2", "lb") or (name == "rt" and self.router_mtu):
            return f"{self.prefix}-{name}"
        m = re.fullmatch(r"b(\d+)", name)
        if m and 1 <= int(m.group(1)) <= self.n_backends:
            return f"{self.prefix}-{name}"
        raise KeyError(f"no namespace {name!r} in this lab")

    @property
    def backends(self) -> list[str]:
        """Short backend names: ['b1', ..., 'bN']."""
        return [f"b{k}" for k in range(1, self.n_backends + 1)]

    @property
    def namespaces(self) -> list[str]:
        """Full names of all namespaces of this lab."""
        routers = ["rt"] if self.router_mtu else []
        return [self.ns(n) for n in ("cli", "cli2", "lb", *routers, *self.backends)]

    @staticmethod
    def backend_addr(k: int) -> str:
        return f"10.20.{k}.2"

    # With ipv6=True every link also has an IPv6 /64: fd00:<net>::1 on the LB's end,
    # ::2 on the other (the router's link is the LB's; DAD off, so they are usable at once).
    client6_addr = "fd00:10:1::2"
    client2_6_addr = "fd00:10:2::2"
    lb_client6_addr = "fd00:10:1::1"

    @staticmethod
    def backend6_addr(k: int) -> str:
        return f"fd00:20:{k:x}::2"

    @staticmethod
    def lb_backend6_addr(k: int) -> str:
        return f"fd00:20:{k:x}::1"

    @staticmethod
    def lb_backend_addr(k: int) -> str:
        return f"10.20.{k}.1"

    @staticmethod
    def lb_backend_if(k: int) -> str:
        return f"lb-b{k}"

    @property
    def lb_backend_ifs(self) -> list[str]:
        return [self.lb_backend_if(k) for k in range(1, self.n_backends + 1)]

    def link(self, ns: str, dev: str) -> dict[str, Any]:
        """``ip -j link show`` record of a device (ifindex, address, mtu, ...)."""
        out = _ip("-n", self.ns(ns), "-j", "link", "show", "dev", dev).stdout
        return dict(json.loads(out)[0])

    def mac(self, ns: str, dev: str) -> str:
        return str(self.link(ns, dev)["address"])

    def ifindex(self, ns: str, dev: str) -> int:
        return int(self.link(ns, dev)["ifindex"])

    # ------------------------------------------------------------------ build / teardown

    def __enter__(self) -> Lab:
        self.setup()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def setup(self) -> Lab:
        """Build the topology (idempotent). On failure everything built so far is removed."""
        if self._closed:
            raise LabError("lab already closed")
        if self._built:
            return self
        self._remove_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self._built = True
        return self

    def _remove_stale(self) -> None:
        stale = re.compile(rf"{re.escape(self.prefix)}-(cli|cli2|lb|rt|b\d+)")
        for name in list_netns():
            if stale.fullmatch(name):
                self._delete_ns(name)

    def _build(self) -> None:
        for name in self.namespaces:
            _ip("netns", "add", name)
            self._created.append(name)
            # Set defaults before creating links so every new device inherits them.
            v6 = "0" if self.ipv6 else "1"
            self._sysctl(name, {
                "net.ipv6.conf.all.disable_ipv6": v6,
                "net.ipv6.conf.default.disable_ipv6": v6,
                "net.ipv6.conf.all.accept_dad": "0",
                "net.ipv6.conf.default.accept_dad": "0",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
            })
            _ip("-n", name, "link", "set", "lo", "up")
        lb = self.ns("lb")
        self._sysctl(lb, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})

        links = [
            ("cli", self.client_if, self.client_addr, self.lb_client_if, self.lb_client_addr),
            ("cli2", self.client2_if, self.client2_addr, self.lb_client2_if,
             self.lb_client2_addr),
        ] + [
            (f"b{k}", self.backend_if, self.backend_addr(k), self.lb_backend_if(k),
             self.lb_backend_addr(k))
            for k in range(1, self.n_backends + 1)
        ]
        if self.router_mtu:
            n = self.n_backends
            links[-1] = ("rt", "up0", f"10.30.{n}.2", self.lb_backend_if(n), f"10.30.{n}.1")
        for short, dev, addr, lb_dev, lb_addr in links:
            peer_ns = self.ns(short)
            # Created directly inside the namespaces: no transient names in the root ns,
            # so concurrent labs cannot collide.
            _ip("-n", lb, "link", "add", lb_dev, "type", "veth", "peer", "name", dev,
                "netns", peer_ns)
            _ip("-n", lb, "addr", "add", f"{lb_addr}/24", "dev", lb_dev)
            _ip("-n", peer_ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", lb, "link", "set", lb_dev, "up")
            _ip("-n", peer_ns, "link", "set", dev, "up")
            gateway = lb_addr
            if self.direct_return and short == f"b{self.n_backends}":
                gateway = lb_addr.rsplit(".", 1)[0] + ".254"
            _ip("-n", peer_ns, "route", "add", "default", "via", gateway)
            if self.ipv6:
                net = {"cli": "10:1", "cli2": "10:2", "rt": f"30:{self.n_backends:x}"}.get(
                    short) or f"20:{int(short[1:]):x}"
                _ip("-n", lb, "addr", "add", f"fd00:{net}::1/64", "dev", lb_dev, "nodad")
                _ip("-n", peer_ns, "addr", "add", f"fd00:{net}::2/64", "dev", dev, "nodad")
                gw6 = f"fd00:{net}::1"
                if self.direct_return and short == f"b{self.n_backends}":
                    gw6 = f"fd00:{net}::fe"
                _ip("-n", peer_ns, "-6", "route", "add", "default", "via", gw6)
            if self.tx_checksum_off:
                # Senders then put full checksums on the wire instead of CHECKSUM_PARTIAL.
                self.exec(short, "ethtool", "-K", dev, "tx", "off")
            if self.lb_tx_checksum_off:
                self.exec("lb", "ethtool", "-K", lb_dev, "tx", "off")
            if self.peer_gro:
                # As on a NIC's receive path (a veth's default is off).
                self.exec(short, "ethtool", "-K", dev, "gro", "on")
        self._sysctl(lb, {f"net.ipv4.conf.{d}.rp_filter": "0"
                          for d in [self.lb_client_if, self.lb_client2_if, *self.lb_backend_ifs]})
        if self.router_mtu:
            self._build_router(self.n_backends, self.router_mtu)

    def _build_router(self, n: int, mtu: int) -> None:
        rt, b = self.ns("rt"), self.ns(f"b{n}")
        self._sysctl(rt, {"net.ipv4.ip_forward": "1"})
        _ip("-n", rt, "link", "add", "down0", "type", "veth", "peer", "name", self.backend_if,
            "netns", b)
        _ip("-n", rt, "addr", "add", f"{self.lb_backend_addr(n)}/24", "dev", "down0")
        _ip("-n", b, "addr", "add", f"{self.backend_addr(n)}/24", "dev", self.backend_if)
        for ns, dev in ((rt, "down0"), (b, self.backend_if)):
            _ip("-n", ns, "link", "set", dev, "mtu", str(mtu), "up")
        # advmss: the backend offers 1460 despite its MTU, so the client learns the
        # path MTU only from the router's "fragmentation needed".
        _ip("-n", b, "route", "add", "default", "via", self.lb_backend_addr(n),
            "advmss", "1460")
        _ip("-n", self.ns("lb"), "route", "add", f"10.20.{n}.0/24", "via", f"10.30.{n}.2")
        if self.ipv6:
            self._sysctl(rt, {"net.ipv6.conf.all.forwarding": "1"})
            _ip("-n", rt, "addr", "add", f"{self.lb_backend6_addr(n)}/64", "dev", "down0",
                "nodad")
            _ip("-n", b, "addr", "add", f"{self.backend6_addr(n)}/64", "dev", self.backend_if,
                "nodad")
            _ip("-n", b, "-6", "route", "add", "default", "via", self.lb_backend6_addr(n),
                "advmss", "1440")
            _ip("-n", self.ns("lb"), "-6", "route", "add", f"fd00:20:{n:x}::/64", "via",
                f"fd00:30:{n:x}::2")

    def _sysctl(self, ns: str, values: dict[str, str]) -> None:
        # /proc/sys/net is per network namespace, so write it from inside the namespace.
        # IPv6 keys are absent when ipv6 is disabled at boot, which is just as quiet.
        lines = []
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            if key.startswith("net.ipv6."):
                lines.append(f"[ -e {path} ] && echo {value} > {path}")
            else:
                lines.append(f"echo {value} > {path} || exit 1")
        res = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", "\n".join([*lines, "true"])],
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise LabError(f"sysctl in {ns}: {res.stderr.strip()}")

    def _delete_ns(self, name: str) -> None:
        for _ in range(50):
            # Kill everything living in the namespace first (servers, agents, strays).
            # Never ourselves, should this process have entered the namespace.
            pids = [p for p in _ip("netns", "pids", name, check=False).stdout.split()
                    if p != str(os.getpid())]
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if not pids:
                break
            time.sleep(0.05)
        res = _ip("netns", "del", name, check=False)
        if res.returncode != 0 and name in list_netns():
            raise LabError(f"ip netns del {name}: {res.stderr.strip()}")

    def close(self) -> None:
        """Stop started processes, delete the namespaces and the workdir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            self._stop(p)
        self._procs.clear()
        errors = []
        # Reverse order: backends and clients before lb (deleting lb destroys the veths).
        for name in reversed(self._created):
            try:
                self._delete_ns(name)
            except LabError as e:
                errors.append(str(e))
        self._created.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError("; ".join(errors))

    @staticmethod
    def _stop(p: subprocess.Popen[Any]) -> None:
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)  # popen() starts a new session per process
        except ProcessLookupError:
            return
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)

    # ------------------------------------------------------------------ running things

    def _argv(self, ns: str, argv: tuple[StrPath, ...]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(ns), *map(str, argv)]

    def exec(self, ns: str, *argv: StrPath, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside namespace ``ns`` (short name). Defaults: check=True,
        text=True, output captured (unless stdout/stderr given), timeout=60 s."""
        kw.setdefault("check", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        try:
            return subprocess.run(self._argv(ns, argv), **kw)
        except subprocess.CalledProcessError as e:
            raise LabError(f"in {ns}: {' '.join(map(str, argv))} exited {e.returncode}: "
                           f"{(e.stderr or e.stdout or '').strip()}") from e

    def popen(self, ns: str, *argv: StrPath, **kw: Any) -> Proc:
        """subprocess.Popen inside ``ns`` in its own session; stopped by close()."""
        kw.setdefault("start_new_session", True)
        p = Proc(self._argv(ns, argv), **kw)
        self._procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[Any]) -> None:
        """SIGTERM (then SIGKILL) a process started with popen()."""
        self._stop(p)
        self._procs = [q for q in self._procs if q is not p]

    def python(self, ns: str, *args: StrPath, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``sys.executable *args`` inside ``ns`` (e.g. "-c", code)."""
        return self.exec(ns, sys.executable, *args, **kw)

    # ------------------------------------------------------------------ lab_tools wrappers

    def tool(self, ns: str, *args: StrPath, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``lab_tools <args>`` to completion inside ``ns`` (check=False by default)."""
        kw.setdefault("check", False)
        return self.exec(ns, sys.executable, TOOLS, *args, **kw)

    def tool_json(self, ns: str, *args: StrPath, timeout: float = 120) -> dict[str, Any]:
        """Run a lab_tools client command and return its JSON result (plus "returncode")."""
        res = self.tool(ns, *args, timeout=timeout)
        try:
            out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError) as e:
            raise LabError(f"lab_tools {' '.join(map(str, args))} in {ns} exited "
                           f"{res.returncode} without JSON: {res.stderr.strip()}") from e
        out["returncode"] = res.returncode
        return out

    def start_tool(self, ns: str, *args: StrPath, ready_timeout: float = 10) -> Proc:
        """Start a lab_tools server in ``ns`` and wait for its READY line. Its stderr goes
        to ``<workdir>/<ns>-<cmd>-<pid>.log`` (path in ``proc.log_path``)."""
        fd, log_name = tempfile.mkstemp(dir=self.workdir, prefix=f"{ns}-{args[0]}-",
                                        suffix=".log")
        try:
            p = self.popen(ns, sys.executable, TOOLS, *args, stdout=subprocess.PIPE,
                           stderr=fd, text=True)
        finally:
            os.close(fd)
        p.log_path = Path(log_name)
        assert p.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            ok = sel.select(ready_timeout) and p.stdout.readline().startswith("READY")
        if not ok:
            self.stop(p)
            raise LabError(f"lab_tools {' '.join(map(str, args))} in {ns} not ready: "
                           f"{p.log_path.read_text().strip()}")
        return p

    def start_tcp_server(self, ns: str, port: int, tag: str | None = None,
                         log: StrPath | None = None) -> Proc:
        """tcp-server in ``ns``; tag defaults to the short ns name (e.g. "b1")."""
        extra = ["--log", str(log)] if log else []
        return self.start_tool(ns, "tcp-server", "--port", str(port), "--tag", tag or ns,
                               *extra)

    def start_udp_server(self, ns: str, port: int, tag: str | None = None,
                         log: StrPath | None = None) -> Proc:
        extra = ["--log", str(log)] if log else []
        return self.start_tool(ns, "udp-server", "--port", str(port), "--tag", tag or ns,
                               *extra)

    def start_tcp_sink(self, ns: str, port: int) -> Proc:
        return self.start_tool(ns, "tcp-sink", "--port", str(port))

    def start_backend_servers(self, tcp_port: int | None = None,
                              udp_port: int | None = None) -> list[Proc]:
        """tcp-server and/or udp-server on every backend, tagged b1..bN."""
        procs = []
        for b in self.backends:
            if tcp_port is not None:
                procs.append(self.start_tcp_server(b, tcp_port))
            if udp_port is not None:
                procs.append(self.start_udp_server(b, udp_port))
        return procs

    def tcp_clients(self, ns: str, dst: str, port: int, count: int = 1, concurrency: int = 1,
                    up: int = 1024, down: int = 1024, src: str | None = None,
                    details: bool = False, timeout: float = 20,
                    src_port: int = 0) -> dict[str, Any]:
        args = ["tcp-clients", "--dst", hostport(dst, port), "--count", str(count),
                "--concurrency", str(concurrency), "--up", str(up), "--down", str(down),
                "--timeout", str(timeout), "--json"]
        if src:
            args += ["--src", src]
        if src_port:
            args += ["--src-port", str(src_port)]
        if details:
            args.append("--details")
        return self.tool_json(ns, *args, timeout=timeout * (count / max(concurrency, 1) + 2))

    def udp_clients(self, ns: str, dst: str, port: int, count: int = 1,
                    src: str | None = None, size: int = 64, timeout: float = 1.0,
                    retries: int = 3) -> dict[str, Any]:
        args = ["udp-clients", "--dst", hostport(dst, port), "--count", str(count),
                "--size", str(size), "--timeout", str(timeout), "--retries", str(retries),
                "--json"]
        if src:
            args += ["--src", src]
        return self.tool_json(ns, *args, timeout=count * timeout * (retries + 1) + 30)

    def start_client(self, ns: str, *args: StrPath) -> Proc:
        """A lab_tools client command running in the background (--json added); see
        finish()."""
        return self.popen(ns, sys.executable, TOOLS, *args, "--json", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)

    def start_long_stream(self, ns: str, dst: str, port: int, seconds: float,
                          rate_mbit: float = 0, progress: StrPath | None = None,
                          ) -> Proc:
        """Start long-stream; stdout (PIPE) ends with its JSON result, see finish()."""
        progress = progress or self.workdir / f"{ns}-stream-{time.monotonic_ns()}.progress"
        p = self.popen(ns, sys.executable, TOOLS, "long-stream", "--dst", hostport(dst, port),
                       "--seconds", str(seconds), "--rate-mbit", str(rate_mbit),
                       "--progress", str(progress), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
        p.progress_path = Path(progress)
        return p

    def finish(self, p: subprocess.Popen[Any], timeout: float = 60) -> dict[str, Any]:
        """Wait for a client started with popen()/start_long_stream(); return its JSON."""
        out, err = p.communicate(timeout=timeout)
        self._procs = [q for q in self._procs if q is not p]
        try:
            res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError) as e:
            raise LabError(f"exit {p.returncode} without JSON: {err.strip()}") from e
        res["returncode"] = p.returncode
        return res
