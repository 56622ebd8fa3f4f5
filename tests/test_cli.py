"""The CLI as users run it: .venv/bin/xdplb."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
XDPLB = str(Path(sys.executable).parent / "xdplb")
LAB = str(ROOT / "examples/lab.yaml")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([XDPLB, *args], capture_output=True, text=True, timeout=60)


def test_validate_good_file() -> None:
    r = run("validate", LAB)
    assert r.returncode == 0
    assert "valid (1 LoadBalancers, 2 listeners)" in r.stdout


def test_validate_bad_file_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(LAB).read_text().replace("port: 8080}", "port: 70000}", 1))
    r = run("validate", str(bad))
    assert r.returncode == 1
    assert "spec.listeners[0].backends[0].port: 70000 is not a valid port" in r.stderr
    assert "Traceback" not in r.stderr


def test_agent_refuses_a_negative_sni_timeout_before_loading_anything(tmp_path: Path) -> None:
    pins = tmp_path / "pins"
    for flag in ("--sni-idle-timeout", "--sni-hello-timeout"):
        r = run("agent", "--config", LAB, "--pin-dir", str(pins), flag, "-1")
        assert r.returncode == 1, r
        assert f"xdplb: {flag} must be" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "compiled" not in r.stderr
    assert not pins.exists()


def test_explain_follows_routes(tmp_path: Path) -> None:
    r = run("explain", "--config", LAB, "--src", "10.10.2.2:40000", "--dst", "192.0.2.10:80")
    assert r.returncode == 0, r.stderr
    assert "route source 10.10.2.0/24" in r.stdout and "10.20.3.2:8080" in r.stdout
    r = run("explain", "--config", LAB, "--src", "10.10.1.2:40000", "--dst", "192.0.2.10:80")
    assert "route default" in r.stdout
    assert "10.20.1.2:8080" in r.stdout or "10.20.2.2:8080" in r.stdout
    assert "client address kept: the backend must route its replies via this node" in r.stdout
    snat = tmp_path / "snat.yaml"
    snat.write_text(Path(LAB).read_text().replace("port: 80\n", "port: 80\n    sourceNAT: Node\n",
                                                  1))
    r = run("explain", "--config", snat, "--src", "10.10.1.2:40000", "--dst", "192.0.2.10:80")
    assert "source NAT: it leaves from this node's address toward the backend" in r.stdout, \
        r.stdout + r.stderr
    r = run("explain", "--config", LAB, "--src", "10.10.1.2:40000", "--dst", "192.0.2.10:81")
    assert "no listener" in r.stdout
    r = run("explain", "--config", LAB, "--src", "10.10.1.2:40000", "--dst", "192.0.2.10:53",
            "--proto", "udp")
    assert "192.0.2.10:53/UDP" in r.stdout and ":5353" in r.stdout


def test_verify_loads_without_attaching() -> None:
    r = run("verify", "--pin-dir", "/sys/fs/bpf/xdplb-test-verify")
    assert r.returncode == 0, r.stderr
    assert "xdplb_ingress: loaded and verified" in r.stdout
    assert "xdplb_ingress_generic: loaded and verified" in r.stdout
    assert "xdplb_egress: loaded and verified" in r.stdout
    subprocess.run(["rm", "-rf", "/sys/fs/bpf/xdplb-test-verify"], check=False)


def test_dump_prints_translated_instructions() -> None:
    r = run("dump", "--pin-dir", "/sys/fs/bpf/xdplb-test-dump")
    assert r.returncode == 0, r.stderr
    assert "== xdplb_ingress" in r.stdout and "== xdplb_egress" in r.stdout
    assert "bpf_map_lookup_elem" in r.stdout or "map_lookup" in r.stdout
    subprocess.run(["rm", "-rf", "/sys/fs/bpf/xdplb-test-dump"], check=False)
