"""A Service of type LoadBalancer on a flat network, end to end: the operator (real kopf,
in this process) allocates an address of each family from a pool with ``announce: L2``
(a dual-stack Service), two agents (`xdplb agent --kubernetes`, each in a load balancer
node's namespace, with the chart's RBAC) program them, one node wins each address's
Lease and answers ARP or Neighbour Solicitations for it, and a client that has no route
but its subnets reaches both. The announcing agent is killed and its node drops off the
segment: the other node takes over within 5 s.
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
L2_POOL = pool("flat", "10.70.0.100-10.70.0.109", "fd70::100-fd70::109", namespaceSelector={},
               announce="L2")
DUAL = {"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"]}
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
    s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
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
def l2_setup(tmp_path: Path, prefix: str, ipv6: bool = False
             ) -> Iterator[tuple[L2Lab, Cluster, Api, dict[str, Node]]]:
    ensure_bpffs(PIN_ROOT)
    lab = L2Lab(prefix, ipv6=ipv6).setup()
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


def web_service(api: Api, name: str, *backends: str, expose: bool = False,
                backends6: tuple[str, ...] = ()) -> None:
    """A Service of the class with an EndpointSlice of ``backends`` (no controller makes
    one here). ``expose``: made as the README shows, from a Deployment by `kubectl expose`
    (one unnamed port). ``backends6``: dual-stack, with an IPv6 slice of those."""
    spec = {"loadBalancerClass": CLASS, **(DUAL if backends6 else {})}
    if expose:
        api.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": name, "namespace": "default"},
                   "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                       "metadata": {"labels": {"app": name}},
                       "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}})
        api.env.cluster.kubectl(
            "expose", "deployment", name, "--type=LoadBalancer", "--port", "80",
            "--target-port", str(BACKEND_PORT), "--overrides",
            json.dumps({"apiVersion": "v1", "spec": spec}))
    else:
        api.apply(service(name, **(DUAL if backends6 else {})))
    for family, addresses in (("IPv4", backends), ("IPv6", backends6)):
        if not addresses:
            continue
        api.env.admin.request(
            "POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "addressType": family, "metadata": {
                    "name": f"{name}-{family.lower()}",
                    "labels": {"kubernetes.io/service-name": name}},
                "ports": [{"name": "" if expose else "http", "port": BACKEND_PORT,
                           "protocol": "TCP"}],
                "endpoints": [endpoint(b) for b in addresses]})


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


def takeovers(lab: L2Lab, vips: tuple[str, ...], killed: int, tails: str) -> list[float]:
    """Seconds from ``killed`` until a client connects to each of ``vips`` again."""
    probes = [lab.popen("cli", "python3", "-c", PROBE, vip, "80", "20",
                        stdout=subprocess.PIPE, text=True) for vip in vips]
    took = []
    for vip, probe in zip(vips, probes, strict=True):
        out, _ = probe.communicate(timeout=30)
        assert probe.returncode == 0, f"{vip} never came back\n{tails}"
        took.append((int(out.split()[0]) - killed) / 1e9)
    return took


def test_l2_announced_service_survives_its_announcer(tmp_path: Path) -> None:
    with l2_setup(tmp_path, "xq", ipv6=True) as (lab, _cluster, api, nodes):
        def tails() -> str:
            return "\n".join(n.tail() for n in nodes.values())

        web_service(api, "web", L2Lab.backend_addr(1), L2Lab.backend_addr(2), expose=True,
                    backends6=(L2Lab.backend6_addr(1), L2Lab.backend6_addr(2)))
        vips = tuple(wait_for("both addresses", lambda: len(i := api.ingress("web")) == 2
                              and [a["ip"] for a in i]))
        vip, vip6 = vips
        assert vips == ("10.70.0.100", "fd70::100")
        row = api.env.cluster.kubectl("get", "svc", "web").stdout.split("\n")[1].split()
        assert row[:5] == ["web", "LoadBalancer", "<none>", f"{vip},{vip6}", "80/TCP"], row
        wait_for("web applied on both nodes", lambda: applied_on_both(api, "web"), timeout=60)
        first = wait_for("one announcer", lambda: announcer(api, vip), timeout=20)
        first6 = wait_for("one IPv6 announcer", lambda: announcer(api, vip6), timeout=20)
        other = next(n for n in lab.NODES if n != first)
        lease = api.get(f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/"
                        f"{lease_name(vip)}")
        assert lease is not None and lease["spec"]["holderIdentity"] == first
        assert lease["metadata"]["ownerReferences"][0]["kind"] == "AddressPool"
        wait_for("status.addresses names the announcers", lambda: (
            (api.lb("default", "web") or {}).get("status", {}).get("addresses")
            == [{"address": vip, "pool": "flat", "announcedBy": first},
                {"address": vip6, "pool": "flat", "announcedBy": first6}]))
        assert api.wait_event("default", "web", "LoadBalancer", "Announced")["message"] \
            .startswith(f"{vip} is announced by node {first}")
        assert lab.local_routes(first).get(vip) and vip not in lab.local_routes(other)
        assert lab.proxies(first6) == [f"{vip6} front"]

        for address in vips:  # each family through its own slice's backends
            res = lab.tcp_clients("cli", address, 80, count=20, concurrency=5)
            assert res["ok"], f"{address}: {res}\n{tails()}"
            assert set(res["tags"]) == {"b1", "b2"}, res["tags"]
        neigh = lab.neighbour("cli", vip)
        assert neigh is not None and neigh["lladdr"] == lab.mac(first, "front"), neigh
        neigh = lab.neighbour("cli", vip6)
        assert neigh is not None and neigh["lladdr"] == lab.mac(first6, "front"), neigh

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
        lab.stop(probe)
        took = takeovers(lab, vips, killed, tails())
        print(f"L2 takeover (agent killed, node off the segment -> client connects):"
              f" IPv4 {took[0]:.2f} s, IPv6 {took[1]:.2f} s"
              + ("" if first6 == first else " (IPv6 was announced by the other node)"))
        assert max(took) <= TAKEOVER_LIMIT, f"{took}\n{tails()}"
        for address in vips:
            neigh = lab.neighbour("cli", address)
            assert neigh is not None and neigh["lladdr"] == lab.mac(other, "front"), neigh
            res = lab.tcp_clients("cli", address, 80, count=10, concurrency=5)
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
        wait_for("the stale routes withdrawn", lambda: not set(vips) & set(
            lab.local_routes(first)) and not lab.proxies(first), timeout=30)
        time.sleep(1.0)  # a standby stays one
        assert vip not in lab.local_routes(first) and lab.local_routes(other).get(vip)
        assert lab.proxies(other) == [f"{vip6} front"]
        res = lab.tcp_clients("cli", vip, 80, count=5)
        assert res["ok"], f"{res}\n{tails()}"

        # And it is a working standby: the other node goes the same way, the first takes
        # both addresses back.
        killed = time.monotonic_ns()
        nodes[other].kill()
        lab.node_down(other)
        again = takeovers(lab, vips, killed, tails())
        print(f"L2 takeover back to the restarted node: IPv4 {again[0]:.2f} s,"
              f" IPv6 {again[1]:.2f} s")
        assert max(again) <= TAKEOVER_LIMIT, f"{again}\n{tails()}"
        for address in vips:
            neigh = lab.neighbour("cli", address)
            assert neigh is not None and neigh["lladdr"] == lab.mac(first, "front"), neigh

        # Every Lease rule of the agents' Role was needed.
        account = api.account  # type: ignore[attr-defined]
        assert L2_LEASE_RULES.isdisjoint(account.unused()), account.unused()


KERNEL_OPS = """
import sys
from xdplb.agent.l2 import Kernel
k, op, address = Kernel(), sys.argv[1], sys.argv[2]
if op == "add":
    print(k.add(address, tuple(sys.argv[3:])))
elif op == "remove":
    k.remove(address)
elif op == "garp":
    print(k.garp(address, sys.argv[3:]))
print(sorted(k.ours()))
"""


def test_the_kernel_answers_arp_and_ns_and_announcements_move_neighbours() -> None:
    """l2.Kernel for real: a local route makes the node answer ARP (and, with no XDP here,
    pings) for the address; for IPv6 the proxy entry on the interface answers Neighbour
    Solicitations; without them nobody does; a gratuitous ARP, or an unsolicited
    Neighbour Advertisement, moves a neighbour entry the client already has to the
    sender's MAC."""
    vip, vip6 = "10.70.0.105", "fd70::105"
    with L2Lab("xr", ipv6=True) as lab:
        def kernel(node: str, *args: str) -> str:
            return lab.exec(node, sys.executable, "-c", KERNEL_OPS, *args).stdout.strip()

        def ping(address: str) -> bool:
            lab.exec("cli", "ip", "neigh", "flush", "dev", "front")
            return lab.exec("cli", "ping", "-c1", "-W1", address, check=False).returncode == 0

        assert not ping(vip) and not ping(vip6)
        assert kernel("n1", "add", vip) == f"[]\n['{vip}']"
        assert lab.local_routes("n1") == {vip: "182"}  # RTPROT_XDPLB_L2, 0xb6
        assert ping(vip)
        assert lab.neighbour("cli", vip)["lladdr"] == lab.mac("n1", "front")  # type: ignore[index]
        assert kernel("n1", "remove", vip) == "[]"
        assert not ping(vip)

        # IPv6: the local route and a proxy entry on front, answered at once.
        assert kernel("n1", "add", vip6, "front").startswith("[]")
        assert lab.local_routes("n1") == {vip6: "182"}
        assert lab.proxies("n1") == [f"{vip6} front"]
        assert lab.exec("n1", "sysctl", "-n", "net.ipv6.neigh.front.proxy_delay").stdout \
            .strip() == "0"
        assert ping(vip6)
        entry = lab.neighbour("cli", vip6)
        assert entry is not None and entry["lladdr"] == lab.mac("n1", "front"), entry
        assert kernel("n1", "remove", vip6) == "[]"
        assert lab.proxies("n1") == [] and lab.local_routes("n1") == {}
        assert not ping(vip6)

        # The client holds a stale entry with n1's MAC; n2's announcement moves it.
        for address in (vip, vip6):
            lab.exec("cli", "ip", "neigh", "replace", address, "lladdr", lab.mac("n1", "front"),
                     "dev", "front", "nud", "stale")
            assert kernel("n2", "garp", address, "front").startswith("[]")
            moved = wait_for(f"the entry of {address} moved", lambda a=address: (  # type: ignore[misc]
                e := lab.neighbour("cli", a)) and e["lladdr"] == lab.mac("n2", "front") and e)
            assert moved["dst"] == address
