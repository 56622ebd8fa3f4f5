"""End to end in the namespace lab: xdplb (native and generic XDP) against
iptables DNAT and plain forwarding; xdplb with source NAT against iptables
DNAT + MASQUERADE; xdplb over IPv6 (xdplb-native6) against itself over IPv4.

Every configuration gets a fresh lab (tests/lab.py, prefix "xb") in every
round, in alternating order. Measures, each from the cli namespace:

  conn/s  new TCP connections per second: wrk with `Connection: close`
          against nginx on both backends
  bulk    one TCP stream, iperf3 to backend 1 (Gbit/s received)
  udp     64-byte UDP payloads delivered per second (iperf3 -u -l 64 -b 0,
          the receiver's count: packets sent - lost)

    sudo .venv/bin/python bench/lab.py [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
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
    listening,
    median,
    mount_bpffs,
    nginx_conf,
    nginx_http,
    require_root,
    start_nginx,
    table,
    wait_until,
)

from tests.lab import Lab

CONFIGS = ("plain", "iptables", "xdplb-native", "xdplb-generic", "iptables-masq", "xdplb-snat",
           "xdplb-native6")
# Which iptables run each xdplb configuration is compared with.
BASELINE = {"xdplb-native": "iptables", "xdplb-generic": "iptables",
            "xdplb-snat": "iptables-masq"}
HTTP_PORT, IPERF_PORT = 80, 5201
B1, B2 = Lab.backend_addr(1), Lab.backend_addr(2)
B1_6, B2_6 = Lab.backend6_addr(1), Lab.backend6_addr(2)

MANIFEST = f"""\
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: bench, namespace: default}}
spec:
  interfaces: [lb-cli, lb-cli2]
  listeners:
  - name: http
    protocol: TCP
    port: {HTTP_PORT}
    address: {Lab.VIP}
    backends: [{{address: {B1}, port: {HTTP_PORT}}}, {{address: {B2}, port: {HTTP_PORT}}}]
  # iperf3's control connection and its data must reach the same server: one backend.
  - name: iperf-tcp
    protocol: TCP
    port: {IPERF_PORT}
    address: {Lab.VIP}
    backends: [{{address: {B1}, port: {IPERF_PORT}}}]
  - name: iperf-udp
    protocol: UDP
    port: {IPERF_PORT}
    address: {Lab.VIP}
    backends: [{{address: {B1}, port: {IPERF_PORT}}}]
"""
# The same over IPv6 (xdplb-native6), in a lab with IPv6 on.
MANIFEST6 = MANIFEST + f"""  - name: http6
    protocol: TCP
    port: {HTTP_PORT}
    address: {Lab.VIP6}
    backends: [{{address: {B1_6}, port: {HTTP_PORT}}}, {{address: {B2_6}, port: {HTTP_PORT}}}]
  - name: iperf-tcp6
    protocol: TCP
    port: {IPERF_PORT}
    address: {Lab.VIP6}
    backends: [{{address: {B1_6}, port: {IPERF_PORT}}}]
  - name: iperf-udp6
    protocol: UDP
    port: {IPERF_PORT}
    address: {Lab.VIP6}
    backends: [{{address: {B1_6}, port: {IPERF_PORT}}}]
"""

IPTABLES_RULES = [
    ["-p", "tcp", "--dport", str(HTTP_PORT), "-m", "statistic", "--mode", "random",
     "--probability", "0.5", "-j", "DNAT", "--to-destination", f"{B1}:{HTTP_PORT}"],
    ["-p", "tcp", "--dport", str(HTTP_PORT), "-j", "DNAT",
     "--to-destination", f"{B2}:{HTTP_PORT}"],
    ["-p", "tcp", "--dport", str(IPERF_PORT), "-j", "DNAT",
     "--to-destination", f"{B1}:{IPERF_PORT}"],
    ["-p", "udp", "--dport", str(IPERF_PORT), "-j", "DNAT",
     "--to-destination", f"{B1}:{IPERF_PORT}"],
]

HTTP_SERVER = f"""\
    server {{
        listen {HTTP_PORT} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
"""


def start_servers(lab: Lab) -> None:
    server = HTTP_SERVER
    if lab.ipv6:
        server = server.replace(f"listen {HTTP_PORT} backlog=4096;",
                                f"listen {HTTP_PORT} backlog=4096;\n"
                                f"        listen [::]:{HTTP_PORT} backlog=4096;")
    for b in ("b1", "b2"):
        d = lab.workdir / f"nginx-{b}"
        start_nginx(lab, b, d, nginx_conf(d, 4096, nginx_http(d, server)), HTTP_PORT)
    lab.popen("b1", "iperf3", "-s", "-p", str(IPERF_PORT), stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    wait_until(lambda: listening(lab, "b1", IPERF_PORT), "iperf3 server in b1")


def setup_iptables(lab: Lab, masquerade: bool = False) -> None:
    for rule in IPTABLES_RULES:
        lab.exec("lb", "iptables", "-t", "nat", "-A", "PREROUTING", "-d", Lab.VIP, *rule)
    if masquerade:  # backends see the LB's address, as with sourceNAT: Node
        lab.exec("lb", "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "lb-b+",
                 "-j", "MASQUERADE")


def start_agent(lab: Lab, mode: str, source_nat: bool = False) -> str:
    """Start the agent in the lb namespace; returns the XDP mode it reports attached."""
    cfg = lab.workdir / "xdplb.yaml"
    base = MANIFEST6 if lab.ipv6 else MANIFEST
    manifest = base.replace("    protocol:", "    sourceNAT: Node\n    protocol:") \
        if source_nat else base
    cfg.write_text(manifest)
    log = lab.workdir / "agent.log"
    with open(log, "w") as out:
        lab.popen("lb", ROOT / ".venv/bin/xdplb", "agent", "--config", cfg,
                  "--xdp-mode", mode, "--pin-dir", f"{PIN_BASE}/lab",
                  "--state-file", lab.workdir / "agent.json",
                  stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: "applied" in log.read_text() and log.read_text().count("attached to") >= 2,
               "the agent to apply and attach", timeout=60)
    modes = set(re.findall(r"attached to \S+: XDP (\w+) mode", log.read_text()))
    return ",".join(sorted(modes))


def tso(lab: Lab) -> str:
    out = lab.exec("cli", "ethtool", "-k", Lab.client_if, check=False).stdout
    m = re.search(r"tcp-segmentation-offload: (\w+)", out)
    return m.group(1) if m else "?"


def host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def run_wrk(lab: Lab, target: str, seconds: float, conns: int) -> float:
    res = lab.exec("cli", "wrk", "-t", "1", "-c", str(conns), "-d", f"{seconds:g}s",
                   "-H", "Connection: close", f"http://{host(target)}:{HTTP_PORT}/",
                   timeout=seconds + 60)
    m = re.search(r"Requests/sec:\s+([\d.]+)", res.stdout)
    if not m:
        raise BenchError(f"wrk output without Requests/sec:\n{res.stdout}")
    errors = re.search(r"Socket errors: (.*)", res.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", res.stdout)
    if non2xx:
        raise BenchError(f"wrk: {non2xx.group(0)}")
    if errors:
        print(f"    note: wrk {errors.group(0)}", file=sys.stderr)
    return float(m.group(1))


def run_iperf(lab: Lab, target: str, seconds: float, udp: bool) -> dict[str, Any]:
    args = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"]
    if udp:
        args += ["-u", "-l", "64", "-b", "0"]
    res = lab.exec("cli", *args, timeout=seconds + 60, check=False)
    try:
        out: dict[str, Any] = json.loads(res.stdout)
    except ValueError as e:
        raise BenchError(f"iperf3 {' '.join(args[1:])}: {res.stderr or res.stdout}") from e
    if out.get("error"):
        raise BenchError(f"iperf3: {out['error']}")
    return out


def measure(cfg: str, seconds: float, conns: int) -> dict[str, Any]:
    with Lab(backends=2, prefix="xb", ipv6=cfg == "xdplb-native6") as lab:
        start_servers(lab)
        mode = "—"
        if cfg.startswith("iptables"):
            setup_iptables(lab, masquerade=cfg == "iptables-masq")
        elif cfg == "xdplb-snat":
            mode = start_agent(lab, "native", source_nat=True)
        elif cfg.startswith("xdplb-"):
            mode = start_agent(lab, cfg.removeprefix("xdplb-").removesuffix("6"))
        vip = Lab.VIP6 if lab.ipv6 else Lab.VIP
        http_target = B1 if cfg == "plain" else vip
        iperf_target = B1 if cfg == "plain" else vip
        cps = run_wrk(lab, http_target, seconds, conns)
        bulk = run_iperf(lab, iperf_target, seconds, udp=False)
        gbit = bulk["end"]["sum_received"]["bits_per_second"] / 1e9
        udp = run_iperf(lab, iperf_target, seconds, udp=True)["end"]["sum"]
        delivered = (udp["packets"] - udp["lost_packets"]) / udp["seconds"]
        return {"cps": cps, "gbit": gbit, "udp_pps": delivered, "mode": mode,
                "tso": tso(lab), "udp_sent_pps": udp["packets"] / udp["seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5, help="per measurement")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)}")
    a = ap.parse_args()
    require_root()
    for tool in ("wrk", "nginx", "iperf3", "iptables", "ethtool", "ss"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            sys.exit(f"{tool} not found: run scripts/setup.sh")
    mount_bpffs()
    configs = [c for c in a.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown or "plain" not in configs:
        sys.exit(f"configs must include plain and come from {CONFIGS}")

    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for rnd in range(a.rounds):
        order = configs if rnd % 2 == 0 else configs[::-1]
        for cfg in order:
            r = measure(cfg, a.seconds, a.connections)
            results[cfg].append(r)
            print(f"round {rnd + 1} {cfg:<14} {r['cps']:9.0f} conn/s {r['gbit']:6.2f} Gbit/s "
                  f"{r['udp_pps']:9.0f} UDP pkt/s delivered (XDP {r['mode']}, cli0 TSO "
                  f"{r['tso']})", file=sys.stderr, flush=True)

    modes = {c: ",".join(sorted({r["mode"] for r in results[c]})) for c in configs
             if c.startswith("xdplb-")}
    print(header("xdplb end to end in the namespace lab",
                 "; ".join(f"{c}: {m}" for c, m in modes.items()) or "none",
                 [f"{a.rounds} rounds, order alternated, a fresh lab per configuration and "
                  f"round; {a.seconds:g} s per measurement; wrk -t1 -c{a.connections} "
                  f"'Connection: close' -> nginx (2 backends); iperf3 -> backend 1",
                  "client TSO (cli0) as measured: "
                  + ", ".join(f"{c} {','.join(sorted({r['tso'] for r in results[c]}))}"
                              for c in configs)]))
    rows = []
    for c in configs:
        rs = results[c]
        rows.append([c, fmt_stat([r["cps"] for r in rs], 0),
                     fmt_stat([r["gbit"] for r in rs], 2),
                     fmt_stat([r["udp_pps"] for r in rs], 0),
                     fmt_stat([r["udp_sent_pps"] for r in rs], 0)])
    print()
    print(table(["config", "new TCP conn/s", "bulk TCP Gbit/s", "UDP 64 B delivered/s",
                 "UDP sent/s"], rows))

    # Per round: costs against the plain-forwarding run of the same round.
    def per_round(c: str, f: Any) -> list[float]:
        return [f(r, p) for r, p in zip(results[c], results["plain"], strict=True)]

    added = {c: per_round(c, lambda r, p: 1e6 / r["cps"] - 1e6 / p["cps"])
             for c in configs if c != "plain"}
    print()
    print(table(["config", "added µs per connection vs plain"],
                [[c, fmt_stat(v, 2)] for c, v in added.items()]))
    compared = [c for c in configs if c in BASELINE and BASELINE[c] in configs]
    if compared:
        rows = []
        for c in compared:
            base, idx = BASELINE[c], range(a.rounds)
            add_ratio = [added[c][i] / added[base][i] if added[base][i] else
                         float("nan") for i in idx]
            udp_ratio = [results[c][i]["udp_pps"] / results[base][i]["udp_pps"]
                         for i in idx]
            bulk_ratio = [results[c][i]["gbit"] / results[base][i]["gbit"] for i in idx]
            for name, vals, goal, ok in (
                    (f"added cost per connection, xdplb/{base}", add_ratio, "≤ 0.5",
                     lambda v: v <= 0.5),
                    (f"UDP delivered, xdplb/{base}", udp_ratio, "≥ 1.2", lambda v: v >= 1.2),
                    (f"bulk TCP, xdplb/{base}", bulk_ratio, "≥ 0.9", lambda v: v >= 0.9)):
                m = median(vals)
                rows.append([c, name, fmt_stat(vals, 2), goal, "met" if ok(m) else "NOT met"])
        print()
        print(table(["xdplb mode", "ratio (per round, same run)", "median (min–max)", "goal",
                     ""], rows))
        print("\nA negative added cost means faster than plain forwarding within noise; "
              "ratios of added costs are then not meaningful.")
    if {"xdplb-native", "xdplb-native6"} <= set(configs):
        v4, v6 = results["xdplb-native"], results["xdplb-native6"]
        cps = [b["cps"] / a["cps"] for a, b in zip(v4, v6, strict=True)]
        bulk = [b["gbit"] / a["gbit"] for a, b in zip(v4, v6, strict=True)]
        print()
        print(table(["IPv6 / IPv4, xdplb native (same run)", "median (min–max)", "goal", ""],
                    [["new TCP conn/s", fmt_stat(cps, 2), "≥ 0.9",
                      "met" if median(cps) >= 0.9 else "NOT met"],
                     ["bulk TCP", fmt_stat(bulk, 2), "—", ""]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
