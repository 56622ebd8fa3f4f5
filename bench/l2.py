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
  ns        the same for IPv6 (fd72::/64): Neighbour Solicitations from a raw ICMPv6
            socket, each answer timed. Configurations:
              address       an address of the node's interface (baseline)
              local-route   a local route on lo alone (IPv4's way): never answered
              proxy         a proxy neighbour entry (`ip -6 neigh add proxy`, proxy_ndp=1),
                            default proxy_delay (0.8 s)
              proxy-nodelay the same with net.ipv6.neigh.<if>.proxy_delay = 0 (xdplb's)
  move      IPv6 takeover at the kernel level (tests/l2lab.py, namespaces xbna-*): the
            client reached the address through n1 (its neighbour entry holds n1's MAC);
            n1 leaves the segment and n2 makes the address its own as xdplb does, with
            or without the unsolicited Neighbour Advertisement; the time until the
            client's ping is answered again (it includes starting n2's two commands, about
            0.4 s). Proxy answers carry no Override flag, so
            without the advertisement the client keeps n1's MAC until its neighbour
            unreachability detection gives up on it.
  takeover  the end-to-end lab of tests/test_l2.py (operator, two agents, a dual-stack
            Service in an L2 pool; namespaces xbl2-*): per round the announcing agent of
            the IPv4 address is killed and its node taken off the segment; the time until
            the client connects to each address again. The baseline is the Lease duration.

    sudo .venv/bin/python bench/l2.py [--rounds 5] [--requests 200]
        [--skip-arp] [--skip-ns] [--skip-move] [--skip-takeover]
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


NODE6, CLIENT6, VIP6 = "fd72::1", "fd72::2", "fd72::100"
NS_CONFIGS = ("address", "local-route", "proxy", "proxy-nodelay")

NSPING = r"""
import json, socket, struct, sys, time
dev, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
index = socket.if_nametoindex(dev)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
tgt = socket.inet_pton(socket.AF_INET6, target)
mac = bytes.fromhex(open(f"/sys/class/net/{dev}/address").read().strip().replace(":", ""))
ns = struct.pack("!BBHI", 135, 0, 0, 0) + tgt + struct.pack("!BB6s", 1, 1, mac)
solicited = "ff02::1:ff%02x:%02x%02x" % (tgt[13], tgt[14], tgt[15])
s.settimeout(2.0)
out = []
for _ in range(count):
    t0 = time.perf_counter_ns()
    s.sendto(ns, (solicited, 0, 0, index))
    while True:
        try:
            data = s.recv(256)
        except socket.timeout:
            out.append(None)
            break
        if data[0] == 136 and data[8:24] == tgt:
            out.append((time.perf_counter_ns() - t0) / 1000)
            break
    time.sleep(0.002)
print(json.dumps(out))
"""


def ns_lab() -> None:
    arp_lab()
    for n in ("c", "n"):
        sysctl(n, "net.ipv6.conf.eth0.accept_dad", "0")
    ip("-n", ns("n"), "addr", "add", f"{NODE6}/64", "dev", "eth0", "nodad")
    ip("-n", ns("c"), "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
    sysctl("n", "net.ipv6.conf.all.forwarding", "1")  # proxy NDP answers only then


def configure6(config: str, requests: int) -> tuple[str, int]:
    """Set the node up for ``config``; returns the address to ask for, and how many
    times (an unanswered configuration costs 2 s a request)."""
    n = ns("n")
    ip("-n", n, "-6", "route", "del", "local", f"{VIP6}/128", "dev", "lo", "table", "local",
       check=False)
    ip("-n", n, "-6", "neigh", "del", "proxy", VIP6, "dev", "eth0", check=False)
    sysctl("n", "net.ipv6.conf.eth0.proxy_ndp", "0" if config == "local-route" else "1")
    sysctl("n", "net.ipv6.neigh.eth0.proxy_delay", "0" if config == "proxy-nodelay" else "80")
    ip("-n", ns("c"), "-6", "neigh", "flush", "dev", "eth0")
    if config == "address":
        return NODE6, requests
    ip("-n", n, "-6", "route", "add", "local", f"{VIP6}/128", "dev", "lo", "table", "local",
       "proto", "0xb6")
    if config == "local-route":
        return VIP6, 2
    ip("-n", n, "-6", "neigh", "add", "proxy", VIP6, "dev", "eth0")
    return VIP6, requests


def bench_ns(rounds: int, requests: int) -> str:
    ns_lab()
    medians: dict[str, list[float]] = {c: [] for c in NS_CONFIGS}
    lost: dict[str, int] = dict.fromkeys(NS_CONFIGS, 0)
    asked: dict[str, int] = dict.fromkeys(NS_CONFIGS, 0)
    try:
        for r in range(rounds):
            print(f"ns round {r + 1}/{rounds}", file=sys.stderr)
            for config in NS_CONFIGS:
                target, count = configure6(config, requests)
                res = subprocess.run(["ip", "netns", "exec", ns("c"), sys.executable, "-c",
                                      NSPING, "eth0", target, str(count)],
                                     capture_output=True, text=True, check=True, timeout=600)
                times = json.loads(res.stdout)
                answered = [t for t in times if t is not None]
                lost[config] += len(times) - len(answered)
                asked[config] += len(times)
                if answered:
                    medians[config].append(median(answered))
    finally:
        arp_down()
    base = medians["address"]
    rows = []
    for c in NS_CONFIGS:
        if not medians[c]:
            rows.append((c, f"never answered ({lost[c]} of {asked[c]})", "-"))
            continue
        rows.append((c, fmt_stat(medians[c]) + (f"; {lost[c]} unanswered" if lost[c] else ""),
                     fmt_stat([ratio(a, b) for a, b in zip(medians[c], base, strict=True)], 2)))
    return table(("configuration", "NS answer µs, median of round medians (range)",
                  "÷ address"), rows)


MOVE_LIMIT = 20.0  # seconds a client is given to reach the address again


def bench_move(rounds: int) -> str:
    from tests.l2lab import L2Lab
    from tests.test_l2 import KERNEL_OPS

    vip = "fd70::105"
    configs = ("with-na", "without-na")
    took: dict[str, list[float]] = {c: [] for c in configs}
    with L2Lab("xbna", ipv6=True) as lab:
        def kernel(node: str, *args: str) -> None:
            lab.exec(node, sys.executable, "-c", KERNEL_OPS, *args)

        for r in range(rounds):
            print(f"move round {r + 1}/{rounds}", file=sys.stderr)
            for config in configs:
                lab.exec("cli", "ip", "-6", "neigh", "flush", "dev", "front")
                kernel("n1", "add", vip, "front")
                lab.exec("cli", "ping", "-c1", "-W1", vip)  # the client learns n1's MAC
                start = time.monotonic()
                lab.node_down("n1")
                kernel("n2", "add", vip, "front")
                if config == "with-na":
                    kernel("n2", "garp", vip, "front")
                while lab.exec("cli", "ping", "-c1", "-W0.2", vip,
                               check=False).returncode != 0:
                    if time.monotonic() - start > MOVE_LIMIT:
                        break
                took[config].append(time.monotonic() - start)
                kernel("n2", "remove", vip)
                kernel("n1", "remove", vip)
                lab.node_up("n1")
    base = took["with-na"]
    return table(("IPv6 address moves n1 -> n2", "seconds until the client reaches it,"
                  " median (range)", "÷ with-na"),
                 [(c, fmt_stat(took[c], 2) + (
                     f"; {n} rounds never within {MOVE_LIMIT:.0f} s"
                     if (n := sum(t > MOVE_LIMIT for t in took[c])) else ""),
                   fmt_stat([ratio(a, b) for a, b in zip(took[c], base, strict=True)], 1))
                  for c in configs])


def bench_takeover(rounds: int) -> str:
    from tests.l2lab import L2Lab
    from tests.test_l2 import announcer, applied_on_both, l2_setup, takeovers, web_service

    took: dict[str, list[float]] = {"IPv4": [], "IPv6": []}
    work = Path(tempfile.mkdtemp(prefix="xdplb-l2-bench-"))
    with l2_setup(work, "xbl2", ipv6=True) as (lab, _cluster, api, nodes):
        web_service(api, "web", L2Lab.backend_addr(1), L2Lab.backend_addr(2),
                    backends6=(L2Lab.backend6_addr(1), L2Lab.backend6_addr(2)))
        deadline = time.monotonic() + 30
        while len(api.ingress("web")) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("no addresses")
            time.sleep(0.2)
        vips = tuple(i["ip"] for i in api.ingress("web"))
        vip = vips[0]
        for r in range(rounds):
            print(f"takeover round {r + 1}/{rounds}", file=sys.stderr)
            deadline = time.monotonic() + 60
            while not (applied_on_both(api, "web") and (first := announcer(api, vip))
                       and (holders := [announcer(api, v) for v in vips]) and all(holders)):
                if time.monotonic() > deadline:
                    raise RuntimeError("no announcer")
                time.sleep(0.2)
            killed = time.monotonic_ns()
            nodes[first].kill()
            lab.node_down(first)
            tails = "\n".join(n.tail(60) for n in nodes.values())
            # A family counts when the killed node announced its address.
            for family, holder, t in zip(("IPv4", "IPv6"), holders,
                                         takeovers(lab, vips, killed, tails), strict=True):
                if holder == first:
                    took[family].append(t)
            lab.node_up(first)
            nodes[first].start()
            time.sleep(2.0)  # its agent back, standing by
    lease = 3.0
    rows = []
    for family, times in took.items():
        rows.append((f"{family}: kill -> client connects via the other node"
                     f" ({len(times)} rounds)", fmt_stat(times, 2) if times else "-",
                     fmt_stat([t / lease for t in times], 2) if times else "-"))
    return table(("", "seconds, median (range)", "÷ Lease duration (3 s)"), rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0, help="ignored")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--skip-takeover", action="store_true")
    p.add_argument("--skip-arp", action="store_true")
    p.add_argument("--skip-ns", action="store_true")
    p.add_argument("--skip-move", action="store_true")
    a = p.parse_args()
    require_root()
    print(header("L2 announcement", "native", [f"rounds {a.rounds}"]))
    if not a.skip_arp:
        print()
        print(bench_arp(a.rounds, a.requests))
    if not a.skip_ns:
        print()
        print(bench_ns(a.rounds, a.requests))
    if not a.skip_move:
        print()
        print(bench_move(a.rounds))
    if not a.skip_takeover:
        print()
        print(bench_takeover(a.rounds))


if __name__ == "__main__":
    main()
