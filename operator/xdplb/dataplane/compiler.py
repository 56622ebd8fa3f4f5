"""Compiles in a process of its own, so that the agent never maps the compiler:

    python -m xdplb.dataplane.compiler PIN_ROOT '{"caps": {...}, "timeouts": {...}}'
    python -m xdplb.dataplane.compiler splice WORK_DIR MAX_SOCKETS

The first, for DataPlane.load(), loads the data path's programs against the
pinned maps (creating those that are missing) and pins them under their code
digest, where the agent takes them. The second, for sni.splice.Splicer, pins
the splice's maps, its programs attached. Exits 1 with the error (a verifier
log, say) on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys

from xdplb.dataplane.config import Capacities, Timeouts
from xdplb.dataplane.loader import DataPlane


def run_apart(*args: str) -> str:
    """main(args) in a child process; its error, or "" when it succeeded."""
    res = subprocess.run([sys.executable, "-m", "xdplb.dataplane.compiler", *args],
                         capture_output=True, text=True)
    return "" if res.returncode == 0 else res.stderr.strip() or f"exit {res.returncode}"


def main(argv: list[str]) -> int:
    try:
        if argv[0] == "splice":  # splice WORK_DIR MAX_SOCKETS: see sni.splice.Splicer
            from xdplb.sni.splice import Splicer

            Splicer.compile(argv[1], int(argv[2]))
            return 0
        pin_root, spec = argv
        cfg = json.loads(spec)
        DataPlane(pin_root, Capacities(**cfg["caps"]),
                  Timeouts(**cfg["timeouts"])).load(apart=False)
    except Exception as e:  # the agent reports it
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
