"""The standalone demo: a namespace lab, the agent on examples/lab.yaml, real
TCP and UDP traffic through the VIP, and a per-backend table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.lab import Lab  # noqa: E402

PIN_ROOT = "/run/xdplb-demo/bpf"


def mount_bpffs(path: str) -> None:
    """`ip netns exec` gives its command a fresh /sys: pins must live elsewhere."""
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", path]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)


def wait_for(path: Path, text: str, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise SystemExit(f"agent did not log {text!r}:\n{path.read_text()}")


def main() -> int:
    mount_bpffs(PIN_ROOT)
    with Lab(prefix="xdemo") as lab:
        lab.start_backend_servers(tcp_port=8080, udp_port=5353)
        log = Path(lab.workdir) / "agent.log"
        with open(log, "w") as out:
            agent = lab.popen("lb", str(ROOT / ".venv/bin/xdplb"), "agent",
                              "--config", str(ROOT / "examples/lab.yaml"),
                              "--pin-dir", f"{PIN_ROOT}/pins",
                              "--state-file", f"{lab.workdir}/agent.json",
                              stdout=out, stderr=subprocess.STDOUT)
        wait_for(log, "applied")
        print(log.read_text(), end="")
        tcp = lab.tcp_clients("cli", Lab.VIP, 80, count=200, concurrency=20,
                              up=256 * 1024, down=256 * 1024)
        tcp2 = lab.tcp_clients("cli2", Lab.VIP, 80, count=20, concurrency=10)
        udp = lab.udp_clients("cli", Lab.VIP, 53, count=100)
        agent.terminate()
        agent.wait(10)
        print(f"\n{'traffic':<34}{'backend':<10}{'flows':>6}")
        for name, res in (("TCP from 10.10.1.0/24 -> VIP:80", tcp),
                          ("TCP from 10.10.2.0/24 -> VIP:80", tcp2),
                          ("UDP from 10.10.1.0/24 -> VIP:53", udp)):
            for tag, n in sorted(res["tags"].items()):
                print(f"{name:<34}{tag:<10}{n:>6}")
            if res["failed"]:
                print(f"{name}: {res['failed']} failed: {res['failures'][:3]}")
        print(f"UDP replies came from: {', '.join(udp['reply_sources'])}")
        ok = all(r["failed"] == 0 for r in (tcp, tcp2, udp))
        print("demo", "OK" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
