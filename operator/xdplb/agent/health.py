"""Active health checks of backends.

One asyncio loop in a background thread probes every target on its own
interval, with a bounded number of probes in flight, so 1,000 backends cost
one thread and a few sockets at a time. A target that fails
`unhealthy_threshold` probes in a row is down: the planner gives it weight 0
(no new flows; open flows continue). It is up again after `healthy_threshold`
passes in a row. Targets start up, so a new backend serves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from xdplb.plan.model import HealthCheck, Target, hostport

log = logging.getLogger("xdplb.health")

MAX_IN_FLIGHT = 256


@dataclass
class TargetState:
    """Consecutive results of one target; `record` says whether its state flipped."""

    healthy_threshold: int
    unhealthy_threshold: int
    up: bool = True
    streak: int = 0  # consecutive results that disagree with `up`
    last_error: str = ""

    def record(self, ok: bool, error: str = "") -> bool:
        self.last_error = "" if ok else error
        if ok == self.up:
            self.streak = 0
            return False
        self.streak += 1
        needed = self.healthy_threshold if ok else self.unhealthy_threshold
        if self.streak < needed:
            return False
        self.up, self.streak = ok, 0
        return True


async def probe(address: str, port: int, check: HealthCheck) -> str | None:
    """None when the target answered; otherwise why not."""
    try:
        if check.protocol == "TCP":
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, port),
                                               check.timeout)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return None
        return await asyncio.wait_for(_udp_probe(address, port, check.payload), check.timeout)
    except TimeoutError:
        return f"no answer in {check.timeout:g} s"
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e)


async def _udp_probe(address: str, port: int, payload: bytes) -> str | None:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[str | None] = loop.create_future()

    class Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not answered.done():
                answered.set_result(None)

        def error_received(self, exc: Exception) -> None:  # ICMP port unreachable
            if not answered.done():
                errno = getattr(exc, "errno", None)
                answered.set_result(os.strerror(errno) if errno else str(exc))

    transport, _ = await loop.create_datagram_endpoint(
        Probe, remote_addr=(address, port),
        family=socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        transport.sendto(payload)
        return await answered
    finally:
        transport.close()


class HealthChecker:
    """Probes a set of targets; calls `on_change()` (from its thread) when one flips."""

    def __init__(self, on_change: Callable[[], None],
                 prober: Callable[[str, int, HealthCheck], Awaitable[str | None]] = probe,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.on_change = on_change
        self.prober = prober
        self.max_in_flight = max_in_flight
        self._states: dict[Target, TargetState] = {}
        self._tasks: dict[Target, asyncio.Task[None]] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="health",
                                        daemon=True)
        self._gate: asyncio.Semaphore | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def set_targets(self, targets: Iterable[Target]) -> None:
        """Probe exactly these from now on; kept targets keep their state."""
        wanted = frozenset(targets)
        asyncio.run_coroutine_threadsafe(self._set(wanted), self._loop).result(10)

    def down(self) -> frozenset[Target]:
        with self._lock:
            return frozenset(t for t, s in self._states.items() if not s.up)

    def states(self) -> dict[Target, TargetState]:
        with self._lock:
            return dict(self._states)

    # -- in the loop ----------------------------------------------------------------
    async def _set(self, wanted: frozenset[Target]) -> None:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.max_in_flight)
        for t in [t for t in self._tasks if t not in wanted]:
            self._tasks.pop(t).cancel()
            with self._lock:
                self._states.pop(t, None)
        for t in wanted - self._tasks.keys():
            with self._lock:
                self._states[t] = TargetState(t.check.healthy_threshold,
                                              t.check.unhealthy_threshold)
            self._tasks[t] = asyncio.create_task(self._watch(t))

    async def _cancel_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    async def _watch(self, t: Target) -> None:
        assert self._gate is not None
        # Spread the first probes over one interval so 1,000 targets do not fire at once.
        await asyncio.sleep(random.uniform(0, t.check.interval))
        while True:
            async with self._gate:
                error = await self.prober(t.address, t.port, t.check)
            with self._lock:
                state = self._states.get(t)
                flipped = state is not None and state.record(error is None, error or "")
            if flipped:
                assert state is not None
                if state.up:
                    log.info("backend %s is healthy again (%s check): it gets new flows",
                             hostport(t.address, t.port), t.check.protocol)
                else:
                    log.warning("backend %s is unhealthy (%s check: %s): no new flows "
                                "until it passes %d checks", hostport(t.address, t.port),
                                t.check.protocol, error, t.check.healthy_threshold)
                self.on_change()
            await asyncio.sleep(t.check.interval)
