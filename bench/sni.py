"""SNI routing end to end: xdplb's acceptor against nginx `stream` with `ssl_preread` (one
worker), both routing the same hostnames to nginx TLS backends, and against going straight
to the backend (`direct`). xdplb runs twice: with its default forwarding (`xdplb`:
splice(2) through a pipe) and with the sockmap verdict (`xdplb-sockmap`).

Every configuration gets a fresh lab (tests/lab.py) in every round, in alternating order.
Measured from the cli namespace, with a.bench.test -> backend 1 and b.bench.test ->
backend 2:

  bulk     one HTTPS download of --size-mib MiB (curl), and 8 at once, Gbit/s
  conn/s   new TLS connections per second: wrk over https with `Connection: close`
  latency  p50 and p99 of a small HTTPS request on a new connection (curl, full TLS
           handshakes), one at a time (c1) and 32 at a time (c32)
  CPU      busy CPU-seconds of the whole machine (/proc/stat, every CPU: user, nice,
           system, irq, softirq) per GiB and per 1,000 connections, and how much of it
           was the LB's processes (agent and acceptor, or nginx), kworker threads and
           softirq (the sockmap and the network stack work there, out of any process)
  apply    xdplb: the acceptor's accept latency (connect until the backend's first
           answer byte) while the agent applies --routes SNI routes, against before

    sudo .venv/bin/python bench/sni.py [--rounds 5] [--seconds 5] [--size-mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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

CONFIGS = ("direct", "nginx", "xdplb", "xdplb-sockmap")
PORT = 443
HOSTS = {"a.bench.test": 1, "b.bench.test": 2}
VIP = Lab.VIP
MIB = 1024 * 1024
PARALLEL = 8
HZ = os.sysconf("SC_CLK_TCK")


def manifest(extra_routes: int = 0) -> str:
    hosts = {**HOSTS, **{f"r{i}.bench.test": 1 + i % 2 for i in range(extra_routes)}}
    return f"""\
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
              f"port: {PORT}}}]\n" for h, k in hosts.items())


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


# -- the lab's parts ----------------------------------------------------------------------


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


def start_agent(lab: Lab, forward: str) -> Path:
    cfg = lab.workdir / "xdplb.yaml"
    cfg.write_text(manifest())
    log = lab.workdir / "agent.log"
    with open(log, "w") as out:
        lab.popen("lb", ROOT / ".venv/bin/xdplb", "agent", "--config", cfg,
                  "--pin-dir", f"{PIN_BASE}/sni-{lab.prefix}", "--sni-forward", forward,
                  "--state-file", lab.workdir / "agent.json",
                  stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: "applied" in log.read_text() and "SNI: listening" in log.read_text(),
               "the agent to apply and listen", timeout=90)
    return log


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


def target(cfg: str, host: str) -> str:
    return Lab.backend_addr(HOSTS[host]) if cfg == "direct" else VIP


def hosts_file(lab: Lab, cfg: str) -> Path:
    """`ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts: wrk and curl resolve
    the hostnames (and so send them as SNI) without DNS."""
    d = Path("/etc/netns") / lab.ns("cli")
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts").write_text("".join(f"{target(cfg, h)} {h}\n" for h in HOSTS))
    return d


# -- CPU ----------------------------------------------------------------------------------


def _stat_fields(pid: str) -> tuple[str, list[str]]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()


def lb_cpu(lab: Lab) -> float:
    """CPU-seconds of every process in the lb namespace so far."""
    total = 0
    for pid in subprocess.run(["ip", "netns", "pids", lab.ns("lb")], capture_output=True,
                              text=True).stdout.split():
        try:
            _, f = _stat_fields(pid)
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
    return total / HZ


def kworker_cpu() -> float:
    """CPU-seconds of every kworker thread so far (they are the kernel's, in no
    namespace: other work on the machine counts too)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            name, f = _stat_fields(pid)
        except (OSError, ValueError):
            continue
        if name.startswith("kworker"):
            total += int(f[11]) + int(f[12])
    return total / HZ


def machine_cpu() -> tuple[float, float]:
    """(busy CPU-seconds of every CPU: user, nice, system, irq, softirq; of it softirq)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = v
    return (user + nice + system + irq + softirq) / HZ, softirq / HZ


class Cpu:
    """CPU-seconds spent while `fn` ran, by where they went."""

    def __init__(self, lab: Lab, fn: Callable[[], Any]) -> None:
        l0, k0, (m0, s0) = lb_cpu(lab), kworker_cpu(), machine_cpu()
        self.result = fn()
        l1, k1, (m1, s1) = lb_cpu(lab), kworker_cpu(), machine_cpu()
        self.machine, self.lb, self.kworker, self.softirq = m1 - m0, l1 - l0, k1 - k0, s1 - s0

    def per(self, units: float) -> dict[str, float]:
        return {"machine": self.machine / units, "lb": self.lb / units,
                "kworker": self.kworker / units, "softirq": self.softirq / units}


# -- the measures -------------------------------------------------------------------------


def curl(lab: Lab, cfg: str, host: str, path: str, fmt: str) -> str:
    res = lab.exec("cli", "curl", "-skf", "--resolve", f"{host}:{PORT}:{target(cfg, host)}",
                   "-o", "/dev/null", "-w", fmt, f"https://{host}:{PORT}{path}", timeout=300,
                   check=False)
    if res.returncode != 0:
        raise BenchError(f"curl {host}{path} via {cfg}: exit {res.returncode} {res.stderr}")
    return str(res.stdout)


def curl_many(lab: Lab, cfg: str, path: str, count: int, parallel: int,
              fmt: str = "%{time_total}\n") -> list[str]:
    """`count` transfers of `path`, each on a new connection with a full TLS handshake,
    `parallel` at a time; one line of `fmt` each."""
    conf = lab.workdir / f"curl-{count}-{parallel}.conf"
    conf.write_text(f'url = "https://a.bench.test:{PORT}{path}"\noutput = "/dev/null"\n' * count)
    args = ["curl", "-skf", "--no-sessionid", "-H", "Connection: close", "-w", fmt,
            "-K", str(conf)]
    if parallel > 1:
        args[1:1] = ["-Z", "--parallel-max", str(parallel), "--parallel-immediate"]
    res = lab.exec("cli", *args, timeout=600, check=False)
    lines = res.stdout.split()
    if res.returncode != 0 or len(lines) != count:
        raise BenchError(f"curl x{count} via {cfg}: exit {res.returncode}, {len(lines)} "
                         f"transfers {res.stderr[-500:]}")
    return lines


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


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def apply_latency(lab: Lab, log: Path, routes: int) -> dict[str, float]:
    """The acceptor's accept latency while the agent applies `routes` SNI routes."""
    out = lab.workdir / "probe.txt"
    seconds = 20.0
    probe = lab.popen("cli", sys.executable, ROOT / "bench" / "sni_probe.py", VIP, str(PORT),
                      "a.bench.test", str(seconds), out)
    time.sleep(2)
    before = log.read_text().count("applied")
    t_write = time.monotonic_ns()
    cfg = lab.workdir / "xdplb.yaml"
    tmp = cfg.with_suffix(".tmp")
    tmp.write_text(manifest(routes - len(HOSTS)))
    tmp.rename(cfg)
    wait_until(lambda: log.read_text().count("applied") > before, "the large apply",
               timeout=120)
    t_done = time.monotonic_ns()
    if "listeners=1 " not in log.read_text().split("cannot apply")[-1]:
        raise BenchError(f"the large apply failed:\n{log.read_text()[-2000:]}")
    probe.wait(seconds + 30)
    samples = [line.split() for line in out.read_text().splitlines()]
    failed = [s for s in samples if s[1] == "-1"]
    if failed:
        raise BenchError(f"probe connections failed: {failed[:3]}")
    idle = [int(s[1]) / 1e6 for s in samples if int(s[0]) < t_write]
    busy = [int(s[1]) / 1e6 for s in samples if t_write <= int(s[0]) <= t_done]
    if len(busy) < 5 or len(idle) < 5:
        raise BenchError(f"too few probes: {len(idle)} before, {len(busy)} during")
    return {"apply_s": (t_done - t_write) / 1e9, "idle_p50": percentile(idle, 50),
            "idle_p99": percentile(idle, 99), "busy_p50": percentile(busy, 50),
            "busy_p99": percentile(busy, 99), "busy_max": max(busy), "busy_n": len(busy)}


def measure(cfg: str, a: argparse.Namespace) -> dict[str, Any]:
    with Lab(backends=2, prefix=a.prefix) as lab:
        etc = hosts_file(lab, cfg)
        try:
            start_backends(lab, a.size_mib)
            log = None
            if cfg.startswith("xdplb"):
                log = start_agent(lab, "sockmap" if cfg == "xdplb-sockmap" else "pipe")
            elif cfg == "nginx":
                start_nginx_lb(lab)
            for h, k in HOSTS.items():      # routing check: each name reaches its backend
                got = lab.exec("cli", "curl", "-sk", "--resolve",
                               f"{h}:{PORT}:{target(cfg, h)}", f"https://{h}:{PORT}/").stdout
                if got.strip() != f"b{k}":
                    raise BenchError(f"{cfg}: {h} reached {got.strip()!r}, not b{k}")
            gib = a.size_mib / 1024
            t0 = time.monotonic()
            bulk1 = Cpu(lab, lambda: float(curl(lab, cfg, "a.bench.test", "/big",
                                                "%{speed_download}")))
            wall8 = [0.0]

            def eight() -> None:
                t = time.monotonic()
                curl_many(lab, cfg, "/big", PARALLEL, PARALLEL, "%{size_download}\n")
                wall8[0] = time.monotonic() - t
            bulk8 = Cpu(lab, eight)
            conn = Cpu(lab, lambda: run_wrk(lab, a.seconds, a.connections))
            kconns = conn.result * a.seconds / 1000
            lat1 = [float(x) * 1000 for x in curl_many(lab, cfg, "/", a.latency_requests, 1)]
            lat32 = [float(x) * 1000 for x in curl_many(lab, cfg, "/", 3 * a.latency_requests,
                                                         32)]
            r: dict[str, Any] = {
                "gbit1": bulk1.result * 8 / 1e9,
                "gbit8": PARALLEL * a.size_mib * MIB * 8 / 1e9 / wall8[0],
                "cps": conn.result,
                "gib1": bulk1.per(gib), "gib8": bulk8.per(PARALLEL * gib),
                "kconn": conn.per(kconns),
                "c1_p50": percentile(lat1, 50), "c1_p99": percentile(lat1, 99),
                "c32_p50": percentile(lat32, 50), "c32_p99": percentile(lat32, 99),
                "seconds": time.monotonic() - t0,
            }
            if log is not None and a.routes:
                r["apply"] = apply_latency(lab, log, a.routes)
        finally:
            shutil.rmtree(etc, ignore_errors=True)
    return r


# -- the report ---------------------------------------------------------------------------


def report(results: dict[str, list[dict[str, Any]]], a: argparse.Namespace,
           load: tuple[str, str]) -> None:
    print(header("SNI routing: xdplb against nginx stream ssl_preread", "native (lb-cli)",
                 [f"{a.rounds} rounds, order alternated, a fresh lab per configuration and "
                  f"round; bulk: one {a.size_mib} MiB HTTPS download (curl), and {PARALLEL} "
                  f"at once; conn/s: wrk -t1 -c{a.connections} {a.seconds:g} s "
                  "'Connection: close' over https; latency: curl, a new connection and full "
                  f"handshake per request, {a.latency_requests} at c1, "
                  f"{3 * a.latency_requests} at c32; backends: nginx TLS, one worker; "
                  "nginx LB: one worker",
                  f"load average before: {load[0]}; after: {load[1]} (/proc/loadavg: "
                  "others' work on this machine disturbs every figure)"]))
    run = [c for c in CONFIGS if results[c]]

    def col(c: str, f: Callable[[dict[str, Any]], float], digits: int = 2) -> str:
        return fmt_stat([f(r) for r in results[c]], digits)

    print()
    print(table(["config", "bulk Gbit/s", f"{PARALLEL} streams Gbit/s", "TLS conn/s",
                 "c1 p50 ms", "c1 p99 ms", "c32 p50 ms", "c32 p99 ms"],
                [[c, col(c, lambda r: r["gbit1"]), col(c, lambda r: r["gbit8"]),
                  col(c, lambda r: r["cps"], 0), col(c, lambda r: r["c1_p50"]),
                  col(c, lambda r: r["c1_p99"]), col(c, lambda r: r["c32_p50"]),
                  col(c, lambda r: r["c32_p99"])] for c in run]))
    print()
    print(table(["added over direct, ms", "c1 p50", "c1 p99", "c32 p50", "c32 p99"],
                [[c, *(fmt_stat([r[k] - d[k] for r, d in zip(results[c], results["direct"],
                                                          strict=True)], 2)
                       for k in ("c1_p50", "c1_p99", "c32_p50", "c32_p99"))]
                 for c in run if c != "direct"]))
    for key, unit in (("gib1", "CPU-s per GiB, one stream"),
                      ("gib8", f"CPU-s per GiB, {PARALLEL} streams"),
                      ("kconn", "CPU-s per 1,000 connections")):
        print()
        print(table([f"{unit}", "machine", "lb processes", "kworker", "softirq"],
                    [[c, *(col(c, lambda r, k=k, key=key: r[key][k], 3)
                           for k in ("machine", "lb", "kworker", "softirq"))] for c in run]))

    def per_round(x: str, f: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]],
                                      float]) -> list[float]:
        return [f(xr, nr, dr) for xr, nr, dr in zip(results[x], results["nginx"],
                                                    results["direct"], strict=True)]

    def added(key: str, part: str = "machine") -> Callable[..., float]:
        return lambda x, n, d: x[key][part] - d[key][part]

    checks: list[tuple[str, list[float], str, Callable[[float], bool] | None]] = []
    for x in [c for c in run if c.startswith("xdplb")]:
        checks += [
            (f"{x}: conn/s / nginx's", per_round(x, lambda x, n, d: x["cps"] / n["cps"]),
             "≥ 1.0", lambda v: v >= 1.0),
            (f"{x}: added machine CPU per conn / nginx's",
             per_round(x, lambda x, n, d: (x["kconn"]["machine"] - d["kconn"]["machine"])
                       / (n["kconn"]["machine"] - d["kconn"]["machine"])), "≤ 1.0",
             lambda v: v <= 1.0),
            (f"{x}: one stream / direct", per_round(x, lambda x, n, d: x["gbit1"] / d["gbit1"]),
             "≥ 0.95", lambda v: v >= 0.95),
            (f"{x}: {PARALLEL} streams / direct",
             per_round(x, lambda x, n, d: x["gbit8"] / d["gbit8"]), "≥ 0.95",
             lambda v: v >= 0.95),
            (f"{x}: added machine CPU per GiB (1 stream), s", per_round(x, added("gib1")),
             "≤ 0.25 × nginx's", None),
            (f"{x}: added machine CPU per GiB ({PARALLEL} streams), s",
             per_round(x, added("gib8")), "≤ 0.25 × nginx's", None),
            (f"{x}: added p99 ms, c1 − nginx's",
             per_round(x, lambda x, n, d: (x["c1_p99"] - d["c1_p99"])
                       - (n["c1_p99"] - d["c1_p99"])), "≤ 0", lambda v: v <= 0),
            (f"{x}: added p99 ms, c32 − nginx's",
             per_round(x, lambda x, n, d: (x["c32_p99"] - d["c32_p99"])
                       - (n["c32_p99"] - d["c32_p99"])), "≤ 0", lambda v: v <= 0),
        ]
    checks += [
        ("nginx: added machine CPU per GiB (1 stream), s", per_round("nginx", added("gib1")),
         "—", None),
        (f"nginx: added machine CPU per GiB ({PARALLEL} streams), s",
         per_round("nginx", added("gib8")), "—", None),
    ]

    def share(r: dict[str, Any], d: dict[str, Any], key: str) -> float:
        """The LB's own part: its processes, kworkers, and softirq beyond direct's."""
        return r[key]["lb"] + r[key]["kworker"] + r[key]["softirq"] - d[key]["softirq"]

    for x in [c for c in run if c.startswith("xdplb")]:
        for key, unit in (("kconn", "per conn"), ("gib1", "per GiB, 1 stream"),
                          (f"gib{PARALLEL}", f"per GiB, {PARALLEL} streams")):
            checks.append((f"{x}: LB share {unit} / nginx's (see bench/README.md)",
                           per_round(x, lambda x, n, d, key=key: share(x, d, key)
                                     / share(n, d, key)), "—", None))
    print()
    print(table(["goal (per round, same run)", "median (min–max)", "goal", ""],
                [[name, fmt_stat(v, 2), goal,
                  "" if ok is None else ("met" if ok(statistics.median(v)) else "NOT met")]
                 for name, v, goal, ok in checks]))

    # Where the added CPU went: the part of each config's figure over direct's.
    rows = []
    for x in [c for c in run if c != "direct"]:
        for key, unit in (("kconn", "per 1k conn"), ("gib1", "per GiB, 1 stream"),
                          ("gib8", f"per GiB, {PARALLEL} streams")):
            parts = [per_round(x, added(key, p)) for p in ("machine", "lb", "kworker",
                                                           "softirq")]
            rest = [m - lb - k - s for m, lb, k, s in zip(*parts, strict=True)]
            rows.append([x, unit, *(fmt_stat(p, 3) for p in parts), fmt_stat(rest, 3)])
    print()
    print(table(["added over direct, CPU-s", "", "machine", "lb processes", "kworker",
                 "softirq", "elsewhere"], rows))

    applies = [(c, r["apply"]) for c in run for r in results[c] if "apply" in r]
    if applies:
        print()
        print(f"Accept latency (connect until the backend's first answer byte) while the "
              f"agent applies {a.routes} SNI routes, ms:")
        print(table(["config", "apply s", "before p50", "before p99", "during p50",
                     "during p99", "during max", "probes during"],
                    [[c, *(fmt_stat([x[k] for cc, x in applies if cc == c], 2)
                           for k in ("apply_s", "idle_p50", "idle_p99", "busy_p50",
                                     "busy_p99", "busy_max", "busy_n"))]
                     for c in run if any(cc == c for cc, _ in applies)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5, help="wrk duration")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--size-mib", type=int, default=256, help="bulk download size")
    ap.add_argument("--latency-requests", type=int, default=500,
                    help="requests at c1 (three times as many at c32)")
    ap.add_argument("--routes", type=int, default=10_000,
                    help="SNI routes of the large apply (0: no such measure)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--prefix", default="xb", help="namespace prefix of the labs")
    ap.add_argument("--json", default=None, help="also write every round's figures here")
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="print the report of figures written by --json, measure nothing")
    a = ap.parse_args()
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        for k, v in saved["args"].items():
            setattr(a, k, v)
        report(saved["results"], a, tuple(saved["load"]))  # type: ignore[arg-type]
        return 0
    # A stop (SIGTERM) unwinds like ^C: every lab's namespaces and processes go.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    require_root()
    for tool in ("wrk", "nginx", "curl", "openssl", "ss"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run scripts/setup.sh")
    if not Path(STREAM_MODULE).exists():
        sys.exit("nginx stream module missing: apt install libnginx-mod-stream")
    configs = [c for c in CONFIGS if c in a.configs.split(",")]
    if not {"direct", "nginx"} <= set(configs):
        sys.exit("--configs needs direct and nginx: every figure is compared with theirs")
    mount_bpffs()
    load0 = Path("/proc/loadavg").read_text().strip()
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for rnd in range(a.rounds):
        for cfg in (configs if rnd % 2 == 0 else configs[::-1]):
            r = measure(cfg, a)
            results[cfg].append(r)
            save(a, (load0, Path("/proc/loadavg").read_text().strip()), results)
            print(f"round {rnd + 1} {cfg:<13} {r['gbit1']:6.2f} / {r['gbit8']:6.2f} Gbit/s "
                  f"{r['cps']:7.0f} conn/s  c1 p99 {r['c1_p99']:6.2f} ms  c32 p99 "
                  f"{r['c32_p99']:6.2f} ms  machine {r['kconn']['machine']:.3f} s/1k conn "
                  f"{r['gib1']['machine']:.2f} s/GiB  ({r['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
    load = (load0, Path("/proc/loadavg").read_text().strip())
    save(a, load, results)
    report(results, a, load)
    return 0


def save(a: argparse.Namespace, load: tuple[str, str],
         results: dict[str, list[dict[str, Any]]]) -> None:
    if a.json:
        keep = ("rounds", "seconds", "connections", "size_mib", "latency_requests", "routes")
        Path(a.json).write_text(json.dumps({"args": {k: getattr(a, k) for k in keep},
                                            "load": load, "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
