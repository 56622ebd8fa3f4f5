"""L2 announcement: one elected node per address answers ARP (IPv4) or Neighbour
Solicitations (IPv6) for it.

Each address of a pool with ``announce: L2`` has a coordination.k8s.io Lease in the
agents' namespace (``xdplb-l2-<address>``, owned by the pool). Every node that applied a
listener on the address is a candidate; the one holding the Lease makes the address
local (l2.py), sends gratuitous ARP (IPv6: unsolicited Neighbour Advertisements) when it
takes over, and renews the Lease every third
of its duration. The others read it when it would expire and take it over then, so a
node whose agent stopped is replaced within one Lease duration (3 s by default). The
election rules are the operator's leader election (k8s/lease.py's ``decide``); the
candidate's identity is its node name, so a restarted agent finds its own Lease and
renews it without a takeover.

Fail-static: an announcer that cannot reach the API keeps announcing (the data plane
never depends on the API being up); it stops when it reads that another node holds the
Lease, when the address is no longer wanted here, or when the agent is uninstalled. A
node whose agent died keeps its route (and XDP keeps serving) until its next agent
starts: that one keeps the routes it still holds the Lease for and removes the others.

The work runs in a thread of its own, so that renewals do not wait behind a long apply.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from xdplb.k8s.lease import L2_LABEL, decide, released
from xdplb.k8s.nodestate import MAX_ANNOUNCEMENTS, Announcement
from xdplb.spec.api import API_VERSION

log = logging.getLogger("xdplb.agent")

LEASE_API = "/apis/coordination.k8s.io/v1"
GARP_AFTER = (0.0, 0.5, 2.0)  # seconds after a takeover: the first may be lost
TICK = 0.1


class Api(Protocol):
    def request(self, method: str, path: str, body: Any = None) -> Any: ...


class KernelOps(Protocol):
    def ours(self) -> set[str]: ...
    def local_routes(self) -> dict[str, int]: ...
    def add(self, address: str, interfaces: tuple[str, ...] = ()) -> list[str]: ...
    def remove(self, address: str) -> None: ...
    def garp(self, address: str, interfaces: tuple[str, ...]) -> list[str]: ...


@dataclass(frozen=True)
class Candidate:
    """An address this node could announce: it applied a listener on it."""

    address: str
    pool: str
    pool_uid: str
    interfaces: tuple[str, ...]


def lease_name(address: str) -> str:
    return "xdplb-l2-" + address.replace(".", "-").replace(":", "-")


@dataclass
class _Held:
    candidate: Candidate
    since: datetime.datetime
    renewed: float  # monotonic time of the last successful write
    garps: list[float] = field(default_factory=list)  # monotonic times still due
    made: tuple[str, ...] | None = None  # the interfaces the kernel answers on (IPv6)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Announcer:
    def __init__(self, api: Api, namespace: str, node: str, kernel: KernelOps,
                 lease_seconds: int = 3) -> None:
        self.api, self.namespace, self.node, self.kernel = api, namespace, node, kernel
        self.duration = lease_seconds
        self.renew_every = lease_seconds / 3
        self.base = f"{LEASE_API}/namespaces/{namespace}/leases"
        self._lock = threading.Lock()
        self._wanted: dict[str, Candidate] | None = None  # None: not told yet
        self._held: dict[str, _Held] = {}
        self._next_read: dict[str, float] = {}
        self._adopted: set[str] = set()  # routes of an earlier agent, Lease still ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._problems: dict[str, str] = {}  # address -> what last went wrong with it

    # -- what the agent sees --------------------------------------------------------------
    def want(self, candidates: dict[str, Candidate]) -> None:
        with self._lock:
            self._wanted = dict(candidates)

    def announcements(self) -> list[Announcement]:
        """What the NodeState shows (the first MAX_ANNOUNCEMENTS, by address)."""
        with self._lock:
            return [Announcement(address=a, pool=h.candidate.pool,
                                 interfaces=list(h.candidate.interfaces[:4]), since=h.since)
                    for a, h in sorted(self._held.items())[:MAX_ANNOUNCEMENTS]]

    @property
    def problems(self) -> list[str]:
        with self._lock:
            return [p for _, p in sorted(self._problems.items())]

    def start(self) -> None:
        self._adopt()
        self._thread = threading.Thread(target=self._run, name="l2-announcer", daemon=True)
        self._thread.start()

    def stop(self, release: bool) -> None:
        """Stop; with ``release``, give every Lease up and withdraw (the data plane goes
        too); without, leave routes and Leases to the next agent of this node."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if release:
            for address in list(self._held):
                self._release(address)

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step(time.monotonic())
            except Exception as e:  # one bad round must not end the announcements
                log.warning("L2 announcer: %r", e)
            self._stop.wait(TICK)

    def step(self, clock: float) -> None:
        with self._lock:
            wanted = self._wanted
        if wanted is None:  # before the first plan: keep what an earlier agent held
            wanted = {a: h.candidate for a, h in self._held.items() if a in self._adopted}
        for address in [a for a in self._held if a not in wanted]:
            self._release(address)
        for address, cand in sorted(wanted.items()):
            held = self._held.get(address)
            if held is not None:
                held.candidate = cand
                if clock - held.renewed >= self.renew_every:
                    self._renew(address, clock)
                self._garps(address, clock)
            elif clock >= self._next_read.get(address, 0.0):
                self._try(cand, clock)

    def _lease(self, address: str) -> dict[str, Any] | None:
        try:
            lease: dict[str, Any] = self.api.request("GET", f"{self.base}/{lease_name(address)}")
            return lease
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _write(self, lease: dict[str, Any] | None, decision_lease: dict[str, Any],
               cand: Candidate) -> None:
        if lease is None:
            meta = decision_lease["metadata"]
            meta["labels"] = {L2_LABEL: cand.address.replace(":", "-"),
                              "app.kubernetes.io/managed-by": "xdplb-agent"}
            if cand.pool_uid:  # the Lease goes with its pool
                meta["ownerReferences"] = [{"apiVersion": API_VERSION, "kind": "AddressPool",
                                            "name": cand.pool, "uid": cand.pool_uid}]
            self.api.request("POST", self.base, decision_lease)
        else:
            self.api.request("PUT", f"{self.base}/{lease_name(cand.address)}", decision_lease)

    def _try(self, cand: Candidate, clock: float) -> None:
        """Read the Lease; take it when it is free or expired, else read it again when it
        would expire."""
        address, name = cand.address, lease_name(cand.address)
        try:
            lease = self._lease(address)
            d = decide(lease, self.node, _now(), self.duration, self.namespace, name)
            if d.action == "wait":
                spec = (lease or {}).get("spec") or {}
                self._next_read[address] = clock + self._until_expiry(spec)
                return
            if d.action != "renew" and address not in self._next_read:
                # A first attempt at a free Lease: candidates spread over half a second,
                # each address in its own order, so that addresses spread over nodes.
                self._next_read[address] = clock + self._jitter(address)
                return
            assert d.lease is not None
            self._write(lease, d.lease, cand)
        except ApiException as e:
            if e.status != 409:  # 409: another candidate wrote first; read again
                log.warning("L2 %s: Lease %s not taken: %s %s", address, name, e.status,
                            e.reason)
            self._next_read[address] = clock + self.renew_every
            return
        except Exception as e:  # the API away: try again shortly
            log.warning("L2 %s: Lease %s not read: %s", address, name, e)
            self._next_read[address] = clock + self.renew_every
            return
        self._take(cand, clock, renewed=d.action == "renew")

    def _until_expiry(self, spec: dict[str, Any]) -> float:
        from xdplb.k8s.conditions import parse_time

        renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
        duration = spec.get("leaseDurationSeconds") or self.duration
        if renewed is None:
            return self.renew_every
        left = (renewed - _now()).total_seconds() + duration
        return min(max(left, 0.0) + 0.05, float(duration))

    def _jitter(self, address: str) -> float:
        digest = hashlib.sha256(f"{address}/{self.node}".encode()).digest()
        return int.from_bytes(digest[:2], "big") / 65536 * 0.5

    def _local(self, cand: Candidate) -> None:
        """Make the address local (and, IPv6, answered for on the candidate's interfaces),
        noting what went wrong."""
        try:
            problems = self.kernel.add(cand.address, cand.interfaces)
        except Exception as e:
            self._problem(cand.address, f"L2 {cand.address}: cannot make it local: {e}")
            return
        if (held := self._held.get(cand.address)) is not None:
            held.made = cand.interfaces
        if problems:
            self._problem(cand.address, f"L2 {cand.address}: " + "; ".join(problems))
        else:
            self._ok(cand.address)

    def _take(self, cand: Candidate, clock: float, renewed: bool) -> None:
        with self._lock:
            self._held[cand.address] = _Held(cand, _now(), clock,
                                             [clock + t for t in GARP_AFTER])
        self._local(cand)
        self._next_read.pop(cand.address, None)
        log.info("L2: %s announced from %s (Lease %s/%s%s)", cand.address,
                 ", ".join(cand.interfaces) or "no interface", self.namespace,
                 lease_name(cand.address), ", ours already" if renewed else "")
        self._garps(cand.address, clock)

    def _renew(self, address: str, clock: float) -> None:
        held = self._held[address]
        name = lease_name(address)
        try:
            lease = self._lease(address)
            d = decide(lease, self.node, _now(), self.duration, self.namespace, name)
            if d.action == "wait":
                log.warning("L2: %s is now held by %s: withdrawn here", address, d.holder)
                self._withdraw(address)
                return
            assert d.lease is not None
            self._write(lease, d.lease, held.candidate)
            held.renewed = clock
        except Exception as e:  # fail-static: keep announcing, try again next round
            log.warning("L2 %s: Lease %s not renewed: %s", address, name, e)
        if held.made != held.candidate.interfaces \
                or address not in self.kernel.local_routes():
            # Its interfaces changed (IPv6 answers on those), or its route was removed (an
            # SNI VIP's route went).
            self._local(held.candidate)

    def _garps(self, address: str, clock: float) -> None:
        held = self._held[address]
        due = [t for t in held.garps if t <= clock]
        if not due:
            return
        held.garps = [t for t in held.garps if t > clock]
        if not held.candidate.interfaces:
            self._problem(address, f"L2 {address}: no interface to announce it on")
        for problem in self.kernel.garp(address, held.candidate.interfaces):
            self._problem(address, problem)

    def _withdraw(self, address: str) -> None:
        with self._lock:
            self._held.pop(address, None)
            self._problems.pop(address, None)
        self._next_read.pop(address, None)
        try:
            self.kernel.remove(address)
        except Exception as e:
            self._problem(address, f"L2 {address}: local route not removed: {e}")

    def _release(self, address: str) -> None:
        """Give the Lease up (another candidate takes it at its next read) and withdraw."""
        name = lease_name(address)
        try:
            body = released(self._lease(address), self.node, _now())
            if body is not None:
                self.api.request("PUT", f"{self.base}/{name}", body)
        except Exception as e:
            log.warning("L2 %s: Lease %s not released (it expires): %s", address, name, e)
        self._withdraw(address)
        log.info("L2: %s no longer announced here", address)

    def _adopt(self) -> None:
        """At start: the routes an earlier agent of this node left. Those whose Lease is
        still ours are kept (and renewed from the first round); the others go."""
        try:
            left = self.kernel.ours()
        except Exception as e:
            self._problem("", f"L2: cannot list local routes: {e}")
            return
        for address in sorted(left):
            try:
                lease = self._lease(address)
            except Exception as e:  # unknown: keep serving, the first plan decides
                log.warning("L2 %s: Lease not read at start: %s", address, e)
                lease = {"spec": {"holderIdentity": self.node}}
            holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
            if holder == self.node:
                owner: dict[str, Any] = next(iter(((lease or {}).get("metadata") or {}).get(
                    "ownerReferences") or []), {})
                cand = Candidate(address, owner.get("name", ""), owner.get("uid", ""), ())
                with self._lock:
                    self._held[address] = _Held(cand, _now(), 0.0)
                self._adopted.add(address)
                log.info("L2: %s kept from the previous agent (Lease still ours)", address)
            else:
                self._withdraw(address)
                log.info("L2: %s withdrawn: left by an earlier agent, announced by %s now",
                         address, holder or "nobody")

    def _problem(self, address: str, text: str) -> None:
        with self._lock:
            if self._problems.get(address) != text:
                log.warning("%s", text)
            self._problems[address] = text

    def _ok(self, address: str) -> None:
        with self._lock:
            self._problems.pop(address, None)
