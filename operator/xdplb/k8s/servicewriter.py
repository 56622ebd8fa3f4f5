"""The Service controller's requests: derived LoadBalancers created, changed and deleted,
Service status written, Events on the Services (services.py decides).

One task runs it, so that one allocation run at a time sees every address handed out:
two handlers allocating side by side could give one address twice. It works from kopf's
indexes of Services and LoadBalancers, which kopf fills completely before any handler
runs, so that after a restart every address already given is known before a new one is.
Addresses given in this run of the operator are remembered until the API shows them (a
watch may bring the created LoadBalancer after the next run).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from typing import Any

from xdplb.k8s.client import Kube, is_missing
from xdplb.k8s.events import event
from xdplb.k8s.index import State
from xdplb.k8s.services import (
    ALLOCATED,
    DEGRADED,
    SERVICE_LABEL,
    Allocation,
    allocate,
    claimant_of,
    derived_lb,
    ingress_ips,
    is_ours,
    owner_uid,
)
from xdplb.k8s.settings import OperatorSettings
from xdplb.spec.api import GROUP, VERSION, Ref
from xdplb.spec.fields import family_of

log = logging.getLogger("xdplb.operator")
TICK = 0.1  # seconds: a burst of changes makes one run

Json = dict[str, Any]


def lb_summary(body: Mapping[str, Any]) -> Json:
    """What the Service controller reads of a LoadBalancer (kept in a kopf index)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    owner = owner_uid(body) if (meta.get("labels") or {}).get(SERVICE_LABEL) else None
    out: Json = {"uid": meta.get("uid", ""), "owner": owner,
                 "addresses": sorted({ln["address"] for ln in spec.get("listeners") or []
                                      if isinstance(ln, dict) and ln.get("address")})}
    if owner is not None:  # a derived object is small: kept whole, to be compared
        out["spec"] = spec
        out["labels"] = meta.get("labels") or {}
    return out


class ServiceController:
    def __init__(self, settings: OperatorSettings, state: State, kube: Kube) -> None:
        self.settings, self.state, self.kube = settings, state, kube
        # Service uid -> family -> the address this run of the operator gave it
        self.assigned: dict[str, dict[str, str]] = {}
        self.told: dict[str, tuple[str, str]] = {}  # Service uid -> its last Event
        self.wake = asyncio.Event()
        self.wake.set()
        # Filled by handlers.py: kopf's indexes of Services and of LoadBalancer summaries.
        self.services: Mapping[Ref, Collection[Json]] = {}
        self.lbs: Mapping[Ref, Collection[Json]] = {}

    def poke(self) -> None:
        self.wake.set()

    async def loop(self) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(TICK)
            self.wake.clear()
            try:
                await self.reconcile()
            except Exception as e:  # the API failed: again shortly
                log.warning("Services not reconciled: %r", e)
                await asyncio.sleep(1.0)
                self.wake.set()

    def _mine(self, svc: Mapping[str, Any]) -> bool:
        s = self.settings
        ns = (svc.get("metadata") or {}).get("namespace")
        return (s.namespace is None or ns == s.namespace) and is_ours(
            svc, s.service_class, s.default_service_class)

    async def reconcile(self) -> None:
        services = [next(iter(v)) for v in self.services.values() if v]
        summaries = {ref: next(iter(v)) for ref, v in self.lbs.items() if v}
        ours = [s for s in services if self._mine(s)]
        claimants = {c.uid: c for c in map(claimant_of, ours)}
        evidence: dict[str, dict[str, str]] = {}  # uid -> family -> address it has

        def have(uid: str, addresses: list[str]) -> None:
            for a in addresses:
                evidence.setdefault(uid, {})[family_of(a)] = a

        for svc in ours:
            have(svc["metadata"].get("uid", ""), ingress_ips(svc)[::-1])  # the first wins
        held: dict[str, str] = {}
        for ref, summary in summaries.items():
            owner = claimants.get(summary.get("owner") or "")
            if owner is not None and owner.ref == ref:
                have(owner.uid, summary["addresses"][::-1])
                continue
            for address in summary["addresses"]:
                held.setdefault(address, f"LoadBalancer {ref[0]}/{ref[1]}")
        for u, mine in self.assigned.items():
            if u in claimants:
                evidence.setdefault(u, {}).update(mine)
        self.assigned = {u: a for u, a in self.assigned.items() if u in claimants}
        self.told = {u: t for u, t in self.told.items() if u.split("/")[0] in claimants}
        allocations = allocate(claimants.values(), evidence, held, self.state.pools.grants,
                               self.state.namespaces)
        for svc in ours:
            c = claimants[svc["metadata"].get("uid", "")]
            await self._serve(svc, allocations[c.ref], summaries.get(c.ref))
        await self._release(services, summaries, claimants)

    async def _serve(self, svc: Json, alloc: Allocation, current: Json | None) -> None:
        meta = svc["metadata"]
        uid, ns, name = meta.get("uid", ""), meta["namespace"], meta["name"]
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/loadbalancers/{name}"
        for ignored in claimant_of(svc).ignored:
            self._tell(svc, "Warning", "AddressIgnored", ignored, once=ignored)
        if not alloc.addresses:
            if current is not None and current.get("owner") == uid:
                await self._delete(path)
            if ingress_ips(svc):
                await self._set_ingress(svc, ())
            self.assigned.pop(uid, None)
            self._tell(svc, "Warning", alloc.reason, alloc.message)
            return
        desired = derived_lb(svc, alloc.addresses)
        if current is None:
            await asyncio.to_thread(self.kube.request, "POST",
                                    path.rsplit("/", 1)[0], desired)
            log.info("Service %s/%s: LoadBalancer created at %s", ns, name,
                     ", ".join(alloc.addresses))
        elif current.get("owner") != uid:
            self._tell(svc, "Warning", "LoadBalancerNameTaken",
                       f"LoadBalancer {ns}/{name} exists and is not this Service's: rename"
                       " or delete it")
            return
        elif current.get("spec") != desired["spec"] or any(
                current.get("labels", {}).get(k) != v
                for k, v in desired["metadata"]["labels"].items()):
            await asyncio.to_thread(self.kube.patch, path, {
                "metadata": {"labels": desired["metadata"]["labels"]},
                "spec": desired["spec"]})
        self.assigned[uid] = {family_of(a): a for a in alloc.addresses}
        if ingress_ips(svc) != list(alloc.addresses) or any(
                i.get("ipMode") != "VIP" for i in svc["status"]["loadBalancer"]["ingress"]):
            await self._set_ingress(svc, alloc.addresses)
        self._tell(svc, "Normal", ALLOCATED, alloc.message)
        if alloc.degraded:
            self._tell(svc, "Warning", DEGRADED, alloc.degraded, once=alloc.degraded)
        for problem in claimant_of(svc).problems:
            self._tell(svc, "Warning", "PortNotServed", problem, once=problem)

    async def _release(self, services: list[Json], summaries: Mapping[Ref, Json],
                       claimants: Mapping[str, Any]) -> None:
        """Derived LoadBalancers whose Service is gone, or no longer ours, go (a cluster's
        garbage collector removes them too when the Service is deleted); a Service that
        is no longer ours loses the address we wrote into its status."""
        by_uid = {s["metadata"].get("uid", ""): s for s in services}
        for ref, summary in summaries.items():
            owner = summary.get("owner")
            if owner is None or (owner in claimants and claimants[owner].ref == ref):
                continue
            path = f"/apis/{GROUP}/{VERSION}/namespaces/{ref[0]}/loadbalancers/{ref[1]}"
            await self._delete(path)
            svc = by_uid.get(owner)
            if svc is not None and set(ingress_ips(svc)) & set(summary["addresses"]):
                await self._set_ingress(svc, ())
                self._tell(svc, "Normal", "AddressReleased",
                           f"{', '.join(summary['addresses'])} released: the Service is no"
                           " longer served by xdplb")

    async def _delete(self, path: str) -> None:
        try:
            await asyncio.to_thread(self.kube.request, "DELETE", path)
            log.info("deleted %s", path.rsplit("/namespaces/", 1)[-1])
        except Exception as e:
            if not is_missing(e):
                raise

    async def _set_ingress(self, svc: Json, addresses: tuple[str, ...]) -> None:
        meta = svc["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/services/{meta['name']}/status"
        ingress = [{"ip": a, "ipMode": "VIP"} for a in addresses] or None
        try:
            await asyncio.to_thread(self.kube.patch, path,
                                    {"status": {"loadBalancer": {"ingress": ingress}}})
        except Exception as e:
            if not is_missing(e):
                raise

    def _tell(self, svc: Json, etype: str, reason: str, message: str,
              once: str | None = None) -> None:
        """An Event on the Service, when this is news for it."""
        uid = svc["metadata"].get("uid", "")
        key = (reason, message) if once is None else ("once:" + once, "")
        if once is not None:
            told = self.told.get(uid + "/" + once)
            if told is not None:
                return
            self.told[uid + "/" + once] = key
        elif self.told.get(uid) == key:
            return
        else:
            self.told[uid] = key
        log.info("Service %s/%s: %s: %s", svc["metadata"]["namespace"], svc["metadata"]["name"],
                 reason, message)
        event(svc, etype, reason, message)
