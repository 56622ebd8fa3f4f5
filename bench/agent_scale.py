"""The agent at scale: cold start, 10 LoadBalancers × 10,000 source CIDRs, and
the cost of a one-route change.

Per round, in the lab's lb namespace (tests/lab.py, prefix "xb"):
  cold start   agent with one small LoadBalancer: time from process start to
               both interfaces attached, beside the agent's own
               "compiled and loaded" / "started" figures
  scale        agent with --lbs × --routes source CIDRs: time from process
               start to the "applied" line (every route written), agent RSS
               (VmRSS, VmHWM) once applied
  one route    one CIDR of one LoadBalancer changed in the file: entries
               written/deleted and bpf(2) syscalls from the "applied" line,
               and the time from the file write to that line

    sudo .venv/bin/python bench/agent_scale.py [--rounds 5] [--lbs 10] [--routes 10000]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    PIN_BASE,
    ROOT,
    fmt_stat,
    header,
    mount_bpffs,
    require_root,
    table,
)

from tests.lab import Lab

APPLIED = re.compile(r"applied \S+: listeners=(\d+) backends=(\d+) routes=(\d+) "
                     r"entries_written=(\d+) entries_deleted=(\d+) syscalls=(\d+) ms=([\d.]+)")
INTERFACES = ("lb-cli", "lb-cli2")


def manifest(lbs: int, routes: int, changed: bool = False) -> str:
    docs = []
    for i in range(lbs):
        lines = [
            "apiVersion: xdplb.io/v1alpha1",
            "kind: LoadBalancer",
            f"metadata: {{name: lb{i}, namespace: default}}",
            "spec:",
            f"  interfaces: [{', '.join(INTERFACES)}]",
            "  listeners:",
            "  - name: tcp",
            "    protocol: TCP",
            "    port: 80",
            f"    address: 192.0.2.{10 + i}",
            "    backends: [{address: 10.20.1.2, port: 8080}, {address: 10.20.2.2, port: 8080}]",
        ]
        if routes:
            lines.append("    sourceRoutes:")
        for j in range(routes):
            cidr = f"{100 + i}.{j >> 8}.{j & 255}.0/24"
            if changed and i == 0 and j == 0:
                cidr = f"{100 + i}.200.0.0/24"
            lines.append(f"    - {{cidr: {cidr}, backends: [{{address: 10.20.{1 + j % 2}.2, "
                         f"port: 8080}}]}}")
        docs.append("\n".join(lines))
    return "\n---\n".join(docs) + "\n"


class AgentRun:
    def __init__(self, lab: Lab, config: Path, tag: str) -> None:
        self.lab = lab
        self.log = lab.workdir / f"agent-{tag}.log"
        self.t0 = time.monotonic()
        with open(self.log, "w") as out:
            self.proc = lab.popen("lb", ROOT / ".venv/bin/xdplb", "agent", "--config", config,
                                  "--xdp-mode", "native", "--pin-dir", f"{PIN_BASE}/scale",
                                  "--state-file", lab.workdir / f"agent-{tag}.json",
                                  stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, cond: Any, what: str, timeout: float = 300) -> float:
        """Seconds since start when cond(log text) first held."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond(self.text()):
                return time.monotonic() - self.t0
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"agent: no {what}:\n{self.text()[-3000:]}")

    def applied(self) -> list[tuple[int, ...]]:
        return [tuple(int(float(x)) if "." not in x else float(x)  # type: ignore[misc]
                      for x in m.groups()) for m in APPLIED.finditer(self.text())]

    def status(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])  # kB
        return out

    def stop(self) -> None:
        self.lab.stop(self.proc)


def ms_in_log(text: str, what: str) -> float:
    m = re.search(rf"{what} in (\d+) ms", text)
    return float(m.group(1)) if m else float("nan")


def cold_start(lab: Lab) -> dict[str, float]:
    cfg = lab.workdir / "small.yaml"
    cfg.write_text(manifest(1, 0))
    run = AgentRun(lab, cfg, "cold")
    try:
        t = run.wait(lambda s: s.count("attached to") >= len(INTERFACES), "attach")
        mem = run.status()
        run.wait(lambda s: "started in" in s, "started line")  # logged after the attach
        text = run.text()
        modes = set(re.findall(r"attached to \S+: XDP (\w+) mode", text))
        return {"attached_s": t, "loaded_ms": ms_in_log(text, "compiled and loaded"),
                "started_ms": ms_in_log(text, "started"), "mode": ",".join(sorted(modes)),
                "rss_mb": mem["VmRSS"] / 1024, "file_mb": mem["RssFile"] / 1024}
    finally:
        run.stop()


def scale(lab: Lab, lbs: int, routes: int) -> dict[str, Any]:
    cfg = lab.workdir / "scale.yaml"
    cfg.write_text(manifest(lbs, routes))
    run = AgentRun(lab, cfg, "scale")
    try:
        t_live = run.wait(lambda s: "applied" in s and s.count("attached to") >= len(INTERFACES),
                          "applied line", timeout=600)
        first = run.applied()[0]
        if first[2] != lbs * routes:
            raise RuntimeError(f"applied {first[2]} routes, expected {lbs * routes}")
        mem = run.status()
        # One route changed; the agent polls the file every 0.2 s.
        t0 = time.monotonic()
        tmp = cfg.with_suffix(".tmp")
        tmp.write_text(manifest(lbs, routes, changed=True))
        tmp.replace(cfg)
        end = time.monotonic() + 900
        while len(run.applied()) < 2:
            if time.monotonic() > end:
                raise RuntimeError(f"no second applied line:\n{run.text()[-2000:]}")
            time.sleep(0.01)
        t_change = time.monotonic() - t0
        second = run.applied()[1]
        return {"live_s": t_live, "apply_ms": first[6], "rss_mb": mem["VmRSS"] / 1024,
                "file_mb": mem["RssFile"] / 1024,
                "hwm_mb": mem["VmHWM"] / 1024, "written": second[3], "deleted": second[4],
                "syscalls": second[5], "change_ms": second[6], "change_wall_s": t_change,
                "first_written": first[3], "first_syscalls": first[5]}
    finally:
        run.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lbs", type=int, default=10)
    ap.add_argument("--routes", type=int, default=10_000, help="source CIDRs per LoadBalancer")
    ap.add_argument("--seconds", type=float, default=None, help="unused (common flag)")
    a = ap.parse_args()
    require_root()
    mount_bpffs()
    cold: list[dict[str, Any]] = []
    big: list[dict[str, Any]] = []
    for rnd in range(a.rounds):
        with Lab(backends=2, prefix="xb") as lab:
            steps = [("cold", lambda lab=lab: cold.append(cold_start(lab))),
                     ("scale", lambda lab=lab: big.append(scale(lab, a.lbs, a.routes)))]
            for _name, step in steps if rnd % 2 == 0 else steps[::-1]:
                step()
        print(f"round {rnd + 1}: cold start {cold[-1]['attached_s']:.2f} s; "
              f"{a.lbs * a.routes} routes live after {big[-1]['live_s']:.2f} s, "
              f"RSS {big[-1]['rss_mb']:.0f} MB; one-route change: "
              f"{big[-1]['written']} written, {big[-1]['syscalls']} syscalls",
              file=sys.stderr, flush=True)

    print(header("xdplb agent at scale",
                 ",".join(sorted({c["mode"] for c in cold})) + f" (on {', '.join(INTERFACES)})",
                 [f"{a.rounds} rounds (cold-start and scale steps alternated), a fresh lab per "
                  f"round; scale: {a.lbs} LoadBalancers × {a.routes:,} source CIDRs = "
                  f"{a.lbs * a.routes:,} routes"]))
    rows = [
        ["cold start: process start -> both interfaces attached (s)",
         fmt_stat([c["attached_s"] for c in cold], 2)],
        ["  agent log: compiled and loaded (ms)", fmt_stat([c["loaded_ms"] for c in cold], 0)],
        ["  agent log: started, incl. first apply and attach (ms)",
         fmt_stat([c["started_ms"] for c in cold], 0)],
        ["  agent RSS, VmRSS (MB)", fmt_stat([c["rss_mb"] for c in cold], 0)],
        ["    of which file-backed, RssFile (MB)", fmt_stat([c["file_mb"] for c in cold], 0)],
        [f"scale: process start -> {a.lbs * a.routes:,} routes applied (s)",
         fmt_stat([b["live_s"] for b in big], 2)],
        ["  agent log: first apply (ms)", fmt_stat([b["apply_ms"] for b in big], 0)],
        ["  first apply: entries written", fmt_stat([b["first_written"] for b in big], 0)],
        ["  first apply: bpf syscalls", fmt_stat([b["first_syscalls"] for b in big], 0)],
        ["  agent RSS once applied, VmRSS (MB)", fmt_stat([b["rss_mb"] for b in big], 0)],
        ["    of which file-backed, RssFile (MB)", fmt_stat([b["file_mb"] for b in big], 0)],
        ["  agent peak RSS, VmHWM (MB)", fmt_stat([b["hwm_mb"] for b in big], 0)],
        ["one-route change: entries written", fmt_stat([b["written"] for b in big], 0)],
        ["  entries deleted", fmt_stat([b["deleted"] for b in big], 0)],
        ["  bpf syscalls", fmt_stat([b["syscalls"] for b in big], 0)],
        ["  agent log: apply (ms)", fmt_stat([b["change_ms"] for b in big], 1)],
        ["  file written -> applied line (s, includes the 0.2 s poll and re-parse)",
         fmt_stat([b["change_wall_s"] for b in big], 2)],
    ]
    print()
    print(table(["measure", "median (min–max)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
