#!/usr/bin/env bash
# Points bcc at kernel headers for the running kernel when it has none of its
# own: links /lib/modules/$(uname -r)/{build,source} to the newest Debian header
# set. One set serves any kernel because the programs use only stable UAPI
# headers. Run per host, and at every container start (uname -r differs per node).
set -euo pipefail
kver=$(uname -r)
has_headers() {  # Debian splits a header set: build/ and source/ (the -common part)
  local d="/lib/modules/$kver"
  [ -e "$d/build/Makefile" ] && { [ -e "$d/build/include/linux/kconfig.h" ] ||
                                  [ -e "$d/source/include/linux/kconfig.h" ]; }
}
has_headers && exit 0
build=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' | sort -V | tail -n 1)
common=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-common' | sort -V | tail -n 1)
if [ -z "$build" ] || [ -z "$common" ]; then
  echo "no kernel headers for $kver and no Debian header set in /usr/src to use" >&2
  exit 1
fi
mkdir -p "/lib/modules/$kver"
ln -sfn "$build" "/lib/modules/$kver/build"
ln -sfn "$common" "/lib/modules/$kver/source"
has_headers
