#!/usr/bin/env bash
# Container entrypoint: `xdplb "$@"`. The agent compiles with bcc at start, so it
# first links the image's kernel headers for this node's kernel (uname -r
# differs per node); the operator needs none.
set -euo pipefail
if [ "${1:-}" = "agent" ]; then
  /opt/xdplb/scripts/kernel-headers.sh
fi
exec xdplb "$@"
