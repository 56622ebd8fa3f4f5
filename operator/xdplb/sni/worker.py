"""The acceptor's own process, and the agent's handle on it.

The acceptor runs apart from the agent so that nothing the agent does (reading and
planning a large file, writing 10,000 routes, a Kubernetes watch) holds the interpreter
lock the acceptor needs between two system calls: an apply does not stall accepts.
The agent talks to it over a socket pair, one request and one answer at a time:

    listen   {(address, port): Route}  -> problems (addresses that cannot be bound)
    routes   RoutingUpdate             -> None
    stats    None                      -> ({outcome: count}, pairs open now)
    stop     None                      -> None, then the process ends

The process dies with the agent (PR_SET_PDEATHSIG, and the end of the socket pair), and
its connections with it, as they did when they were the agent's own sockets.

    python -m xdplb.sni.worker CONTROL_FD SETTINGS_JSON LOG_FORMAT PIN_DIR
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from xdplb.dataplane.apart import child_env
from xdplb.errors import XdplbError
from xdplb.sni.settings import SniSettings

log = logging.getLogger("xdplb.sni")

PR_SET_PDEATHSIG = 1
START_TIMEOUT = 60.0      # compiling the sockmap splice takes a few seconds
REPLY_TIMEOUT = 30.0
_LEN = struct.Struct("!I")


class WorkerError(XdplbError):
    pass


def frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WorkerError("the SNI acceptor process went away")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return pickle.loads(_recv_exact(sock, n))


class Worker:
    """The agent's handle: starts the process and asks it things (from any thread)."""

    def __init__(self, settings: SniSettings, pin_dir: str, log_format: str = "text") -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()),
                 json.dumps(asdict(settings)), log_format, pin_dir],
                pass_fds=(theirs.fileno(),), env=child_env())
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self._lock = threading.Lock()
        ours.settimeout(START_TIMEOUT)
        try:
            if (got := read_frame(ours)) != ("ok", "ready"):
                raise WorkerError(f"the SNI acceptor did not start: {got[1]}")
        except (OSError, WorkerError) as e:
            self.kill()
            raise WorkerError(f"the SNI acceptor did not start: {e}") from e
        ours.settimeout(REPLY_TIMEOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, op: str, arg: Any = None) -> Any:
        """The answer to `op`. A request left without its whole answer (a timeout, a
        broken frame) ends the process: its late answer would be taken for the next
        request's. The agent's check then starts another."""
        with self._lock:
            try:
                self.sock.sendall(frame((op, arg)))
                status, value = read_frame(self.sock)
            except Exception as e:
                self.kill()
                raise WorkerError(f"the SNI acceptor did not answer: {e}") from e
        if status != "ok":
            raise WorkerError(f"the SNI acceptor failed to {op}: {value}")
        return value

    def stop(self) -> None:
        with contextlib.suppress(WorkerError):
            self.ask("stop")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
        self.sock.close()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        self.sock.close()


# -- the process ------------------------------------------------------------------------


class _Control:
    """The worker's end of the socket pair: frames read as they come, without blocking
    the loop on a large routing update."""

    def __init__(self, sock: socket.socket, acceptor: Any) -> None:
        self.sock, self.acceptor = sock, acceptor
        self.buf = bytearray()

    def readable(self, _obj: Any, _fd: int, _ev: int) -> None:
        try:
            chunk = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:     # the agent is gone
            self.acceptor.stop()
            return
        self.buf += chunk
        while len(self.buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self.buf)
            if len(self.buf) < _LEN.size + n:
                return
            op, arg = pickle.loads(self.buf[_LEN.size:_LEN.size + n])
            del self.buf[:_LEN.size + n]
            try:
                reply: Any = ("ok", self.handle(op, arg))
            except Exception as e:   # answered, so the agent can say what failed
                log.exception("SNI acceptor: %s", op)
                reply = ("error", str(e))
            self.sock.sendall(frame(reply))

    def handle(self, op: str, arg: Any) -> Any:
        a = self.acceptor
        if op == "listen":
            return a.set_listeners(arg)
        if op == "routes":
            a.routes.apply(arg)
            return None
        if op == "stats":
            return dict(a.stats), a.pairs
        if op == "stop":
            a.stop()
            return None
        raise ValueError(f"unknown request {op!r}")


def _log_setup(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        class Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return json.dumps({"time": self.formatTime(record),
                                   "level": record.levelname.lower(),
                                   "logger": record.name, "msg": record.getMessage()})
        handler.setFormatter(Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if os.environ.get("XDPLB_SNI_DEBUG") else
                        logging.INFO, handlers=[handler])


def _raise_file_limit() -> None:
    """Two descriptors per pair: as many as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str]) -> int:
    ctrl_fd, settings_json, log_format, pin_dir = argv
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The agent stops it; a terminal's ^C reaches the agent, which then does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _log_setup(log_format)
    _raise_file_limit()
    ctrl = socket.socket(fileno=int(ctrl_fd))
    t0 = time.monotonic()
    try:
        from xdplb.sni.acceptor import Acceptor
        from xdplb.sni.splice import Splicer

        settings = SniSettings(**json.loads(settings_json))
        splicer = Splicer(pin_dir, 2 * settings.max_pairs) \
            if settings.forward == "sockmap" else None
        acceptor = Acceptor(settings, splicer)
    except Exception as e:
        ctrl.sendall(frame(("error", str(e))))
        return 1
    control = _Control(ctrl, acceptor)
    acceptor.watch(ctrl.fileno(), 1, control.readable)   # EPOLLIN
    ctrl.sendall(frame(("ok", "ready")))
    log.info("SNI: acceptor process %d started in %.0f ms (%s forwarding)", os.getpid(),
             (time.monotonic() - t0) * 1000, settings.forward)
    try:
        acceptor.run()
    finally:
        acceptor.close()
        if splicer is not None:
            splicer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
