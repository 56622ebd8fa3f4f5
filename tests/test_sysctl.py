"""Source-NAT ports kept out of the kernel's ephemeral ports: the range arithmetic,
the agent's call at start, and the reservation at work in a network namespace."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import xdplb
from xdplb import cli
from xdplb.agent import sysctl
from xdplb.agent.node import NodeApplier, NodeOptions
from xdplb.agent.sysctl import (
    MIN_EPHEMERAL,
    SnatPortsError,
    merge,
    parse_port_range,
    parse_ranges,
    plan_reservation,
    reserve_snat_ports,
    show_ranges,
    subtract,
)
from xdplb.dataplane.config import Capacities
from xdplb.dataplane.loader import DataPlane
from xdplb.errors import XdplbError

KERNEL_DEFAULT = "32768\t60999\n"


# -- arithmetic -----------------------------------------------------------------------------

def test_parse_and_show_keep_the_kernel_format() -> None:
    assert parse_port_range(KERNEL_DEFAULT) == (32768, 60999)
    assert parse_ranges("\n") == []
    assert parse_ranges("8080,30000-30010\n") == [(8080, 8080), (30000, 30010)]
    assert show_ranges(parse_ranges("8080,30000-30010\n")) == "8080,30000-30010"
    assert merge([(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]) == [(1, 9), (20, 30)]
    assert subtract((100, 200), [(90, 110), (150, 150), (190, 300)]) == [(111, 149), (151, 189)]
    assert subtract((100, 200), []) == [(100, 200)]
    assert subtract((100, 200), [(0, 1000)]) == []


def test_the_default_ranges_do_not_overlap() -> None:
    caps = Capacities()
    assert (caps.snat_port_min, caps.snat_port_max) == (1024, 32767)
    r = plan_reservation((caps.snat_port_min, caps.snat_port_max), KERNEL_DEFAULT, "\n")
    assert r.add == () and r.kept == 60999 - 32768 + 1 and r.problem() is None
    assert "outside the kernel's ephemeral ports 32768-60999" in r.summary()


def test_overlap_is_added_to_an_existing_reserved_list() -> None:
    r = plan_reservation((30005, 40000), KERNEL_DEFAULT, "8080,30000-30010\n")
    assert r.add == ((32768, 40000),)
    assert show_ranges(r.after) == "8080,30000-30010,32768-40000"
    assert r.kept == 60999 - 40000
    assert r.problem() is None
    # Already reserved parts are not added again; the rest is.
    r = plan_reservation((32760, 33000), KERNEL_DEFAULT, "8080,32800-32900")
    assert r.add == ((32768, 32799), (32901, 33000))
    assert show_ranges(r.after) == "8080,32768-33000"
    # A range wholly reserved already: nothing to add, however few ports are left.
    r = plan_reservation((32768, 60999), KERNEL_DEFAULT, "32768-60999")
    assert r.add == () and r.kept == 0 and r.problem() is None
    assert "already in net.ipv4.ip_local_reserved_ports" in r.summary()


def test_refuses_to_leave_fewer_than_1024_ephemeral_ports() -> None:
    low = 60999 - MIN_EPHEMERAL + 1            # leaves exactly 1024: allowed
    ok = plan_reservation((1024, low - 1), KERNEL_DEFAULT, "")
    assert ok.kept == MIN_EPHEMERAL and ok.problem() is None
    bad = plan_reservation((1024, low), KERNEL_DEFAULT, "")
    assert bad.kept == MIN_EPHEMERAL - 1
    message = bad.problem()
    assert message is not None
    assert "source-NAT ports 1024-59976" in message
    assert "ephemeral ports 32768-60999 (net.ipv4.ip_local_port_range)" in message
    assert "1023 ephemeral ports" in message
    assert "Narrow --snat-port-min/--snat-port-max" in message
    assert "narrow net.ipv4.ip_local_port_range" in message
    # Existing reservations count toward what is left.
    r = plan_reservation((32768, 40000), KERNEL_DEFAULT, "40001-60000")
    assert r.kept == 999 and r.problem() is not None


def sysctls(root: Path, port_range: str, reserved: str) -> Path:
    (root / "ip_local_port_range").write_text(port_range)
    (root / "ip_local_reserved_ports").write_text(reserved)
    return root


def test_reserve_writes_the_merged_list_and_logs_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = sysctls(tmp_path, KERNEL_DEFAULT, "8080,30000-30010\n")
    with caplog.at_level(logging.INFO, "xdplb.agent"):
        r = reserve_snat_ports((30000, 40999), root)
    assert r is not None and r.add == ((32768, 40999),)
    assert (root / "ip_local_reserved_ports").read_text() == "8080,30000-30010,32768-40999"
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 1
    assert "source-NAT ports 30000-40999 overlap the kernel's ephemeral ports 32768-60999" \
        in lines[0]
    assert "reserved 32768-40999" in lines[0] and "keeps 20000 ephemeral ports" in lines[0]
    # Again (an agent's restart): nothing to add, nothing written.
    (root / "ip_local_reserved_ports").write_text("8080,30000-30010,32768-40999\n")
    r = reserve_snat_ports((30000, 40999), root)
    assert r is not None and r.add == ()
    assert (root / "ip_local_reserved_ports").read_text() == "8080,30000-30010,32768-40999\n"


def test_reserve_refuses_without_writing(tmp_path: Path) -> None:
    root = sysctls(tmp_path, KERNEL_DEFAULT, "")
    with pytest.raises(SnatPortsError) as e:
        reserve_snat_ports((1024, 65535), root)
    assert isinstance(e.value, XdplbError)
    assert "would leave the kernel 0 ephemeral ports" in str(e.value)
    assert (root / "ip_local_reserved_ports").read_text() == ""


def test_unreadable_sysctls_are_a_warning(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    assert reserve_snat_ports((30000, 40999), tmp_path / "missing") is None
    assert "cannot read the kernel's ephemeral port range" in caplog.text


# -- the agent ------------------------------------------------------------------------------

class _Stop(Exception):
    pass


class _NotLoading(DataPlane):
    """A data plane that stops start() where it would begin loading."""

    def load_async(self) -> None:
        raise _Stop


def applier(snat: tuple[int, int]) -> NodeApplier:
    caps = Capacities(snat_port_min=snat[0], snat_port_max=snat[1])
    return NodeApplier(NodeOptions(caps=caps), "test", dp=_NotLoading("/nonexistent", caps))


def test_node_start_reserves_before_loading(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = sysctls(tmp_path, KERNEL_DEFAULT, "")
    monkeypatch.setattr(sysctl, "IPV4", root)
    with pytest.raises(_Stop):
        applier((30000, 40999)).start()
    assert (root / "ip_local_reserved_ports").read_text() == "32768-40999"


def test_node_start_refuses_before_loading(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = sysctls(tmp_path, KERNEL_DEFAULT, "")
    monkeypatch.setattr(sysctl, "IPV4", root)
    with pytest.raises(SnatPortsError, match="ip_local_port_range"):
        applier((1024, 65535)).start()


@pytest.mark.parametrize("kubernetes", [False, True])
def test_agent_command_ends_with_the_message_and_status_1(
        kubernetes: bool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Both the standalone and the cluster agent turn the refusal into one error line
    and exit status 1 (their start() raises it; here a stand-in does)."""
    import xdplb.agent.cluster
    import xdplb.agent.standalone
    import xdplb.dataplane.loader

    class Refusing:
        def __init__(self, *_a: object, **_k: object) -> None:
            pass

        def run(self) -> None:
            raise SnatPortsError("source-NAT ports 1024-65535 overlap ...")

    monkeypatch.setattr(xdplb.dataplane.loader.DataPlane, "load_async", lambda self: None)
    monkeypatch.setattr(xdplb.agent.cluster, "ClusterAgent", Refusing)
    monkeypatch.setattr(xdplb.agent.standalone, "Agent", Refusing)
    monkeypatch.setattr(cli, "setup_logging", lambda fmt: None)
    args = ["agent", "--kubernetes", "--node-name", "n1"] if kubernetes else ["agent"]
    with caplog.at_level(logging.ERROR):
        assert cli.main(args) == 1
    assert "source-NAT ports 1024-65535 overlap" in caplog.text


# -- in a network namespace -----------------------------------------------------------------

IN_NAMESPACE = textwrap.dedent("""
    import json, socket, struct
    from pathlib import Path
    from xdplb.agent.sysctl import reserve_snat_ports

    ipv4 = Path("/proc/sys/net/ipv4")
    (ipv4 / "ip_local_port_range").write_text("40000 40199")
    listeners = []
    for _ in range(5):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(512)
        listeners.append(s)

    def connect(listener):
        c = socket.create_connection(listener.getsockname(), timeout=5)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return c

    # Before: 150 connections to one listener take 150 of the 200 ports, so at
    # least 50 of 40000-40099.
    before = [connect(listeners[0]) for _ in range(150)]
    ports_before = [c.getsockname()[1] for c in before]
    for c in before:
        c.close()  # RST (linger 0): no TIME_WAIT holds the ports
    res = reserve_snat_ports((40000, 40099), min_kept=100)  # a small range: 100 left
    reserved = (ipv4 / "ip_local_reserved_ports").read_text().strip()
    # After: 300 connections, 75 to each of four other listeners (100 ports left).
    after = [connect(listeners[1 + i % 4]) for i in range(300)]
    print(json.dumps({"before": ports_before, "after": [c.getsockname()[1] for c in after],
                      "reserved": reserved, "kept": res.kept if res else None}))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns)")
def test_reserved_ports_are_never_ephemeral_in_a_network_namespace() -> None:
    ns = f"xd-ports-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        operator_dir = str(Path(xdplb.__file__).resolve().parent.parent)
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", IN_NAMESPACE],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": operator_dir})
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    assert all(40000 <= p <= 40199 for p in out["before"])
    assert sum(p <= 40099 for p in out["before"]) >= 50   # the kernel did use them
    assert out["reserved"] == "40000-40099" and out["kept"] == 100
    assert len(out["after"]) == 300
    assert all(40100 <= p <= 40199 for p in out["after"]), sorted(out["after"])
    # The host's namespace is untouched: the sysctls are per network namespace.
    assert "40000-40099" not in Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text()
