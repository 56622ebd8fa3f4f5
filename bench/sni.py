"""SNI routing end to end: xdplb's acceptor + in-kernel splice against nginx `stream`
with `ssl_preread` (one worker), both routing the same hostnames to nginx TLS backends,
and against going straight to the backend.

Every configuration gets a fresh lab (tests/lab.py) in every round, in alternating
order. Measured from the cli namespace, with a.bench.test -> backend 1 and
b.bench.test -> backend 2:

  bulk     one HTTPS download of --size-mib MiB (curl), Gbit/s
  conn/s   new TLS connections per second: wrk over https with `Connection: close`
  latency  median time of one small HTTPS request on a new connection (curl), and what
           the LB adds to it against going straight to the backend
  CPU      CPU-seconds during bulk and conn/s, per GiB and per 1,000 connections:
           `lb proc` = processes in the lb namespace (agent or nginx); `machine` = all
           CPUs of the machine (clients and backends too: compare between configurations).
           The splice runs in softirq and kworker context, which `lb proc` does not see.

    sudo .venv/bin/python bench/sni.py [--rounds 5] [--seconds 5] [--size-mib 256]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
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
    mount_bpffs,
    nginx_conf,
    nginx_http,
    require_root,
    start_nginx,
    table,
    wait_until,
)

from tests.lab import Lab

CONFIGS = ("direct", "xdplb", "nginx")
PORT = 443
HOSTS = {"a.bench.test": 1, "b.bench.test": 2}
VIP = Lab.VIP

MANIFEST = f"""\
apiVersion: xdplb.io/v1alpha1
kind: LoadBalancer
metadata: {{name: sni-bench, namespace: default}}
spec:
  interfaces: [{Lab.lb_client_if}]
  listeners:
  - name: tls
    protocol: TCP
    port: {PORT}
    address: {VIP}
    backends: [{{address: {Lab.backend_addr(1)}, port: {PORT}}}]
    sniRoutes:
""" + "".join(f"    - hostname: {h}\n      backends: [{{address: {Lab.backend_addr(k)}, "
              f"port: {PORT}}}]\n" for h, k in HOSTS.items())

STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
TLS_SERVER = """\
    sendfile on;
    server {{
        listen {port} ssl backlog=4096;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        root {dir}/www;
        location = / {{ return 200 "{name}\\n"; }}
    }}
"""

STREAM_BLOCK = """\
stream {{
    map $ssl_preread_server_name $backend {{
{map}        default b1;
    }}
{upstreams}    server {{
        listen {vip}:{port} backlog=4096;
        ssl_preread on;
        proxy_pass $backend;
    }}
}}
"""


def start_backends(lab: Lab, size_mib: int) -> None:
    for k in (1, 2):
        b = f"b{k}"
        d = lab.workdir / f"nginx-{b}"
        (d / "www").mkdir(parents=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / "key.pem"),
                        "-out", str(d / "cert.pem"), "-days", "2", "-subj", f"/CN={b}"],
                       check=True, capture_output=True)
        with open(d / "www" / "big", "wb") as f:
            chunk = os.urandom(MIB)
            for _ in range(size_mib):
                f.write(chunk)
        server = TLS_SERVER.format(dir=d, port=PORT, name=b)
        start_nginx(lab, b, d, nginx_conf(d, 8192, nginx_http(d, server), "user root;\n"), PORT)


MIB = 1024 * 1024


def start_agent(lab: Lab) -> None:
    cfg = lab.workdir / "xdplb.yaml"
    cfg.write_text(MANIFEST)
    log = lab.workdir / "agent.log"
    with open(log, "w") as out:
        lab.popen("lb", ROOT / ".venv/bin/xdplb", "agent", "--config", cfg,
                  "--pin-dir", f"{PIN_BASE}/sni-{lab.prefix}",
                  "--state-file", lab.workdir / "agent.json",
                  stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: "applied" in log.read_text() and "SNI: listening" in log.read_text(),
               "the agent to apply and listen", timeout=60)


def start_nginx_lb(lab: Lab) -> None:
    d = lab.workdir / "nginx-lb"
    mapping = "".join(f"        {h} b{k};\n" for h, k in HOSTS.items())
    upstreams = "".join(f"    upstream b{k} {{ server {Lab.backend_addr(k)}:{PORT}; }}\n"
                        for k in (1, 2))
    stream = STREAM_BLOCK.format(map=mapping, upstreams=upstreams, vip=VIP, port=PORT)
    # The same trick as the agent's: the VIP made local, so nginx can bind it.
    lab.exec("lb", "ip", "route", "add", "local", f"{VIP}/32", "dev", "lo", "table", "local")
    start_nginx(lab, "lb", d, nginx_conf(d, 16384, stream, f"load_module {STREAM_MODULE};\n"),
                PORT)


def lb_cpu(lab: Lab) -> float:
    """CPU-seconds of every process in the lb namespace so far."""
    total = 0
    for pid in subprocess.run(["ip", "netns", "pids", lab.ns("lb")], capture_output=True,
                              text=True).stdout.split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """Busy CPU-seconds of the whole machine so far (everything but idle and iowait)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def cpu_during(lab: Lab, fn: Any) -> tuple[Any, float, float]:
    l0, m0 = lb_cpu(lab), machine_cpu()
    out = fn()
    return out, lb_cpu(lab) - l0, machine_cpu() - m0


def target(cfg: str, host: str) -> str:
    return Lab.backend_addr(HOSTS[host]) if cfg == "direct" else VIP


def curl(lab: Lab, cfg: str, host: str, path: str, fmt: str) -> str:
    res = lab.exec("cli", "curl", "-skf", "--resolve", f"{host}:{PORT}:{target(cfg, host)}",
                   "-o", "/dev/null", "-w", fmt, f"https://{host}:{PORT}{path}", timeout=300,
                   check=False)
    if res.returncode != 0:
        raise BenchError(f"curl {host}{path} via {cfg}: exit {res.returncode} {res.stderr}")
    return str(res.stdout)


def run_wrk(lab: Lab, seconds: float, conns: int) -> float:
    res = lab.exec("cli", "wrk", "-t", "1", "-c", str(conns), "-d", f"{seconds:g}s",
                   "-H", "Connection: close", f"https://a.bench.test:{PORT}/",
                   timeout=seconds + 60)
    m = re.search(r"Requests/sec:\s+([\d.]+)", res.stdout)
    if not m or re.search(r"Non-2xx", res.stdout):
        raise BenchError(f"wrk output:\n{res.stdout}")
    if errors := re.search(r"Socket errors: (.*)", res.stdout):
        print(f"    note: wrk {errors.group(0)}", file=sys.stderr)
    return float(m.group(1))


def hosts_file(lab: Lab, cfg: str) -> Path:
    """`ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts: wrk resolves the
    hostnames (and so sends them as SNI) without DNS."""
    d = Path("/etc/netns") / lab.ns("cli")
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts").write_text("".join(f"{target(cfg, h)} {h}\n" for h in HOSTS))
    return d


def measure(cfg: str, prefix: str, seconds: float, conns: int, size_mib: int,
            latency_n: int) -> dict[str, Any]:
    with Lab(backends=2, prefix=prefix) as lab:
        etc = hosts_file(lab, cfg)
        try:
            start_backends(lab, size_mib)
            if cfg == "xdplb":
                start_agent(lab)
            elif cfg == "nginx":
                start_nginx_lb(lab)
            for h, k in HOSTS.items():      # routing check: each name reaches its backend
                got = lab.exec("cli", "curl", "-sk", "--resolve",
                               f"{h}:{PORT}:{target(cfg, h)}", f"https://{h}:{PORT}/").stdout
                if got.strip() != f"b{k}":
                    raise BenchError(f"{cfg}: {h} reached {got.strip()!r}, not b{k}")
            speed, bulk_lb, bulk_m = cpu_during(lab, lambda: float(curl(
                lab, cfg, "a.bench.test", "/big", "%{speed_download}")))
            cps, conn_lb, conn_m = cpu_during(lab, lambda: run_wrk(lab, seconds, conns))
            lat = [float(curl(lab, cfg, "b.bench.test", "/", "%{time_total}"))
                   for _ in range(latency_n)]
        finally:
            shutil.rmtree(etc, ignore_errors=True)
    gib = size_mib / 1024
    kconns = cps * seconds / 1000
    return {"gbit": speed * 8 / 1e9, "cps": cps, "lat_ms": statistics.median(lat) * 1000,
            "lb_per_gib": bulk_lb / gib, "m_per_gib": bulk_m / gib,
            "lb_per_kconn": conn_lb / kconns, "m_per_kconn": conn_m / kconns}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5, help="wrk duration")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--size-mib", type=int, default=256, help="bulk download size")
    ap.add_argument("--latency-requests", type=int, default=30)
    ap.add_argument("--prefix", default="xb", help="namespace prefix of the labs")
    a = ap.parse_args()
    require_root()
    for tool in ("wrk", "nginx", "curl", "openssl", "ss"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run scripts/setup.sh")
    if not Path(STREAM_MODULE).exists():
        sys.exit("nginx stream module missing: apt install libnginx-mod-stream")
    mount_bpffs()

    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for rnd in range(a.rounds):
        for cfg in (CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]):
            r = measure(cfg, a.prefix, a.seconds, a.connections, a.size_mib,
                        a.latency_requests)
            results[cfg].append(r)
            print(f"round {rnd + 1} {cfg:<7} {r['gbit']:6.2f} Gbit/s {r['cps']:8.0f} conn/s "
                  f"{r['lat_ms']:6.2f} ms", file=sys.stderr, flush=True)

    print(header("SNI routing: xdplb against nginx stream ssl_preread", "native (lb-cli)",
                 [f"{a.rounds} rounds, order alternated, a fresh lab per configuration and "
                  f"round; bulk: one {a.size_mib} MiB HTTPS download (curl); conn/s: wrk -t1 "
                  f"-c{a.connections} {a.seconds:g} s 'Connection: close' over https; "
                  f"latency: median of {a.latency_requests} curl requests on new connections; "
                  "backends: nginx TLS, one worker; nginx LB: one worker"]))
    rows = []
    for c in CONFIGS:
        rs = results[c]
        rows.append([c, fmt_stat([r["gbit"] for r in rs], 2), fmt_stat([r["cps"] for r in rs], 0),
                     fmt_stat([r["lat_ms"] for r in rs], 2),
                     fmt_stat([r["lb_per_gib"] for r in rs], 2),
                     fmt_stat([r["m_per_gib"] for r in rs], 2),
                     fmt_stat([r["lb_per_kconn"] for r in rs], 2),
                     fmt_stat([r["m_per_kconn"] for r in rs], 2)])
    print()
    print(table(["config", "bulk Gbit/s", "TLS conn/s", "latency ms", "lb proc CPU-s/GiB",
                 "machine CPU-s/GiB", "lb proc CPU-s/1k conn", "machine CPU-s/1k conn"], rows))

    def per_round(f: Any) -> list[float]:
        return [f(x, n, d) for x, n, d in zip(results["xdplb"], results["nginx"],
                                              results["direct"], strict=True)]

    checks = [
        ("bulk, xdplb/nginx", per_round(lambda x, n, d: x["gbit"] / n["gbit"]), "≥ 1.5",
         lambda v: v >= 1.5),
        ("conn/s, xdplb/nginx", per_round(lambda x, n, d: x["cps"] / n["cps"]), "≥ 1.0",
         lambda v: v >= 1.0),
        ("lb process CPU per GiB, xdplb/nginx",
         per_round(lambda x, n, d: x["lb_per_gib"] / n["lb_per_gib"]), "≤ 0.25",
         lambda v: v <= 0.25),
        ("machine CPU per GiB, xdplb/nginx",
         per_round(lambda x, n, d: x["m_per_gib"] / n["m_per_gib"]), "≤ 0.25 (goal is for "
         "the LB)", None),
        ("lb process CPU per 1k conn, xdplb/nginx",
         per_round(lambda x, n, d: x["lb_per_kconn"] / n["lb_per_kconn"]), "—", None),
        ("added latency ms, xdplb", per_round(lambda x, n, d: x["lat_ms"] - d["lat_ms"]), "—",
         None),
        ("added latency ms, nginx", per_round(lambda x, n, d: n["lat_ms"] - d["lat_ms"]), "—",
         None),
    ]
    print()
    print(table(["ratio (per round, same run)", "median (min–max)", "goal", ""],
                [[name, fmt_stat(v, 2), goal,
                  "" if ok is None else ("met" if ok(statistics.median(v)) else "NOT met")]
                 for name, v, goal, ok in checks]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
