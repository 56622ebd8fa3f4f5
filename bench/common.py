"""Shared helpers of the benchmarks: run facts, statistics, text tables, bpffs."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PIN_BASE = "/run/xdplb-bench/bpf"


def git_commit() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True)
    commit = res.stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def header(title: str, xdp_mode: str, extra: Sequence[str] = ()) -> str:
    lines = [title, "=" * len(title),
             f"kernel {platform.release()}  commit {git_commit()}  cpus {os.cpu_count()}  "
             f"XDP mode: {xdp_mode}", *extra]
    return "\n".join(lines)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_stat(xs: Sequence[float], digits: int = 1) -> str:
    """'median (min–max)'."""
    if not xs:
        return "n/a"
    return f"{median(xs):.{digits}f} ({min(xs):.{digits}f}–{max(xs):.{digits}f})"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def mount_bpffs(path: str = PIN_BASE) -> None:
    """`ip netns exec` gives its command a fresh /sys: pins must live elsewhere."""
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", path]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root (BPF, network namespaces)")


class BenchError(RuntimeError):
    pass


def wait_until(check: Any, what: str, timeout: float = 30, interval: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(interval)
    raise BenchError(f"timed out waiting for {what}")


def listening(lab: Any, ns: str, port: int) -> bool:
    """A TCP socket listens on `port` in the lab namespace `ns`."""
    return bool(lab.exec(ns, "ss", "-Htln", f"sport = :{port}", check=False).stdout.strip())


def nginx_conf(d: Path, connections: int, block: str, top: str = "") -> str:
    """nginx.conf text for one foreground worker whose pid and logs stay in ``d``:
    ``top`` lines first (modules, user), then the events limit, then ``block``."""
    return (f"{top}worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n"
            f"error_log {d}/error.log warn;\nevents {{ worker_connections {connections}; }}\n"
            f"{block}")


def nginx_http(d: Path, body: str) -> str:
    """An http block with no access log and its temporary files in ``d``, then ``body``."""
    temps = "".join(f"    {kind}_temp_path {d}/{name};\n" for kind, name in (
        ("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
        ("uwsgi", "uwsgi"), ("scgi", "scgi")))
    return f"http {{\n    access_log off;\n{temps}{body}}}\n"


def start_nginx(lab: Any, ns: str, d: Path, conf: str, port: int) -> None:
    """nginx with ``conf`` in the lab namespace ``ns``, once it listens on ``port``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "nginx.conf").write_text(conf)
    with open(d / "stderr.log", "w") as err:
        lab.popen(ns, "nginx", "-p", d, "-e", d / "error.log", "-c", d / "nginx.conf",
                  stdout=subprocess.DEVNULL, stderr=err)
    wait_until(lambda: listening(lab, ns, port), f"nginx in {ns}")
