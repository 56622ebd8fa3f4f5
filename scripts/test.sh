#!/usr/bin/env bash
# Set up (idempotent), lint, then run the whole test suite as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check operator tests scripts bench
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
