"""IPv6 and dual-stack end to end: the lab with an IPv6 /64 on every link, the agent on a
file with a listener per family, real clients (Python sockets, curl -6) through it.

- both families on one port at once, with weights, source routes of an IPv6 prefix and
  UDP replies from the VIP;
- flows survive a SIGKILL and restart of the agent, and a conntrack flush;
- path MTU discovery through a router with a 1,280-byte link (ICMPv6 Packet Too Big);
- source NAT to the node's IPv6 address toward a backend that answers clients directly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.lab import Lab, bytes_since
from tests.test_e2e import (
    MIB,
    PIN_ROOT,
    SINK_PORT,
    TCP_PORT,
    UDP_PORT,
    XDPLB,
    Agent,
    check_ok,
    clients_speak_first,
    finish_stream,
    mount_bpffs,
    start_lab,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and XDP"),
    pytest.mark.skipif(not XDPLB.exists(), reason="needs .venv/bin/xdplb (scripts/setup.sh)"),
]

VIP, VIP6 = Lab.VIP, Lab.VIP6
B6 = {k: Lab.backend6_addr(k) for k in (1, 2, 3)}
HTTP_PORT = 8000


def config(w1: int = 1, w2: int = 1, extra: str = "") -> str:
    """A listener per family on :80 (b1/b2, weights w1/w2; clients of cli2's /64 to b3
    on IPv6), UDP :53 and the sink :9000 on IPv6, HTTP :8000 on IPv6."""
    b4 = {k: Lab.backend_addr(k) for k in (1, 2)}
    return f"""\
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: dual, namespace: default}}
spec:
  interfaces: [{Lab.lb_client_if}, {Lab.lb_client2_if}]
  listeners:
  - name: web
    protocol: TCP
    port: 80
    address: {VIP}
    backends:
    - {{address: {b4[1]}, port: {TCP_PORT}}}
    - {{address: {b4[2]}, port: {TCP_PORT}}}
  - name: web6
    protocol: TCP
    port: 80
    address: {VIP6}
    backends:
    - {{address: {B6[1]}, port: {TCP_PORT}, weight: {w1}}}
    - {{address: {B6[2]}, port: {TCP_PORT}, weight: {w2}}}
    sourceRoutes:
    - cidr: fd00:10:2::/64
      backends: [{{address: {B6[3]}, port: {TCP_PORT}}}]
  - name: sink6
    protocol: TCP
    port: {SINK_PORT}
    address: {VIP6}
    backends:
    - {{address: {B6[1]}, port: {SINK_PORT}}}
    - {{address: {B6[2]}, port: {SINK_PORT}}}
  - name: dns6
    protocol: UDP
    port: 53
    address: {VIP6}
    backends:
    - {{address: {B6[1]}, port: {UDP_PORT}}}
    - {{address: {B6[2]}, port: {UDP_PORT}}}
  - name: http6
    protocol: TCP
    port: {HTTP_PORT}
    address: {VIP6}
    backends:
    - {{address: {B6[1]}, port: {HTTP_PORT}}}
{extra}"""


Env = Callable[..., tuple[Lab, Agent]]


@pytest.fixture
def make_env() -> Iterator[Env]:
    mount_bpffs(PIN_ROOT)
    made: list[tuple[Lab, Agent]] = []

    def make(prefix: str, text: str, *flags: str, start: bool = True,
             **kw: object) -> tuple[Lab, Agent]:
        lab = start_lab(prefix, ipv6=True, **kw)
        agent = Agent(lab, prefix, text, *flags)
        made.append((lab, agent))
        if start:
            agent.start()
        return lab, agent

    yield make
    for lab, agent in reversed(made):
        agent.cleanup()
        lab.close()


def test_both_families_on_one_port(make_env: Env) -> None:
    lab, agent = make_env("x6a", config(w1=3, w2=1))
    res = lab.tcp_clients("cli", VIP, 80, count=20, concurrency=5)
    check_ok(res, "IPv4 through the dual-stack file", agent)
    res = lab.tcp_clients("cli", VIP6, 80, count=200, concurrency=10, up=16 * 1024,
                          down=16 * 1024)
    check_ok(res, "IPv6 TCP", agent)
    assert set(res["tags"]) == {"b1", "b2"} and 0.62 <= res["tags"]["b1"] / 200 <= 0.88, \
        res["tags"]  # weights 3:1: 75 % on b1
    res = lab.tcp_clients("cli2", VIP6, 80, count=20, concurrency=5)
    check_ok(res, "IPv6 from the source-routed prefix", agent)
    assert res["tags"] == {"b3": 20}, res
    res = lab.udp_clients("cli", VIP6, 53, count=50)
    check_ok(res, "IPv6 UDP", agent)
    assert res["reply_sources"] == {f"[{VIP6}]:53": 50}, res
    out = lab.exec("lb", XDPLB, "conntrack", "list", "--pin-dir", agent.pin_dir).stdout
    assert f"-> [{VIP6}]:53 => [{B6[1]}]:{UDP_PORT}" in out or \
        f"-> [{VIP6}]:53 => [{B6[2]}]:{UDP_PORT}" in out, out[-2000:]


def test_curl_over_ipv6(make_env: Env) -> None:
    lab, agent = make_env("x6h", config())
    (lab.workdir / "www").mkdir()
    (lab.workdir / "www" / "hello.txt").write_text("served by b1\n")
    lab.popen("b1", "python3", "-m", "http.server", "--bind", "::", "--directory",
              lab.workdir / "www", str(HTTP_PORT), stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        out = lab.exec("cli", "curl", "-6", "-s", "--max-time", "5",
                       f"http://[{VIP6}]:{HTTP_PORT}/hello.txt", check=False)
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert out.stdout == "served by b1\n", f"{out}\n{agent.tail()}"


def test_flows_survive_a_restart_and_a_flush(make_env: Env) -> None:
    lab, agent = make_env("x6r", config())
    streams = [lab.start_long_stream("cli", VIP6, SINK_PORT, seconds=8, rate_mbit=20)
               for _ in range(6)]
    time.sleep(1.5)
    agent.kill()
    agent.start()
    t_restart = time.monotonic_ns()
    assert "adopted pinned maps" in agent.text(), agent.tail()
    time.sleep(1)
    with clients_speak_first(lab, ipv6=True):
        flushed = subprocess.run([str(XDPLB), "conntrack", "flush", "--pin-dir",
                                  agent.pin_dir], capture_output=True, text=True, timeout=30)
        assert flushed.returncode == 0 and re.search(r"flushed \d+ entries", flushed.stdout)
        t_flush = time.monotonic_ns()
        time.sleep(0.3)   # every client sends again (a block each 26 ms at 20 Mbit/s)
    for i, p in enumerate(streams):
        finish_stream(lab, p, agent, f"IPv6 stream {i} across a restart and a flush")
        assert p.progress_path is not None
        assert bytes_since(p.progress_path, t_restart) > MIB, f"stream {i} stalled"
        assert bytes_since(p.progress_path, t_flush) > 0, f"stream {i} stalled at the flush"


def test_path_mtu_discovery_with_packet_too_big(make_env: Env) -> None:
    # b3 sits behind a router with a 1,280-byte link: the router's Packet Too Big quotes
    # the packet the LB forwarded (client -> b3); made about client -> VIP, it lowers the
    # client's path MTU, or the upload black-holes.
    extra = f"""\
  - name: mtu6
    protocol: TCP
    port: 81
    address: {VIP6}
    backends: [{{address: {B6[3]}, port: {TCP_PORT}}}]
"""
    lab, agent = make_env("x6m", config(extra=extra), router_mtu=1280)
    res = lab.tcp_clients("cli", VIP6, 81, count=4, concurrency=2, up=MIB, down=MIB,
                          timeout=15)
    check_ok(res, "IPv6 uploads through a 1,280-byte hop", agent)
    assert res["bytes_up"] == res["bytes_down"] == 4 * MIB
    route = lab.exec("cli", "ip", "-6", "route", "get", VIP6).stdout
    assert "mtu 1280" in route, f"the client learnt no path MTU for the VIP:\n{route}"


def test_source_nat_to_the_nodes_ipv6_address(make_env: Env) -> None:
    # b3 answers clients directly (its default route bypasses the LB): only source NAT,
    # from the LB's own IPv6 address toward b3, brings its answers back.
    extra = f"""\
  - name: snat6
    protocol: TCP
    port: 82
    address: {VIP6}
    sourceNAT: Node
    backends: [{{address: {B6[3]}, port: 8081}}]
  - name: snat6-udp
    protocol: UDP
    port: 54
    address: {VIP6}
    sourceNAT: Node
    backends: [{{address: {B6[3]}, port: 5354}}]
"""
    lab, agent = make_env("x6n", config(extra=extra), start=False, direct_return=True)
    log = lab.workdir / "b3.jsonl"
    lab.start_tcp_server("b3", 8081, log=log)
    lab.start_udp_server("b3", 5354)
    agent.start()
    res = lab.tcp_clients("cli", VIP6, 82, count=20, concurrency=5)
    check_ok(res, "IPv6 source NAT, TCP", agent)
    res = lab.udp_clients("cli", VIP6, 54, count=20)
    check_ok(res, "IPv6 source NAT, UDP", agent)
    assert res["reply_sources"] == {f"[{VIP6}]:54": 20}, res
    peers = {json.loads(line)["peer"].rsplit(":", 1)[0] for line in log.read_text().splitlines()}
    assert peers == {f"[{Lab.lb_backend6_addr(3)}]"}, peers  # the node's, not the client's


def test_a_wildcard_listener_takes_ipv6_addresses_as_they_come(make_env: Env) -> None:
    # An IPv6 listener without an address serves every IPv6 address of its interface,
    # and one added later within a second (rtnetlink), without a file change.
    extra = f"""\
  - name: any6
    protocol: TCP
    port: 8081
    ipFamily: IPv6
    backends: [{{address: {B6[1]}, port: {TCP_PORT}}}, {{address: {B6[2]}, port: {TCP_PORT}}}]
"""
    lab, agent = make_env("x6w", config(extra=extra))
    res = lab.tcp_clients("cli", Lab.lb_client6_addr, 8081, count=10, concurrency=5)
    check_ok(res, "IPv6 to the LB's own address", agent)
    added = "fd00:10:1::200"
    offset = agent.size()
    lab.exec("lb", "ip", "addr", "add", f"{added}/64", "dev", Lab.lb_client_if, "nodad")
    agent.wait_log("applied", offset, timeout=3)
    res = lab.tcp_clients("cli", added, 8081, count=20, concurrency=5)
    check_ok(res, f"IPv6 to the new address {added}", agent)
    assert set(res["tags"]) <= {"b1", "b2"}, res["tags"]
    # IPv4 on the same port is not this listener's: the node answers it (refused).
    res = lab.tcp_clients("cli", Lab.lb_client_addr, 8081, timeout=2)
    assert not res["ok"] and "refused" in str(res["failures"]), res


def test_health_checks_over_ipv6(make_env: Env) -> None:
    extra = f"""\
  - name: checked6
    protocol: TCP
    port: 84
    address: {VIP6}
    healthCheck: {{protocol: TCP, intervalSeconds: 1, timeoutSeconds: 1, unhealthyThreshold: 2,
                  healthyThreshold: 1}}
    backends: [{{address: {B6[1]}, port: 8090}}, {{address: {B6[2]}, port: 8090}}]
"""
    lab, agent = make_env("x6c", config(extra=extra), start=False)
    servers = {b: lab.start_tcp_server(b, 8090) for b in ("b1", "b2")}
    agent.start()
    res = lab.tcp_clients("cli", VIP6, 84, count=30, concurrency=10)
    check_ok(res, "both IPv6 backends healthy", agent)
    assert set(res["tags"]) == {"b1", "b2"}
    offset = agent.size()
    lab.stop(servers["b1"])
    agent.wait_log(f"backend [{B6[1]}]:8090 is unhealthy", offset, timeout=10)
    agent.wait_log("applied", offset, timeout=5)
    res = lab.tcp_clients("cli", VIP6, 84, count=30, concurrency=10)
    check_ok(res, "new IPv6 flows while b1 is down", agent)
    assert res["tags"] == {"b2": 30}
    status = subprocess.run([str(XDPLB), "status", "--state-file", str(agent.state_file)],
                            capture_output=True, text=True, timeout=30).stdout
    assert f"backend [{B6[1]}]:8090 down" in status, status
