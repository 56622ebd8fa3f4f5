"""LoadBalancer status from the per-node reports (pure; KEP-1623 conditions).

``Programmed`` is True when every selected node (a Linux Node that the agent
DaemonSet runs on, matching the LoadBalancer's ``nodeSelector`` and not being
deleted) reports this generation applied, with a heartbeat younger than the
silence limit. ``Degraded`` lists the selected nodes that report a failure or
went silent, with their errors.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xdplb.spec.api import Ref

SILENCE_LIMIT = 30.0  # seconds without a heartbeat after which a node counts as down
SHOWN_NODES = 10  # nodes named in a message; the rest are counted

ACCEPTED, PROGRAMMED, DEGRADED = "Accepted", "Programmed", "Degraded"


@dataclass(frozen=True)
class Verdict:
    """The operator's own judgement of a LoadBalancer: valid, and free of conflicts."""

    accepted: bool
    reason: str  # Accepted | Invalid | AddressNotAllowed | Conflicted
    message: str


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: Mapping[str, str]
    deleting: bool = False
    addresses: tuple[str, ...] = ()  # InternalIP and ExternalIP: never a backend

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> NodeInfo:
        meta = node.get("metadata", {})
        addresses = tuple(sorted({a["address"] for a in (node.get("status") or {}).get(
            "addresses") or [] if a.get("type") in ("InternalIP", "ExternalIP")
            and a.get("address")}))
        return cls(meta["name"], dict(meta.get("labels") or {}),
                   bool(meta.get("deletionTimestamp")), addresses)


@dataclass(frozen=True)
class NodeReport:
    """One node's NodeState status, its LoadBalancer entries indexed by namespace/name."""

    heartbeat: datetime.datetime | None
    errors: tuple[str, ...]  # node-level: agent error, interfaces that failed to attach
    entries: Mapping[Ref, Mapping[str, Any]] = field(default_factory=dict)
    # Addresses this node answers ARP (IPv6: NS) for, and since when.
    announced: Mapping[str, datetime.datetime | None] = field(default_factory=dict)

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> NodeReport:
        status = status or {}
        errors = [f"interface {i.get('name')}: {i['error']}"
                  for i in status.get("interfaces") or [] if i.get("error")]
        if status.get("error"):
            errors.insert(0, str(status["error"]))
        entries = {(e.get("namespace", ""), e.get("name", "")): e
                   for e in status.get("loadBalancers") or []}
        announced = {a.get("address", ""): parse_time(a.get("since"))
                     for a in status.get("announcements") or []}
        return cls(parse_time(status.get("heartbeatTime")), tuple(errors), entries, announced)


def parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A label map (``{key: value}``) or a LabelSelector (matchLabels/matchExpressions)."""
    if not selector:
        return True
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return all(labels.get(k) == v for k, v in selector.items())
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], set(expr.get("values") or [])
        present = key in labels
        ok = {"In": present and labels[key] in values,
              "NotIn": not present or labels[key] not in values,
              "Exists": present, "DoesNotExist": not present}[op]
        if not ok:
            return False
    return True


def selected_nodes(lb_selector: Mapping[str, Any] | None, agent_selector: Mapping[str, str],
                   nodes: Iterable[NodeInfo]) -> list[str]:
    return sorted(n.name for n in nodes
                  if not n.deleting and n.labels.get("kubernetes.io/os") == "linux"
                  and selector_matches(agent_selector, n.labels)
                  and selector_matches(lb_selector, n.labels))


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_NODES])
    return shown + (f" and {len(items) - SHOWN_NODES} more" if len(items) > SHOWN_NODES else "")


# (namespace, service: {name, port}, protocol) -> the (address, port) of its endpoints
ServiceResolver = Callable[[str, Mapping[str, Any], str], Iterable[tuple[str, int]]]


def listener_counts(spec: Mapping[str, Any], namespace: str = "",
                    resolve: ServiceResolver | None = None) -> list[dict[str, Any]]:
    """Distinct backends of each listener's groups (default and routes), Services resolved."""
    out = []
    for ln in spec.get("listeners") or []:
        groups = [ln, *(r for key in ("sourceRoutes", "sniRoutes") for r in ln.get(key) or [])]
        distinct = {(b.get("address"), b.get("port")) for g in groups for b in g.get("backends")
                    or []}
        for g in groups:
            if g.get("service") and resolve is not None:
                distinct.update(resolve(namespace, g["service"], ln.get("protocol", "TCP")))
        out.append({"name": ln.get("name"), "backends": len(distinct)})
    return out


def condition(ctype: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {"type": ctype, "status": "True" if ok else "False", "reason": reason,
            "message": message, "observedGeneration": generation}


def announcers(reports: Mapping[str, NodeReport], now: datetime.datetime,
               silence: float = SILENCE_LIMIT) -> dict[str, str]:
    """Address -> the node that reports announcing it; when two do (a node whose agent
    died reports its last state until it falls silent), the one that took it over last.
    Silent nodes count for nothing."""
    oldest = datetime.datetime.min.replace(tzinfo=datetime.UTC)
    best: dict[str, tuple[datetime.datetime, str]] = {}
    for name in sorted(reports):
        report = reports[name]
        if report.heartbeat is None or (now - report.heartbeat).total_seconds() > silence:
            continue
        for address, since in report.announced.items():
            key = (since or oldest, name)
            if address not in best or key[0] > best[address][0]:
                best[address] = key
    return {address: name for address, (_, name) in best.items()}


def address_status(pools: Mapping[str, str], announced: Mapping[str, str]
                   ) -> list[dict[str, str]]:
    """status.addresses: each listener address, its pool and its announcer (L2)."""
    return [{"address": a, "pool": p, "announcedBy": announced.get(a, "")}
            for a, p in sorted(pools.items())]


def lb_status(lb: Mapping[str, Any], verdict: Verdict, nodes: Iterable[NodeInfo],
              reports: Mapping[str, NodeReport], now: datetime.datetime,
              agent_selector: Mapping[str, str] | None = None,
              silence: float = SILENCE_LIMIT,
              resolve: ServiceResolver | None = None,
              addresses: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The status a LoadBalancer should have (conditions without lastTransitionTime)."""
    meta, spec = lb.get("metadata", {}), lb.get("spec") or {}
    generation = int(meta.get("generation") or 1)
    ref, uid = (meta.get("namespace", ""), meta.get("name", "")), meta.get("uid")
    selected = selected_nodes(spec.get("nodeSelector"), agent_selector or {}, nodes)
    programmed, pending, failing = [], [], []
    for name in selected:
        report = reports.get(name)
        if report is None or report.heartbeat is None:
            pending.append(f"{name} (no report)")
            continue
        age = (now - report.heartbeat).total_seconds()
        if age > silence:
            failing.append(f"{name}: no heartbeat for {int(age)}s")
            continue
        failing += [f"{name}: {e}" for e in report.errors]
        entry = report.entries.get(ref)
        if entry is not None and uid and entry.get("uid") and entry["uid"] != uid:
            entry = None  # a report about an earlier object of the same name
        if entry is None:
            pending.append(f"{name} (not applied yet)")
        elif entry.get("phase") == "Failed":
            failing.append(f"{name}: {entry.get('message') or 'apply failed'}")
        elif entry.get("phase") == "Applied" and int(entry.get("generation") or 0) == generation:
            programmed.append(name)
        else:
            pending.append(f"{name} (at generation {entry.get('generation')})")

    conditions = [condition(ACCEPTED, verdict.accepted, verdict.reason, verdict.message,
                            generation)]
    if not verdict.accepted:
        conditions += [condition(PROGRAMMED, False, "NotAccepted", "not accepted", generation),
                       condition(DEGRADED, False, "NotAccepted", "not accepted", generation)]
        programmed = []
    else:
        done = f"{len(programmed)}/{len(selected)} nodes applied generation {generation}"
        if not selected:
            prog = condition(PROGRAMMED, False, "NoNodes",
                             "no Linux node running the agent matches spec.nodeSelector",
                             generation)
        elif len(programmed) == len(selected):
            prog = condition(PROGRAMMED, True, "Programmed", done, generation)
        else:
            waiting = sorted(pending) + sorted(f.split(":")[0] for f in failing
                                               if f.split(":")[0] not in programmed)
            prog = condition(PROGRAMMED, False, "Pending",
                             f"{done}; waiting for {_names(sorted(set(waiting)))}", generation)
        degraded = (condition(DEGRADED, True, "NodeErrors", "; ".join(
            failing[:SHOWN_NODES]) + (f"; and {len(failing) - SHOWN_NODES} more"
                                      if len(failing) > SHOWN_NODES else ""), generation)
            if failing else condition(DEGRADED, False, "AsExpected", "no node reports an error",
                                      generation))
        conditions += [prog, degraded]
    return {
        "observedGeneration": generation,
        "conditions": conditions,
        "nodes": {"selected": len(selected), "programmed": len(programmed),
                  "summary": f"{len(programmed)}/{len(selected)}"},
        "listeners": listener_counts(spec, ref[0], resolve),
        "addresses": addresses or [],
    }


def with_transition_times(new: list[dict[str, Any]], old: list[dict[str, Any]] | None,
                          now: datetime.datetime) -> list[dict[str, Any]]:
    """Keep each condition's lastTransitionTime unless its status changed."""
    before = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = before.get(c["type"])
        keep = prev is not None and prev.get("status") == c["status"]
        out.append({**c, "lastTransitionTime": prev.get("lastTransitionTime") if keep and prev
                    else rfc3339(now)})
    return out


def status_events(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]
                  ) -> list[tuple[str, str, str]]:
    """(type, reason, message) Events for what changed: acceptance, programming, health."""
    before = {c.get("type"): c for c in old or []}
    after = {c["type"]: c for c in new}
    events = []

    def flipped(ctype: str, to: str) -> bool:
        return after[ctype]["status"] == to and before.get(ctype, {}).get("status") != to

    acc = after[ACCEPTED]
    if flipped(ACCEPTED, "True"):
        events.append(("Normal", "Accepted", acc["message"]))
    elif acc["status"] == "False" and (before.get(ACCEPTED, {}).get("message") != acc["message"]
                                       or flipped(ACCEPTED, "False")):
        events.append(("Warning", acc["reason"], acc["message"]))
    if flipped(PROGRAMMED, "True"):
        events.append(("Normal", "Programmed", after[PROGRAMMED]["message"]))
    if flipped(DEGRADED, "True"):
        events.append(("Warning", "Degraded", after[DEGRADED]["message"]))
    elif flipped(DEGRADED, "False") and before.get(DEGRADED, {}).get("status") == "True":
        events.append(("Normal", "Recovered", after[DEGRADED]["message"]))
    return events


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Equal apart from the conditions' lastTransitionTime (what a write would change)."""
    def strip(s: Mapping[str, Any] | None) -> dict[str, Any]:
        s = dict(s or {})
        s["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                           for c in s.get("conditions") or []]
        return s

    return strip(a) == strip(b)
