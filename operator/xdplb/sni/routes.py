"""Which backend an SNI connection goes to, from a snapshot of the plan the agent has just
written into the maps: per SNI listener, its hostnames' groups and its default group,
each as the Maglev table the data path holds (slot -> backend). The acceptor picks with
the data path's flow hash (plan/flowhash.py), so `xdplb explain`, XDP and the acceptor
agree, and a pick costs a dict lookup and a few multiplications: no map lookups.

The agent hands the acceptor a new snapshot after every apply (it is the only writer of
those maps). Tables travel once: each group gets a token the first time it is sent, and
later snapshots name it by its token.
"""

from __future__ import annotations

import socket
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from xdplb.plan.flowhash import IPV4_WORDS, IPV6_WORDS, client_hash_int, flow_hash_ints
from xdplb.plan.model import Group, Listener, Plan

Address = tuple[str, int]


@dataclass(frozen=True)
class Route:
    """What the acceptor needs to know about the SNI listener behind a listening socket."""

    listener_id: int
    label: str
    client_ip_affinity: bool = False
    proxy_protocol: bool = False


class Backend(NamedTuple):
    family: int          # AF_INET or AF_INET6
    address: Address


class GroupTable(NamedTuple):
    """A group's Maglev table: slot -> index into `backends` (empty: no eligible one)."""

    slots: array[int]
    backends: tuple[Backend, ...]


class SniTable(NamedTuple):
    default: GroupTable
    names: dict[str, GroupTable]   # hostname (lower case, as the spec has it) -> group


Routing = dict[int, SniTable]      # listener id -> its SNI routes


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def group_table(g: Group) -> GroupTable:
    return GroupTable(array("H", g.table),
                      tuple(Backend(family_of(b.address), (b.address, b.port))
                            for b in g.backends))


def pick(table: SniTable, hostname: str | None, h: int) -> Backend | None:
    """The backend for flow hash `h` of a connection naming `hostname` (None: no SNI);
    the listener's default group when the name has no route. None when the group has no
    eligible backend."""
    g = table.names.get(hostname, table.default) if hostname else table.default
    slots = g.slots
    return g.backends[slots[h % len(slots)]] if slots else None


def pick_for(routing: Routing, route: Route, hostname: str | None, family: int,
             client: Address, local: int, port: int) -> Backend | None:
    """The acceptor's choice for a connection from `client` to the listener address
    `local` (an integer) and `port`: the data path's flow hash (or client hash, with
    ClientIP affinity) on the Maglev table of the hostname's group."""
    table = routing.get(route.listener_id)
    if table is None:
        return None
    words = IPV6_WORDS if family == socket.AF_INET6 else IPV4_WORDS
    cip = int.from_bytes(socket.inet_pton(family, client[0]), "big")
    h = client_hash_int(cip, words) if route.client_ip_affinity else \
        flow_hash_ints(cip, local, client[1], port, 6, words)
    return pick(table, hostname, h)


def sni_listeners(plan: Plan) -> Iterable[Listener]:
    return (lst for lst in plan.listeners if lst.sni)


class RoutingUpdate(NamedTuple):
    """What one apply changes: the tables sent for the first time (by token), and every
    SNI listener's routes by token. Tokens no listener names any more are forgotten."""

    tables: dict[int, GroupTable]
    listeners: dict[int, tuple[int, dict[str, int]]]   # id -> (default, {name: token})


class RoutingSender:
    """The agent's side: remembers which tables the acceptor has."""

    def __init__(self) -> None:
        self._tokens: dict[Group, int] = {}
        self._next = 1

    def update(self, plan: Plan,
               listener_ids: Mapping[tuple[str | None, int, str], int]) -> RoutingUpdate:
        tokens: dict[Group, int] = {}
        new: dict[int, GroupTable] = {}

        def token(g: Group) -> int:
            t = tokens.get(g)
            if t is None:
                t = self._tokens.get(g)
                if t is None:
                    t, self._next = self._next, self._next + 1
                    new[t] = group_table(g)
                tokens[g] = t
            return t

        listeners = {listener_ids[lst.identity]: (
            token(lst.default), {r.hostname: token(r.group) for r in lst.sni_routes})
            for lst in sni_listeners(plan)}
        self._tokens = tokens
        return RoutingUpdate(new, listeners)

    def forget(self) -> None:
        """The acceptor lost its tables (a new acceptor process): send them all again."""
        self._tokens.clear()


class RoutingReceiver:
    """The acceptor's side: the tables it holds, and the routing they make."""

    def __init__(self) -> None:
        self.tables: dict[int, GroupTable] = {}
        self.routing: Routing = {}

    def apply(self, update: RoutingUpdate) -> None:
        tables = {**self.tables, **update.tables}
        self.routing = {lid: SniTable(tables[default], {n: tables[t] for n, t in names.items()})
                        for lid, (default, names) in update.listeners.items()}
        live = {t for default, names in update.listeners.values()
                for t in (default, *names.values())}
        self.tables = {t: g for t, g in tables.items() if t in live}
