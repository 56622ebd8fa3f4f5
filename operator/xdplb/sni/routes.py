"""Which backend an SNI connection goes to: read from the same maps the data path
uses (sni_routes -> groups -> pool -> backends), with the same flow hash, so
`xdplb explain`, XDP and the acceptor agree on one Maglev table per group."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from xdplb.dataplane import layout as L
from xdplb.plan.flowhash import client_hash, flow_hash


class LookupMap(Protocol):
    def lookup(self, key: bytes) -> bytes | None: ...


@dataclass(frozen=True)
class Route:
    """What the acceptor needs to know about the SNI listener behind a socket."""

    listener_id: int
    label: str
    client_ip_affinity: bool = False
    proxy_protocol: bool = False


def pick_backend(maps: Mapping[str, LookupMap], route: Route, hostname: str | None,
                 client: tuple[str, int], local: tuple[str, int]) -> tuple[str, int] | None:
    """The backend for a TLS connection naming `hostname` (None: no SNI); the listener's
    default group when the name has no route. None when the group has no eligible backend."""
    maps_sni = maps["sni_routes"]
    gid = maps_sni.lookup(L.sni_key(route.listener_id, hostname)) if hostname else None
    if gid is None:
        gid = maps_sni.lookup(L.sni_key(route.listener_id, ""))
        if gid is None:
            return None
    raw = maps["groups"].lookup(gid[:4])
    if raw is None:
        return None
    group = L.GroupVal.from_buffer_copy(raw)
    if not group.size:
        return None
    h = client_hash(client[0]) if route.client_ip_affinity \
        else flow_hash(client[0], local[0], client[1], local[1], "TCP")
    slot = group.offset + h % group.size
    elem = maps["pool"].lookup(L.encode_u32(slot // L.POOL_IDS))
    if elem is None:
        return None
    bid = L.PoolIds.from_buffer_copy(elem).id[slot % L.POOL_IDS]
    raw = maps["backends"].lookup(L.encode_u32(bid))
    if raw is None:
        return None
    b = L.BackendVal.from_buffer_copy(raw)
    return L.from_ip(b.addr), L.from_be16(b.port)
