"""The LoadBalancer status the operator writes (KEP-1623 conditions), as a model.

Only its schema is used (the CRD's status schema); the operator builds the
dicts in xdplb.k8s.conditions.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AddressPoolStatus",
    "AddressStatus",
    "Condition",
    "ListenerStatus",
    "LoadBalancerStatus",
    "NodeCounts",
]

Count = Annotated[int, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Condition(_Model):
    """metav1.Condition, with the bounds the Kubernetes API gives it."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    status: Literal["True", "False", "Unknown"]
    observed_generation: Count | None = Field(default=None, alias="observedGeneration")
    last_transition_time: datetime.datetime = Field(alias="lastTransitionTime")
    reason: str = Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = Field(max_length=32768)


class NodeCounts(_Model):
    selected: Count = 0
    programmed: Count = 0
    summary: str = Field(default="0/0", max_length=32, description="programmed/selected")


class ListenerStatus(_Model):
    name: str = Field(max_length=63)
    backends: Count = Field(default=0, description="distinct backends of the listener's groups")


class AddressStatus(_Model):
    address: str = Field(max_length=45, description="a listener address")
    pool: str = Field(default="", max_length=253, description="the AddressPool that admits it")
    announced_by: str = Field(
        default="", alias="announcedBy", max_length=253,
        description="announce: L2: the node elected to answer ARP for it")


class LoadBalancerStatus(_Model):
    observed_generation: Count | None = Field(default=None, alias="observedGeneration")
    conditions: list[Condition] = Field(default_factory=list, max_length=8)
    nodes: NodeCounts | None = None
    # A cluster object has at most 16 listeners (MAX_LISTENERS_PER_OBJECT in k8s/crd.py),
    # so at most 16 listener entries and 16 addresses: bounds that keep the worst-case
    # object within etcd's limit.
    listeners: list[ListenerStatus] = Field(default_factory=list, max_length=16)
    addresses: list[AddressStatus] = Field(default_factory=list, max_length=16)


class AddressPoolStatus(_Model):
    observed_generation: Count | None = Field(default=None, alias="observedGeneration")
    conditions: list[Condition] = Field(default_factory=list, max_length=8)
    # A string: an IPv6 pool may hold more than an int64 counts.
    total: str = Field(default="0", max_length=40, pattern=r"^[0-9]+$",
                       description="addresses in the pool")
    used: Count = Field(default=0, description="addresses of the pool that listeners use")
