"""Per-interface IPv4 settings that source NAT in XDP depends on."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

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
