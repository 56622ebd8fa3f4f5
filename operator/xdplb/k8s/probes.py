"""/healthz and /readyz of the operator, served from a thread for leader and standbys alike."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from xdplb.k8s.client import Kube


class Probes:
    """What /healthz and /readyz answer, read by the probe server's thread.

    Alive while every loop of this replica's role runs: the Lease loop of a standby;
    kopf, the Lease renewal, the DaemonSet loop and (from the first LoadBalancer on) the
    status loop of the leader. Ready once the API server has answered: a standby is ready
    too, or a rolling update with maxUnavailable 0 would wait forever for a replica that
    only stands by.
    """

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.role = "starting"
        self.loops: list[asyncio.Future[Any]] = []

    def alive(self) -> bool:
        return not any(t.done() for t in self.loops)

    def ready(self) -> bool:
        return self.kube.answered


class _DualStackServer(ThreadingHTTPServer):
    daemon_threads = True
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        with contextlib.suppress(OSError):  # IPv4 too: the pod may have either address
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve_probes(port: int, probes: Probes) -> ThreadingHTTPServer:
    """/healthz and /readyz on ``port``, from a thread: kopf counts every task started
    on its loop as its own. A loop that hangs without ending a task goes unnoticed."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            check = {"/healthz": probes.alive, "/readyz": probes.ready}.get(
                self.path.split("?")[0])
            ok = check is not None and check()
            code = 404 if check is None else 200 if ok else 503
            text = f"{'ok' if ok else 'not ok'}: {probes.role}\n".encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # kubelet probes every few seconds: no log line each

    try:
        server: ThreadingHTTPServer = _DualStackServer(("::", port), Handler)
    except OSError:  # no IPv6 in this network namespace
        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server
