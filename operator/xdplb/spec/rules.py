"""The rules a LoadBalancer is checked by once every field is valid.

Its declared CEL rules, and the items that must not repeat, reported with exact
paths. The models run these, so this module knows them only by the attributes it
reads (the protocols below).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Protocol

from pydantic import BaseModel

from xdplb.spec.celcheck import cel_problems
from xdplb.spec.errors import show_value

__all__ = ["check_rules"]


class _Backend(Protocol):
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def endpoint(self) -> str: ...


class _Group(Protocol):
    """A listener or a route: what names a group of backends."""

    @property
    def backends(self) -> Sequence[_Backend] | None: ...


class _Route(_Group, Protocol):
    @property
    def cidr(self) -> str: ...


class _Listener(_Group, Protocol):
    @property
    def name(self) -> str: ...
    @property
    def family(self) -> str: ...
    @property
    def identity(self) -> Hashable: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def source_routes(self) -> Sequence[_Route]: ...
    @property
    def sni_routes(self) -> Sequence[_Group]: ...


class _Spec(Protocol):
    @property
    def interfaces(self) -> Sequence[str] | None: ...
    @property
    def listeners(self) -> Sequence[_Listener]: ...


class _LoadBalancer(Protocol):
    @property
    def spec(self) -> _Spec: ...


def _repeats(keys: Sequence[Hashable]) -> Iterator[tuple[int, int]]:
    """(index, index of its first occurrence) of every repeated key."""
    if len(set(keys)) == len(keys):
        return
    first: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i:
            yield i, j


def check_rules(lb: _LoadBalancer) -> list[tuple[str, str]]:
    """Rules spanning several fields or items, as (path, message) pairs."""
    spec = lb.spec
    assert isinstance(spec, BaseModel)  # cel_problems walks a model's fields
    problems = list(cel_problems(spec, "spec"))
    names = spec.interfaces or []
    problems += [(f"spec.interfaces[{i}]",
                  f"{show_value(names[i])} is also listed at spec.interfaces[{j}]")
                 for i, j in _repeats(names)]
    listeners = spec.listeners
    problems += [(f"spec.listeners[{i}].name",
                  f"{show_value(listeners[i].name)} is used by spec.listeners[{j}]")
                 for i, j in _repeats([ln.name for ln in listeners])]
    problems += [(f"spec.listeners[{i}]",
                  f"listener {listeners[i].endpoint} is also defined by spec.listeners[{j}]")
                 for i, j in _repeats([ln.identity for ln in listeners])]
    for i, listener in enumerate(listeners):
        problems += _listener_rules(f"spec.listeners[{i}]", listener)
    return problems


def _family_rules(lp: str, listener: _Listener) -> Iterator[tuple[str, str]]:
    """Every route's network and backends are of the listener's family (no NAT64; the
    default group's backends are a CEL rule of Listener). Checked here, not by the API
    server: a CEL rule over every route's backends would cost past its budget."""
    family = listener.family

    def other(address: str) -> bool:
        return (":" in address) != (family == "IPv6")

    # Routes mostly share a few backend lists (spec.model._shared_list): each is judged once.
    judged: dict[int, list[int]] = {}
    for kind, routes in (("sourceRoutes", listener.source_routes),
                         ("sniRoutes", listener.sni_routes)):
        for j, r in enumerate(routes):
            cidr = getattr(r, "cidr", None)
            if cidr is not None and other(cidr):
                yield (f"{lp}.{kind}[{j}].cidr",
                       f"{show_value(cidr)} is not an {family} network, the listener's family")
            backends = r.backends or ()
            bad = judged.get(id(backends))
            if bad is None:
                bad = judged[id(backends)] = [i for i, b in enumerate(backends)
                                              if other(b.address)]
            for i in bad:
                yield (f"{lp}.{kind}[{j}].backends[{i}].address",
                       f"{show_value(backends[i].address)} is not an {family} address, the"
                       " listener's family (no NAT64): write a listener per family")


def _listener_rules(lp: str, listener: _Listener) -> Iterator[tuple[str, str]]:
    """Repeated backends of a group, repeated route keys; the protocol and
    proxyProtocol rules are CEL rules of Listener (see cel_problems)."""
    groups = [(lp, listener.backends)]
    groups += [(f"{lp}.sourceRoutes[{j}]", r.backends)
               for j, r in enumerate(listener.source_routes) if r.backends and len(r.backends) > 1]
    groups += [(f"{lp}.sniRoutes[{j}]", r.backends)
               for j, r in enumerate(listener.sni_routes) if r.backends and len(r.backends) > 1]
    for gp, group in groups:
        backends = group or ()
        for i, j in _repeats([(b.address, b.port) for b in backends]):
            yield (f"{gp}.backends[{i}]",
                   f"backend {backends[i].endpoint} is also listed at {gp}.backends[{j}]")

    yield from _family_rules(lp, listener)
    for kind, field, routes in (("sourceRoutes", "cidr", listener.source_routes),
                                ("sniRoutes", "hostname", listener.sni_routes)):
        keys = [getattr(r, field) for r in routes]
        for i, j in _repeats(keys):
            yield (f"{lp}.{kind}[{i}].{field}",
                   f"{show_value(keys[i])} is also used by {lp}.{kind}[{j}]")

