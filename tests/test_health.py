"""Active health checks: the threshold state machine, real TCP/UDP probes, and the
checker's scheduling (state flips, bounded concurrency, target changes)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from xdplb.agent.health import HealthChecker, TargetState, probe
from xdplb.plan.model import HealthCheck, Target

TCP = HealthCheck("TCP", None, interval=0.05, timeout=0.5, healthy_threshold=2,
                  unhealthy_threshold=3)
UDP = HealthCheck("UDP", None, interval=0.05, timeout=0.3, healthy_threshold=1,
                  unhealthy_threshold=1, payload=b"ping")


def test_state_flips_only_after_a_streak() -> None:
    s = TargetState(healthy_threshold=2, unhealthy_threshold=3)
    assert [s.record(False, "refused") for _ in range(2)] == [False, False] and s.up
    assert s.record(True) is False and s.streak == 0  # a pass breaks the failure streak
    assert [s.record(False, "refused") for _ in range(3)] == [False, False, True]
    assert not s.up and s.last_error == "refused"
    assert s.record(True) is False and not s.up
    assert s.record(True) is True and s.up and s.last_error == ""


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    yield srv
    srv.close()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_probe_real_sockets(tcp_listener: socket.socket) -> None:
    port = tcp_listener.getsockname()[1]
    assert asyncio.run(probe("127.0.0.1", port, TCP)) is None
    assert "refused" in (asyncio.run(probe("127.0.0.1", free_port(), TCP)) or "").lower()


def test_udp_probe_answer_refusal_and_silence() -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        data, addr = echo.recvfrom(100)
        got.append(data)
        echo.sendto(data, addr)

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert asyncio.run(probe("127.0.0.1", echo.getsockname()[1], UDP)) is None
        assert got == [b"ping"]
        refused = asyncio.run(probe("127.0.0.1", free_port(socket.SOCK_DGRAM), UDP))
        assert refused and "refused" in refused.lower()
        assert asyncio.run(probe("127.0.0.1", silent.getsockname()[1], UDP)) == \
            "no answer in 0.3 s"
    finally:
        t.join(5)
        echo.close()
        silent.close()


def wait_for(cond: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_checker_marks_a_stopped_server_down_and_back_up() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    port = srv.getsockname()[1]
    t = Target("127.0.0.1", port, TCP)
    changes: list[frozenset[Target]] = []
    hc = HealthChecker(lambda: changes.append(hc.down()))
    hc.start()
    try:
        hc.set_targets([t])
        time.sleep(0.3)
        assert hc.down() == frozenset() and changes == []
        srv.close()
        wait_for(lambda: hc.down() == {t})
        assert changes == [frozenset({t})]
        assert "refused" in hc.states()[t].last_error.lower()
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(64)
        wait_for(lambda: hc.down() == frozenset())
        assert changes == [frozenset({t}), frozenset()]
        hc.set_targets([])
        assert hc.states() == {}
    finally:
        hc.stop()
        srv.close()


def test_checker_bounds_probes_in_flight() -> None:
    in_flight, peak, probed = 0, 0, set()
    lock = threading.Lock()

    async def slow_probe(address: str, port: int, check: HealthCheck) -> str | None:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
            probed.add(port)
        await asyncio.sleep(0.02)
        with lock:
            in_flight -= 1
        return None

    check = HealthCheck("TCP", None, 0.05, 1.0, 1, 1)
    hc = HealthChecker(lambda: None, prober=slow_probe, max_in_flight=8)
    hc.start()
    try:
        hc.set_targets(Target("10.0.0.1", p, check) for p in range(1, 1001))
        wait_for(lambda: len(probed) == 1000, timeout=20)
        assert 1 <= peak <= 8
        assert threading.active_count() < 50  # one loop thread, not one per backend
    finally:
        hc.stop()
