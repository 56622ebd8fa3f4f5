"""Leader election on a coordination.k8s.io/v1 Lease, by client-go's rules.

A replica takes the Lease when it is absent, released, or not renewed for its
``leaseDurationSeconds``; the holder renews it every retry period and gives up
when it cannot renew within the renew deadline, which ends before the Lease
expires, so a successor never starts while the old leader still acts. Writes
carry the ``resourceVersion`` read, so of two replicas racing for the Lease one
gets a 409 and reads again. On a clean stop the holder releases the Lease and a
standby takes it at its next attempt instead of after the expiry.

``decide`` and ``released`` are pure; ``LeaderElector`` does the requests.
Expiry compares the Lease's ``renewTime`` with the local clock: nodes keep time
with NTP, and the skew to tolerate is small against a 15 s lease.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import kubernetes

from xdplb.errors import XdplbError
from xdplb.k8s.conditions import parse_time
from xdplb.k8s.settings import LeaderElectionSettings

API = "/apis/coordination.k8s.io/v1"
L2_LABEL = "xdplb.io/l2-address"  # on the agents' L2 announcement Leases
log = logging.getLogger("xdplb.lease")


class LeaseLost(SystemExit, XdplbError):
    """The leader could not keep the Lease: the process ends non-zero with this message and
    is restarted, as client-go's controllers do. Raised outside the event loop only (a
    SystemExit in a task would break out of the loop). SystemExit first: its __init__
    sets the exit code."""


class Client(Protocol):
    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json", timeout: float | None = None) -> Any:
        ...


def micro_time(t: datetime.datetime) -> str:
    """The Lease's MicroTime format."""
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Decision:
    """What one attempt writes: a new Lease, ours renewed or taken over, or nothing."""

    action: Literal["create", "acquire", "renew", "wait"]
    lease: dict[str, Any] | None  # the body to POST (create) or PUT (acquire, renew)
    holder: str  # who holds the Lease once the write succeeds (or now, when waiting)


def new_lease(namespace: str, name: str, identity: str, now: datetime.datetime,
              duration: int) -> dict[str, Any]:
    t = micro_time(now)
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"holderIdentity": identity, "leaseDurationSeconds": duration,
                     "acquireTime": t, "renewTime": t, "leaseTransitions": 0}}


def expired(spec: dict[str, Any], now: datetime.datetime) -> bool:
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds") or 0
    return renewed is None or now >= renewed + datetime.timedelta(seconds=duration)


def decide(lease: dict[str, Any] | None, identity: str, now: datetime.datetime,
           duration: int, namespace: str = "", name: str = "") -> Decision:
    """The write one attempt makes, given the Lease as read (None: there is none)."""
    if lease is None:
        return Decision("create", new_lease(namespace, name, identity, now, duration), identity)
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    if holder and holder != identity and not expired(spec, now):
        return Decision("wait", None, holder)
    body = copy.deepcopy(lease)  # keeps metadata.resourceVersion: the PUT is conditional
    t = micro_time(now)
    new = {**spec, "holderIdentity": identity, "leaseDurationSeconds": duration, "renewTime": t}
    if holder == identity:
        new.setdefault("acquireTime", t)
        body["spec"] = new
        return Decision("renew", body, identity)
    # Released (empty holder) or expired: a change of holder is a transition.
    new.update(acquireTime=t, leaseTransitions=(spec.get("leaseTransitions") or 0) + 1)
    body["spec"] = new
    return Decision("acquire", body, identity)


def released(lease: dict[str, Any] | None, identity: str, now: datetime.datetime
             ) -> dict[str, Any] | None:
    """The Lease given up by its holder (client-go's release), or None when not ours."""
    spec = (lease or {}).get("spec") or {}
    if lease is None or spec.get("holderIdentity") != identity:
        return None
    body = copy.deepcopy(lease)
    t = micro_time(now)
    body["spec"] = {"holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": t,
                    "renewTime": t, "leaseTransitions": spec.get("leaseTransitions") or 0}
    return body


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class LeaderElector:
    """The I/O around ``decide``: blocking requests, run in the elector's own thread."""

    def __init__(self, kube: Client, settings: LeaderElectionSettings) -> None:
        self.kube, self.settings = kube, settings
        self.base = f"{API}/namespaces/{settings.namespace}/leases"
        self.holder = ""  # as last read, for the logs
        self.renewed = 0.0  # monotonic time of our last successful write
        self.timeout = settings.renew_deadline  # of one request: a hung call ends in time
        # A renewal given up on (past its deadline) may still be running in its thread: the
        # release waits for it, or the renewal could land after the release.
        self.lock = threading.Lock()
        # A thread of its own: in the default executor, renewals would queue behind the
        # operator's status writes and finalizer patches.
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")

    async def _attempt_in_thread(self) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self.thread, self.attempt)

    def _read(self) -> dict[str, Any] | None:
        try:
            lease: dict[str, Any] = self.kube.request(
                "GET", f"{self.base}/{self.settings.name}", timeout=self.timeout)
            return lease
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def attempt(self) -> bool:
        """One try to take or renew the Lease (blocking); True when we hold it."""
        with self.lock:
            return self._attempt()

    def _attempt(self) -> bool:
        s = self.settings
        for _ in range(2):  # a 409: someone wrote the Lease since we read it; read again
            d = decide(self._read(), s.identity, _now(), s.lease_duration, s.namespace, s.name)
            self.holder = d.holder
            if d.action == "wait":
                return False
            try:
                if d.action == "create":
                    self.kube.request("POST", self.base, d.lease, timeout=self.timeout)
                else:
                    self.kube.request("PUT", f"{self.base}/{s.name}", d.lease,
                                      timeout=self.timeout)
            except kubernetes.client.ApiException as e:
                if e.status == 409:
                    continue
                raise
            if d.action != "renew":
                log.info("acquired the Lease %s/%s as %s", s.namespace, s.name, s.identity)
            self.renewed = time.monotonic()
            return True
        raise RuntimeError("the Lease changed under each of two writes")

    async def acquire(self) -> None:
        """Return once we hold the Lease; a standby waits here (cancel it to stop)."""
        s = self.settings
        log.info("waiting for the Lease %s/%s as %s", s.namespace, s.name, s.identity)
        reported = ""
        while True:
            try:
                if await self._attempt_in_thread():
                    return
                if self.holder != reported:
                    log.info("the Lease %s/%s is held by %s", s.namespace, s.name, self.holder)
                    reported = self.holder
            except Exception as e:
                log.warning("Lease %s/%s not acquired: %s", s.namespace, s.name, e)
            await asyncio.sleep(s.retry_period)

    async def hold(self) -> str:
        """Renew the Lease until it is lost; return why."""
        s = self.settings
        while True:
            await asyncio.sleep(s.retry_period)
            left = s.renew_deadline - (time.monotonic() - self.renewed)
            try:
                held = await asyncio.wait_for(self._attempt_in_thread(),
                                              timeout=max(left, 0.01))
            except TimeoutError:
                held = None
            except Exception as e:
                log.warning("Lease %s/%s not renewed: %s", s.namespace, s.name, e)
                held = None
            if held is False:
                return f"lost the Lease {s.namespace}/{s.name}: held by {self.holder}"
            if not held and time.monotonic() - self.renewed >= s.renew_deadline:
                return (f"lost the Lease {s.namespace}/{s.name}: not renewed within"
                        f" {s.renew_deadline:g}s")

    def release(self) -> None:
        """Give the Lease up, so that a standby takes over at its next attempt (blocking)."""
        s = self.settings
        try:
            with self.lock:
                body = released(self._read(), s.identity, _now())
                if body is not None:
                    self.kube.request("PUT", f"{self.base}/{s.name}", body,
                                      timeout=self.timeout)
                    log.info("released the Lease %s/%s", s.namespace, s.name)
        except Exception as e:  # a 409 included: someone else wrote it, so it is not ours
            log.warning("Lease %s/%s not released (it expires): %s", s.namespace, s.name, e)
