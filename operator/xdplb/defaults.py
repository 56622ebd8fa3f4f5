"""Where the agent keeps its state on a node, unless told otherwise."""

from __future__ import annotations

PIN_ROOT = "/sys/fs/bpf/xdplb"        # bpffs directory of the pinned maps and programs
STATE_FILE = "/run/xdplb/agent.json"  # what the agent applied, for `xdplb status`
CONFIG_FILE = "/etc/xdplb/loadbalancers.yaml"  # a standalone agent's LoadBalancers
