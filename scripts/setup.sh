#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian bookworm machine (run as root):
# system packages, kernel headers for bcc, bpffs, and the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3-bpfcc python3-venv python3-pip iproute2 ethtool bpftool iptables
              iperf3 nginx-light wrk socat curl openssl tcpdump)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
kver=$(uname -r)
need_headers=0
[ -e "/lib/modules/$kver/build/include/linux/kconfig.h" ] || need_headers=1
if [ "$need_headers" = 1 ] && ! dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "ok installed"; then
  missing+=(linux-headers-amd64)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against kernel headers; a Debian header set serves any kernel
# because the programs use only stable UAPI headers.
if [ "$need_headers" = 1 ]; then
  build=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$build" "/lib/modules/$kver/build"
  ln -sfn "$common" "/lib/modules/$kver/source"
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
