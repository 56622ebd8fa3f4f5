"""xdplb command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from xdplb.dataplane.config import Capacities, Timeouts
from xdplb.defaults import CONFIG_FILE, PIN_ROOT, STATE_FILE
from xdplb.k8s.settings import add_args as add_operator_args
from xdplb.sni.settings import FORWARDERS, SniSettings

if TYPE_CHECKING:
    from xdplb.dataplane.bpfsys import BpfMap


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname.lower(),
                           "logger": record.name, "msg": record.getMessage()})


def setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


CAPACITY_FLAGS = {"conntrack": "conntrack-capacity", "listener_keys": "max-listener-keys",
                  "listeners": "max-listeners", "source_routes": "max-source-routes",
                  "groups": "max-groups", "table_slots": "table-slots",
                  "backends": "max-backends", "snat_port_min": "snat-port-min",
                  "snat_port_max": "snat-port-max"}


CAPACITY_HELP = {
    "snat_port_min": "first source port of source-NAT flows",
    "snat_port_max": "last source port of source-NAT flows; the agent adds the part of "
                     "the range within net.ipv4.ip_local_port_range to "
                     "net.ipv4.ip_local_reserved_ports, and refuses to start when that leaves "
                     "the kernel fewer than 1024 ephemeral ports",
}


def add_dataplane_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pin-dir", default=PIN_ROOT,
                   help="bpffs directory for pinned maps (default %(default)s)")
    for f in fields(Capacities):
        text = f"{CAPACITY_HELP[f.name]} " if f.name in CAPACITY_HELP else ""
        p.add_argument(f"--{CAPACITY_FLAGS[f.name]}", dest=f"cap_{f.name}", type=int,
                       default=f.default, help=f"{text}(default {f.default})")
    for f in fields(Timeouts):
        p.add_argument(f"--{f.name.replace('_', '-')}-timeout", dest=f"to_{f.name}", type=int,
                       default=f.default, help=f"seconds (default {f.default})")


def capacities(a: argparse.Namespace) -> Capacities:
    try:
        return Capacities(**{f.name: getattr(a, f"cap_{f.name}") for f in fields(Capacities)})
    except ValueError as e:
        sys.exit(f"xdplb: {e}")


def timeouts(a: argparse.Namespace) -> Timeouts:
    return Timeouts(**{f.name: getattr(a, f"to_{f.name}") for f in fields(Timeouts)})


def add_sni_args(p: argparse.ArgumentParser) -> None:
    d = SniSettings()
    p.add_argument("--sni-max-pairs", type=int, default=d.max_pairs,
                   help="SNI connections spliced at a time; more are refused "
                        "(default %(default)s)")
    p.add_argument("--sni-max-per-client", type=int, default=d.max_per_client,
                   help="SNI connections of one client (an IPv4 address, or the /64 of "
                        "an IPv6 one) at a time; more are refused (default %(default)s: "
                        "no bound)")
    p.add_argument("--sni-forward", choices=FORWARDERS, default=d.forward,
                   help="how SNI pairs are spliced: splice(2) through a pipe, or an sk_skb "
                        "verdict in a sockmap (default %(default)s)")


def sni_settings(a: argparse.Namespace) -> SniSettings:
    try:
        return SniSettings(hello_timeout=a.to_sni_hello, idle_timeout=a.to_sni_idle,
                           max_pairs=a.sni_max_pairs, max_per_client=a.sni_max_per_client,
                           forward=a.sni_forward)
    except ValueError as e:
        sys.exit(f"xdplb: {e}")


def cmd_agent(a: argparse.Namespace) -> int:
    from xdplb.dataplane.loader import AttachError, DataPlane, cleanup

    setup_logging(a.log_format)
    if a.cleanup:
        detached = cleanup(a.pin_dir)
        logging.info("cleanup: detached from %s, removed %s", ", ".join(detached) or "nothing",
                     a.pin_dir)
        return 0
    if a.kubernetes and not a.node_name:
        logging.error("--kubernetes needs --node-name (or the NODE_NAME variable)")
        return 2
    sni = sni_settings(a)     # bad flags end here, before anything is compiled or pinned
    # Compile first: the rest of the agent is imported while the compiler runs.
    dp = DataPlane(a.pin_dir, capacities(a), timeouts(a))
    dp.load_async()
    from xdplb.agent.sysctl import SnatPortsError

    # A cluster agent keeps programs and pins on a clean stop: its successor adopts them.
    detach = a.detach_on_exit if a.detach_on_exit is not None else not a.kubernetes
    try:
        if a.kubernetes:
            from xdplb.agent.cluster import ClusterAgent, ClusterOptions

            ClusterAgent(ClusterOptions(
                node_name=a.node_name, daemonset=a.daemonset,
                lease_namespace=a.lease_namespace, l2_lease_seconds=a.l2_lease_seconds,
                xdp_mode=a.xdp_mode, pin_root=a.pin_dir,
                caps=capacities(a), timeouts=timeouts(a),
                detach_on_exit=detach, force=a.force,
                metrics_port=a.metrics_port, state_file=a.state_file,
                sni=sni, log_format=a.log_format), dp=dp).run()
        else:
            from xdplb.agent.standalone import Agent, AgentOptions

            Agent(AgentOptions(config=a.config, xdp_mode=a.xdp_mode, pin_root=a.pin_dir,
                               caps=capacities(a), timeouts=timeouts(a),
                               detach_on_exit=detach, force=a.force,
                               metrics_port=a.metrics_port, state_file=a.state_file,
                               sni=sni, log_format=a.log_format), dp).run()
    except (AttachError, SnatPortsError) as e:
        logging.error("%s", e)
        return 1
    return 0


def cmd_operator(a: argparse.Namespace) -> int:
    from xdplb.k8s.operator import run
    from xdplb.k8s.settings import settings_from_args

    setup_logging(a.log_format)
    run(settings_from_args(a))
    return 0


def cmd_uninstall(a: argparse.Namespace) -> int:
    from xdplb.k8s.client import Kube
    from xdplb.k8s.uninstall import uninstall

    setup_logging(a.log_format)
    return 0 if uninstall(Kube(), a.namespace, a.deployment, a.timeout) else 1


def cmd_crds(a: argparse.Namespace) -> int:
    from pathlib import Path

    from xdplb.k8s.crd import crd_documents, to_yaml

    docs = crd_documents()
    if a.output_dir is None:
        print("---\n".join(to_yaml(doc) for doc in docs.values()), end="")
        return 0
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (out / name).write_text(to_yaml(doc))
        print(f"wrote {out / name}")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from xdplb.spec.load import SpecError, load_file

    try:
        lbs = load_file(a.file)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1
    n = sum(len(lb.spec.listeners) for lb in lbs)
    print(f"{a.file}: valid ({len(lbs)} LoadBalancers, {n} listeners)")
    return 0


def cmd_reference(a: argparse.Namespace) -> int:
    from pathlib import Path

    from xdplb.k8s.reference import render

    text = render()
    if a.output is None:
        print(text, end="")
        return 0
    Path(a.output).write_text(text)
    print(f"wrote {a.output}")
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    from xdplb.plan.explain import explain
    from xdplb.plan.planner import build_plan
    from xdplb.spec.load import SpecError, load_file

    try:
        plan = build_plan(load_file(a.config))
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1
    try:
        src, sport = _endpoint(a.src)
        dst, dport = _endpoint(a.dst)
    except ValueError as e:
        print(f"xdplb explain: {e}", file=sys.stderr)
        return 2
    local = None
    if not a.any_local:
        from xdplb.agent.inventory import read_inventory
        local = {addr for addrs in read_inventory().addresses.values() for addr in addrs}
    print(explain(plan, src, sport, dst, dport, a.proto.upper(), local, a.sni).text())
    return 0


def _endpoint(text: str) -> tuple[str, int]:
    """IP:PORT, an IPv6 address in brackets ([2001:db8::1]:443), as (canonical
    address, port)."""
    import ipaddress

    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, like [2001:db8::1]:443")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is no IP:PORT")
    return str(ipaddress.ip_address(host)), int(port)


def _open_maps(pin_dir: str) -> dict[str, BpfMap]:
    from xdplb.dataplane.layout import MAP_LAYOUTS

    dirs = sorted(os.listdir(pin_dir)) if os.path.isdir(pin_dir) else []
    if not dirs:
        raise SystemExit(f"no pinned maps under {pin_dir}: is the agent running?")
    base = f"{pin_dir}/{dirs[-1]}"
    from xdplb.dataplane.bpfsys import BpfMap

    return {n: BpfMap.pinned(f"{base}/{n}") for n, _k, _v in MAP_LAYOUTS
            if os.path.exists(f"{base}/{n}")}


def cmd_conntrack(a: argparse.Namespace) -> int:
    from xdplb.dataplane import conntrack
    from xdplb.dataplane import layout as L

    maps = _open_maps(a.pin_dir)
    if a.action == "flush":
        print(f"flushed {conntrack.flush(maps['ct'], maps['ct_reply'])} entries")
        return 0
    now = L.ct_now_ns()
    flows = conntrack.flows(maps["ct"])
    for f in flows:
        print(f.describe(now))
    print(f"{len(flows)} flows")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from xdplb.dataplane.loader import xdp_state

    try:
        with open(a.state_file) as f:
            state = json.load(f)
    except OSError:
        print(f"no agent state at {a.state_file}: is the agent running?", file=sys.stderr)
        return 1
    print(f"agent pid {state['pid']}, config {state['config']}")
    print(f"pin directory {state['pin_dir']}")
    for ifname, mode in state["interfaces"].items():
        try:
            st = xdp_state(ifname)
            print(f"interface {ifname}: XDP {st.mode or 'detached'} (program id {st.prog_id}),"
                  f" requested {mode}")
        except Exception as e:
            print(f"interface {ifname}: {e}")
    for lst in state["listeners"]:
        host = f"[{lst['address']}]" if ":" in lst["address"] else lst["address"]
        print(f"listener {lst['name']} {host}:{lst['port']}/{lst['protocol']}: "
              f"{lst['backends']} backends, {lst['sourceRoutes']} source routes")
    health = state.get("health", [])
    down = [h for h in health if not h["up"]]
    if health:
        print(f"health checks: {len(health) - len(down)} of {len(health)} backends up")
    for h in down:
        print(f"backend {h['backend']} down ({h['check']} check: {h['error'] or 'failing'}): "
              "no new flows")
    if state.get("lastError"):
        print(f"last error: {state['lastError']}")
    return 0


def _load_only(a: argparse.Namespace) -> tuple[Any, list[Any]]:
    """bcc's module and every program of the data path, loaded (verified) but attached
    nowhere; the maps are not pinned (maps.h), so nothing is left behind."""
    from bcc import BPF

    from xdplb.dataplane.config import cflags
    from xdplb.dataplane.layout import BPF_DIR
    from xdplb.dataplane.loader import PROGRAMS, load_program

    b = BPF(src_file=str(BPF_DIR / "xdplb.c"),
            cflags=[f"-I{BPF_DIR}", *cflags(capacities(a), timeouts(a))])
    return b, [load_program(b, p.func, p.type, flags=p.flags) for p in PROGRAMS]


def cmd_verify(a: argparse.Namespace) -> int:
    try:
        _load_only(a)
    except Exception as e:
        print(f"verification failed: {e}", file=sys.stderr)
        return 1
    from xdplb.dataplane.loader import PROGRAMS

    for spec in PROGRAMS:
        print(f"{spec.pin}: loaded and verified")
    return 0


def cmd_dump(a: argparse.Namespace) -> int:
    from xdplb.dataplane.bpfsys import prog_info
    from xdplb.dataplane.loader import PROGRAMS

    _b, progs = _load_only(a)
    for spec, p in zip(PROGRAMS, progs, strict=True):
        pid = prog_info(p.fd).id
        print(f"== {spec.pin} (id {pid})", flush=True)
        subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(pid)], check=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="xdplb", description="XDP layer-4 load balancer")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("agent", help="run the node agent")
    p.add_argument("--config", default=CONFIG_FILE, help="YAML file of LoadBalancers")
    p.add_argument("--xdp-mode", choices=["native", "generic", "offload"], default="native")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace a foreign XDP program")
    p.add_argument("--detach-on-exit", action=argparse.BooleanOptionalAction, default=None,
                   help="remove programs and pins on a clean stop (default: on standalone)")
    p.add_argument("--cleanup", action="store_true", help="remove programs, filters, pins")
    p.add_argument("--kubernetes", action="store_true", help="take LoadBalancers from the API")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""))
    p.add_argument("--daemonset", default="", metavar="NAMESPACE/NAME",
                   help="the agents' DaemonSet: when it is gone at a stop, clean up as"
                        " --cleanup does (set by the operator)")
    p.add_argument("--lease-namespace", default="",
                   help="namespace of the L2 announcement Leases (default: the --daemonset's;"
                        " neither: no L2 announcement)")
    p.add_argument("--l2-lease-seconds", type=int, default=3,
                   help="an L2 announcer that stops is replaced within this (it renews its"
                        " Lease every third of it; default %(default)s)")
    p.add_argument("--state-file", default=STATE_FILE)
    add_dataplane_args(p)
    add_sni_args(p)
    p.set_defaults(fn=cmd_agent)

    p = sub.add_parser("operator", help="run the Kubernetes operator")
    add_operator_args(p)
    p.set_defaults(fn=cmd_operator)

    p = sub.add_parser("uninstall", help="before deleting an install: stop the operator and"
                       " agents, release LoadBalancers' finalizers, delete NodeStates")
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "xdplb-system"),
                   help="namespace of the operator (default: $POD_NAMESPACE, else %(default)s)")
    p.add_argument("--deployment", default="xdplb-operator", help="the operator's Deployment")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the operator's pods to stop")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.set_defaults(fn=cmd_uninstall)

    p = sub.add_parser("crds", help="print the CustomResourceDefinitions (or write them)")
    p.add_argument("--output-dir", default=None, help="write one YAML file per CRD here")
    p.set_defaults(fn=cmd_crds)

    p = sub.add_parser("validate", help="validate a YAML file of LoadBalancers")
    p.add_argument("file")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("reference", help="print the configuration reference (Markdown)")
    p.add_argument("--output", default=None, help="write it to this file instead")
    p.set_defaults(fn=cmd_reference)

    p = sub.add_parser("explain", help="which listener, route and backend a new flow gets")
    p.add_argument("--config", default=CONFIG_FILE)
    p.add_argument("--src", required=True, help="client IP:PORT ([IPv6]:PORT)")
    p.add_argument("--dst", required=True, help="destination IP:PORT ([IPv6]:PORT)")
    p.add_argument("--proto", default="tcp", choices=["tcp", "udp", "TCP", "UDP"])
    p.add_argument("--sni", default=None, metavar="NAME",
                   help="on an SNI listener: the ClientHello's server name ('' for none)")
    p.add_argument("--any-local", action="store_true",
                   help="let wildcard listeners match any destination")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("status", help="interfaces, mode, programs, applied configuration")
    p.add_argument("--state-file", default=STATE_FILE)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("conntrack", help="list or flush tracked flows")
    p.add_argument("action", choices=["list", "flush"])
    p.add_argument("--pin-dir", default=PIN_ROOT)
    p.set_defaults(fn=cmd_conntrack)

    for name, fn, text in (("verify", cmd_verify, "compile and load without attaching"),
                           ("dump", cmd_dump, "print the translated instructions")):
        p = sub.add_parser(name, help=text)
        add_dataplane_args(p)
        p.set_defaults(fn=fn)

    a = ap.parse_args(argv)
    return int(a.fn(a))


if __name__ == "__main__":
    sys.exit(main())
