"""The acceptor's settings (agent flags), and what it counts."""

from __future__ import annotations

from dataclasses import dataclass

FORWARDERS = ("pipe", "sockmap")


@dataclass(frozen=True)
class SniSettings:
    hello_timeout: float = 5.0       # a whole ClientHello after the handshake
    connect_timeout: float = 5.0     # the backend's handshake
    idle_timeout: float = 600.0      # a spliced pair that moves no byte (0: never); nginx's
                                     # proxy_timeout is 10 min too
    max_pairs: int = 32_768          # spliced pairs at a time
    max_per_client: int = 0          # connections of one client (IPv4 address, IPv6 /64) at a
                                     # time (0: any)
    max_pending: int = 8192          # connections waiting for their hello or backend
    forward: str = "pipe"            # pipe: splice(2) through a pipe; sockmap: sk_skb verdict

    def __post_init__(self) -> None:
        if self.forward not in FORWARDERS:
            raise ValueError(f"--sni-forward: {self.forward!r} is none of "
                             f"{', '.join(FORWARDERS)}")
        for name in ("max_pairs", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"--sni-{name.replace('_', '-')} must be at least 1")
        if self.max_per_client < 0:
            raise ValueError("--sni-max-per-client must be 0 (no bound) or more")
        for name, what in (("hello_timeout", "--sni-hello-timeout"),
                           ("connect_timeout", "the SNI connect timeout")):
            if getattr(self, name) <= 0:
                raise ValueError(f"{what} must be positive")
        if self.idle_timeout < 0:
            raise ValueError("--sni-idle-timeout must be 0 (none) or more")


# What became of the connections of SNI listeners (the acceptor's counters).
OUTCOMES = (
    "accepted",        # taken from a listening socket
    "spliced",         # joined to its backend in the kernel
    "relayed",         # sockmap only: could not join (the client had half-closed already),
                       # spliced through a pipe instead
    "refused",         # past a bound (pending hellos, pairs, per client, descriptors): reset
    "evicted",         # waited longest for the rest of its ClientHello when the pending
                       # bound was reached by a new connection: reset to make room
    "hello_timeout",   # no complete ClientHello in time: closed
    "closed_early",    # the client went away before its ClientHello was complete
    "hello_too_long",  # a ClientHello beyond the bound: sent to the default group
    "not_tls",         # not a TLS ClientHello: closed
    "no_backend",      # no eligible backend in the group: reset
    "backend_failed",  # the backend refused or did not answer
    "reset",           # a spliced pair ended by a reset
    "idle_timeout",    # a spliced pair idle for --sni-idle-timeout: closed
    "closed",          # a pair ended, both sides done
)
