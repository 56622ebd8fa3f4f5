#!/usr/bin/env bash
# Set up (idempotent), lint and type-check, then run the whole test suite as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check operator tests scripts bench
.venv/bin/mypy  # strict on operator/xdplb (pyproject.toml)
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
