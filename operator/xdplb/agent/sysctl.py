"""IPv4 settings that source NAT in XDP depends on: per interface, and the ports the
kernel may give the node's own connections; the IPv6 settings L2 announcement needs."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from xdplb.errors import XdplbError

log = logging.getLogger("xdplb.agent")

CONF = Path("/proc/sys/net/ipv4/conf")


def _read(ifname: str, key: str) -> int:
    return int((CONF / ifname / key).read_text())


def allow_local_sources(ifnames: Iterable[str], conf: Path = CONF) -> list[str]:
    """After XDP rewrites a client's packet to leave from the node's own address,
    the kernel sees a packet arrive with a local source: accept_local lets it
    through, and strict reverse-path filtering must be off. Returns problems."""
    problems = []
    for ifname in ifnames:
        path = conf / ifname / "accept_local"
        try:
            if path.read_text().strip() != "1":
                path.write_text("1")
                log.info("%s: net.ipv4.conf.%s.accept_local=1 (source NAT)", ifname, ifname)
            strict = [k for k in ("all", ifname)
                      if (conf / k / "rp_filter").read_text().strip() == "1"]
        except OSError as e:
            problems.append(f"{ifname}: cannot set accept_local for source NAT: {e}")
            continue
        if strict:
            problems.append(f"{ifname}: strict reverse-path filtering drops source-NAT "
                            f"flows: set net.ipv4.conf.{strict[0]}.rp_filter to 0 or 2")
    return problems


CONF6 = Path("/proc/sys/net/ipv6")


def answer_proxy_ndp(ifname: str, root: Path = CONF6) -> list[str]:
    """proxy_ndp on and proxy_delay 0 on ``ifname``, so that the kernel answers Neighbour
    Solicitations for a proxy entry at once (else after up to 0.8 s); it does so only on
    an interface that forwards IPv6, as a node serving IPv6 must. Returns problems."""
    problems = []
    for key, value in ((f"conf/{ifname}/proxy_ndp", "1"), (f"neigh/{ifname}/proxy_delay", "0")):
        try:
            if (root / key).read_text().strip() != value:
                (root / key).write_text(value)
                log.info("%s: net.ipv6.%s=%s (L2 announcement)", ifname,
                         key.replace("/", "."), value)
        except OSError as e:
            problems.append(f"{ifname}: cannot set net.ipv6.{key.replace('/', '.')}: {e}")
    try:
        if (root / "conf" / ifname / "forwarding").read_text().strip() != "1":
            problems.append(f"{ifname}: net.ipv6.conf.{ifname}.forwarding is 0: IPv6 is not"
                            " forwarded, and no Neighbour Solicitation is answered for an"
                            " announced address")
    except OSError as e:
        problems.append(f"{ifname}: cannot read net.ipv6.conf.{ifname}.forwarding: {e}")
    return problems


# -- source-NAT ports and the kernel's ephemeral ports ---------------------------------------

IPV4 = Path("/proc/sys/net/ipv4")  # this network namespace's: the agent runs in the host's
MIN_EPHEMERAL = 1024  # ephemeral ports the kernel must keep for the node's own connections

PortRange = tuple[int, int]  # first, last (inclusive)


class SnatPortsError(XdplbError):
    """The source-NAT port range would leave the kernel too few ephemeral ports."""


def show_ranges(ranges: Iterable[PortRange]) -> str:
    """The kernel's format of ip_local_reserved_ports: "8080,30000-30010"."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def parse_port_range(text: str) -> PortRange:
    """ip_local_port_range: "32768\t60999"."""
    low, high = (int(x) for x in text.split())
    return low, high


def parse_ranges(text: str) -> list[PortRange]:
    """ip_local_reserved_ports: "8080,30000-30010", or empty."""
    out = []
    for part in text.strip().split(","):
        if part.strip():
            first, _, last = part.partition("-")
            out.append((int(first), int(last or first)))
    return merge(out)


def merge(ranges: Iterable[PortRange]) -> list[PortRange]:
    """Sorted, with overlapping and adjacent ranges joined."""
    out: list[PortRange] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def subtract(span: PortRange, ranges: Iterable[PortRange]) -> list[PortRange]:
    """The ports of `span` in none of `ranges`."""
    out = []
    start, end = span
    for a, b in merge(ranges):
        if b < start or a > end:
            continue
        if a > start:
            out.append((start, a - 1))
        start = max(start, b + 1)
    if start <= end:
        out.append((start, end))
    return out


def count(ranges: Iterable[PortRange]) -> int:
    return sum(b - a + 1 for a, b in ranges)


@dataclass(frozen=True)
class Reservation:
    """What reserving the source-NAT ports does to the kernel's ephemeral ports."""

    snat: PortRange
    local: PortRange                 # ip_local_port_range
    reserved: tuple[PortRange, ...]  # ip_local_reserved_ports as found
    add: tuple[PortRange, ...]       # source-NAT ports the kernel may still pick
    min_kept: int = MIN_EPHEMERAL    # fewer ephemeral ports left: refused

    @property
    def after(self) -> list[PortRange]:
        return merge([*self.reserved, *self.add])

    @property
    def kept(self) -> int:
        """Ephemeral ports the kernel keeps once `add` is reserved."""
        return count(subtract(self.local, self.after))

    def problem(self) -> str | None:
        """Why the reservation must not be made: too few ephemeral ports left."""
        if not self.add or self.kept >= self.min_kept:
            return None
        snat, local = show_ranges([self.snat]), show_ranges([self.local])
        return (f"source-NAT ports {snat} (--snat-port-min..--snat-port-max) overlap the "
                f"kernel's ephemeral ports {local} (net.ipv4.ip_local_port_range): "
                f"reserving the overlap would leave the kernel {self.kept} ephemeral ports "
                f"for the node's own connections, fewer than {self.min_kept}. Narrow "
                f"--snat-port-min/"
                f"--snat-port-max (to ports outside {local}), or narrow "
                f"net.ipv4.ip_local_port_range (to keep at least {self.min_kept} of its ports "
                f"outside {snat})")

    def summary(self) -> str:
        snat, local = show_ranges([self.snat]), show_ranges([self.local])
        if not self.add:
            if self.snat[1] < self.local[0] or self.snat[0] > self.local[1]:
                return (f"source-NAT ports {snat} are outside the kernel's ephemeral ports "
                        f"{local} (net.ipv4.ip_local_port_range): nothing to reserve")
            return (f"source-NAT ports {snat}: their overlap with the kernel's ephemeral ports "
                    f"{local} is already in net.ipv4.ip_local_reserved_ports "
                    f"({show_ranges(self.reserved)}); the kernel keeps {self.kept} ephemeral "
                    f"ports")
        return (f"source-NAT ports {snat} overlap the kernel's ephemeral ports {local}: "
                f"reserved {show_ranges(self.add)} (net.ipv4.ip_local_reserved_ports="
                f"{show_ranges(self.after)}), so the node's own connections never take them; "
                f"the kernel keeps {self.kept} ephemeral ports")


def plan_reservation(snat: PortRange, port_range: str, reserved: str,
                     min_kept: int = MIN_EPHEMERAL) -> Reservation:
    """From the texts of ip_local_port_range and ip_local_reserved_ports."""
    local = parse_port_range(port_range)
    have = parse_ranges(reserved)
    overlap = (max(snat[0], local[0]), min(snat[1], local[1]))
    add = subtract(overlap, have) if overlap[0] <= overlap[1] else []
    return Reservation(snat, local, tuple(have), tuple(add), min_kept)


def reserve_snat_ports(snat: PortRange, root: Path | None = None,
                       min_kept: int = MIN_EPHEMERAL) -> Reservation | None:
    """Keep the kernel from giving the node's own connections (health checks, the SNI
    acceptor's, any process's) a source-NAT port: a flow of the data path to the same
    backend may hold it, and both would share one 4-tuple there. Adds the part of the
    source-NAT range within ip_local_port_range to ip_local_reserved_ports (in `root`,
    /proc/sys/net/ipv4 by default: per network namespace). Raises SnatPortsError when
    that would leave the kernel fewer than `min_kept` ephemeral ports; None (logged)
    when the sysctls cannot be read or written."""
    root = root or IPV4
    try:
        res = plan_reservation(snat, (root / "ip_local_port_range").read_text(),
                               (root / "ip_local_reserved_ports").read_text(), min_kept)
    except (OSError, ValueError) as e:
        log.warning("cannot read the kernel's ephemeral port range (%s): the node's own "
                    "connections may take ports source-NAT flows hold", e)
        return None
    if (problem := res.problem()) is not None:
        raise SnatPortsError(problem)
    if res.add:
        try:
            (root / "ip_local_reserved_ports").write_text(show_ranges(res.after))
        except OSError as e:
            log.warning("cannot reserve source-NAT ports %s in net.ipv4.ip_local_reserved_ports"
                        " (%s): the node's own connections may take ports source-NAT flows "
                        "hold", show_ranges(res.add), e)
            return None
    log.info("%s", res.summary())
    return res
