"""Data-plane capacities and conntrack timeouts: agent flags, compiled into
the programs (-D) and part of the pin directory's name."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from xdplb.dataplane import layout as L


@dataclass(frozen=True)
class Capacities:
    """Sizes of the maps. Listener and backend ids are 16-bit in conntrack entries."""

    conntrack: int = 1_000_000       # flows (a forward entry each, and maybe a reply entry)
    listener_keys: int = 16_384      # (interface, address, port, protocol) entries
    listeners: int = 4096            # distinct listeners (counters)
    source_routes: int = 1_000_000   # LPM entries
    groups: int = 262_144            # distinct backend groups
    table_slots: int = 16_777_216    # Maglev slots of every group together (2 bytes each)
    backends: int = 65_536           # distinct (address, port) backends
    # Source-NAT ports, per (node address, backend): below the kernel's default ephemeral
    # ports (net.ipv4.ip_local_port_range 32768-60999), which the node's own connections take.
    snat_port_min: int = 1024
    snat_port_max: int = 32_767

    def __post_init__(self) -> None:
        for name in ("listeners", "backends"):
            if not 1 <= getattr(self, name) <= 65_536:
                raise ValueError(f"--max-{name} must be 1..65536")
        if self.table_slots % L.POOL_IDS:
            raise ValueError(f"--table-slots must be a multiple of {L.POOL_IDS}")
        if not 1 <= self.snat_port_min <= self.snat_port_max <= 65_535:
            raise ValueError("--snat-port-min..--snat-port-max must be a range within 1..65535")


@dataclass(frozen=True)
class Timeouts:
    tcp_established: int = 300
    tcp_closing: int = 10            # after a RST, or FIN both ways
    tcp_unreplied: int = 30          # no reply seen yet
    udp: int = 30
    sni_hello: int = 5               # SNI: a whole ClientHello after the handshake
    sni_idle: int = 600              # SNI: a spliced pair that moves no byte (0: never)


# Datagrams whose fragments are being translated at once (the frags map, LRU).
MAX_FRAGMENTED = 65_536


def map_entries(caps: Capacities) -> dict[str, int]:
    """Capacity of each map whose size is an agent flag (maps.h sizes them alike)."""
    return {
        "listeners": caps.listener_keys,
        "src_routes": caps.source_routes,
        "groups": caps.groups,
        "pool": caps.table_slots // L.POOL_IDS,
        "backends": caps.backends,
        "backend_nets": caps.backends,
        "vips": caps.listener_keys,
        "rev_nat": 2 * caps.backends,  # per backend and protocol
        "ct": caps.conntrack,
        "ct_reply": caps.conntrack,
        "listener_stats": caps.listeners,
        "backend_stats": caps.backends,
    }


# What the programs are compiled against when the agent creates the maps itself:
# the maps bcc creates along are never used, so they are made as small as can be.
COMPILE_CAPS = Capacities(conntrack=1, listener_keys=1, listeners=1, source_routes=1,
                          groups=1, table_slots=4, backends=1)


def cflags(caps: Capacities, timeouts: Timeouts) -> list[str]:
    defines = {
        "MAX_LISTENER_KEYS": caps.listener_keys,
        "MAX_LISTENERS": caps.listeners,
        "MAX_SOURCE_ROUTES": caps.source_routes,
        "MAX_GROUPS": caps.groups,
        "POOL_ELEMS": caps.table_slots // L.POOL_IDS,
        "CT_ENTRIES": caps.conntrack,
        "MAX_BACKENDS": caps.backends,
        "MAX_BACKEND_NETS": caps.backends,
        "MAX_FRAGMENTED": MAX_FRAGMENTED,
        "MAX_REV_NAT": 2 * caps.backends,  # per backend and protocol
        "SNAT_PORT_MIN": caps.snat_port_min,
        "SNAT_PORT_MAX": caps.snat_port_max,
        "CT_TCP_EST_TIMEOUT": timeouts.tcp_established,
        "CT_TCP_CLOSE_TIMEOUT": timeouts.tcp_closing,
        "CT_TCP_SYN_TIMEOUT": timeouts.tcp_unreplied,
        "CT_UDP_TIMEOUT": timeouts.udp,
    }
    return [f"-D{k}={v}" for k, v in defines.items()]


def capacity_hash(caps: Capacities) -> str:
    return hashlib.sha256(repr(sorted(asdict(caps).items())).encode()).hexdigest()[:6]
