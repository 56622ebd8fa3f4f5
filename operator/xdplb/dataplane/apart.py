"""Runs one function in a process of its own, so that the agent never maps the
compiler (bcc and LLVM: about 150 MB resident once used):

    python -m xdplb.dataplane.apart MODULE:FUNCTION ARG...

It imports none of its callers: each names what to build (the data path:
loader.compile_pinned; the SNI splice: sni.splice.compile_splice). The child
exits 1 with the error (a verifier log, say) on stderr.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path


def child_env() -> dict[str, str]:
    """The environment of a child that runs ``python -m xdplb...``: this very package
    first on its path, wherever the parent found it (not another copy installed)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def run_apart(target: str, *args: str) -> str:
    """``target`` (MODULE:FUNCTION) called with ``args`` in a child process; its error,
    or "" when it succeeded."""
    res = subprocess.run([sys.executable, "-m", __name__, target, *args],
                         capture_output=True, text=True, env=child_env())
    return "" if res.returncode == 0 else res.stderr.strip() or f"exit {res.returncode}"


def main(argv: list[str]) -> int:
    module, _, function = argv[0].partition(":")
    try:
        getattr(importlib.import_module(module), function)(*argv[1:])
    except Exception as e:  # the caller reports it
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
