"""Tests of the namespace lab and traffic tools themselves (no load balancer involved)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests` has no __init__.py; make `tests.lab` importable however pytest was started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.lab import Lab, LabError, bytes_since, list_netns, read_progress

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

TCP_PORT = 8080
UDP_PORT = 5353
SINK_PORT = 9000
KIB = 1024


def _own(prefix: str) -> list[str]:
    return [n for n in list_netns() if n.startswith(f"{prefix}-")]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=3, prefix="xlt") as lab:
        lab.start_backend_servers(tcp_port=TCP_PORT, udp_port=UDP_PORT)
        yield lab


def test_topology(lab: Lab) -> None:
    assert set(_own("xlt")) == {"xlt-cli", "xlt-cli2", "xlt-lb", "xlt-b1", "xlt-b2", "xlt-b3"}
    assert lab.exec("lb", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    for dev in ("all", "default", lab.lb_client_if, lab.lb_client2_if, *lab.lb_backend_ifs):
        rp = lab.exec("lb", "cat", f"/proc/sys/net/ipv4/conf/{dev}/rp_filter").stdout
        assert rp.strip() == "0", dev
    route = lab.exec("b2", "ip", "route", "show", "default").stdout
    assert "via 10.20.2.1" in route
    # The VIP must not be local anywhere: the LB has to steer it.
    for ns in ("cli", "cli2", "lb", *lab.backends):
        assert Lab.VIP not in lab.exec(ns, "ip", "-4", "addr").stdout


def test_tcp_direct_to_backends(lab: Lab) -> None:
    for k, b in enumerate(lab.backends, start=1):
        res = lab.tcp_clients("cli", lab.backend_addr(k), TCP_PORT, count=50, concurrency=10,
                              up=64 * KIB, down=64 * KIB)
        assert res["ok"], res["failures"]
        assert res["returncode"] == 0
        assert res["tags"] == {b: 50}
        assert res["bytes_up"] == res["bytes_down"] == 50 * 64 * KIB


def test_tcp_clients_report_failures(lab: Lab) -> None:
    # Nothing listens on this port: every connection must be reported, exit code non-zero.
    res = lab.tcp_clients("cli", lab.backend_addr(1), TCP_PORT + 1, count=3, timeout=2)
    assert not res["ok"] and res["returncode"] != 0
    assert res["failed"] == 3 and len(res["failures"]) == 3
    assert "ConnectionRefusedError" in res["failures"][0]


def test_udp_echo(lab: Lab) -> None:
    res = lab.udp_clients("cli2", lab.backend_addr(2), UDP_PORT, count=20)
    assert res["ok"], res["failures"]
    assert res["tags"] == {"b2": 20}
    assert res["reply_sources"] == {f"{lab.backend_addr(2)}:{UDP_PORT}": 20}


def test_long_stream_progress(lab: Lab) -> None:
    lab.start_tcp_sink("b3", SINK_PORT)
    p = lab.start_long_stream("cli", lab.backend_addr(3), SINK_PORT, seconds=1.5,
                              rate_mbit=200)
    time.sleep(0.5)
    mark = time.monotonic_ns()
    res = lab.finish(p, timeout=30)
    assert res["ok"], res["error"]
    assert res["acked"] == res["sent"] > 0
    assert p.progress_path is not None
    samples = read_progress(p.progress_path)
    assert len(samples) >= 10
    assert [b for _, b in samples] == sorted(b for _, b in samples)
    # ~1 s at 200 Mbit/s after the mark is ~25 MB; leave room for slow machines.
    assert bytes_since(p.progress_path, mark) >= 10 * KIB * KIB


def test_tx_checksum_off(lab: Lab) -> None:
    # Runs while the module lab is up: labs with different prefixes must coexist.
    with Lab(backends=1, prefix="xlc", tx_checksum_off=True, peer_gro=True) as lab:
        for ns, dev in (("cli", lab.client_if), ("cli2", lab.client2_if),
                        ("b1", lab.backend_if)):
            feats = lab.exec(ns, "ethtool", "-k", dev).stdout
            assert "tx-checksumming: off" in feats, (ns, feats)
            assert "generic-receive-offload: on" in feats, (ns, feats)
        lab.start_backend_servers(tcp_port=TCP_PORT, udp_port=UDP_PORT)
        res = lab.tcp_clients("cli", lab.backend_addr(1), TCP_PORT, count=20, concurrency=5,
                              up=64 * KIB, down=64 * KIB)
        assert res["ok"], res["failures"]
        assert res["tags"] == {"b1": 20}
        res = lab.udp_clients("cli2", lab.backend_addr(1), UDP_PORT, count=5)
        assert res["ok"], res["failures"]
    assert _own("xlc") == []
    assert len(_own("xlt")) == 6


def test_close_kills_processes_and_is_idempotent() -> None:
    lab = Lab(backends=2, prefix="xlz").setup()
    # A process the lab did not start must not keep the namespace alive.
    stray = subprocess.Popen(["ip", "netns", "exec", lab.ns("lb"), "sleep", "60"])
    started = lab.popen("b2", "sleep", "60")
    time.sleep(0.2)
    lab.close()
    assert stray.wait(5) != 0 and started.wait(5) != 0
    assert _own("xlz") == []
    assert not lab.workdir.exists()
    lab.close()
    with pytest.raises(LabError):
        lab.setup()


def test_stale_namespaces_are_replaced() -> None:
    # Simulate a crashed run: leftovers (even with more backends) under the same prefix.
    for name in ("xly-lb", "xly-b7"):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with Lab(backends=1, prefix="xly") as lab:
            assert set(_own("xly")) == set(lab.namespaces)
            lab.start_tcp_server("b1", TCP_PORT)
            res = lab.tcp_clients("cli", lab.backend_addr(1), TCP_PORT, count=2)
            assert res["ok"], res["failures"]
    finally:
        for name in _own("xly"):
            subprocess.run(["ip", "netns", "del", name], check=False)
    assert _own("xly") == []
