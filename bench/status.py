"""Status writes of the operator: do they grow with changes, or with nodes × objects?

The real operator (`xdplb operator`, a process of its own, finding the API
through KUBECONFIG) against the API emulator of the tests, with --lbs
LoadBalancers on N simulated nodes for each N of --nodes. The bench plays the
agents: each node's NodeState lists every LoadBalancer as applied, written as
the agent writes it (on a change, at most once a second, and a heartbeat every
10 s otherwise). Per N, after every LoadBalancer reports Programmed N/N:

  steady   --seconds with heartbeats only
  changes  --seconds with one LoadBalancer spec change per second; every node
           reports the new generation after a random 0.1-2 s

A status write is a change of a LoadBalancer that leaves its generation as it
was (the emulator's event log tells them apart from spec changes). Reported
per minute, and per spec change.

    sudo .venv/bin/python bench/status.py [--rounds 5] [--lbs 100] [--nodes 10,100] [--seconds 30]
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, fmt_stat, header, require_root, table, wait_until

from tests.k8s.cluster import Cluster
from xdplb.k8s.nodestate import rfc3339

# Admits the LoadBalancers' addresses (192.0.2.0 ..): without a pool they are refused.
OPEN_POOL = {"apiVersion": "xdplb.io/v1alpha1", "kind": "AddressPool",
             "metadata": {"name": "bench"},
             "spec": {"addresses": ["192.0.0.0/16"], "namespaceSelector": {}}}

GROUP, VERSION = "xdplb.io", "v1alpha1"
HEARTBEAT = 10.0  # seconds, as the agent (ClusterOptions.heartbeat_seconds)
MIN_WRITE = 1.0   # at most one NodeState write per node per second, as the agent


def lb_doc(i: int, weight: int = 1) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoadBalancer",
            "metadata": {"name": f"lb-{i}", "namespace": "default"},
            "spec": {"listeners": [{
                "name": "http", "protocol": "TCP", "port": 80,
                "address": f"192.0.{2 + i // 250}.{i % 250 + 1}",
                "backends": [{"address": "10.20.1.2", "port": 8080, "weight": weight},
                             {"address": "10.20.2.2", "port": 8080}]}]}}


class Agents:
    """N simulated agents: what each node reports, written as the agent writes it."""

    def __init__(self, custom: Any, nodes: list[str], lbs: dict[str, dict[str, Any]]) -> None:
        self.custom = custom
        self.nodes = nodes
        self.generation = {n: {name: 1 for name in lbs} for n in nodes}
        self.uids = {name: lb["metadata"]["uid"] for name, lb in lbs.items()}
        self.dirty: set[str] = set(nodes)
        self.last_write = {n: -1e9 for n in nodes}
        self.pending: list[tuple[float, str, str, int]] = []  # (due, node, lb, generation)
        self.writes = 0

    def report_later(self, name: str, generation: int, rng: random.Random) -> None:
        now = time.monotonic()
        for n in self.nodes:
            heapq.heappush(self.pending, (now + rng.uniform(0.1, 2.0), n, name, generation))

    def tick(self) -> None:
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            _, n, name, generation = heapq.heappop(self.pending)
            self.generation[n][name] = generation
            self.dirty.add(n)
        for n in self.nodes:
            since = now - self.last_write[n]
            if (n in self.dirty and since >= MIN_WRITE) or since >= HEARTBEAT:
                self.write(n)

    def write(self, n: str) -> None:
        status = {"heartbeatTime": rfc3339(datetime.datetime.now(datetime.UTC)),
                  "mode": "native", "interfaces": [{"name": "eth0", "mode": "native",
                                                    "attached": True}],
                  "loadBalancers": [
                      {"namespace": "default", "name": name, "uid": self.uids[name],
                       "generation": g, "phase": "Applied", "listeners": 1, "backends": 2}
                      for name, g in sorted(self.generation[n].items())]}
        self.custom.patch_cluster_custom_object_status(GROUP, VERSION, "nodestates", n,
                                                       {"status": status})
        self.dirty.discard(n)
        self.last_write[n] = time.monotonic()
        self.writes += 1


def status_writes(cluster: Cluster, since: int) -> int:
    """Changes of LoadBalancers after revision `since` that kept their generation."""
    generation: dict[str, int] = {}
    count = 0
    for rev, res, kind, obj in list(cluster.emulator.log):
        if res[2] != "loadbalancers":
            continue
        name, g = obj["metadata"]["name"], obj["metadata"].get("generation")
        if rev > since and kind == "MODIFIED" and generation.get(name) == g:
            count += 1
        generation[name] = g
    return count


def one_run(n_nodes: int, a: argparse.Namespace, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="xdplb-status-bench-"))
    with Cluster(work) as cluster:
        cluster.apply_crds()
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(OPEN_POOL))
        import kubernetes

        api = cluster.client()
        core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
        nodes = [f"node-{i}" for i in range(n_nodes)]
        for n in nodes:
            core.create_node({"metadata": {"name": n, "labels": {"kubernetes.io/os": "linux"}}})
        env = {**os.environ, "KUBECONFIG": str(cluster.admin_kubeconfig)}
        env.pop("POD_NAMESPACE", None)
        log = open(work / "operator.log", "w")  # closed below
        op = subprocess.Popen([str(ROOT / ".venv/bin/xdplb"), "operator"], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
        try:
            lbs = {}
            for i in range(a.lbs):
                obj = custom.create_namespaced_custom_object(GROUP, VERSION, "default",
                                                             "loadbalancers", lb_doc(i))
                lbs[obj["metadata"]["name"]] = obj
            for n in nodes:
                custom.create_cluster_custom_object(GROUP, VERSION, "nodestates", {
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "NodeState",
                    "metadata": {"name": n}})
            agents = Agents(custom, nodes, lbs)

            def programmed() -> bool:
                agents.tick()
                items = custom.list_namespaced_custom_object(GROUP, VERSION, "default",
                                                             "loadbalancers")["items"]
                return all(((o.get("status") or {}).get("nodes") or {}).get("summary")
                           == f"{n_nodes}/{n_nodes}" for o in items)

            wait_until(programmed, f"every LoadBalancer Programmed on {n_nodes} nodes", 180,
                       interval=0.2)

            def window(change: bool) -> tuple[int, int, int]:
                mark = cluster.emulator.revision
                writes0, end, changes = agents.writes, time.monotonic() + a.seconds, 0
                next_change = time.monotonic()
                while time.monotonic() < end:
                    if change and time.monotonic() >= next_change:
                        i = rng.randrange(a.lbs)
                        obj = custom.patch_namespaced_custom_object(
                            GROUP, VERSION, "default", "loadbalancers", f"lb-{i}",
                            {"spec": lb_doc(i, weight=rng.randrange(2, 100))["spec"]})
                        agents.report_later(f"lb-{i}", obj["metadata"]["generation"], rng)
                        changes += 1
                        next_change += 1.0
                    agents.tick()
                    time.sleep(0.05)
                return status_writes(cluster, mark), agents.writes - writes0, changes

            steady, steady_reports, _ = window(change=False)
            changed, changed_reports, changes = window(change=True)
        finally:
            op.terminate()
            op.wait(30)
            log.close()
    minutes = a.seconds / 60
    return {"steady": steady / minutes, "steady_reports": steady_reports / minutes,
            "changes": changes / minutes, "changed": changed / minutes,
            "changed_reports": changed_reports / minutes,
            "per_change": changed / max(changes, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lbs", type=int, default=100)
    ap.add_argument("--nodes", default="10,100", help="node counts, comma-separated")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each window")
    a = ap.parse_args()
    require_root()
    counts = [int(x) for x in a.nodes.split(",")]
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for r in range(a.rounds):
        for n in counts if r % 2 == 0 else counts[::-1]:
            runs[n].append(one_run(n, a, seed=r))
            print(f"round {r + 1}, {n} nodes: {runs[n][-1]}", file=sys.stderr, flush=True)

    print(header("xdplb operator: LoadBalancer status writes (API emulator, operator process)",
                 "none", [f"{a.rounds} rounds, {a.lbs} LoadBalancers, a fresh emulator and "
                          f"operator per run; windows of {a.seconds:.0f} s"]))
    rows = []
    for n in counts:
        def col(k: str, n: int = n, digits: int = 1) -> str:
            return fmt_stat([x[k] for x in runs[n]], digits)
        rows += [
            [f"{n} nodes, heartbeats only: status writes/min", col("steady")],
            ["  NodeState writes/min by the agents", col("steady_reports", digits=0)],
            [f"{n} nodes, spec changes/min", col("changes", digits=0)],
            ["  status writes/min", col("changed")],
            ["  status writes per spec change", col("per_change", digits=2)],
            ["  NodeState writes/min by the agents", col("changed_reports", digits=0)],
        ]
    print()
    print(table(["measure", "median (min–max)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
