#!/usr/bin/env bash
# Set up (idempotent), then run the standalone demo in network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
