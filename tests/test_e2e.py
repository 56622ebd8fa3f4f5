"""End-to-end tests: the standalone agent in a namespace lab, real TCP and UDP traffic
through the VIP, configuration changes, a bad file, a SIGKILL restart, a clean stop and
full checksums across the load balancer.

Every agent runs in the lab's lb namespace and logs to a file that the tests poll; its
maps are pinned on a bpffs mounted in the root mount namespace (``ip netns exec`` gives
its command a fresh /sys, so /sys/fs/bpf cannot be shared with the test process).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.lab import Lab, Proc, bytes_since, read_progress

ROOT = Path(__file__).resolve().parents[1]
XDPLB = ROOT / ".venv/bin/xdplb"
PIN_ROOT = "/run/xdplb-e2e/bpf"
VIP = Lab.VIP
TCP_PORT, UDP_PORT, SINK_PORT = 8080, 5353, 9000
VIP_TCP, VIP_UDP, VIP_SINK = 80, 53, 9000
MIB = 1024 * 1024

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and XDP"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
    pytest.mark.skipif(not XDPLB.exists(), reason="needs .venv/bin/xdplb (scripts/setup.sh)"),
]


# ---------------------------------------------------------------------- configuration


def config_yaml(w1: int = 1, w2: int = 1, udp_port: int = UDP_PORT) -> str:
    """The lab's LoadBalancer: TCP :80 and sink :9000 over b1/b2 (weights w1/w2), clients
    of 10.10.2.0/24 to b3, UDP :53 over b1/b2."""
    b1, b2, b3 = (Lab.backend_addr(k) for k in (1, 2, 3))
    return f"""\
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: web, namespace: default}}
spec:
  interfaces: [{Lab.lb_client_if}, {Lab.lb_client2_if}]
  listeners:
  - name: tcp
    protocol: TCP
    port: {VIP_TCP}
    address: {VIP}
    backends:
    - {{address: {b1}, port: {TCP_PORT}, weight: {w1}}}
    - {{address: {b2}, port: {TCP_PORT}, weight: {w2}}}
    sourceRoutes:
    - cidr: 10.10.2.0/24
      backends: [{{address: {b3}, port: {TCP_PORT}}}]
  - name: sink
    protocol: TCP
    port: {VIP_SINK}
    address: {VIP}
    backends:
    - {{address: {b1}, port: {SINK_PORT}, weight: {w1}}}
    - {{address: {b2}, port: {SINK_PORT}, weight: {w2}}}
  - name: udp
    protocol: UDP
    port: {VIP_UDP}
    address: {VIP}
    backends:
    - {{address: {b1}, port: {udp_port}}}
    - {{address: {b2}, port: {udp_port}}}
"""


def mount_bpffs(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", path]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)


# ---------------------------------------------------------------------- agent handle


class Agent:
    """One `xdplb agent` in the lab's lb namespace, with its config, pins and log."""

    def __init__(self, lab: Lab, name: str, config: str | None = None,
                 *flags: str) -> None:
        self.lab = lab
        self.flags = flags  # more command-line flags
        self.pin_dir = f"{PIN_ROOT}/{name}"
        self.config = lab.workdir / "lb.yaml"
        self.state_file = lab.workdir / "agent.json"
        self.log = lab.workdir / f"agent-{name}.log"
        self.proc: Proc | None = None
        self._runs = 0
        if config is not None:
            self.write_config(config)

    # -- process
    def start(self, timeout: float = 60) -> float:
        """Start and wait until it has attached and applied; returns the start time."""
        self._runs += 1
        offset = self.size()
        with open(self.log, "a") as out:
            out.write(f"---- agent run {self._runs}\n")
            out.flush()
            offset = self.size()
            self.proc = self.lab.popen(
                "lb", XDPLB, "agent", "--config", self.config, "--pin-dir", self.pin_dir,
                "--state-file", self.state_file, *self.flags, stdout=out,
                stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        self.wait_log("attached to", offset, timeout)
        self.wait_log("applied", offset, timeout)
        return time.monotonic() - t0

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.lab.stop(self.proc)

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent ignored SIGTERM for {timeout} s\n{self.tail()}")
        self.lab.stop(self.proc)
        return rc

    def assert_running(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, \
            f"agent exited ({self.proc and self.proc.returncode})\n{self.tail()}"

    # -- config file
    def write_config(self, text: str) -> None:
        """Atomic replace: write a temporary file beside it, then rename."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    # -- log
    def size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def text(self, offset: int = 0) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def tail(self, n: int = 40) -> str:
        lines = self.text().splitlines()[-n:]
        return "---- agent log (tail) ----\n" + "\n".join(lines)

    def wait_log(self, text: str, offset: int = 0, timeout: float = 15) -> float:
        """Wait until ``text`` appears in the log after byte ``offset``; returns the
        monotonic time at which it was seen. Fails if the agent exits meanwhile."""
        end = time.monotonic() + timeout
        while True:
            if text in self.text(offset):
                return time.monotonic()
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"agent exited ({self.proc.returncode}) before logging "
                            f"{text!r}\n{self.tail()}")
            if time.monotonic() >= end:
                pytest.fail(f"agent did not log {text!r} within {timeout} s\n{self.tail()}")
            time.sleep(0.01)

    def apply(self, text: str, within: float = 1.0) -> float:
        """Write a new config; assert the agent logs "applied" within ``within`` s."""
        offset = self.size()
        t0 = time.monotonic()
        self.write_config(text)
        seen = self.wait_log("applied", offset, timeout=max(10, 3 * within))
        elapsed = seen - t0
        assert elapsed <= within, \
            f"config applied after {elapsed:.2f} s, expected <= {within} s\n{self.tail()}"
        return elapsed

    # -- data plane
    def conntrack_count(self) -> int:
        res = subprocess.run([str(XDPLB), "conntrack", "list", "--pin-dir", self.pin_dir],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"conntrack list: {res.stderr}\n{self.tail()}"
        m = re.search(r"^(\d+) flows$", res.stdout, re.M)
        assert m, f"no 'N flows' line in conntrack list output:\n{res.stdout[-2000:]}"
        return int(m.group(1))

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.lab.stop(self.proc)
        shutil.rmtree(self.pin_dir, ignore_errors=True)


def start_lab(prefix: str, **kw: object) -> Lab:
    lab = Lab(backends=3, prefix=prefix, **kw).setup()  # type: ignore[arg-type]
    try:
        lab.start_backend_servers(tcp_port=TCP_PORT, udp_port=UDP_PORT)
        for b in ("b1", "b2"):
            lab.start_tcp_sink(b, SINK_PORT)
    except BaseException:
        lab.close()
        raise
    return lab


@pytest.fixture(scope="module")
def bpffs() -> str:
    mount_bpffs(PIN_ROOT)
    return PIN_ROOT


@pytest.fixture
def make_env(bpffs: str) -> Iterator[object]:
    """Factory for a private lab + agent (prefix must start with "xe"), torn down after."""
    made: list[tuple[Lab, Agent]] = []

    def make(prefix: str, start: bool = True, **kw: object) -> tuple[Lab, Agent]:
        lab = start_lab(prefix, **kw)
        agent = Agent(lab, prefix, config_yaml())
        made.append((lab, agent))
        if start:
            agent.start()
        return lab, agent

    yield make
    for lab, agent in reversed(made):
        agent.cleanup()
        lab.close()


@pytest.fixture(scope="module")
def env(bpffs: str) -> Iterator[tuple[Lab, Agent]]:
    """The shared lab ("xe") with one agent running on the baseline configuration."""
    lab = start_lab("xe")
    agent = Agent(lab, "xe", config_yaml())
    try:
        agent.start()
        yield lab, agent
    finally:
        agent.cleanup()
        lab.close()


@pytest.fixture
def baseline(env: tuple[Lab, Agent]) -> Iterator[tuple[Lab, Agent]]:
    """The shared lab with the baseline configuration in effect before and after."""
    lab, agent = env
    agent.assert_running()
    if agent.config.read_text() != config_yaml():
        agent.apply(config_yaml(), within=2)
    yield lab, agent
    if agent.proc is not None and agent.proc.poll() is None \
            and agent.config.read_text() != config_yaml():
        agent.apply(config_yaml(), within=2)


# ---------------------------------------------------------------------- helpers


def check_ok(res: dict[str, object], what: str, agent: Agent) -> None:
    failures = res.get("failures") or [res.get("error")]
    assert res.get("ok") and res.get("returncode") == 0, \
        f"{what}: {res.get('failed', '?')} failed, e.g. {failures[:3]}; " \
        f"result {({k: v for k, v in res.items() if k != 'failures'})}\n{agent.tail()}"


def check_share(tags: dict[str, int], total: int, lo: float, hi: float, agent: Agent) -> None:
    assert set(tags) <= {"b1", "b2"}, f"unexpected backends {tags}\n{agent.tail()}"
    for b in ("b1", "b2"):
        share = tags.get(b, 0) / total
        assert lo <= share <= hi, \
            f"{b} got {share:.0%} of {total} flows, expected {lo:.0%}..{hi:.0%}: {tags}"


def sink_conns(lab: Lab, b: str) -> int:
    out = lab.exec(b, "ss", "-Htn", "state", "established", f"( sport = :{SINK_PORT} )").stdout
    return len([line for line in out.splitlines() if line.strip()])


def start_stream_on(lab: Lab, agent: Agent, want: str, seconds: float, rate_mbit: float,
                    tries: int = 12, port: int = VIP_SINK) -> tuple[Proc, list[Proc]]:
    """Long streams to VIP:sink until one lands on backend ``want``; returns it and the
    others (which land elsewhere and must finish intact too)."""
    others: list[Proc] = []
    for _ in range(tries):
        before = sink_conns(lab, want)
        p = lab.start_long_stream("cli", VIP, port, seconds=seconds, rate_mbit=rate_mbit)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            assert p.progress_path is not None
            if p.progress_path.exists() and read_progress(p.progress_path)[-1:] \
                    and read_progress(p.progress_path)[-1][1] > 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"long stream made no progress in 5 s: "
                        f"{lab.finish(p, timeout=30)}\n{agent.tail()}")
        if sink_conns(lab, want) > before:
            return p, others
        others.append(p)
    pytest.fail(f"no stream landed on {want} in {tries} tries\n{agent.tail()}")


@contextlib.contextmanager
def clients_speak_first(lab: Lab, ipv6: bool = False) -> Iterator[None]:
    """While in effect, the LB's forwarding drops what backends send (TCP sends it again
    later). A flow whose conntrack entry is lost recovers when its client speaks first
    (README, "What a flow survives"); a backend segment before that passes untouched,
    and the client's reset to it ends the flow when its sequence number is exact, which
    depends on timing. Tests of the recovery hold the backends back while entries are
    lost, so that every client speaks first."""
    tool = "ip6tables" if ipv6 else "iptables"
    rules = [("FORWARD", "-i", dev, "-j", "DROP") for dev in lab.lb_backend_ifs]
    for rule in rules:
        lab.exec("lb", tool, "-I", *rule)
    try:
        yield
    finally:
        for rule in rules:
            lab.exec("lb", tool, "-D", *rule)


def finish_stream(lab: Lab, p: Proc, agent: Agent, what: str) -> dict[str, object]:
    res = lab.finish(p, timeout=60)
    check_ok(res, what, agent)
    assert res["sent"] == res["acked"], res
    return res


# ---------------------------------------------------------------------- shared lab


def test_tcp_many_streams_balanced(baseline: tuple[Lab, Agent]) -> None:
    lab, agent = baseline
    for dev in (lab.lb_client_if, lab.lb_client2_if):
        assert f"attached to {dev}: XDP native mode" in agent.text(), agent.tail()
    n = 300
    res = lab.tcp_clients("cli", VIP, VIP_TCP, count=n, concurrency=30, up=MIB, down=MIB,
                          timeout=30)
    check_ok(res, f"{n} TCP streams of 1 MiB each way", agent)
    assert res["succeeded"] == n and res["bytes_up"] == res["bytes_down"] == n * MIB
    check_share(res["tags"], n, 0.40, 0.60, agent)


def test_tcp_source_route(baseline: tuple[Lab, Agent]) -> None:
    lab, agent = baseline
    res = lab.tcp_clients("cli2", VIP, VIP_TCP, count=40, concurrency=10, up=64 * 1024,
                          down=64 * 1024)
    check_ok(res, "TCP from 10.10.2.0/24", agent)
    assert res["tags"] == {"b3": 40}, f"source route not followed: {res['tags']}"


def test_udp_replies_from_listener(baseline: tuple[Lab, Agent]) -> None:
    lab, agent = baseline
    n = 200
    res = lab.udp_clients("cli", VIP, VIP_UDP, count=n)
    check_ok(res, "UDP probes", agent)
    assert res["reply_sources"] == {f"{VIP}:{VIP_UDP}": n}, res["reply_sources"]
    check_share(res["tags"], n, 0.25, 0.75, agent)


def test_weight_zero_drains_new_flows_only(baseline: tuple[Lab, Agent]) -> None:
    lab, agent = baseline
    stream, others = start_stream_on(lab, agent, "b1", seconds=5, rate_mbit=200)
    time.sleep(0.5)
    elapsed = agent.apply(config_yaml(w1=0, w2=1))
    t_applied = time.monotonic_ns()
    # New flows: all to b2, while the open stream to b1 keeps going.
    res = lab.tcp_clients("cli", VIP, VIP_TCP, count=60, concurrency=10, up=64 * 1024,
                          down=64 * 1024)
    check_ok(res, "TCP after b1 weight 0", agent)
    assert res["tags"] == {"b2": 60}, f"new flows still reach b1: {res['tags']}"
    stream_res = finish_stream(lab, stream, agent, "stream on b1 across the weight change")
    assert stream.progress_path is not None
    moved = bytes_since(stream.progress_path, t_applied)
    assert moved >= 4 * MIB, \
        f"stream on b1 moved only {moved} bytes after the change (applied in " \
        f"{elapsed:.2f} s): {stream_res}\n{agent.tail()}"
    for p in others:
        finish_stream(lab, p, agent, "stream on b2 across the weight change")


def test_backend_removed_from_the_file_keeps_its_open_flows(
        baseline: tuple[Lab, Agent]) -> None:
    # The stream's flow has no reply entry: b1's replies find it through b1's rev_nat
    # entry, which must outlive b1's place in the file, and the conntrack sweeps (every
    # 10 s) that may release it, while the flow lives.
    lab, agent = baseline
    stream, others = start_stream_on(lab, agent, "b1", seconds=13, rate_mbit=100)
    line = f"    - {{address: {Lab.backend_addr(1)}, port: {SINK_PORT}, weight: 1}}\n"
    assert line in config_yaml()
    agent.apply(config_yaml().replace(line, ""))
    after_a_sweep = time.monotonic_ns() + 10_500_000_000
    finish_stream(lab, stream, agent, "stream on b1 after b1 left the file")
    assert stream.progress_path is not None
    assert bytes_since(stream.progress_path, after_a_sweep) >= 2 * MIB
    for p in others:
        finish_stream(lab, p, agent, "stream on b2 across the change")


def test_direct_connections_to_a_backend_pass_untouched(baseline: tuple[Lab, Agent]) -> None:
    # b1:8080 is a backend endpoint, but this client talks to it directly (not through
    # the listener): its replies must keep b1's address.
    lab, agent = baseline
    res = lab.tcp_clients("cli", Lab.backend_addr(1), TCP_PORT, count=20, concurrency=5,
                          up=64 * 1024, down=64 * 1024)
    check_ok(res, "direct connections to b1", agent)
    assert res["tags"] == {"b1": 20}


def test_direct_connection_from_a_closed_flows_port_passes_untouched(
        baseline: tuple[Lab, Agent]) -> None:
    # A client port whose closed flow through the listener reached b1 (its entries live
    # on for the closing timeout) opens a connection to b1 directly: b1's SYN|ACK is not
    # a reply of the old flow and must keep b1's address.
    lab, agent = baseline
    b1 = Lab.backend_addr(1)
    for port in range(41000, 41200, 2):
        res = lab.tcp_clients("cli", VIP, VIP_TCP, src_port=port)
        check_ok(res, f"TCP from port {port}", agent)
        if res["tags"] == {"b1": 1}:
            break
    else:
        pytest.fail("no flow from ports 41000..41198 reached b1")
    res = lab.tcp_clients("cli", b1, TCP_PORT, src_port=port, timeout=3)
    check_ok(res, f"direct connection to b1 from port {port}", agent)
    assert res["tags"] == {"b1": 1}


def test_wildcard_listener_follows_an_address_added_to_its_interface(
        baseline: tuple[Lab, Agent]) -> None:
    # No file change: the agent learns of the address from rtnetlink and applies.
    lab, agent = baseline
    b1, b2 = Lab.backend_addr(1), Lab.backend_addr(2)
    agent.apply(config_yaml() + f"""\
---
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: any, namespace: default}}
spec:
  interfaces: [{Lab.lb_client_if}]
  listeners:
  - name: any
    protocol: TCP
    port: 8081
    backends: [{{address: {b1}, port: {TCP_PORT}}}, {{address: {b2}, port: {TCP_PORT}}}]
""", within=2)
    added = "10.10.1.200"
    offset = agent.size()
    lab.exec("lb", "ip", "addr", "add", f"{added}/24", "dev", Lab.lb_client_if)
    try:
        agent.wait_log("applied", offset, timeout=3)
        res = lab.tcp_clients("cli", added, 8081, count=20, concurrency=5)
        check_ok(res, f"TCP to the new address {added}:8081", agent)
        assert set(res["tags"]) <= {"b1", "b2"}, res["tags"]
    finally:
        lab.exec("lb", "ip", "addr", "del", f"{added}/24", "dev", Lab.lb_client_if)


def test_bad_file_keeps_last_good_state(baseline: tuple[Lab, Agent]) -> None:
    lab, agent = baseline
    offset = agent.size()
    agent.write_config(config_yaml(udp_port=70000))
    agent.wait_log("keeping the last good state", offset, timeout=5)
    log = agent.text(offset)
    assert re.search(r"invalid configuration: .*spec\.listeners\[2\]\.backends\[0\]\.port: "
                     r"70000", log), f"error without field path:\n{log}"
    assert "applied" not in log, f"an invalid file was applied:\n{log}"
    agent.assert_running()
    # The old state keeps serving.
    res = lab.tcp_clients("cli", VIP, VIP_TCP, count=40, concurrency=10)
    check_ok(res, "TCP with a bad file", agent)
    check_share(res["tags"], 40, 0.15, 0.85, agent)
    res = lab.udp_clients("cli", VIP, VIP_UDP, count=20)
    check_ok(res, "UDP with a bad file", agent)
    # A corrected, different file applies within a second.
    agent.apply(config_yaml(w1=3, w2=1))
    res = lab.tcp_clients("cli", VIP, VIP_TCP, count=40, concurrency=10)
    check_ok(res, "TCP after the corrected file", agent)
    agent.assert_running()


# ---------------------------------------------------------------------- private labs


def test_sigkill_restarts_keep_flows_and_drop_unused_interfaces(make_env) -> None:  # type: ignore[no-untyped-def]
    lab, agent = make_env("xek")
    stream = lab.start_long_stream("cli", VIP, VIP_SINK, seconds=9, rate_mbit=100)
    res = lab.udp_clients("cli", VIP, VIP_UDP, count=30)  # UDP flows live 30 s
    check_ok(res, "UDP before the kill", agent)
    time.sleep(1)
    before = agent.conntrack_count()
    # The stream and ~30 UDP flows (two probes may share a source port by chance).
    assert before >= 25, f"expected the stream and 30 UDP flows tracked, got {before}"
    agent.kill()
    restart_s = agent.start()
    t_attached = time.monotonic_ns()
    assert "adopted pinned maps" in agent.text(), agent.tail()
    assert "reused the programs" in agent.text(), agent.tail()  # the same code
    after = agent.conntrack_count()
    assert after >= before, f"conntrack dropped from {before} to {after}\n{agent.tail()}"
    res = lab.tcp_clients("cli", VIP, VIP_TCP, count=40, concurrency=10, up=64 * 1024,
                          down=64 * 1024)
    check_ok(res, "TCP after the restart", agent)
    check_share(res["tags"], 40, 0.15, 0.85, agent)
    finish_stream(lab, stream, agent, "stream across SIGKILL + restart")
    assert stream.progress_path is not None
    moved = bytes_since(stream.progress_path, t_attached)
    assert moved >= 10 * MIB, \
        f"stream moved only {moved} bytes after the new agent attached (restart took " \
        f"{restart_s:.1f} s)\n{agent.tail()}"

    # Killed again, and started on a file without the second interface: the
    # predecessor's programs leave it.
    agent.kill()
    agent.write_config(config_yaml().replace(f", {Lab.lb_client2_if}]", "]"))
    mark = agent.size()
    agent.start()
    assert f"detached from {Lab.lb_client2_if}: attached by an earlier agent" in \
        agent.text(mark), agent.tail()
    links = lab.exec("lb", "ip", "-d", "link", "show", Lab.lb_client2_if).stdout
    egress = lab.exec("lb", "tc", "filter", "show", "dev", Lab.lb_client2_if, "egress").stdout
    assert "prog/xdp" not in links and "xdplb" not in egress, f"{links}\n{egress}"
    assert "prog/xdp" in lab.exec("lb", "ip", "-d", "link", "show", Lab.lb_client_if).stdout


def test_sigterm_clean_stop(make_env) -> None:  # type: ignore[no-untyped-def]
    lab, agent = make_env("xes")
    res = lab.tcp_clients("cli", VIP, VIP_TCP, count=10, concurrency=5)
    check_ok(res, "TCP before the stop", agent)
    links = lab.exec("lb", "ip", "-d", "link", "show").stdout
    assert "prog/xdp" in links, f"no XDP program while running:\n{links}"
    rc = agent.terminate()
    assert rc == 0, f"agent exited {rc} on SIGTERM\n{agent.tail()}"
    links = lab.exec("lb", "ip", "-d", "link", "show").stdout
    assert "prog/xdp" not in links, f"XDP left attached after a clean stop:\n{links}"
    for dev in (lab.lb_client_if, lab.lb_client2_if):
        filters = lab.exec("lb", "tc", "filter", "show", "dev", dev, "egress").stdout
        assert filters.strip() == "", f"egress filter left on {dev}:\n{filters}"
    assert not os.path.exists(agent.pin_dir), \
        f"pin directory left: {os.listdir(agent.pin_dir)}\n{agent.tail()}"


def test_full_checksums_across_lb(make_env) -> None:  # type: ignore[no-untyped-def]
    lab, agent = make_env("xec", tx_checksum_off=True)
    feats = lab.exec("cli", "ethtool", "-k", lab.client_if).stdout
    assert "tx-checksumming: off" in feats
    n = 100
    res = lab.tcp_clients("cli", VIP, VIP_TCP, count=n, concurrency=20, up=MIB, down=MIB,
                          timeout=30)
    check_ok(res, f"{n} TCP streams with full checksums", agent)
    check_share(res["tags"], n, 0.30, 0.70, agent)
    res = lab.udp_clients("cli", VIP, VIP_UDP, count=100)
    check_ok(res, "UDP with full checksums", agent)
    assert res["reply_sources"] == {f"{VIP}:{VIP_UDP}": 100}, res["reply_sources"]
    check_share(res["tags"], 100, 0.25, 0.75, agent)


def test_conntrack_flush_mid_stream_keeps_every_stream(make_env) -> None:  # type: ignore[no-untyped-def]
    # Lost state (flushed here; evicted or rehashed in production): every segment
    # without an entry is selected again with the same table, so it lands where it was.
    lab, agent = make_env("xef", start=False)
    lab.start_tcp_sink("b3", SINK_PORT)
    b3 = Lab.backend_addr(3)
    agent.write_config(config_yaml().replace(
        f"port: {SINK_PORT}, weight: 1}}\n  - name: udp",
        f"port: {SINK_PORT}, weight: 1}}\n    - {{address: {b3}, port: {SINK_PORT}}}\n"
        "  - name: udp"))
    assert b3 in agent.config.read_text()
    agent.start()
    n = 50
    streams = [lab.start_long_stream("cli", VIP, VIP_SINK, seconds=7, rate_mbit=4)
               for _ in range(n)]
    deadline = time.monotonic() + 20
    while agent.conntrack_count() < n:
        assert time.monotonic() < deadline, f"{n} streams not tracked\n{agent.tail()}"
        time.sleep(0.2)
    assert all(sink_conns(lab, b) > 0 for b in ("b1", "b2", "b3")), \
        "streams did not spread over the three backends"
    with clients_speak_first(lab):
        flushed = subprocess.run([str(XDPLB), "conntrack", "flush", "--pin-dir",
                                  agent.pin_dir], capture_output=True, text=True, timeout=30)
        assert flushed.returncode == 0, flushed.stderr
        t_flush = time.monotonic_ns()
        time.sleep(0.5)   # every client sends again (a 64 KiB block each 131 ms at 4 Mbit/s)
    assert re.search(r"flushed (\d+) entries", flushed.stdout), flushed.stdout
    for i, p in enumerate(streams):
        finish_stream(lab, p, agent, f"stream {i} across a conntrack flush")
        assert p.progress_path is not None
        assert bytes_since(p.progress_path, t_flush) > 0, f"stream {i} stalled at the flush"
    assert agent.conntrack_count() >= n, "segments after the flush did not re-create entries"


def test_path_mtu_discovery_through_translated_icmp(make_env) -> None:  # type: ignore[no-untyped-def]
    # A router with a 1,280-byte link sits between the LB and b3. The client sends
    # full-size segments; the router's "fragmentation needed" quotes the packet the
    # LB forwarded (client -> b3). Only when the LB makes it about client -> VIP does
    # the client's socket lower its path MTU; otherwise the upload black-holes.
    lab, agent = make_env("xem", start=False, router_mtu=1280)
    b3 = Lab.backend_addr(3)
    agent.write_config(config_yaml() + f"""\
  - name: mtu
    protocol: TCP
    port: 81
    address: {VIP}
    backends: [{{address: {b3}, port: {TCP_PORT}}}]
""")
    agent.start()
    res = lab.tcp_clients("cli", VIP, 81, count=4, concurrency=2, up=MIB, down=MIB,
                          timeout=15)
    check_ok(res, "uploads through a 1,280-byte hop", agent)
    assert res["bytes_up"] == res["bytes_down"] == 4 * MIB
    route = lab.exec("cli", "ip", "route", "get", VIP).stdout
    assert "mtu 1280" in route, f"the client learnt no path MTU for the VIP:\n{route}"


def snat_config(source_nat: str) -> str:
    b3 = Lab.backend_addr(3)
    return config_yaml() + f"""\
  - name: direct-tcp
    protocol: TCP
    port: 82
    address: {VIP}
    sourceNAT: {source_nat}
    backends: [{{address: {b3}, port: 8081}}]
  - name: direct-udp
    protocol: UDP
    port: 54
    address: {VIP}
    sourceNAT: {source_nat}
    backends: [{{address: {b3}, port: 5354}}]
"""


def test_source_nat_reaches_a_backend_that_answers_clients_directly(make_env) -> None:  # type: ignore[no-untyped-def]
    # b3's default route bypasses the LB: with the client's address kept, b3's
    # answers never come back (documented); with sourceNAT: Node, b3 sees the LB's
    # own address and answers it, and the LB turns the answers around.
    lab, agent = make_env("xen", start=False, direct_return=True)
    tcp_log, udp_log = lab.workdir / "b3-tcp.jsonl", lab.workdir / "b3-udp.jsonl"
    lab.start_tcp_server("b3", 8081, log=tcp_log)
    lab.start_udp_server("b3", 5354, log=udp_log)
    agent.write_config(snat_config("None"))
    agent.start()
    res = lab.tcp_clients("cli", VIP, 82, count=1, timeout=2)
    assert not res["ok"], f"b3 answered without source NAT: {res}"

    agent.apply(snat_config("Node"), within=2)
    # b3's answers arrive where no listener is: a TC ingress filter, not XDP, takes them.
    assert f"attached to {Lab.lb_backend_if(3)}: TC ingress for source-NAT replies" \
        in agent.text(), agent.tail()
    n = 200
    res = lab.tcp_clients("cli", VIP, 82, count=n, concurrency=20, up=MIB, down=MIB,
                          timeout=30)
    check_ok(res, f"{n} TCP streams of 1 MiB each way through source NAT", agent)
    assert res["succeeded"] == n and res["bytes_up"] == res["bytes_down"] == n * MIB
    assert res["tags"] == {"b3": n}
    res = lab.udp_clients("cli", VIP, 54, count=50)
    check_ok(res, "UDP through source NAT", agent)
    assert res["reply_sources"] == {f"{VIP}:54": 50}
    node = Lab.lb_backend_addr(3)
    peers = {json.loads(line)["peer"].rsplit(":", 1)[0]
             for log in (tcp_log, udp_log) for line in log.read_text().splitlines()}
    assert peers == {node}, f"b3 saw {peers}, expected only the LB's address {node}"


def test_hairpin_backend_reaches_its_own_listener(make_env) -> None:  # type: ignore[no-untyped-def]
    lab, agent = make_env("xeh", start=False)
    log = lab.workdir / "b1-hairpin.jsonl"
    lab.start_tcp_server("b1", 8082, log=log)
    b1 = Lab.backend_addr(1)
    agent.write_config(config_yaml().replace(
        f"interfaces: [{Lab.lb_client_if}, {Lab.lb_client2_if}]",
        f"interfaces: [{Lab.lb_client_if}, {Lab.lb_client2_if}, {Lab.lb_backend_if(1)}]")
        + f"""\
  - name: hairpin
    protocol: TCP
    port: 83
    address: {VIP}
    backends: [{{address: {b1}, port: 8082}}]
""")
    agent.start()
    res = lab.tcp_clients("b1", VIP, 83, count=20, concurrency=5, up=64 * 1024,
                          down=64 * 1024, timeout=10)
    check_ok(res, "b1 -> its own listener", agent)
    assert res["tags"] == {"b1": 20}
    peers = {json.loads(line)["peer"].rsplit(":", 1)[0] for line in log.read_text().splitlines()}
    assert peers == {Lab.lb_backend_addr(1)}, peers
    res = lab.tcp_clients("cli", VIP, 83, count=5, timeout=10)  # other clients: unchanged
    check_ok(res, "client -> hairpin listener", agent)


def test_health_check_stops_new_flows_to_a_dead_backend_and_brings_it_back(make_env) -> None:  # type: ignore[no-untyped-def]
    lab, agent = make_env("xeg", start=False)
    check = "{protocol: TCP, port: 8090, intervalSeconds: 1, timeoutSeconds: 1, " \
            "unhealthyThreshold: 2, healthyThreshold: 2}"
    b1, b2 = Lab.backend_addr(1), Lab.backend_addr(2)
    servers = {b: lab.start_tcp_server(b, 8090) for b in ("b1", "b2")}
    agent.write_config(config_yaml() + f"""\
  - name: checked
    protocol: TCP
    port: 84
    address: {VIP}
    healthCheck: {check}
    backends: [{{address: {b1}, port: 8090}}, {{address: {b2}, port: 8090}}]
  - name: checked-sink
    protocol: TCP
    port: 9001
    address: {VIP}
    healthCheck: {check}
    backends: [{{address: {b1}, port: {SINK_PORT}}}, {{address: {b2}, port: {SINK_PORT}}}]
""")
    agent.start()
    res = lab.tcp_clients("cli", VIP, 84, count=40, concurrency=10)
    check_ok(res, "both backends healthy", agent)
    assert set(res["tags"]) == {"b1", "b2"}
    stream, others = start_stream_on(lab, agent, "b2", seconds=12, rate_mbit=20, port=9001)

    offset = agent.size()
    lab.stop(servers["b1"])
    t0 = time.monotonic()
    agent.wait_log(f"backend {b1}:8090 is unhealthy", offset, timeout=10)
    took = time.monotonic() - t0
    assert took <= 1 * 2 + 1.5, f"marked down after {took:.1f} s (interval 1 s x threshold 2)"
    agent.wait_log("applied", offset, timeout=5)
    res = lab.tcp_clients("cli", VIP, 84, count=40, concurrency=10)
    check_ok(res, "new flows while b1 is down", agent)
    assert res["tags"] == {"b2": 40}
    status = subprocess.run([str(XDPLB), "status", "--state-file", str(agent.state_file)],
                            capture_output=True, text=True, timeout=30).stdout
    assert f"backend {b1}:8090 down (TCP check: Connection refused): no new flows" in status, \
        status

    offset = agent.size()
    servers["b1"] = lab.start_tcp_server("b1", 8090)
    agent.wait_log(f"backend {b1}:8090 is healthy again", offset, timeout=10)
    agent.wait_log("applied", offset, timeout=5)
    res = lab.tcp_clients("cli", VIP, 84, count=40, concurrency=10)
    check_ok(res, "after b1 came back", agent)
    assert set(res["tags"]) == {"b1", "b2"}
    finish_stream(lab, stream, agent, "stream to b2 across b1's outage")
    for p in others:
        finish_stream(lab, p, agent, "stream to b1 across its outage (existing flow)")
