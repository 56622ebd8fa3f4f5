"""`xdplb operator`: validates LoadBalancers, owns the agent DaemonSet, writes status.

This module runs it: with leader election on, a replica runs kopf only while it
holds the Lease (see lease.py) and exits non-zero when it loses it; /healthz and
/readyz (probes.py) answer for the leader and the standbys alike. What kopf calls
is wired in handlers.py; the index of the cluster is index.py, the status writes
statuswriter.py, the finalizer finalizer.py and the agent DaemonSet agents.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import kopf

from xdplb.k8s.client import Kube
from xdplb.k8s.handlers import build_registry
from xdplb.k8s.index import State
from xdplb.k8s.lease import LeaderElector, LeaseLost
from xdplb.k8s.probes import Probes, serve_probes
from xdplb.k8s.settings import OperatorSettings

log = logging.getLogger("xdplb.operator")


async def _flag(stop: threading.Event | None) -> None:
    """Return once ``stop`` is set (never when None)."""
    while stop is None or not stop.is_set():
        await asyncio.sleep(0.1 if stop else 3600)


async def operate(settings: OperatorSettings, kube: Kube, registry: kopf.OperatorRegistry,
                  probes: Probes, stop: threading.Event | None,
                  ready: threading.Event | None) -> str | None:
    """Stand by for the Lease (when electing), then run kopf until stopped; return why the
    Lease was lost, if it was."""
    stopped = asyncio.create_task(_flag(stop))
    elector: LeaderElector | None = None
    holding: asyncio.Task[str] | None = None
    try:
        if settings.leader_election.enabled:
            elector = LeaderElector(kube, settings.leader_election)
            acquiring = asyncio.create_task(elector.acquire())
            probes.role, probes.loops = "standby", [acquiring]
            await asyncio.wait({acquiring, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not acquiring.done():
                acquiring.cancel()
                return None
            # Started before kopf: kopf, when it stops, ends every task started after it.
            holding = asyncio.create_task(elector.hold())
        kopf_stop = asyncio.Event()
        running = asyncio.create_task(kopf.operator(
            registry=registry, standalone=True, clusterwide=True, stop_flag=kopf_stop,
            ready_flag=ready))
        probes.role, probes.loops = "leader", [running, *([holding] if holding else [])]
        await asyncio.wait({running, stopped, *([holding] if holding else [])},
                           return_when=asyncio.FIRST_COMPLETED)
        lost = holding.result() if holding is not None and holding.done() else None
        if lost:
            log.error("%s; stopping", lost)
        kopf_stop.set()
        try:
            await running
        finally:
            if holding is not None:
                holding.cancel()
            if elector is not None and not lost:
                await asyncio.to_thread(elector.release)
        return lost
    finally:
        stopped.cancel()


def run(settings: OperatorSettings, stop: threading.Event | None = None,
        ready: threading.Event | None = None, state: State | None = None) -> None:
    """Run until ``stop`` is set (or forever); ``state`` lets a caller watch the index.

    Raises LeaseLost (a SystemExit: the process ends non-zero) when the Lease is lost.
    """
    kube = Kube(settings.kubeconfig)
    state = state or State(settings)
    # kopf logs every handled event at INFO: at 1,000 nodes that is the heartbeat rate.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    probes = Probes(kube)
    registry = build_registry(settings, state, kube, probes)
    server = serve_probes(settings.health_port, probes) if settings.health_port else None
    try:
        lost = asyncio.run(operate(settings, kube, registry, probes, stop, ready))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    if lost:
        raise LeaseLost(f"xdplb operator: {lost}")
