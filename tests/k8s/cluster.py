"""The API emulator served from a thread of its own, with kubeconfigs, kubectl and a client.

Tests talk to it only as a cluster is talked to: over HTTP with a kubeconfig
(kubectl, the kubernetes client, kopf), so that the same tests can later
point at a real API server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kmock
import kubernetes
import yaml

from tests.k8s.emulator import ApiEmulator

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
ADMIN_TOKEN = "admin-token"
T = TypeVar("T")


def write_kubeconfig(path: Path, server: str, user: str = "test", token: str = "token"
                     ) -> Path:
    """A kubeconfig whose one context reaches `server` as `user` with a bearer token."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
    }))
    return path


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.emulator = ApiEmulator()
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="api-emulator", daemon=True)
        self.url = ""

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            async with kmock.Server(self.emulator, port=0) as server:
                self.url = str(server.url).rstrip("/")
                self._ready.set()
                await self._stop.wait()
                await self.emulator.end_watches()

        self.loop.run_until_complete(main())

    def __enter__(self) -> Cluster:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the API emulator did not start")
        self.admin_kubeconfig = self.kubeconfig("admin", ADMIN_TOKEN)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the emulator's loop (to read or seed its state without races)."""
        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def kubeconfig(self, user: str, token: str) -> Path:
        return write_kubeconfig(self.workdir / f"kubeconfig-{user}", self.url, user, token)

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.admin_kubeconfig),
               "HOME": str(self.workdir)}  # discovery cache stays in the test's directory
        proc = subprocess.run([str(KUBECTL), *args], input=stdin, capture_output=True,
                              text=True, env=env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def apply_crds(self) -> None:
        """What a user runs first: ``kubectl apply -f crds/``."""
        crd_manifests()
        self.kubectl("apply", "-f", str(ROOT / "crds"))

    def client(self) -> kubernetes.client.ApiClient:
        """A kubernetes client logged in as the cluster admin."""
        return kubernetes.config.new_client_from_config(str(self.admin_kubeconfig))


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 15.0,
             interval: float = 0.05) -> T:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def crd_manifests(workdir: Path | None = None) -> list[Path]:
    """The project's CRDs, as a user applies them (``kubectl apply -f crds/``)."""
    files = sorted((ROOT / "crds").glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no CRDs under {ROOT / 'crds'}: see `xdplb crds`")
    return files
