"""The container image's recipe: linted, and built from the set-up script's steps."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = ROOT / ".venv/bin/hadolint"


def test_dockerfile_passes_hadolint() -> None:
    tool = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    if tool is None:
        pytest.fail("hadolint not installed: run scripts/setup.sh")
    res = subprocess.run([tool, "--failure-threshold", "info", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_image_and_setup_share_the_install_steps() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "scripts/setup.sh").read_text()
    for script in ("install-packages.sh", "kernel-headers.sh"):
        assert f"scripts/{script}" in docker and f"scripts/{script}" in setup, script
    assert re.search(r"install-packages\.sh runtime headers", docker)
    assert re.search(r"^FROM debian:bookworm-slim$", docker, re.M)
    assert re.search(r"^USER 65532:65532$", docker, re.M)  # the operator runs unprivileged
    entry = (ROOT / "scripts/entrypoint.sh").read_text()
    assert "kernel-headers.sh" in entry and 'exec xdplb "$@"' in entry


def test_kernel_header_links_for_a_kernel_without_headers(tmp_path: Path) -> None:
    # In a private mount namespace with an empty /lib/modules: the script must link
    # the Debian header set installed under /usr/src, as the image does at start.
    res = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         "mount -t tmpfs none /lib/modules && bash scripts/kernel-headers.sh && "
         "readlink /lib/modules/$(uname -r)/build /lib/modules/$(uname -r)/source && "
         "test -e /lib/modules/$(uname -r)/source/include/linux/kconfig.h"],
        cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    build, source = res.stdout.split()
    assert re.fullmatch(r"/usr/src/linux-headers-.*-amd64", build)
    assert re.fullmatch(r"/usr/src/linux-headers-.*-common", source)
