"""Compiles the data path in a process of its own, for DataPlane.load():

    python -m xdplb.dataplane.compiler PIN_ROOT '{"caps": {...}, "timeouts": {...}}'

It loads the programs against the pinned maps (creating those that are missing)
and pins them under their code digest, where the agent takes them: the agent
never maps the compiler. Exits 1 with the error (a verifier log, say) on stderr.
"""

from __future__ import annotations

import json
import sys

from xdplb.dataplane.config import Capacities, Timeouts
from xdplb.dataplane.loader import DataPlane


def main(argv: list[str]) -> int:
    pin_root, spec = argv
    cfg = json.loads(spec)
    dp = DataPlane(pin_root, Capacities(**cfg["caps"]), Timeouts(**cfg["timeouts"]))
    try:
        dp.load(apart=False)
    except Exception as e:  # the agent reports it
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
