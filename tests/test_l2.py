"""A Service of type LoadBalancer on a flat network, end to end: the operator (real kopf,
in this process) allocates an address from a pool with ``announce: L2``, two agents
(`xdplb agent --kubernetes`, each in a load balancer node's namespace, with the chart's
RBAC) program it, one of them wins the address's Lease and answers ARP for it, and a
client that has no route but its subnet reaches it. The announcing agent is killed and
its node drops off the segment: the other node takes over within 5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import kubernetes
import pytest

from tests.chart import chart_grants
from tests.k8s.cluster import KUBECTL, Cluster, wait_for
from tests.l2lab import L2Lab
from tests.lab import Proc
from tests.test_address_pools import CLASS, Api, pool, service
from tests.test_cluster_agent import AGENT_TOKEN, L2_LEASE_RULES, XDPLB, endpoint
from tests.test_operator import (
    SYSTEM_NS,
    Env,
    operator_cluster,
    operator_settings,
    running_operator,
)
from xdplb.agent.announcer import lease_name
from xdplb.dataplane.loader import ensure_bpffs

pytestmark = [
    pytest.mark.skipif(not KUBECTL.exists(), reason="run scripts/setup.sh for kubectl"),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("socat") is None,
                       reason="needs root for namespaces and XDP, and socat"),
]

PIN_ROOT = "/run/xdplb-k8s/bpf"
RELAY_PORT = 16444
BACKEND_PORT = 8080
L2_POOL = pool("flat", "10.70.0.100-10.70.0.109", namespaceSelector={}, announce="L2")
TAKEOVER_LIMIT = 5.0


class Node:
    """One load balancer node of the lab: its agent, reaching the API through a relay."""

    def __init__(self, lab: L2Lab, name: str, kubeconfig: Path) -> None:
        self.lab, self.name, self.kubeconfig = lab, name, kubeconfig
        self.pins = f"{PIN_ROOT}/l2-{lab.prefix}-{name}"
        self.log = lab.workdir / f"agent-{name}.log"
        self.proc: Proc | None = None

    def start(self) -> None:
        with open(self.log, "a") as out:
            self.proc = self.lab.popen(
                self.name, XDPLB, "agent", "--kubernetes", "--node-name", self.name,
                "--pin-dir", self.pins, "--detach-on-exit",
                "--lease-namespace", SYSTEM_NS,
                "--state-file", self.lab.workdir / f"{self.name}.json",
                env={**os.environ, "KUBECONFIG": str(self.kubeconfig)}, stdout=out,
                stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: nothing of the agent's own clean-up runs."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.lab.stop(self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.lab.stop(self.proc)

    def tail(self, n: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return f"---- agent {self.name} ----\n" + "\n".join(lines[-n:])

    def cleanup(self) -> None:
        self.stop()
        self.lab.exec(self.name, XDPLB, "agent", "--cleanup", "--pin-dir", self.pins,
                      check=False)
        shutil.rmtree(self.pins, ignore_errors=True)


def relay(lab: L2Lab, cluster: Cluster, host: list[subprocess.Popen[bytes]]) -> Path:
    """Let the nodes' namespaces reach the emulator (host loopback) through a Unix socket;
    returns the agents' kubeconfig."""
    sock = lab.workdir / "api.sock"
    port = cluster.url.rsplit(":", 1)[1]
    host.append(subprocess.Popen(["socat", f"UNIX-LISTEN:{sock},fork",
                                  f"TCP:127.0.0.1:{port}"]))
    wait_for("relay socket", sock.exists)
    for node in lab.NODES:
        lab.popen(node, "socat", f"TCP-LISTEN:{RELAY_PORT},bind=127.0.0.1,fork,reuseaddr",
                  f"UNIX-CONNECT:{sock}")
    config = lab.workdir / "kubeconfig-agents"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": f"http://127.0.0.1:{RELAY_PORT}"}}],
        "users": [{"name": "agent", "user": {"token": AGENT_TOKEN}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "agent"}}]}))
    return config


PROBE = """
import socket, sys, time
dst, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect((dst, port))
        print(time.monotonic_ns(), flush=True)
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
    finally:
        s.close()
sys.exit(1)
"""


@contextmanager
def l2_setup(tmp_path: Path, prefix: str
             ) -> Iterator[tuple[L2Lab, Cluster, Api, dict[str, Node]]]:
    ensure_bpffs(PIN_ROOT)
    lab = L2Lab(prefix).setup()
    relays: list[subprocess.Popen[bytes]] = []
    try:
        for b in lab.backends:
            lab.start_tcp_server(b, BACKEND_PORT)
        with Cluster(tmp_path) as cluster:
            operator_cluster(cluster, (L2_POOL,))
            account = cluster.emulator.grant(
                AGENT_TOKEN, f"system:serviceaccount:{SYSTEM_NS}:agent",
                chart_grants("agent", SYSTEM_NS))
            core = kubernetes.client.CoreV1Api(cluster.client())
            for node in lab.NODES:
                core.create_node({"metadata": {"name": node,
                                               "labels": {"kubernetes.io/os": "linux"}}})
            config = relay(lab, cluster, relays)
            nodes = {n: Node(lab, n, config) for n in lab.NODES}
            try:
                for n in nodes.values():
                    n.start()
                settings = operator_settings(cluster)
                with running_operator(cluster, settings) as state:
                    api = Api(Env(cluster, state, settings))
                    api.account = account  # type: ignore[attr-defined]
                    yield lab, cluster, api, nodes
            finally:  # while the API answers: the agents release what they hold
                for n in nodes.values():
                    n.cleanup()
    finally:
        for r in relays:
            r.terminate()
            r.wait(10)
        lab.close()


def web_service(api: Api, name: str, *backends: str, expose: bool = False) -> None:
    """A Service of the class with an EndpointSlice of ``backends`` (no controller makes
    one here). ``expose``: made as the README shows, from a Deployment by `kubectl expose`
    (one unnamed port)."""
    if expose:
        api.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": name, "namespace": "default"},
                   "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                       "metadata": {"labels": {"app": name}},
                       "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}})
        api.env.cluster.kubectl(
            "expose", "deployment", name, "--type=LoadBalancer", "--port", "80",
            "--target-port", str(BACKEND_PORT), "--overrides",
            json.dumps({"apiVersion": "v1", "spec": {"loadBalancerClass": CLASS}}))
    else:
        api.apply(service(name))
    api.env.admin.request("POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"{name}-1", "labels": {"kubernetes.io/service-name": name}},
        "ports": [{"name": "" if expose else "http", "port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": [endpoint(b) for b in backends]})


def announcer(api: Api, address: str) -> str:
    """The node whose NodeState reports announcing ``address`` (exactly one)."""
    states = api.admin.get("/apis/xdplb.io/v1alpha1/nodestates")["items"]
    holders = [s["metadata"]["name"] for s in states
               if any(a["address"] == address
                      for a in (s.get("status") or {}).get("announcements") or [])]
    return holders[0] if len(holders) == 1 else ""


def applied_on_both(api: Api, name: str) -> bool:
    states = api.admin.get("/apis/xdplb.io/v1alpha1/nodestates")["items"]
    return len(states) == 2 and all(
        any(e["name"] == name and e["phase"] == "Applied"
            for e in (s.get("status") or {}).get("loadBalancers") or []) for s in states)


def test_l2_announced_service_survives_its_announcer(tmp_path: Path) -> None:
    with l2_setup(tmp_path, "xq") as (lab, _cluster, api, nodes):
        def tails() -> str:
            return "\n".join(n.tail() for n in nodes.values())

        web_service(api, "web", L2Lab.backend_addr(1), L2Lab.backend_addr(2), expose=True)
        vip = api.wait_address("web")
        assert vip == "10.70.0.100"
        row = api.env.cluster.kubectl("get", "svc", "web").stdout.split("\n")[1].split()
        assert row[:5] == ["web", "LoadBalancer", "<none>", vip, "80/TCP"], row
        wait_for("web applied on both nodes", lambda: applied_on_both(api, "web"), timeout=60)
        first = wait_for("one announcer", lambda: announcer(api, vip), timeout=20)
        other = next(n for n in lab.NODES if n != first)
        lease = api.get(f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/"
                        f"{lease_name(vip)}")
        assert lease is not None and lease["spec"]["holderIdentity"] == first
        assert lease["metadata"]["ownerReferences"][0]["kind"] == "AddressPool"
        wait_for("status.addresses names the announcer", lambda: (
            (api.lb("default", "web") or {}).get("status", {}).get("addresses")
            == [{"address": vip, "pool": "flat", "announcedBy": first}]))
        assert api.wait_event("default", "web", "LoadBalancer", "Announced")["message"] \
            .startswith(f"{vip} is announced by node {first}")
        assert lab.local_routes(first).get(vip) and vip not in lab.local_routes(other)

        res = lab.tcp_clients("cli", vip, 80, count=20, concurrency=5)
        assert res["ok"], f"{res}\n{tails()}"
        assert set(res["tags"]) == {"b1", "b2"}, res["tags"]
        neigh = lab.neighbour("cli", vip)
        assert neigh is not None and neigh["lladdr"] == lab.mac(first, "front"), neigh

        # A second Service: another address, announced too, reachable too.
        web_service(api, "api", L2Lab.backend_addr(2))
        second = api.wait_address("api")
        assert second == "10.70.0.101"
        wait_for("api announced", lambda: announcer(api, second), timeout=30)
        res = lab.tcp_clients("cli", second, 80, count=5)
        assert res["ok"] and set(res["tags"]) == {"b2"}, f"{res}\n{tails()}"

        # The announcer's agent is killed and its node leaves the segment.
        probe = lab.popen("cli", "python3", "-c", PROBE, vip, "80", "20",
                          stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # the probe connects through the first node meanwhile
        killed = time.monotonic_ns()
        nodes[first].kill()
        lab.node_down(first)
        assert probe.stdout is not None
        probe.stdout.readline()  # its first success, before the kill
        back = lab.popen("cli", "python3", "-c", PROBE, vip, "80", "20",
                         stdout=subprocess.PIPE, text=True)
        out, _ = back.communicate(timeout=30)
        lab.stop(probe)
        assert back.returncode == 0, f"the VIP never came back\n{tails()}"
        takeover = (int(out.split()[0]) - killed) / 1e9
        print(f"L2 takeover (agent killed, node off the segment -> client connects):"
              f" {takeover:.2f} s")
        assert takeover <= TAKEOVER_LIMIT, f"{takeover:.2f} s\n{tails()}"
        neigh = lab.neighbour("cli", vip)
        assert neigh is not None and neigh["lladdr"] == lab.mac(other, "front"), neigh
        res = lab.tcp_clients("cli", vip, 80, count=10, concurrency=5)
        assert res["ok"] and set(res["tags"]) <= {"b1", "b2"}, f"{res}\n{tails()}"
        wait_for("the other node announces", lambda: announcer(api, vip) == other
                 or announcer(api, vip) == "", timeout=10)
        # The killed node's last report still lists it: the later takeover wins.
        wait_for("status names the new announcer", lambda: any(
            a["announcedBy"] == other
            for a in (api.lb("default", "web") or {}).get("status", {}).get("addresses", [])),
            timeout=10)

        # The first node comes back: its new agent finds the Lease taken, and withdraws the
        # route its killed predecessor left.
        assert lab.local_routes(first).get(vip), "the killed agent's route is still there"
        lab.node_up(first)
        nodes[first].start()
        wait_for("the stale route withdrawn", lambda: vip not in lab.local_routes(first),
                 timeout=30)
        time.sleep(1.0)  # a standby stays one
        assert vip not in lab.local_routes(first) and lab.local_routes(other).get(vip)
        res = lab.tcp_clients("cli", vip, 80, count=5)
        assert res["ok"], f"{res}\n{tails()}"

        # And it is a working standby: the other node goes the same way, the first takes
        # the address back.
        killed = time.monotonic_ns()
        nodes[other].kill()
        lab.node_down(other)
        back = lab.popen("cli", "python3", "-c", PROBE, vip, "80", "20",
                         stdout=subprocess.PIPE, text=True)
        out, _ = back.communicate(timeout=30)
        assert back.returncode == 0, f"the VIP never came back\n{tails()}"
        again = (int(out.split()[0]) - killed) / 1e9
        print(f"L2 takeover back to the restarted node: {again:.2f} s")
        assert again <= TAKEOVER_LIMIT, f"{again:.2f} s\n{tails()}"
        neigh = lab.neighbour("cli", vip)
        assert neigh is not None and neigh["lladdr"] == lab.mac(first, "front"), neigh

        # Every Lease rule of the agents' Role was needed.
        account = api.account  # type: ignore[attr-defined]
        assert L2_LEASE_RULES.isdisjoint(account.unused()), account.unused()


KERNEL_OPS = """
import sys
from xdplb.agent.l2 import Kernel
k, op, address = Kernel(), sys.argv[1], sys.argv[2]
if op == "add":
    k.add(address)
elif op == "remove":
    k.remove(address)
elif op == "garp":
    print(k.garp(address, sys.argv[3:]))
print(sorted(k.ours()))
"""


def test_the_kernel_answers_arp_for_a_local_route_and_garp_moves_neighbours() -> None:
    """l2.Kernel for real: a local route makes the node answer ARP (and, with no XDP here,
    pings) for the address; without it nobody does; a gratuitous ARP moves a neighbour
    entry the client already has to the sender's MAC."""
    vip = "10.70.0.105"
    with L2Lab("xr") as lab:
        def kernel(node: str, *args: str) -> str:
            return lab.exec(node, sys.executable, "-c", KERNEL_OPS, *args).stdout.strip()

        def ping() -> bool:
            lab.exec("cli", "ip", "neigh", "flush", "dev", "front")
            return lab.exec("cli", "ping", "-c1", "-W1", vip, check=False).returncode == 0

        assert not ping()
        assert kernel("n1", "add", vip) == f"['{vip}']"
        assert lab.local_routes("n1") == {vip: "182"}  # RTPROT_XDPLB_L2, 0xb6
        assert ping()
        assert lab.neighbour("cli", vip)["lladdr"] == lab.mac("n1", "front")  # type: ignore[index]
        assert kernel("n1", "remove", vip) == "[]"
        assert not ping()
        # The client holds a stale entry with n1's MAC; n2's gratuitous ARP moves it.
        lab.exec("cli", "ip", "neigh", "replace", vip, "lladdr", lab.mac("n1", "front"),
                 "dev", "front", "nud", "stale")
        assert kernel("n2", "garp", vip, "front").startswith("[]")
        entry = wait_for("the entry moved", lambda: (
            e := lab.neighbour("cli", vip)) and e["lladdr"] == lab.mac("n2", "front") and e)
        assert entry["dst"] == vip
