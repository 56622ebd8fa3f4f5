#!/usr/bin/env bash
# Installs the Debian packages of the given sets that are missing, for the
# set-up script and the container image alike:
#   runtime  the agent and the operator: bcc, a Python venv, netlink tools
#   headers  kernel headers for bcc (see scripts/kernel-headers.sh)
#   test     the test suite, the demo and the benchmarks: traffic tools, servers
set -euo pipefail

declare -A SETS=(
  [runtime]="python3-bpfcc python3-venv python3-pip iproute2 ethtool"
  [headers]="linux-headers-amd64"
  [test]="bpftool iptables iperf3 nginx-light libnginx-mod-stream wrk socat curl openssl tcpdump iputils-ping"
)

wanted=()
for set in "$@"; do
  [ -n "${SETS[$set]:-}" ] || { echo "unknown package set: $set" >&2; exit 2; }
  read -r -a pkgs <<< "${SETS[$set]}"
  wanted+=("${pkgs[@]}")
done
missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
