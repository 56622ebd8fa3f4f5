"""The data path off the happy path, end to end: the standalone agent in a namespace lab,
real clients, and conntrack touched from outside while traffic runs.

- a connection made to a backend itself, before the agent started and idle past every
  timeout, is never touched;
- a VIP answers on its listeners' ports only;
- the sweeper, running in a loop, never breaks a flow;
- two UDP clients never receive each other's datagrams, whatever entries go;
- fragmented datagrams go both ways;
- partial checksums come out right where the kernel completes them in software;
- a UDP flow leaves a backend that is gone.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.lab import Lab
from tests.test_e2e import (
    PIN_ROOT,
    TCP_PORT,
    UDP_PORT,
    VIP,
    VIP_TCP,
    VIP_UDP,
    XDPLB,
    Agent,
    check_ok,
    config_yaml,
    mount_bpffs,
    start_lab,
)
from xdplb.dataplane import conntrack
from xdplb.dataplane.bpfsys import BpfMap
from xdplb.dataplane.config import Timeouts

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and XDP"),
    pytest.mark.skipif(not XDPLB.exists(), reason="needs .venv/bin/xdplb (scripts/setup.sh)"),
]

MIB = 1024 * 1024
B1, B2, B3 = (Lab.backend_addr(k) for k in (1, 2, 3))
ECHO_PORT = 7000


def listeners(*extra: str) -> str:
    return config_yaml() + "".join(extra)


def listener(name: str, port: int, backends: list[tuple[str, int]], protocol: str = "TCP",
             **fields: str) -> str:
    more = "".join(f"    {k}: {v}\n" for k, v in fields.items())
    bs = ", ".join(f"{{address: {a}, port: {p}}}" for a, p in backends)
    return (f"  - name: {name}\n    protocol: {protocol}\n    port: {port}\n"
            f"    address: {VIP}\n{more}    backends: [{bs}]\n")


Env = Callable[..., tuple[Lab, Agent]]


@pytest.fixture
def make_env() -> Iterator[Env]:
    """A private lab (prefix "xi...") and an agent on ``config``, torn down after."""
    mount_bpffs(PIN_ROOT)
    made: list[tuple[Lab, Agent]] = []

    def make(prefix: str, config: str, *flags: str, start: bool = True,
             **kw: object) -> tuple[Lab, Agent]:
        lab = start_lab(prefix, **kw)
        agent = Agent(lab, prefix, config, *flags)
        made.append((lab, agent))
        if start:
            agent.start()
        return lab, agent

    yield make
    for lab, agent in reversed(made):
        agent.cleanup()
        lab.close()


def pinned(agent: Agent, name: str) -> BpfMap:
    (path,) = glob.glob(f"{agent.pin_dir}/*/{name}")
    return BpfMap.pinned(path)


def finish(lab: Lab, p: object, what: str, agent: Agent, timeout: float = 90) -> dict:
    res = lab.finish(p, timeout=timeout)  # type: ignore[arg-type]
    check_ok(res, what, agent)
    return res


def test_a_connection_to_a_backend_itself_is_never_touched(make_env: Env) -> None:
    # b1:7000 is a listener's backend (b1 has a rev_nat entry, and serves that one
    # listener address). A client talks to it directly: opened before the agent
    # started, and idle for longer than any conntrack timeout of the agent.
    config = listeners(listener("echo", 70, [(B1, ECHO_PORT)]))
    short = ("--tcp-established-timeout", "2", "--tcp-unreplied-timeout", "2",
             "--tcp-closing-timeout", "2")
    lab, agent = make_env("xia", config, *short, start=False)
    lab.start_tool("b1", "tcp-echo", "--port", str(ECHO_PORT))
    before = lab.start_client("cli", "tcp-chat", "--dst", f"{B1}:{ECHO_PORT}", "--rounds",
                              "24", "--gap", "0.4", "--long-round", "18", "--long-gap", "4")
    time.sleep(1)
    agent.start()
    after = lab.start_client("cli", "tcp-chat", "--dst", f"{B1}:{ECHO_PORT}", "--rounds",
                             "8", "--gap", "0.3", "--long-round", "4", "--long-gap", "4")
    listener_chat = lab.start_client("cli", "tcp-chat", "--dst", f"{VIP}:70", "--rounds",
                                     "5", "--gap", "0.1")
    finish(lab, listener_chat, "a connection through the listener to b1:7000 meanwhile",
           agent)
    for p, what in ((before, "opened before the agent"), (after, "opened after it")):
        res = finish(lab, p, f"a direct connection {what}", agent)
        assert res["ok_rounds"] == res["rounds"], res


def test_a_vip_answers_on_its_listeners_ports_only(make_env: Env) -> None:
    # An SNI listener makes its VIP an address of the node (for the acceptor): the
    # node's own services (a server on 0.0.0.0:2222 here, ssh or the kubelet in life)
    # would answer on it too. They must not; the node's own address still reaches them.
    config = listeners(listener("tls", 443, [(B1, 8443)],
                                sniRoutes=f"[{{hostname: a.example.com, backends: "
                                          f"[{{address: {B2}, port: 8443}}]}}]"))
    lab, agent = make_env("xiv", config)
    assert f"{VIP} made local" in agent.text(), agent.tail()
    lab.start_tcp_server("lb", 2222, tag="node")
    lab.start_udp_server("lb", 2223, tag="node")
    res = lab.tcp_clients("cli", Lab.lb_client_addr, 2222, timeout=3)
    check_ok(res, "the node's service on its own address", agent)
    res = lab.tcp_clients("cli", VIP, 2222, timeout=2)
    assert not res["ok"] and "refused" not in str(res["failures"]), res  # no answer at all
    res = lab.udp_clients("cli", VIP, 2223, timeout=0.5, retries=1)
    assert res["succeeded"] == 0, res
    res = lab.tcp_clients("cli", VIP, VIP_TCP, count=10)  # a listener's port: served
    check_ok(res, "the VIP's listener", agent)
    ping = lab.exec("cli", "ping", "-c", "2", "-i", "0.2", "-W", "1", VIP, check=False)
    assert ping.returncode == 0, ping.stdout


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_answers_go_back_where_they_came_from(make_env: Env, mode: str) -> None:
    # XDP answers a ping of a VIP, and a SYN that no backend can take with a RST, made in
    # place of the packet; XDP_TX into a veth whose peer runs no XDP is lost, so TC
    # ingress sends them back. The LB's interfaces complete checksums in software (tx
    # off): the RST made from a SYN with a partial checksum must arrive valid.
    drained = (f"  - name: drained\n    protocol: TCP\n    port: 81\n    address: {VIP}\n"
               f"    backends: [{{address: {B1}, port: {TCP_PORT}, weight: 0}}]\n")
    lab, agent = make_env(f"xia{mode[0]}", listeners(drained), "--xdp-mode", mode,
                          lb_tx_checksum_off=True)
    assert f"XDP {mode} mode" in agent.text()
    ping = lab.exec("cli", "ping", "-c", "2", "-i", "0.2", "-W", "1", VIP, check=False)
    assert ping.returncode == 0, ping.stdout
    res = lab.tcp_clients("cli", VIP, 81, count=3, timeout=2)
    assert res["failed"] == 3 and all("Connection refused" in f for f in res["failures"]), res
    assert res["elapsed_s"] < 1, res  # refused at once, not after retries
    assert csum_errors(lab, "cli") == {"Tcp": 0, "Udp": 0}


def test_sweeping_in_a_loop_never_breaks_a_flow(make_env: Env) -> None:
    # Every flow here has two entries (source NAT, or a backend serving two listener
    # addresses): a sweeper that deleted a new reply entry its batch read missed the
    # forward entry of, or a forward entry a packet refreshed after the read, would
    # break them.
    config = listeners(listener("snat", 85, [(B1, TCP_PORT), (B2, TCP_PORT)],
                                sourceNAT="Node"),
                       listener("second", 86, [(B1, TCP_PORT), (B2, TCP_PORT)]),
                       listener("snat-udp", 55, [(B1, UDP_PORT), (B2, UDP_PORT)], "UDP",
                                sourceNAT="Node"))
    lab, agent = make_env("xiw", config)
    ct, ct_reply = pinned(agent, "ct"), pinned(agent, "ct_reply")
    stop = threading.Event()
    sweeps = [0]

    def sweeper() -> None:
        while not stop.is_set():
            conntrack.sweep(ct, ct_reply, Timeouts())
            sweeps[0] += 1

    t = threading.Thread(target=sweeper)
    t.start()
    try:
        clients = [lab.start_client("cli", "tcp-clients", "--dst", f"{VIP}:{port}",
                                    "--count", "200", "--concurrency", "50", "--up",
                                    str(64 * 1024), "--down", str(64 * 1024))
                   for port in (85, 86)]
        udp = lab.start_client("cli2", "udp-session", "--dst", f"{VIP}:55", "--name", "u",
                               "--count", "300", "--gap", "0.005", "--min-share", "1")
        for p in clients:
            res = finish(lab, p, "200 TCP flows while the sweeper runs", agent)
            assert res["succeeded"] == 200
        finish(lab, udp, "a UDP flow while the sweeper runs", agent)
    finally:
        stop.set()
        t.join()
        ct.close()
        ct_reply.close()
    assert sweeps[0] >= 20, sweeps


def test_two_udp_clients_never_get_each_others_datagrams(make_env: Env) -> None:
    # One backend, source NAT: every datagram of both clients reaches b1 from the node's
    # address. Entries of both flows go, by hand, again and again (as an eviction or a
    # lost update would take them): each client must only ever get its own answers,
    # and its flow recover.
    config = listeners(listener("snat-udp", 55, [(B1, UDP_PORT)], "UDP", sourceNAT="Node"))
    lab, agent = make_env("xiu", config)
    ct, ct_reply = pinned(agent, "ct"), pinned(agent, "ct_reply")
    stop = threading.Event()
    cuts = [0]

    def cut() -> None:
        while not stop.wait(0.15):
            for m in (ct_reply, ct) if cuts[0] % 2 else (ct, ct_reply):
                for k, _v in m.items():
                    try:
                        m.delete(k)
                    except OSError:
                        pass
                cuts[0] += 1

    t = threading.Thread(target=cut)
    t.start()
    try:
        sessions = [lab.start_client(ns, "udp-session", "--dst", f"{VIP}:55", "--name", name,
                                     "--count", "400", "--gap", "0.005", "--min-share", "0.8")
                    for ns, name in (("cli", "A"), ("cli2", "B"))]
        results = [finish(lab, p, f"UDP client {i}", agent) for i, p in enumerate(sessions)]
    finally:
        stop.set()
        t.join()
        ct.close()
        ct_reply.close()
    assert cuts[0] >= 10
    assert [r["foreign"] for r in results] == [0, 0], results


def test_fragmented_datagrams_go_both_ways(make_env: Env) -> None:
    config = listeners(listener("snat-udp", 55, [(B1, UDP_PORT), (B2, UDP_PORT)], "UDP",
                                sourceNAT="Node"))
    lab, agent = make_env("xif", config)
    for port, what in ((VIP_UDP, "keeping the client's address"), (55, "source NAT")):
        res = lab.udp_clients("cli", VIP, port, count=40, size=4000)
        check_ok(res, f"4,000-byte datagrams both ways, {what}", agent)
        assert res["reply_sources"] == {f"{VIP}:{port}": 40}, res


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_partial_checksums_come_out_right(make_env: Env, mode: str) -> None:
    # Clients and backends hand the LB partial checksums (veth, offload on); the LB's
    # own interfaces complete them in software (tx off). Rewritten the way a complete
    # checksum is, they would reach the other end wrong.
    lab, agent = make_env(f"xix{mode[0]}", config_yaml(), "--xdp-mode", mode,
                          lb_tx_checksum_off=True)
    feats = lab.exec("lb", "ethtool", "-k", Lab.lb_backend_if(1)).stdout
    assert "tx-checksumming: off" in feats
    res = lab.tcp_clients("cli", VIP, VIP_TCP, count=40, concurrency=10, up=MIB, down=MIB,
                          timeout=30)
    check_ok(res, "TCP with checksums completed by the LB", agent)
    res = lab.udp_clients("cli", VIP, VIP_UDP, count=100)
    check_ok(res, "UDP with checksums completed by the LB", agent)
    for ns in ("cli", "b1", "b2"):
        errors = csum_errors(lab, ns)
        assert errors == {"Tcp": 0, "Udp": 0}, f"{ns}: {errors}\n{agent.tail()}"


def csum_errors(lab: Lab, ns: str) -> dict[str, int]:
    """InCsumErrors of TCP and UDP in a namespace (/proc/net/snmp)."""
    rows = [line.split() for line in
            lab.exec(ns, "cat", "/proc/net/snmp").stdout.splitlines()]
    out = {}
    for head, values in zip(rows[::2], rows[1::2], strict=True):
        proto = head[0].rstrip(":")
        if proto in ("Tcp", "Udp"):
            out[proto] = int(values[head.index("InCsumErrors")])
    return out


def test_a_udp_flow_leaves_a_backend_that_is_gone(make_env: Env) -> None:
    port = 5360
    config = listeners(listener("one", 56, [(B1, port)], "UDP"))
    lab, agent = make_env("xim", config)
    servers = {b: lab.start_udp_server(b, port) for b in ("b1", "b2")}
    session = lab.start_client("cli", "udp-session", "--dst", f"{VIP}:56", "--name", "s",
                               "--count", "300", "--gap", "0.01", "--min-share", "0.85")
    time.sleep(1)
    # b1's server goes, and b1 leaves the file for b2: the flow must follow.
    lab.stop(servers["b1"])
    agent.apply(listeners(listener("one", 56, [(B2, port)], "UDP")), within=2)
    res = finish(lab, session, "a UDP flow across its backend's removal", agent)
    assert res["foreign"] == 0


def test_lab_tools_report_crossed_datagrams() -> None:
    # The foreign count means something: an echo of another client's datagram counts.
    import socket

    from tests import lab_tools

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        stop = threading.Event()

        def crossing_echo() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                try:
                    data, peer = server.recvfrom(65535)
                except TimeoutError:
                    continue
                server.sendto(lab_tools._pad_tag("x") + b"Z:" + data[2:], peer)

        t = threading.Thread(target=crossing_echo)
        t.start()
        try:
            args = lab_tools.build_parser().parse_args(
                ["udp-session", "--dst", f"127.0.0.1:{server.getsockname()[1]}",
                 "--name", "A", "--count", "3", "--timeout", "0.2", "--json"])
            assert lab_tools.cmd_udp_session(args) == 1
        finally:
            stop.set()
            t.join()
