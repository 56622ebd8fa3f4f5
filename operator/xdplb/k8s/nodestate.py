"""NodeState: one small cluster-scoped object per node, written by its agent.

The agent of node N owns ``nodestates/N`` (owner reference to the Node, so it
goes with the Node) and writes only its status; the operator reads all of them
to compute each LoadBalancer's status. One object per node, not per
(node, LoadBalancer), keeps the watch traffic proportional to the changes.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xdplb.spec.api import API_VERSION, ApiVersion

__all__ = [
    "Announcement",
    "InterfaceState",
    "LoadBalancerState",
    "NodeState",
    "NodeStateStatus",
    "Phase",
]

MAX_LOADBALANCERS_PER_NODE = 512
MAX_ANNOUNCEMENTS = 256  # listed per node (a node may announce more: the rest are counted)
MAX_MESSAGE = 1024

Phase = Literal["Applied", "Failed", "Removed"]
Mode = Literal["native", "generic", "none"]
Count = Annotated[int, Field(ge=0)]
Message = Annotated[str, Field(max_length=MAX_MESSAGE)]


class _Model(BaseModel):
    # Tolerant on read: a newer agent may report fields this operator does not know.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class InterfaceState(_Model):
    name: str = Field(min_length=1, max_length=15)
    mode: Mode = "none"
    attached: bool = False
    error: Message = ""


class LoadBalancerState(_Model):
    """What this node did with one LoadBalancer (listed while it selects this node)."""

    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)
    uid: str = Field(default="", max_length=64)
    generation: Count = 0
    phase: Phase
    message: Message = ""
    listeners: Count = 0
    backends: Count = 0


class Announcement(_Model):
    """An address this node answers ARP or Neighbour Solicitations for (announce: L2),
    elected by its Lease."""

    address: str = Field(min_length=1, max_length=45)
    pool: str = Field(default="", max_length=253)
    interfaces: list[Annotated[str, Field(max_length=15)]] = Field(default_factory=list,
                                                                   max_length=4)
    since: datetime.datetime | None = None


class NodeStateStatus(_Model):
    heartbeat_time: datetime.datetime = Field(alias="heartbeatTime")
    mode: Mode = "none"
    interfaces: list[InterfaceState] = Field(default_factory=list, max_length=64)
    load_balancers: list[LoadBalancerState] = Field(
        default_factory=list, alias="loadBalancers", max_length=MAX_LOADBALANCERS_PER_NODE
    )
    announcements: list[Announcement] = Field(default_factory=list,
                                              max_length=MAX_ANNOUNCEMENTS)
    error: Message = ""

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", by_alias=True)
        data["heartbeatTime"] = rfc3339(self.heartbeat_time)
        for a, model in zip(data["announcements"], self.announcements, strict=True):
            if model.since is not None:
                a["since"] = rfc3339(model.since)
            else:
                a.pop("since")
        return data


class NodeState(_Model):
    api_version: ApiVersion = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["NodeState"] = "NodeState"
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: NodeStateStatus | None = None


def rfc3339(t: datetime.datetime) -> str:
    """Seconds precision, 'Z': what metav1.Time serializes to."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
