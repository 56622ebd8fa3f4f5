"""Prometheus metrics: kernel counters are read at scrape time, so a scrape
costs a few batch reads and the data path pays nothing extra."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from xdplb.dataplane import layout as L
from xdplb.dataplane.bpfsys import BpfMap, possible_cpus
from xdplb.dataplane.layout import Stat
from xdplb.plan.model import Target, hostport
from xdplb.sni.acceptor import OUTCOMES

if TYPE_CHECKING:
    from xdplb.agent.health import TargetState

MAP_WRITES = Counter("xdplb_map_entries_written_total", "Map entries written or deleted")
APPLY_SECONDS = Histogram("xdplb_apply_duration_seconds", "Time to apply a configuration")
ERRORS = Counter("xdplb_errors_total", "Configuration or data-plane errors", ["kind"])
CT_ENTRIES = Gauge("xdplb_conntrack_entries", "Conntrack entries at the last sweep")


def percpu_sum(raw: bytes, fields: int) -> tuple[int, ...]:
    """Sum a per-CPU value of `fields` u64s over every possible CPU."""
    ncpu = possible_cpus()
    per = len(raw) // ncpu
    sums = [0] * fields
    for c in range(ncpu):
        vals = struct.unpack_from(f"={fields}Q", raw, c * per)
        sums = [a + b for a, b in zip(sums, vals, strict=True)]
    return tuple(sums)


class HealthCollector(Collector):
    """One gauge per probed backend: 1 up, 0 down (weight 0 until it recovers)."""

    def __init__(self, states: Callable[[], dict[Target, TargetState]]) -> None:
        self.states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("xdplb_backend_up", "Health-check state of a probed backend",
                               labels=["backend", "check"])
        for t, s in sorted(self.states().items()):
            up.add_metric([hostport(t.address, t.port), t.check.protocol], 1 if s.up else 0)
        yield up


class SniCollector(Collector):
    """What the SNI acceptor did with connections, and the pairs it splices now."""

    def __init__(self, stats: Callable[[], tuple[Mapping[str, int], int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counts, pairs = self.stats()
        outcomes = CounterMetricFamily(
            "xdplb_sni_connections", "Connections of SNI listeners by what became of them",
            labels=["outcome"])
        for outcome in OUTCOMES:
            outcomes.add_metric([outcome], counts.get(outcome, 0))
        yield outcomes
        spliced = GaugeMetricFamily("xdplb_sni_spliced_pairs",
                                    "Client and backend socket pairs spliced in the kernel now")
        spliced.add_metric([], pairs)
        yield spliced


class DataPlaneCollector(Collector):
    def __init__(self, maps: dict[str, BpfMap],
                 labels: Callable[[], tuple[dict[int, str], dict[int, str]]]) -> None:
        self.maps = maps
        self.labels = labels  # () -> (listener id -> name, backend id -> address:port)

    def collect(self) -> Iterator[CounterMetricFamily]:
        verdicts = CounterMetricFamily("xdplb_packets_by_path",
                                       "Packets per data-path verdict, path or drop reason",
                                       labels=["path"])
        for k, v in self.maps["stats"].items():
            idx = L.decode_u32(k)
            if idx in Stat._value2member_map_:
                verdicts.add_metric([Stat(idx).name.lower()], percpu_sum(v, 1)[0])
        yield verdicts
        listeners, backends = self.labels()
        for what, mapname, names in (("listener", "listener_stats", listeners),
                                     ("backend", "backend_stats", backends)):
            pk = CounterMetricFamily(f"xdplb_{what}_packets", f"Packets per {what}",
                                     labels=[what])
            by = CounterMetricFamily(f"xdplb_{what}_bytes", f"Bytes per {what}", labels=[what])
            fl = CounterMetricFamily(f"xdplb_{what}_new_flows", f"New flows per {what}",
                                     labels=[what])
            for idx, name in names.items():
                raw = self.maps[mapname].lookup(L.encode_u32(idx))
                if raw is None:
                    continue
                p, b, f = percpu_sum(raw, 3)
                pk.add_metric([name], p)
                by.add_metric([name], b)
                fl.add_metric([name], f)
            yield pk
            yield by
            yield fl


def register(collector: Collector) -> None:
    REGISTRY.register(collector)


__all__ = ["APPLY_SECONDS", "CT_ENTRIES", "ERRORS", "MAP_WRITES", "DataPlaneCollector",
           "HealthCollector", "SniCollector", "register"]
