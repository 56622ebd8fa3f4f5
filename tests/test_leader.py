"""Leader election and probes of `xdplb operator`.

The decision is tested as a pure function; the Lease loop against a fake client
for the failure paths; and two operator replicas (real kopf runtime, threads of
this process) against the API emulator, with the operator's RBAC rules only.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from tests.chart import chart_grants
from tests.k8s.cluster import KUBECTL, Cluster, wait_for, write_kubeconfig
from tests.test_health import free_port
from tests.test_operator import OPEN_POOL
from xdplb.k8s.client import Kube
from xdplb.k8s.daemonset import AgentSettings
from xdplb.k8s.index import State
from xdplb.k8s.lease import LeaderElector, LeaseLost, decide, released
from xdplb.k8s.operator import run
from xdplb.k8s.settings import LeaderElectionSettings, OperatorSettings

NS = "xdplb-system"
TOKEN = "operator-token"
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/xdplb-operator"
LB_API = "/apis/xdplb.io/v1alpha1/namespaces/default/loadbalancers"
NOW = datetime.datetime(2026, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)
# Short enough for tests, in the same proportions as the defaults (15 / 10 / 2).
ELECTION = LeaderElectionSettings(enabled=True, namespace=NS, lease_duration=6,
                                  renew_deadline=4, retry_period=0.5)


def at(seconds: float) -> str:
    return (NOW + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease(holder: str, renewed: float, duration: int = 15, transitions: int = 2
          ) -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "xdplb-operator", "namespace": NS, "resourceVersion": "41"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                     "acquireTime": at(-100), "renewTime": at(renewed),
                     "leaseTransitions": transitions}}


# --- the decision -------------------------------------------------------------------


def test_absent_lease_is_created_as_ours() -> None:
    d = decide(None, "a", NOW, 15, NS, "xdplb-operator")
    assert (d.action, d.holder) == ("create", "a")
    assert d.lease == {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": "xdplb-operator", "namespace": NS},
                       "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15,
                                "acquireTime": at(0), "renewTime": at(0),
                                "leaseTransitions": 0}}


def test_fresh_lease_of_another_holder_is_waited_for() -> None:
    d = decide(lease("b", renewed=-14.9), "a", NOW, 15)
    assert (d.action, d.lease, d.holder) == ("wait", None, "b")


def test_expired_lease_is_taken_over_as_a_transition() -> None:
    d = decide(lease("b", renewed=-15.1), "a", NOW, 10)
    assert (d.action, d.holder) == ("acquire", "a")
    assert d.lease is not None
    assert d.lease["metadata"]["resourceVersion"] == "41"  # the PUT is conditional
    assert d.lease["spec"] == {"holderIdentity": "a", "leaseDurationSeconds": 10,
                               "acquireTime": at(0), "renewTime": at(0), "leaseTransitions": 3}


def test_released_lease_is_taken_at_once() -> None:
    d = decide(lease("", renewed=-0.5, duration=1), "a", NOW, 15)
    assert d.action == "acquire" and d.lease is not None
    assert d.lease["spec"]["leaseTransitions"] == 3


def test_our_lease_is_renewed() -> None:
    d = decide(lease("a", renewed=-2), "a", NOW, 15)
    assert (d.action, d.holder) == ("renew", "a")
    assert d.lease is not None
    assert d.lease["spec"] == {"holderIdentity": "a", "leaseDurationSeconds": 15,
                               "acquireTime": at(-100), "renewTime": at(0),
                               "leaseTransitions": 2}
    # Even one past its expiry: no other replica took it meanwhile.
    assert decide(lease("a", renewed=-20), "a", NOW, 15).action == "renew"


def test_release_empties_only_our_lease() -> None:
    body = released(lease("a", renewed=-1), "a", NOW)
    assert body is not None and body["metadata"]["resourceVersion"] == "41"
    assert body["spec"] == {"holderIdentity": "", "leaseDurationSeconds": 1,
                            "acquireTime": at(0), "renewTime": at(0), "leaseTransitions": 2}
    assert released(lease("b", renewed=-1), "a", NOW) is None
    assert released(None, "a", NOW) is None


def test_timings_must_let_the_leader_stop_before_the_lease_expires() -> None:
    with pytest.raises(ValueError, match="lease duration > renew deadline"):
        LeaderElectionSettings(lease_duration=10, renew_deadline=10)


# --- the Lease loop, against a fake API -----------------------------------------------


class FakeApi:
    """Answers requests from a script: each entry an object to return or an exception."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, Any]] = []

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json", timeout: float | None = None) -> Any:
        self.calls.append((method, body))
        answer = self.answers.pop(0) if self.answers else ConnectionError("API unreachable")
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_conflicting_write_is_decided_again_on_a_fresh_read() -> None:
    won = lease("c", renewed=0, transitions=1)
    won["spec"]["renewTime"] = datetime.datetime.now(datetime.UTC).isoformat()
    api = FakeApi(lease("b", renewed=-20, transitions=0),
                  kubernetes.client.ApiException(status=409),  # another replica won the race
                  won)
    elector = LeaderElector(api, LeaderElectionSettings(identity="a"))
    assert elector.attempt() is False
    assert elector.holder == "c"
    assert [m for m, _ in api.calls] == ["GET", "PUT", "GET"]


def test_leader_gives_up_when_not_renewed_within_the_deadline() -> None:
    api = FakeApi()  # every request fails
    elector = LeaderElector(api, LeaderElectionSettings(
        identity="a", lease_duration=2, renew_deadline=0.5, retry_period=0.1))
    elector.renewed = time.monotonic()
    started = time.monotonic()
    reason = asyncio.run(elector.hold())
    assert "not renewed within 0.5s" in reason
    assert 0.5 <= time.monotonic() - started < 1.5


# --- replicas against the API emulator ------------------------------------------------

needs_kubectl = pytest.mark.skipif(not KUBECTL.exists(),
                                   reason="run scripts/setup.sh for kubectl")


def probe(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a probe on ``port``; (0, "") while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()
    except OSError:
        return 0, ""


class Replica:
    """One operator replica: ``run()`` in a thread, as a pod runs `xdplb operator`."""

    def __init__(self, kubeconfig: Path, identity: str) -> None:
        self.identity = identity
        self.settings = OperatorSettings(
            kubeconfig=str(kubeconfig), health_port=free_port(),
            agent=AgentSettings(namespace=NS, image="registry.example/xdplb:1"),
            status_interval=0.2, resync_interval=0.3,
            leader_election=LeaderElectionSettings(**{**vars(ELECTION), "identity": identity}))
        self.state = State(self.settings)
        self.stop, self.ready = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=identity, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            run(self.settings, self.stop, self.ready, self.state)
        except BaseException as e:  # LeaseLost is a SystemExit
            self.error = e

    def probe(self, path: str) -> tuple[int, str]:
        return probe(self.settings.health_port, path)

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), f"{self.identity} did not stop"


@contextmanager
def replicas(tmp_path: Path, *identities: str) -> Iterator[tuple[Kube, list[Replica]]]:
    with Cluster(tmp_path) as cluster:
        cluster.apply_crds()
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(OPEN_POOL))
        cluster.emulator.grant(TOKEN, f"system:serviceaccount:{NS}:xdplb-operator",
                               chart_grants("operator", NS))
        kubeconfig = cluster.kubeconfig("operator", TOKEN)
        started: list[Replica] = []
        try:
            for identity in identities:
                started.append(Replica(kubeconfig, identity))
                # In order: the first is the leader, the others find it holding the Lease.
                wait_for(f"{identity} answering the API", lambda: started[-1].probe(
                    "/readyz")[0] == 200, timeout=10)
            yield Kube(str(cluster.admin_kubeconfig)), started
        finally:
            for r in started:
                r.stop.set()
            for r in started:
                r.thread.join(20)


def holder(admin: Kube) -> str:
    return admin.get(LEASE)["spec"]["holderIdentity"]


def apply_lb(admin: Kube, name: str, port: int) -> None:
    admin.request("POST", LB_API, {
        "apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer", "metadata": {"name": name},
        "spec": {"listeners": [{"name": "http", "protocol": "TCP", "port": port,
                                "address": "192.0.2.10",
                                "backends": [{"address": "10.0.0.11", "port": 8080}]}]}})


def accepted(admin: Kube, name: str) -> bool:
    conds = (admin.get(f"{LB_API}/{name}").get("status") or {}).get("conditions") or []
    return any(c["type"] == "Accepted" and c["status"] == "True" for c in conds)


@needs_kubectl
def test_one_replica_is_active_and_both_are_ready(tmp_path: Path) -> None:
    with replicas(tmp_path, "pod-a", "pod-b") as (admin, (a, b)):
        assert a.ready.wait(10)
        assert holder(admin) == "pod-a"
        apply_lb(admin, "web", 80)
        wait_for("web accepted", lambda: accepted(admin, "web"))
        assert ("default", "web") in a.state.lbs
        lb = admin.get(f"{LB_API}/web")
        assert lb["metadata"]["finalizers"] == ["xdplb.io/release"]
        # The standby watches nothing and writes nothing: kopf has not started in it.
        time.sleep(1.0)  # a few of its attempts at the Lease
        assert not b.ready.is_set() and b.state.lbs == {}
        assert holder(admin) == "pod-a"
        assert a.probe("/healthz") == (200, "ok: leader")
        assert a.probe("/readyz") == (200, "ok: leader")
        assert b.probe("/healthz") == (200, "ok: standby")
        assert b.probe("/readyz") == (200, "ok: standby")  # or a rolling update would stall
        assert a.probe("/metrics")[0] == 404


@needs_kubectl
def test_a_clean_stop_hands_over_at_once(tmp_path: Path) -> None:
    with replicas(tmp_path, "pod-a", "pod-b") as (admin, (a, b)):
        assert a.ready.wait(10)
        apply_lb(admin, "web", 80)
        wait_for("web accepted", lambda: accepted(admin, "web"))
        a.halt()
        stopped = time.monotonic()
        assert a.error is None
        assert b.ready.wait(10)
        # A standby attempt after the release, not the Lease's expiry (6 s) later.
        assert time.monotonic() - stopped < ELECTION.lease_duration / 2
        spec = admin.get(LEASE)["spec"]
        assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("pod-b", 1)
        assert spec["leaseDurationSeconds"] == ELECTION.lease_duration
        # The new leader serves: it indexes what exists and accepts what comes.
        apply_lb(admin, "api", 81)
        wait_for("api accepted by pod-b", lambda: accepted(admin, "api"))
        wait_for("pod-b indexed both", lambda: {("default", "web"), ("default", "api")}
                 <= set(b.state.lbs))
        assert b.probe("/healthz") == (200, "ok: leader")


@needs_kubectl
def test_a_leader_whose_lease_is_taken_stops(tmp_path: Path) -> None:
    with replicas(tmp_path, "pod-a", "pod-b") as (admin, (a, b)):
        assert a.ready.wait(10)
        stolen = admin.get(LEASE)
        stolen["spec"].update(holderIdentity="intruder", leaseDurationSeconds=60,
                              renewTime=datetime.datetime.now(datetime.UTC).strftime(
                                  "%Y-%m-%dT%H:%M:%S.%fZ"))
        admin.request("PUT", LEASE, stolen)
        taken = time.monotonic()
        a.thread.join(15)
        assert not a.thread.is_alive()
        assert time.monotonic() - taken < 10  # its next renewal finds it, then kopf stops
        assert isinstance(a.error, LeaseLost) and a.error.code  # the process exits non-zero
        assert "held by intruder" in str(a.error)
        assert holder(admin) == "intruder"  # not released: it was not ours any more
        assert not b.ready.is_set()  # the intruder's Lease is fresh
        assert b.probe("/healthz") == (200, "ok: standby")


def test_probes_before_the_api_answers(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{closed}")
    replica = Replica(kubeconfig, "pod-a")
    try:
        wait_for("probes served", lambda: replica.probe("/healthz")[0])
        assert replica.probe("/readyz") == (503, "not ok: standby")
        assert replica.probe("/healthz") == (200, "ok: standby")  # its Lease loop keeps trying
    finally:
        replica.halt()
    assert replica.error is None
