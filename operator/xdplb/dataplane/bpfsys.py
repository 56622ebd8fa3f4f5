"""Thin ctypes wrappers around the bpf(2) commands the agent needs beyond bcc:
opening pins, map element operations, object info and BPF_PROG_TEST_RUN."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from functools import cache

from xdplb.errors import XdplbError

_libc = ctypes.CDLL(None, use_errno=True)
# bpf(2)'s system call number (asm/unistd.h of each architecture).
SYS_BPF_BY_MACHINE = {"x86_64": 321, "i386": 357, "i686": 357, "aarch64": 280, "riscv64": 280,
                      "loongarch64": 280, "armv7l": 386, "ppc64le": 361, "ppc64": 361,
                      "s390x": 351, "mips64": 5315}


@cache
def _sys_bpf() -> int:
    machine = os.uname().machine
    if machine not in SYS_BPF_BY_MACHINE:
        raise BpfError(errno.ENOSYS, f"bpf(2): no system call number known for {machine}")
    return SYS_BPF_BY_MACHINE[machine]

MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
MAP_CREATE = 0
PROG_LOAD, OBJ_PIN, OBJ_GET = 5, 6, 7
PROG_TEST_RUN = 10
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH, MAP_UPDATE_BATCH, MAP_DELETE_BATCH = 24, 26, 27


class BpfError(XdplbError, OSError):
    """A bpf(2) command failed: errno and strerror as OSError has them."""


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    ret: int = _libc.syscall(_sys_bpf(), cmd, attr, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({cmd}): {os.strerror(err)}")
    return ret


def _attr(fmt: str, *values: int | bytes) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(128)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _addr(obj: ctypes._CData | ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if obj is None else ctypes.addressof(obj)


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    return bpf(OBJ_GET, _attr("=QII", ctypes.addressof(p), 0, 0))


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    bpf(OBJ_PIN, _attr("=QII", ctypes.addressof(p), fd, 0))


PROG_TYPE_SCHED_CLS, PROG_TYPE_XDP = 3, 6
F_XDP_HAS_FRAGS = 1 << 5


def prog_load(prog_type: int, insns: bytes, name: str, flags: int = 0,
              license: str = "GPL") -> int:
    """Load already-relocated instructions; the verifier log is in the error on failure."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(1 << 20)
    attr = _attr("=IIQQIIQII16s", prog_type, len(insns) // 8, ctypes.addressof(code),
                 ctypes.addressof(lic), 0, 0, 0, 0, flags, name.encode()[:15])
    try:
        return bpf(PROG_LOAD, attr)
    except BpfError:
        struct.pack_into("=IIQ", attr, 24, 1, len(log), ctypes.addressof(log))
        try:
            return bpf(PROG_LOAD, attr)
        except BpfError as e:
            raise BpfError(e.errno, f"{e.strerror}\n{log.value.decode(errors='replace')}") from e


def prog_get_fd_by_id(prog_id: int) -> int:
    return bpf(PROG_GET_FD_BY_ID, _attr("=III", prog_id, 0, 0))


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    flags: int = 0


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(88)
    bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), ctypes.addressof(info)))
    typ, mid, ks, vs, me, flags = struct.unpack_from("=6I", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(typ, mid, ks, vs, me, name, flags)


def map_create(info: MapInfo, max_entries: int) -> int:
    """A new map shaped like `info` (type, key and value sizes, flags, name)."""
    return bpf(MAP_CREATE, _attr("=IIIIIII16s", info.type, info.key_size, info.value_size,
                                 max_entries, info.flags, 0, 0, info.name.encode()[:15]))


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    info = ctypes.create_string_buffer(256)
    bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), ctypes.addressof(info)))
    typ, pid = struct.unpack_from("=II", info, 0)
    return ProgInfo(typ, pid, info.raw[64:80].split(b"\0", 1)[0].decode())


def prog_map_ids(fd: int, most: int = 64) -> list[int]:
    """Ids of the maps a loaded program uses (bpf_prog_info's map_ids)."""
    ids = (ctypes.c_uint32 * most)()
    info = ctypes.create_string_buffer(256)
    struct.pack_into("=IQ", info, 52, most, ctypes.addressof(ids))
    bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), ctypes.addressof(info)))
    n = struct.unpack_from("=I", info, 52)[0]
    if n > most:
        return prog_map_ids(fd, n)
    return list(ids[:n])


def prog_name_by_id(prog_id: int) -> str:
    fd = prog_get_fd_by_id(prog_id)
    try:
        return prog_info(fd).name
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes        # the frame as the program left it (for XDP, its metadata first)
    duration_ns: int
    ctx: bytes = b""   # the context as the program left it (xdp_md: where data starts)


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1,
                  ctx: bytes | None = None) -> TestRun:
    """Run a loaded program on `data`; `duration_ns` is the mean per run."""
    din = ctypes.create_string_buffer(data, len(data))
    dout = ctypes.create_string_buffer(len(data) + 256)
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    cout = ctypes.create_string_buffer(len(ctx)) if ctx else None
    attr = _attr("=IIIIQQIIIIQQ", prog_fd, 0, len(data), len(dout), ctypes.addressof(din),
                 ctypes.addressof(dout), repeat, 0, len(ctx) if ctx else 0,
                 len(ctx) if ctx else 0, _addr(cin), _addr(cout))
    bpf(PROG_TEST_RUN, attr)
    _fd, retval, _in, out_size = struct.unpack_from("=IIII", attr, 0)
    duration = struct.unpack_from("=I", attr, 36)[0]
    return TestRun(retval, dout.raw[:out_size], duration, cout.raw if cout else b"")


class BpfMap:
    """A map by fd with raw-bytes element operations. `syscalls` counts the
    bpf(2) calls made, for the agent's per-change log line."""

    def __init__(self, fd: int, name: str = "") -> None:
        self.fd = fd
        self.info = map_info(fd)
        self.name = name or self.info.name
        self.syscalls = 0
        ncpu = possible_cpus()
        percpu = self.info.type in (6, 10, 13)  # percpu hash, array, lru hash
        self.value_size = ((self.info.value_size + 7) // 8 * 8) * ncpu if percpu \
            else self.info.value_size

    @classmethod
    def pinned(cls, path: str) -> BpfMap:
        return cls(obj_get(path), os.path.basename(path))

    def close(self) -> None:
        os.close(self.fd)

    def _elem(self, cmd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None,
              flags: int = 0) -> None:
        k = ctypes.create_string_buffer(key, len(key))
        self.syscalls += 1
        bpf(cmd, _attr("=IIQQQ", self.fd, 0, ctypes.addressof(k), _addr(value), flags))

    def update(self, key: bytes, value: bytes) -> None:
        self._elem(MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, len(value)))

    def delete(self, key: bytes) -> None:
        self._elem(MAP_DELETE_ELEM, key, None)

    def lookup(self, key: bytes) -> bytes | None:
        v = ctypes.create_string_buffer(self.value_size)
        try:
            self._elem(MAP_LOOKUP_ELEM, key, v)
        except BpfError as e:
            if e.errno == 2:
                return None
            raise
        return v.raw

    def update_batch(self, keys: list[bytes], values: list[bytes]) -> None:
        if not keys:
            return
        kb = ctypes.create_string_buffer(b"".join(keys))
        vb = ctypes.create_string_buffer(b"".join(values))
        self.syscalls += 1
        bpf(MAP_UPDATE_BATCH, _attr("=QQQQIIQQ", 0, 0, ctypes.addressof(kb),
                                    ctypes.addressof(vb), len(keys), self.fd, 0, 0))

    def keys(self) -> list[bytes]:
        out: list[bytes] = []
        prev: bytes | None = None
        nxt = ctypes.create_string_buffer(self.info.key_size)
        while True:
            pk = ctypes.create_string_buffer(prev, len(prev)) if prev is not None else None
            try:
                self.syscalls += 1
                bpf(MAP_GET_NEXT_KEY, _attr("=IIQQQ", self.fd, 0, _addr(pk),
                                            ctypes.addressof(nxt), 0))
            except BpfError as e:
                if e.errno == 2:
                    return out
                raise
            prev = nxt.raw
            out.append(prev)

    def items(self, chunk: int = 4096) -> list[tuple[bytes, bytes]]:
        """Every element, read with BPF_MAP_LOOKUP_BATCH (a few syscalls per
        thousand entries, not two per entry)."""
        ks, vs = self.info.key_size, self.value_size
        keys = ctypes.create_string_buffer(ks * chunk)
        values = ctypes.create_string_buffer(vs * chunk)
        # Hash maps use a u32 bucket as the batch token, generic maps a whole key.
        tok = max(8, ks)
        tok_in = ctypes.create_string_buffer(tok)
        tok_out = ctypes.create_string_buffer(tok)
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            attr = _attr("=QQQQIIQQ", 0 if first else ctypes.addressof(tok_in),
                         ctypes.addressof(tok_out), ctypes.addressof(keys),
                         ctypes.addressof(values), chunk, self.fd, 0, 0)
            done = False
            try:
                self.syscalls += 1
                bpf(MAP_LOOKUP_BATCH, attr)
            except BpfError as e:
                if e.errno != 2:
                    raise
                done = True
            n = struct.unpack_from("=I", attr, 32)[0]
            kr, vr = keys.raw, values.raw
            out.extend((kr[i * ks:(i + 1) * ks], vr[i * vs:(i + 1) * vs]) for i in range(n))
            if done:
                return out
            ctypes.memmove(tok_in, tok_out, tok)
            first = False

    def delete_batch(self, keys: list[bytes]) -> None:
        if not keys:
            return
        kb = ctypes.create_string_buffer(b"".join(keys))
        self.syscalls += 1
        bpf(MAP_DELETE_BATCH, _attr("=QQQQIIQQ", 0, 0, ctypes.addressof(kb), 0, len(keys),
                                    self.fd, 0, 0))


def possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    total = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total
