#!/usr/bin/env bash
# Set up (idempotent), lint and type-check, then run the whole test suite as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check operator tests scripts bench
.venv/bin/mypy  # strict on operator/xdplb (pyproject.toml)
# Two workers, a test file each at a time (its module fixtures stay in one process;
# labs, pins and ports are named per file, so files never collide): the labs mostly
# wait on the network, which halves the run on two cores. `-n 0` runs in one process.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
