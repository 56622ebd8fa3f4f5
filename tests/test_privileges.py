"""The agent's least privileges: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_NET_RAW, no
CAP_SYS_ADMIN (the DaemonSet's set), are enough to start, to be killed and to
start again adopting the pinned maps, and either reuse its pinned programs (the
same code) or replace them in place (other code); and to announce an address (L2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdplb.dataplane import loader
from xdplb.k8s.daemonset import CAPABILITIES

ROOT = Path(__file__).resolve().parents[1]
XDPLB = ROOT / ".venv/bin/xdplb"
NS = "xpv-ns"
# `ip netns exec` gives the agent a sysfs of its own, without /sys/fs/bpf: the pins live
# on a bpffs mounted beforehand, as a pod mounts the host's (mounting needs SYS_ADMIN).
PIN_ROOT = "/run/xdplb-test-privileges/bpf"

CONFIG = """\
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {name: caps, namespace: default}
spec:
  interfaces: [xp0, xp1]
  listeners:
  - name: web
    protocol: TCP
    port: 80
    address: 192.0.2.10
    backends: [{address: 10.0.0.2, port: 8080}]
"""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Path]:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh("ip", "netns", "add", NS)
    sh("ip", "-n", NS, "link", "add", "xp0", "type", "veth", "peer", "name", "xp1")
    sh("ip", "-n", NS, "link", "set", "xp0", "up")
    sh("ip", "-n", NS, "link", "set", "xp1", "up")
    (tmp_path / "lb.yaml").write_text(CONFIG)
    yield tmp_path
    subprocess.run([str(XDPLB), "agent", "--cleanup", "--pin-dir", PIN_ROOT],
                   capture_output=True)
    sh("ip", "netns", "del", NS)


def start_agent(work: Path, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    caps = ",".join(f"+{c.lower()}" for c in sorted(CAPABILITIES))
    with open(log, "a") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", NS, "setpriv", f"--bounding-set=-all,{caps}",
             str(XDPLB), "agent", "--config", str(work / "lb.yaml"), "--pin-dir", PIN_ROOT,
             "--state-file", str(work / "agent.json"), "--conntrack-capacity", "4096", *flags],
            stdout=out, stderr=subprocess.STDOUT)


def wait_for(log: Path, text: str, after: int, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if text in log.read_text()[after:]:
            return
        assert proc.poll() is None, f"agent exited {proc.returncode}:\n{log.read_text()}"
        time.sleep(0.1)
    pytest.fail(f"no {text!r} in the agent log:\n{log.read_text()}")


def xdp_prog_id(dev: str = "xp0") -> int:
    out = sh("ip", "-n", NS, "-j", "-d", "link", "show", "dev", dev)
    return int(__import__("json").loads(out)[0].get("xdp", {}).get("prog", {}).get("id", 0))


def test_agent_restarts_hitlessly_without_sys_admin(netns: Path) -> None:
    assert "SYS_ADMIN" not in CAPABILITIES and {"BPF", "NET_ADMIN"} <= set(CAPABILITIES)
    os.makedirs(PIN_ROOT, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", PIN_ROOT]).returncode != 0:
        sh("mount", "-t", "bpf", "bpf", PIN_ROOT)
    log = netns / "agent.log"
    log.touch()
    first = start_agent(netns, log)
    wait_for(log, "applied", 0, first)
    # The compiler ran in a process of its own: the agent never mapped it.
    maps = Path(f"/proc/{first.pid}/maps").read_text()
    assert "xdplb" in Path(f"/proc/{first.pid}/cmdline").read_text()
    assert "libbcc" not in maps and "LLVM" not in maps
    old = xdp_prog_id()
    assert old and old in loader.pinned_program_ids(PIN_ROOT)
    first.send_signal(signal.SIGKILL)
    first.wait()

    # The same code: its pinned programs are taken as they are.
    mark = len(log.read_text())
    second = start_agent(netns, log)
    wait_for(log, "adopted pinned maps", mark, second)
    wait_for(log, "reused the programs", mark, second)
    wait_for(log, "applied", mark, second)
    assert xdp_prog_id() == old
    second.send_signal(signal.SIGKILL)
    second.wait()

    # Other code (here another compiled-in timeout): compiled, and swapped in; and
    # the interface the file no longer names loses the old program, which only the
    # old agent's pins name ours without SYS_ADMIN.
    # It starts on a bad file (nothing applied until a good one comes).
    assert xdp_prog_id("xp1") == old
    (netns / "lb.yaml").write_text(CONFIG.replace("port: 80", "port: 70000"))
    mark = len(log.read_text())
    third = start_agent(netns, log, "--udp-timeout", "31")
    try:
        wait_for(log, "adopted pinned maps", mark, third)
        wait_for(log, "started in", mark, third)
        (netns / "lb.yaml").write_text(CONFIG.replace("[xp0, xp1]", "[xp0]"))
        wait_for(log, "attached to xp0", mark, third)
        wait_for(log, "applied", mark, third)
        assert "reused the programs" not in log.read_text()[mark:]
        assert "detached from xp1: attached by an earlier agent" in log.read_text()[mark:]
        assert xdp_prog_id("xp1") == 0
        new = xdp_prog_id()
        assert new and new != old, "the new agent did not replace its predecessor's program"
        # The old pins went with it; the new agent's two (native and generic XDP) stay.
        ids = loader.pinned_program_ids(PIN_ROOT)
        assert new in ids and old not in ids and len(ids) == 2
        assert "--force" not in log.read_text()
    finally:
        third.send_signal(signal.SIGTERM)
        assert third.wait(30) == 0, log.read_text()


ANNOUNCE = """
from xdplb.agent.l2 import Kernel
k = Kernel()
k.add("192.0.2.77")
print(k.garp("192.0.2.77", ["xp0"]), sorted(k.ours()))
k.remove("192.0.2.77")
print(sorted(k.ours()))
"""


def test_l2_announcement_with_the_agents_capabilities(netns: Path) -> None:
    """The kernel side of an announcement (a local route, gratuitous ARP) works with the
    DaemonSet's capabilities, and gratuitous ARP is what needs NET_RAW."""
    def run(caps: list[str]) -> str:
        bounding = ",".join(f"+{c.lower()}" for c in sorted(caps))
        return sh("ip", "netns", "exec", NS, "setpriv", f"--bounding-set=-all,{bounding}",
                  sys.executable, "-c", ANNOUNCE)

    assert run(list(CAPABILITIES)).split("\n")[:2] == ["[] ['192.0.2.77']", "[]"]
    without = run([c for c in CAPABILITIES if c != "NET_RAW"])
    assert "gratuitous ARP for 192.0.2.77 on xp0: Operation not permitted" in without, without
