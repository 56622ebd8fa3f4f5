"""Kubernetes mode against the API emulator of the tests (tests/k8s): the cluster
agent runs as its own process (`xdplb agent --kubernetes`, found through
KUBECONFIG), its maps on a bpffs, its listeners on an interface the node does
not have (maps are written, nothing is attached).

  scale    --lbs LoadBalancers of --routes source CIDRs each, created through the
           API: time until the agent logs every one applied, and its VmRSS/VmHWM
  latency  --changes one-route changes, each a `kubectl apply` of one object:
           time from running kubectl until the agent logs that generation applied
           (the line follows the map writes), p50/p99; kubectl's own time beside it
  restart  a new agent with all of them in the API (the pins of the last one
           adopted): time from its start until it logs every one applied, its VmRSS

Every round starts a fresh emulator and agent.

    sudo .venv/bin/python bench/k8s.py [--rounds 5] [--lbs 100] [--routes 1000] [--changes 100]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    PIN_BASE,
    ROOT,
    BenchError,
    fmt_stat,
    header,
    mount_bpffs,
    require_root,
    table,
    wait_until,
)

from tests.k8s.cluster import KUBECTL, Cluster, crd_manifests

# Admits the LoadBalancers' addresses (192.0.2.0 ..): without a pool they are refused.
OPEN_POOL = {"apiVersion": "xdplb.io/v1alpha1", "kind": "AddressPool",
             "metadata": {"name": "bench"},
             "spec": {"addresses": ["192.0.0.0/16"], "namespaceSelector": {}}}

NODE = "bench-node"


def lb(i: int, routes: int, changed: int | None = None) -> dict[str, Any]:
    cidrs = [f"10.{64 + j // 256}.{j % 256}.0/24" for j in range(routes)]
    if changed is not None:
        cidrs[0] = f"172.{16 + changed // 256}.{changed % 256}.0/24"
    return {
        "apiVersion": "xdplb.io/v1alpha1", "kind": "LoadBalancer",
        "metadata": {"name": f"lb-{i}", "namespace": "default"},
        "spec": {"interfaces": ["xkb-none"], "listeners": [{
            "name": "http", "protocol": "TCP", "port": 80,
            "address": f"192.0.{2 + i // 250}.{i % 250 + 1}",
            "backends": [{"address": "10.20.1.2", "port": 8080}],
            "sourceRoutes": [{"cidr": c, "backends": [{"address": "10.20.3.2", "port": 8080}]}
                             for c in cidrs]}]},
    }


def applied_lines(log: Path, offset: int = 0) -> list[tuple[str, int]]:
    text = log.read_text()[offset:]
    return [(m[1], int(m[2])) for m in re.finditer(
        r"applied default/(lb-\d+) generation (\d+):", text)]


def memory(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def one_round(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="xdplb-k8s-bench-"))
    pins = f"{PIN_BASE}/k8s"
    shutil.rmtree(pins, ignore_errors=True)
    with Cluster(work) as cluster:
        cluster.kubectl("apply", *[x for f in crd_manifests() for x in ("-f", str(f))])
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(OPEN_POOL))
        import kubernetes

        api = cluster.client()
        kubernetes.client.CoreV1Api(api).create_node({"metadata": {"name": NODE}})
        custom = kubernetes.client.CustomObjectsApi(api)
        log = work / "agent.log"
        env = {**os.environ, "KUBECONFIG": str(cluster.admin_kubeconfig)}

        def start_agent(log: Path) -> subprocess.Popen[bytes]:
            with open(log, "w") as out:
                return subprocess.Popen(
                    [str(ROOT / ".venv/bin/xdplb"), "agent", "--kubernetes", "--node-name",
                     NODE, "--pin-dir", pins, "--state-file", str(work / "agent.json")],
                    stdout=out, stderr=subprocess.STDOUT, env=env)

        agent = start_agent(log)
        try:
            wait_until(lambda: "started in" in log.read_text(), "the agent to start", 120)
            t0 = time.monotonic()
            for i in range(a.lbs):
                custom.create_namespaced_custom_object("xdplb.io", "v1alpha1", "default",
                                                       "loadbalancers", lb(i, a.routes))
            created = time.monotonic() - t0
            wait_until(lambda: len({n for n, _g in applied_lines(log)}) >= a.lbs,
                       f"{a.lbs} LoadBalancers applied", 600)
            scale_s = time.monotonic() - t0
            rss, hwm = memory(agent.pid)

            latencies, kubectl_s = [], []
            kenv = {**env, "HOME": str(work)}
            for c in range(a.changes):
                i = c % a.lbs
                doc = json.dumps(lb(i, a.routes, changed=c))
                mark = len(log.read_text())
                t1 = time.monotonic()
                res = subprocess.run([str(KUBECTL), "apply", "-f", "-"], input=doc, text=True,
                                     capture_output=True, env=kenv, timeout=60)
                t2 = time.monotonic()
                if res.returncode != 0:
                    raise BenchError(f"kubectl apply: {res.stderr}")
                wait_until(lambda i=i, mark=mark: any(n == f"lb-{i}" for n, _g in
                                                      applied_lines(log, mark)),
                           f"change {c} applied", 60, interval=0.005)
                latencies.append(time.monotonic() - t1)
                kubectl_s.append(t2 - t1)

            agent.terminate()
            agent.wait(30)
            log = work / "agent-restart.log"
            t3 = time.monotonic()
            agent = start_agent(log)
            wait_until(lambda: len({n for n, _g in applied_lines(log)}) >= a.lbs,
                       f"{a.lbs} LoadBalancers applied after a restart", 600)
            restart_s = time.monotonic() - t3
            restart_rss, _ = memory(agent.pid)
        finally:
            agent.terminate()
            agent.wait(30)
            shutil.rmtree(pins, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    lat = sorted(latencies)
    return {"create_s": created, "scale_s": scale_s, "lag_s": scale_s - created,
            "restart_s": restart_s, "restart_rss": restart_rss, "rss": rss, "hwm": hwm,
            "p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "kubectl": statistics.median(kubectl_s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lbs", type=int, default=100)
    ap.add_argument("--routes", type=int, default=1000, help="source CIDRs per LoadBalancer")
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=None, help="unused (common flag)")
    a = ap.parse_args()
    require_root()
    if not KUBECTL.exists():
        sys.exit("kubectl not found: run scripts/setup.sh")
    mount_bpffs()
    rounds = []
    for r in range(a.rounds):
        rounds.append(one_round(a))
        print(f"round {r + 1}: {rounds[-1]}", file=sys.stderr, flush=True)

    def col(k: str, scale: float = 1.0, digits: int = 2) -> str:
        return fmt_stat([x[k] * scale for x in rounds], digits)

    print(header("xdplb in Kubernetes mode (API emulator, cluster agent process)", "none",
                 [f"{a.rounds} rounds, a fresh emulator and agent each; {a.lbs} LoadBalancers "
                  f"x {a.routes} source CIDRs; {a.changes} one-route changes by kubectl apply"]))
    print()
    print(table(["measure", "median (min–max)", "goal"], [
        [f"{a.lbs} LoadBalancers created through the API (s)", col("create_s"), "—"],
        ["creation start -> all applied by the agent (s)", col("scale_s"), "—"],
        ["  last creation -> all applied (s)", col("lag_s"), "—"],
        ["agent VmRSS once applied (MB)", col("rss", digits=0), "< 300 MB"],
        ["agent VmHWM (MB)", col("hwm", digits=0), "—"],
        ["agent restarted: start -> all applied (s)", col("restart_s"), "< 5 s"],
        ["  its VmRSS then (MB)", col("restart_rss", digits=0), "< 300 MB"],
        ["kubectl apply -> maps written, p50 (ms)", col("p50", 1000, 0), "—"],
        ["kubectl apply -> maps written, p99 (ms)", col("p99", 1000, 0), "< 1000 ms"],
        ["  of which kubectl itself, median (ms)", col("kubectl", 1000, 0), "—"],
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
