# One image for the operator and the node agent: `xdplb operator`, `xdplb agent`.
# The package sets and the kernel-header links are the set-up script's
# (scripts/install-packages.sh, scripts/kernel-headers.sh), so CI exercises them.
FROM debian:bookworm-slim

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

COPY scripts/install-packages.sh scripts/kernel-headers.sh /opt/xdplb/scripts/
# Debian's stable packages (with security updates) are the pin: bcc comes from there.
# hadolint ignore=DL3008
RUN bash /opt/xdplb/scripts/install-packages.sh runtime headers \
 && apt-get clean && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY operator /src/operator
# bcc is the system's python3-bpfcc: the venv sees system site packages.
RUN python3 -m venv --system-site-packages /opt/xdplb/venv \
 && /opt/xdplb/venv/bin/pip install --no-cache-dir /src \
 && rm -rf /src
COPY scripts/entrypoint.sh /opt/xdplb/scripts/entrypoint.sh

ENV PATH=/opt/xdplb/venv/bin:$PATH
# The operator runs as this user; the agent's pod runs as root with the
# capabilities documented in the chart.
USER 65532:65532
ENTRYPOINT ["/opt/xdplb/scripts/entrypoint.sh"]
CMD ["--help"]
