"""Accept-latency probe of bench/sni.py, run inside the client namespace: one connection
after another to HOST:PORT, each sending a real ClientHello (Python's ssl) and timing
connect() until the first byte of the server's answer (its ServerHello): what the SNI
acceptor adds is accepting, reading the hello, picking and connecting to the backend.

    python sni_probe.py HOST PORT SNI SECONDS OUT

OUT gets one line per connection: the start (time.monotonic_ns(), a clock the whole
machine shares) and the latency in ns.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time


def hello(server_name: str) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def main(host: str, port: int, name: str, seconds: float, out: str) -> int:
    data = hello(name)
    end = time.monotonic() + seconds
    with open(out, "w") as f:
        while time.monotonic() < end:
            t0 = time.monotonic_ns()
            try:
                with socket.create_connection((host, port), timeout=10) as s:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.sendall(data)
                    if not s.recv(1):
                        raise ConnectionError("closed")
                    f.write(f"{t0} {time.monotonic_ns() - t0}\n")
            except OSError as e:
                f.write(f"{t0} -1 {e}\n")
            time.sleep(0.002)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]))
