"""Compiles, loads and attaches the data path; owns the pins in bpffs.

Maps are pinned under <pin root>/<layout hash>-<capacity hash>: an agent that
starts while an earlier one's pins and programs exist adopts the maps (so
established flows survive) and swaps its programs in atomically. Programs are
pinned there too, under a digest of what compiled them: an agent that finds its
own digest reuses them and skips the compiler (seconds of CPU at every restart).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from xdplb.dataplane import bpfsys
from xdplb.dataplane.apart import run_apart
from xdplb.dataplane.config import (
    COMPILE_CAPS,
    Capacities,
    Timeouts,
    capacity_hash,
    cflags,
    map_entries,
)
from xdplb.dataplane.layout import BPF_DIR, MAP_LAYOUTS, layout_hash
from xdplb.defaults import PIN_ROOT
from xdplb.errors import XdplbError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

XDP_PROG = "xdplb_ingress"
TC_PROG = "xdplb_egress"
TC_INGRESS_PROG = "xdplb_tc_in"
XDP_FLAGS = {"generic": 1 << 1, "native": 1 << 2, "offload": 1 << 3}
XDP_ATTACHED_MODE = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload",
                     1: "native", 2: "generic", 3: "offload"}
TC_EGRESS_PARENT = 0xFFFFFFF3
TC_INGRESS_PARENT = 0xFFFFFFF2
TC_PRIO = 0xC0DE          # fixed prio and handle: replaced in place, never duplicated
TC_HANDLE = 1


class AttachError(XdplbError):
    """A program could not be loaded, attached or detached."""


@dataclass(frozen=True)
class Program:
    """A loaded program of ours (bcc's Function has the same two fields)."""

    fd: int
    name: bytes


@dataclass(frozen=True)
class XdpState:
    prog_id: int
    mode: str   # native | generic | offload | "" when none


def ensure_bpffs(root: str) -> None:
    """Mount a bpffs at (or above) root when none is there yet."""
    path = Path(root)
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:
        if _fs_type(probe) != "bpf":
            mount_at = path if _fs_type(path.parent) != "bpf" else path.parent
            mount_at.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "bpf", "bpf", str(mount_at)], check=True,
                           capture_output=True)
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode().strip() if isinstance(e, subprocess.CalledProcessError) \
            else str(e)
        raise AttachError(f"no bpffs for the pins at {root}, and mounting one failed "
                          f"({detail}): mount a bpffs there (in a pod, the host's "
                          "/sys/fs/bpf) or choose another --pin-dir") from None


def _fs_type(path: Path) -> str:
    best, fstype = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, typ, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fstype = mnt, typ
    return fstype


LD_IMM64, PSEUDO_MAP_FD = 0x18, 1


def swap_map_fds(insns: bytes, swap: dict[int, int]) -> bytes:
    """The instructions with every map reference (a 64-bit immediate load of a map
    fd) to a map in `swap` pointed at its replacement."""
    out = bytearray(insns)
    for off in range(0, len(out) - 8, 8):
        if out[off] == LD_IMM64 and out[off + 1] >> 4 == PSEUDO_MAP_FD:
            fd = int.from_bytes(out[off + 4:off + 8], "little", signed=True)
            if fd in swap:
                out[off + 4:off + 8] = swap[fd].to_bytes(4, "little", signed=True)
    return bytes(out)


def load_program(bpf: Any, func: str, prog_type: int, swap: dict[int, int] | None = None,
                 flags: int = 0) -> Any:
    """Load a function of a bcc module from its relocated instructions: its map
    references swapped (swap_map_fds), and with program flags, which bcc's loader
    cannot pass. XDP programs are loaded multi-buffer aware (xdplb reads only the
    headers, which are in the first buffer), so that native XDP attaches to
    jumbo-MTU interfaces and veths above 3,506 bytes; a program that tail-calls
    one, or that one tail-calls, must be loaded the same way."""
    from bcc import BPF, lib

    name = func.encode()
    start = lib.bpf_function_start(bpf.module, name)
    size = lib.bpf_function_size(bpf.module, name)
    insns = swap_map_fds(ctypes.string_at(start, size), swap or {})
    fd = bpfsys.prog_load(prog_type, insns, func, flags)
    fn = BPF.Function(bpf, name, fd)
    # Closed with the module; a function loaded twice (with other flags) keeps both.
    bpf.funcs[name if name not in bpf.funcs else (name, fd)] = fn
    return fn


def load_xdp_frags(bpf: Any, func: str) -> Any:
    return load_program(bpf, func, bpfsys.PROG_TYPE_XDP, flags=bpfsys.F_XDP_HAS_FRAGS)


class ProgramSpec(NamedTuple):
    pin: str    # its name under the code directory
    func: str   # its function in xdplb.c
    type: int
    flags: int


XDP_GENERIC_PIN = f"{XDP_PROG}_generic"  # bpffs names hold no dot

# The data path's programs. XDP twice: multi-buffer aware for native mode, and without
# that flag for generic mode: a multi-buffer program in generic mode leaves TC ingress
# an skb without its link-layer header and with the frame's metadata misplaced (kernel
# 6.18), and TC ingress completes what XDP leaves it (partial checksums).
PROGRAMS = (ProgramSpec(XDP_PROG, XDP_PROG, bpfsys.PROG_TYPE_XDP, bpfsys.F_XDP_HAS_FRAGS),
            ProgramSpec(XDP_GENERIC_PIN, XDP_PROG, bpfsys.PROG_TYPE_XDP, 0),
            ProgramSpec(TC_PROG, TC_PROG, bpfsys.PROG_TYPE_SCHED_CLS, 0),
            ProgramSpec(TC_INGRESS_PROG, TC_INGRESS_PROG, bpfsys.PROG_TYPE_SCHED_CLS, 0))


def code_digest(flags: list[str]) -> str:
    """Names what compiling the sources with these flags gives on this kernel and bcc."""
    from importlib.metadata import version

    h = hashlib.sha256()
    # The sources, and the Python that relocates and loads them.
    here = Path(__file__).parent
    for path in [*sorted(BPF_DIR.iterdir()), here / "loader.py", here / "bpfsys.py"]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    uname = os.uname()
    h.update(repr((flags, PROGRAMS, uname.release, uname.version, version("bcc"))).encode())
    return h.hexdigest()[:12]


class DataPlane:
    def __init__(self, pin_root: str = PIN_ROOT, caps: Capacities | None = None,
                 timeouts: Timeouts | None = None) -> None:
        self.pin_root = pin_root
        self.caps = caps or Capacities()
        self.timeouts = timeouts or Timeouts()
        self.pin_dir = f"{pin_root}/{layout_hash()}-{capacity_hash(self.caps)}"
        self.bpf: Any = None
        self.xdp_fn: Any = None
        self.xdp_generic_fn: Any = None
        self.tc_fn: Any = None
        self.tc_in_fn: Any = None
        self.maps: dict[str, bpfsys.BpfMap] = {}
        self.adopted = False
        self.reused = False  # the programs were a predecessor's: nothing compiled
        self.code_dir = ""
        self.xdp_ids: tuple[int, ...] = ()
        self.load_seconds = 0.0  # compile and load, for the logs
        self.loading: threading.Thread | None = None  # load_async's
        self._load_error: BaseException | None = None

    # -- load ---------------------------------------------------------------------------
    def load_async(self) -> None:
        """Start load() in a thread: the compiler runs in a child process, so the caller
        can go on meanwhile, then call wait_loaded()."""
        def run() -> None:
            try:
                self.load()
            except BaseException as e:  # raised again by wait_loaded()
                self._load_error = e

        self.loading = threading.Thread(target=run, name="compile")
        self.loading.start()

    def wait_loaded(self) -> None:
        """Wait for load_async's load; raise its error."""
        assert self.loading is not None, "load_async() first"
        self.loading.join()
        if self._load_error is not None:
            raise self._load_error

    def load(self, apart: bool = True) -> None:
        """Take this code's pinned programs, or compile them: in a process of its own
        (`apart`), so that the agent never maps the compiler (bcc and LLVM: ~150 MB
        resident), or here, keeping bcc's module in self.bpf when it compiled (tests
        read its tables)."""
        t0 = time.monotonic()
        ensure_bpffs(self.pin_root)
        stale = self._other_layouts()
        if stale and apart:
            log.warning("pinned maps with another layout or capacity found (%s): flows "
                        "tracked there will be lost when their programs are replaced",
                        ", ".join(stale))
        self.adopted = os.path.exists(f"{self.pin_dir}/ct")
        os.makedirs(self.pin_dir, exist_ok=True)
        self.code_dir = f"{self.pin_dir}/{CODE_PIN_PREFIX}{code_digest(self._cflags())}"
        self.reused = self.adopted and self._take_programs()
        if not self.reused:
            if apart:
                self._compile_apart()
            else:
                self._compile()
        # Pinned under its id, so that this or a later agent recognises the program
        # attached to an interface from the id netlink reports, without CAP_SYS_ADMIN
        # (BPF_PROG_GET_FD_BY_ID); the pin also keeps the id from being reused.
        self.xdp_ids = tuple(bpfsys.prog_info(fn.fd).id
                             for fn in (self.xdp_fn, self.xdp_generic_fn))
        for fn, prog_id in zip((self.xdp_fn, self.xdp_generic_fn), self.xdp_ids, strict=True):
            id_pin = f"{self.pin_dir}/{PROG_PIN_PREFIX}{prog_id}"
            if not os.path.exists(id_pin):
                bpfsys.obj_pin(fn.fd, id_pin)
        self.load_seconds = time.monotonic() - t0

    def _cflags(self) -> list[str]:
        # Compiled and relocated by bcc against maps of its own, made as small as can
        # be; the programs are then loaded against the real maps (see maps.h).
        compile_caps = replace(COMPILE_CAPS, snat_port_min=self.caps.snat_port_min,
                               snat_port_max=self.caps.snat_port_max)
        # No debug info: the programs and maps are loaded without BTF (load_program,
        # _open_maps), so making it would only cost compile time (~0.3 s).
        return [f"-I{BPF_DIR}", "-g0", *cflags(compile_caps, self.timeouts)]

    def _compile(self) -> None:
        """Compile, load against the pinned maps (made now where missing), pin."""
        from bcc import BPF  # system package: imported late so pure modules never need it

        self.bpf = BPF(src_file=str(BPF_DIR / "xdplb.c").encode(), cflags=self._cflags())
        swap = self._open_maps()
        progs = [load_program(self.bpf, p.func, p.type, swap, p.flags) for p in PROGRAMS]
        os.makedirs(self.code_dir, exist_ok=True)
        for p, fn in zip(PROGRAMS, progs, strict=True):
            _pin_anew(fn.fd, f"{self.code_dir}/{p.pin}")
        self._set_programs(progs)

    def _compile_apart(self) -> None:
        """_compile() in a child process (compile_pinned), then take what it pinned."""
        spec = json.dumps({"caps": asdict(self.caps), "timeouts": asdict(self.timeouts)})
        if error := run_apart(f"{__name__}:compile_pinned", self.pin_root, spec):
            raise AttachError(f"compiling the data path failed: {error}")
        if not self._take_programs():
            raise AttachError(f"the compiled programs are not pinned in {self.code_dir}")

    def _take_programs(self) -> bool:
        """Take the programs pinned under this code's digest and the maps they use,
        when every map is pinned and they use no other."""
        pins = [f"{self.code_dir}/{p.pin}" for p in PROGRAMS]
        if not all(os.path.exists(p) for p in pins) or not all(
                os.path.exists(f"{self.pin_dir}/{name}") for name, _k, _v in MAP_LAYOUTS):
            return False
        maps: dict[str, bpfsys.BpfMap] = {}
        progs: list[Program] = []
        try:  # a pin may go meanwhile (another agent's cleanup): then compile
            for name, _k, _v in MAP_LAYOUTS:
                maps[name] = bpfsys.BpfMap.pinned(f"{self.pin_dir}/{name}")
            for spec, pin in zip(PROGRAMS, pins, strict=True):
                progs.append(Program(bpfsys.obj_get(pin), spec.func.encode()))
            pinned_ids = {m.info.id for m in maps.values()}
            usable = all((m.info.key_size, m.info.value_size)
                         == (ctypes.sizeof(k), ctypes.sizeof(v))
                         for (_n, k, v), m in zip(MAP_LAYOUTS, maps.values(), strict=True)) \
                and all(set(bpfsys.prog_map_ids(p.fd)) <= pinned_ids for p in progs)
        except OSError:
            usable = False
        if not usable:
            for m in maps.values():
                m.close()
            for prog in progs:
                os.close(prog.fd)
            return False
        self.maps = maps
        self._set_programs(progs)
        return True

    def _set_programs(self, progs: list[Any]) -> None:
        self.xdp_fn, self.xdp_generic_fn, self.tc_fn, self.tc_in_fn = progs

    def _programs(self) -> list[Any]:
        return [self.xdp_fn, self.xdp_generic_fn, self.tc_fn, self.tc_in_fn]

    def _open_maps(self) -> dict[int, int]:
        """The pinned maps (a predecessor's, adopted), or new ones pinned now; returns
        bcc's map fd -> ours, for the programs' map references."""
        sizes = map_entries(self.caps)
        swap = {}
        for name, _k, _v in MAP_LAYOUTS:
            bcc_fd = self.bpf[name.encode()].map_fd
            shape = bpfsys.map_info(bcc_fd)
            entries = sizes.get(name, shape.max_entries)
            pin = f"{self.pin_dir}/{name}"
            if os.path.exists(pin):
                fd = bpfsys.obj_get(pin)
                have = bpfsys.map_info(fd)
                want = (shape.type, shape.key_size, shape.value_size, entries)
                if (have.type, have.key_size, have.value_size, have.max_entries) != want:
                    os.close(fd)
                    raise AttachError(f"pinned map {pin} has another shape than this agent "
                                      "expects: remove it (xdplb agent --cleanup)")
            else:
                fd = bpfsys.map_create(shape, entries)
                bpfsys.obj_pin(fd, pin)
            self.maps[name] = bpfsys.BpfMap(fd, name)
            swap[bcc_fd] = fd
        return swap

    def _other_layouts(self) -> list[str]:
        """Pin directories of other layouts or capacities (a bpffs root also holds
        files of its own, such as maps.debug: only directories count)."""
        return sorted(d for d in os.listdir(self.pin_root)
                      if d != os.path.basename(self.pin_dir)
                      and os.path.isdir(f"{self.pin_root}/{d}"))

    def remove_stale_pins(self) -> None:
        """Once attached everywhere: drop other layouts' maps and older programs."""
        for d in self._other_layouts():
            shutil.rmtree(f"{self.pin_root}/{d}", ignore_errors=True)
        for pin in Path(self.pin_dir).glob(f"{PROG_PIN_PREFIX}*"):
            if pin.name not in {f"{PROG_PIN_PREFIX}{i}" for i in self.xdp_ids}:
                pin.unlink(missing_ok=True)
        for code in Path(self.pin_dir).glob(f"{CODE_PIN_PREFIX}*"):
            if code.name != os.path.basename(self.code_dir):
                shutil.rmtree(code, ignore_errors=True)
        for work in Path(self.pin_dir).glob("splice-*"):  # an agent killed mid-compile
            shutil.rmtree(work, ignore_errors=True)

    # -- attach -------------------------------------------------------------------------
    def attach(self, ifname: str, mode: str = "native", force: bool = False) -> str:
        """Attach XDP and TC to ifname; returns the XDP mode in effect."""
        if mode == "offload":
            raise AttachError("offload mode is not supported: the hash, LRU and LPM maps "
                              "of the data path cannot be offloaded to a NIC")
        cur = xdp_state(ifname)
        if cur.prog_id and not force and not is_ours(cur.prog_id, self.pin_root):
            raise AttachError(f"{ifname} already runs XDP program {program_name(cur.prog_id)}"
                              f" (id {cur.prog_id}); pass --force to replace it")
        if cur.prog_id and cur.mode != mode:
            log.info("%s: XDP mode %s -> %s: detaching first (packets pass unbalanced "
                     "for the gap)", ifname, cur.mode, mode)
            _set_xdp(ifname, -1, XDP_FLAGS[cur.mode])
        try:
            _set_xdp(ifname, self._xdp_for(mode).fd, XDP_FLAGS[mode])
            in_effect = mode
        except Exception as e:
            if mode != "native":
                raise AttachError(f"{ifname}: cannot attach XDP in {mode} mode: {e}") from e
            log.warning("%s: native XDP unavailable (%s); falling back to generic mode",
                        ifname, e)
            _set_xdp(ifname, self.xdp_generic_fn.fd, XDP_FLAGS["generic"])
            in_effect = "generic"
        _attach_tc(ifname, self.tc_fn.fd, self.tc_fn.name.decode(), TC_EGRESS_PARENT)
        # What XDP leaves to the skb path: rewrites of packets with a partial checksum.
        self.attach_backend_side(ifname)
        return in_effect

    def _xdp_for(self, mode: str) -> Any:
        return self.xdp_generic_fn if mode == "generic" else self.xdp_fn

    def attach_backend_side(self, ifname: str) -> None:
        """TC ingress: on an interface that runs no XDP of ours, the replies of source-NAT
        flows."""
        _attach_tc(ifname, self.tc_in_fn.fd, self.tc_in_fn.name.decode(),
                   TC_INGRESS_PARENT)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        else:
            for fn in self._programs():
                if fn is not None:
                    os.close(fn.fd)
        self.xdp_fn = self.xdp_generic_fn = self.tc_fn = self.tc_in_fn = None


def compile_pinned(pin_root: str, spec: str) -> None:
    """The child's part of DataPlane.load(): compile, load against the pinned maps
    (creating those that are missing) and pin the programs under their code digest.
    ``spec``: JSON of the capacities and timeouts."""
    cfg = json.loads(spec)
    DataPlane(pin_root, Capacities(**cfg["caps"]), Timeouts(**cfg["timeouts"])).load(apart=False)


def _iproute() -> IPRoute:
    from pyroute2 import IPRoute  # 0.15 s to import: after the compiler has started

    return IPRoute()


def _ifindex(ipr: IPRoute, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise AttachError(f"interface {ifname} does not exist")
    return int(idx[0])


def xdp_state(ifname: str) -> XdpState:
    with _iproute() as ipr:
        return _xdp_of(ipr.get_links(_ifindex(ipr, ifname))[0])


def _xdp_of(link: Any) -> XdpState:
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return XdpState(0, "")
    attrs = dict(xdp["attrs"])
    return XdpState(int(attrs.get("IFLA_XDP_PROG_ID") or 0),
                    XDP_ATTACHED_MODE.get(attrs.get("IFLA_XDP_ATTACHED") or 0, ""))


def _set_xdp(ifname: str, fd: int, flags: int) -> None:
    """Attach the XDP program ``fd`` in the mode of ``flags`` (-1: detach it)."""
    with _iproute() as ipr:
        ipr.link("set", index=_ifindex(ipr, ifname),
                 xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})


def _attach_tc(ifname: str, fd: int, name: str, parent: int) -> None:
    with _iproute() as ipr:
        idx = _ifindex(ipr, ifname)
        try:
            ipr.tc("add", "clsact", idx)
        except Exception as e:  # an existing clsact is kept: other filters may live there
            if getattr(e, "code", None) != errno.EEXIST:
                raise
        ipr.tc("replace-filter", "bpf", idx, handle=TC_HANDLE, prio=TC_PRIO, fd=fd, name=name,
               parent=parent, classid=1, direct_action=True)


def _detach_tc(ifname: str, parent: int) -> None:
    with _iproute() as ipr:
        ipr.tc("del-filter", "bpf", _ifindex(ipr, ifname), handle=TC_HANDLE, prio=TC_PRIO,
               parent=parent)


def tc_filters(ifname: str, parent: int = TC_EGRESS_PARENT) -> list[str]:
    """Names of the BPF filters of a clsact hook (egress or ingress) at our prio."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ipr:
        idx = _ifindex(ipr, ifname)
        try:
            filters = ipr.get_filters(idx, parent=parent)
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.ENODEV):  # no such hook, or the link went
                return []
            raise
    names = []
    for f in filters:
        opts = f.get_attr("TCA_OPTIONS")
        if opts and (n := opts.get_attr("TCA_BPF_NAME")):
            names.append(n)
    return names


# The names of our filters on each hook; xdplb_backend_in is what earlier versions named
# the TC ingress program, whose filters an upgraded agent removes too.
OUR_FILTERS = {TC_EGRESS_PARENT: (TC_PROG,), TC_INGRESS_PARENT: (TC_INGRESS_PROG,
                                                                 "xdplb_backend_in")}


def _has_our_filter(ifname: str, parent: int) -> bool:
    return any(n.startswith(OUR_FILTERS[parent]) for n in tc_filters(ifname, parent))


PROG_PIN_PREFIX = "xdp-"
CODE_PIN_PREFIX = "code-"  # a directory of the programs compiled from one code digest


def _pin_anew(fd: int, path: str) -> None:
    if os.path.exists(path):  # the same code loaded again: the newer load wins
        os.unlink(path)
    bpfsys.obj_pin(fd, path)


def pinned_program_ids(pin_root: str = PIN_ROOT) -> set[int]:
    """Ids of the XDP programs agents pinned under pin_root (a pin's name carries it)."""
    ids = set()
    for pin in Path(pin_root).glob(f"*/{PROG_PIN_PREFIX}*"):
        suffix = pin.name.removeprefix(PROG_PIN_PREFIX)
        if suffix.isdigit():
            ids.add(int(suffix))
    return ids


def program_name(prog_id: int) -> str:
    """The program's name in quotes, or "unknown" where reading it needs CAP_SYS_ADMIN."""
    try:
        return repr(bpfsys.prog_name_by_id(prog_id))
    except OSError:
        return "unknown"


def is_ours(prog_id: int, pin_root: str = PIN_ROOT) -> bool:
    """An xdplb program: pinned by an agent under pin_root, or (an agent whose pins
    are gone) named like one, when the name can be read."""
    if prog_id in pinned_program_ids(pin_root):
        return True
    try:
        return bpfsys.prog_name_by_id(prog_id) == XDP_PROG
    except OSError:
        return False


def detach(ifname: str, pin_root: str = PIN_ROOT, keep: tuple[int, ...] = ()) -> bool:
    """Remove our XDP program and TC filters (but those of the hooks in ``keep``) from
    ifname; leave anything else. Returns whether anything of ours was there."""
    removed = False
    try:
        cur = xdp_state(ifname)
    except AttachError:
        return False
    if cur.prog_id and is_ours(cur.prog_id, pin_root):
        _set_xdp(ifname, -1, XDP_FLAGS[cur.mode or "generic"])
        removed = True
    for parent in OUR_FILTERS.keys() - set(keep):
        if _has_our_filter(ifname, parent):
            _detach_tc(ifname, parent)
            removed = True
    return removed


def attached_interfaces(pin_root: str = PIN_ROOT) -> list[str]:
    """Interfaces in this network namespace that run our XDP program, or only our TC
    ingress filter for source-NAT replies (one link dump, then the TC ingress of each
    link without our XDP)."""
    with _iproute() as ipr:
        links = [(link.get_attr("IFLA_IFNAME"), _xdp_of(link)) for link in ipr.get_links()]
    return [n for n, xdp in links
            if (xdp.prog_id and is_ours(xdp.prog_id, pin_root))
            or _has_our_filter(n, TC_INGRESS_PARENT)]


def cleanup(pin_root: str = PIN_ROOT) -> list[str]:
    """Detach from every interface and remove the pins; returns what was detached."""
    detached = [n for n in attached_interfaces(pin_root) if detach(n, pin_root)]
    if os.path.isdir(pin_root):
        shutil.rmtree(pin_root, ignore_errors=True)
    return detached

