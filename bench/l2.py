"""L2 announcement: how fast an announced address answers ARP, and how fast another node
takes it over.

  arp       a client and a node on one veth pair (namespaces xbarp-*); the client sends
            --requests ARP requests per configuration and round from a packet socket and
            times each reply. Configurations, alternated within each round:
              address       an address of the node's interface (the kernel's own: baseline)
              local-route   the announced address as xdplb makes it: a local route on lo
              proxy         a proxy neighbour entry (`ip neigh add proxy`), which needs a
                            /32 route out another interface, default proxy_delay (0.8 s)
              proxy-nodelay the same with net.ipv4.neigh.<if>.proxy_delay = 0
  takeover  the end-to-end lab of tests/test_l2.py (operator, two agents, a Service in an
            L2 pool; namespaces xbl2-*): per round the announcing agent is killed and its
            node taken off the segment; the time until the client connects to the address
            again through the other node. The baseline is the Lease duration.

    sudo .venv/bin/python bench/l2.py [--rounds 5] [--requests 200] [--skip-arp|--skip-takeover]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import fmt_stat, header, median, ratio, require_root, table

PREFIX = "xbarp"
NODE_ADDR, CLIENT_ADDR, VIP = "10.72.0.1", "10.72.0.2", "10.72.0.100"
CONFIGS = ("address", "local-route", "proxy", "proxy-nodelay")

ARPING = r"""
import json, socket, struct, sys, time
dev, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((dev, 0x0806))
mac = s.getsockname()[4]
src = socket.inet_aton(sys.argv[4])
tip = socket.inet_aton(target)
frame = (b"\xff" * 6 + mac + b"\x08\x06"
         + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, src, b"\0" * 6, tip))
s.settimeout(2.0)
out = []
for _ in range(count):
    t0 = time.perf_counter_ns()
    s.send(frame)
    while True:
        try:
            data = s.recv(64)
        except socket.timeout:
            out.append(None)
            break
        if len(data) >= 42 and data[20:22] == b"\x00\x02" and data[28:32] == tip:
            out.append((time.perf_counter_ns() - t0) / 1000)
            break
    time.sleep(0.002)
print(json.dumps(out))
"""


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def ns(name: str) -> str:
    return f"{PREFIX}-{name}"


def sysctl(where: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns(where), "sysctl", "-qw", f"{key}={value}"],
                   check=True)


def arp_lab() -> None:
    arp_down()
    for n in ("c", "n"):
        ip("netns", "add", ns(n))
        ip("-n", ns(n), "link", "set", "lo", "up")
    ip("-n", ns("n"), "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
       "netns", ns("c"))
    ip("-n", ns("n"), "addr", "add", f"{NODE_ADDR}/24", "dev", "eth0")
    ip("-n", ns("c"), "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0")
    for n in ("c", "n"):
        ip("-n", ns(n), "link", "set", "eth0", "up")
    sysctl("n", "net.ipv4.ip_forward", "1")  # proxy ARP answers only on a forwarding node


def arp_down() -> None:
    for n in ("c", "n"):
        ip("netns", "del", ns(n), check=False)


def configure(config: str) -> str:
    """Set the node up for ``config``; returns the address to ask for."""
    n = ns("n")
    ip("-n", n, "route", "del", f"{VIP}/32", "table", "local", check=False)
    ip("-n", n, "route", "del", f"{VIP}/32", check=False)
    ip("-n", n, "neigh", "del", "proxy", VIP, "dev", "eth0", check=False)
    sysctl("n", "net.ipv4.neigh.eth0.proxy_delay", "0" if config == "proxy-nodelay" else "80")
    ip("-n", ns("c"), "neigh", "flush", "dev", "eth0")
    if config == "address":
        return NODE_ADDR
    if config == "local-route":
        ip("-n", n, "route", "add", "local", f"{VIP}/32", "dev", "lo", "table", "local",
           "proto", "0xb6", "scope", "host")
    else:
        # The kernel consults proxy entries only for addresses routed out another
        # interface: without this route, nothing answers (net/ipv4/arp.c).
        ip("-n", n, "route", "add", f"{VIP}/32", "dev", "lo")
        ip("-n", n, "neigh", "add", "proxy", VIP, "dev", "eth0")
    return VIP


def arp_round(requests: int) -> dict[str, list[float]]:
    out = {}
    for config in CONFIGS:
        target = configure(config)
        res = subprocess.run(["ip", "netns", "exec", ns("c"), sys.executable, "-c", ARPING,
                              "eth0", target, str(requests), CLIENT_ADDR],
                             capture_output=True, text=True, check=True, timeout=600)
        times = json.loads(res.stdout)
        lost = sum(t is None for t in times)
        if lost:
            print(f"  {config}: {lost} of {requests} unanswered", file=sys.stderr)
        out[config] = [t for t in times if t is not None]
    return out


def bench_arp(rounds: int, requests: int) -> str:
    arp_lab()
    try:
        medians: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for r in range(rounds):
            print(f"arp round {r + 1}/{rounds}", file=sys.stderr)
            for config, times in arp_round(requests).items():
                medians[config].append(median(times))
    finally:
        arp_down()
    base = medians["address"]
    rows = [(c, fmt_stat(medians[c]), fmt_stat([ratio(a, b) for a, b in
                                               zip(medians[c], base, strict=True)], 2))
            for c in CONFIGS]
    return table(("configuration", "ARP answer µs, median of round medians (range)",
                  "÷ address"), rows)


def bench_takeover(rounds: int) -> str:
    from tests.l2lab import L2Lab
    from tests.test_l2 import PROBE, announcer, applied_on_both, l2_setup, web_service

    took: list[float] = []
    work = Path(tempfile.mkdtemp(prefix="xdplb-l2-bench-"))
    with l2_setup(work, "xbl2") as (lab, _cluster, api, nodes):
        web_service(api, "web", L2Lab.backend_addr(1), L2Lab.backend_addr(2))
        vip = api.wait_address("web")
        for r in range(rounds):
            print(f"takeover round {r + 1}/{rounds}", file=sys.stderr)
            deadline = time.monotonic() + 60
            while not (applied_on_both(api, "web") and (first := announcer(api, vip))):
                if time.monotonic() > deadline:
                    raise RuntimeError("no announcer")
                time.sleep(0.2)
            killed = time.monotonic_ns()
            nodes[first].kill()
            lab.node_down(first)
            probe = lab.popen("cli", "python3", "-c", PROBE, vip, "80", "30",
                              stdout=subprocess.PIPE, text=True)
            out, _ = probe.communicate(timeout=60)
            if probe.returncode != 0:
                tails = "\n".join(n.tail(60) for n in nodes.values())
                raise RuntimeError(f"the address never came back in round {r + 1}\n{tails}")
            took.append((int(out.split()[0]) - killed) / 1e9)
            lab.node_up(first)
            nodes[first].start()
            time.sleep(2.0)  # its agent back, standing by
    lease = 3.0
    return table(("", "seconds, median (range)", "÷ Lease duration (3 s)"),
                 [("kill -> client connects via the other node", fmt_stat(took, 2),
                   fmt_stat([t / lease for t in took], 2))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0, help="ignored")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--skip-takeover", action="store_true")
    p.add_argument("--skip-arp", action="store_true")
    a = p.parse_args()
    require_root()
    print(header("L2 announcement", "native", [f"rounds {a.rounds}"]))
    if not a.skip_arp:
        print()
        print(bench_arp(a.rounds, a.requests))
    if not a.skip_takeover:
        print()
        print(bench_takeover(a.rounds))


if __name__ == "__main__":
    main()
