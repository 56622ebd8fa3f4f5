"""The ctypes mirror (dataplane/layout.py) against the C structures of layout.h: as
bcc builds them from the compiled source, and as the kernel created the maps."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.datapath import Harness, needs_bpf
from xdplb.dataplane import layout as L
from xdplb.dataplane.config import Timeouts, cflags, map_entries


def _describe(t: Any) -> Any:
    """Size and, recursively, every field's name, offset and size. bcc builds packed
    ctypes structures with explicit `__pad_N` fields where C pads: those are skipped,
    the offsets of the named fields show any padding difference."""
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return (ctypes.sizeof(t),
                [(name, getattr(t, name).offset, getattr(t, name).size, _describe(ft))
                 for name, ft, *_bits in t._fields_ if not name.startswith("__pad")])
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        return (ctypes.sizeof(t), t._length_, _describe(t._type_))
    return ctypes.sizeof(t)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@needs_bpf
@pytest.mark.parametrize(("name", "key", "value"), L.MAP_LAYOUTS,
                         ids=[m[0] for m in L.MAP_LAYOUTS])
def test_map_layout_matches_c(harness: Harness, name: str, key: type, value: type) -> None:
    table = harness.dp.bpf[name.encode()]
    c_key = table.Key
    c_value = getattr(table, "sLeaf", None) or table.Leaf  # per-CPU maps: one CPU's value
    assert _describe(key) == _describe(c_key)
    assert _describe(value) == _describe(c_value)
    info = harness.maps[name].info
    assert (info.key_size, info.value_size) == (ctypes.sizeof(key), ctypes.sizeof(value))


MAP_DEF = re.compile(r"BPF_(?:F_)?TABLE\(\s*\"\w+\",\s*[^,]+,\s*[^,]+,\s*(\w+),\s*(\w+)")


def test_every_map_of_maps_h_has_a_layout() -> None:
    names = [name for name, _size in MAP_DEF.findall((L.BPF_DIR / "maps.h").read_text())]
    assert sorted(names) == sorted(m[0] for m in L.MAP_LAYOUTS)


def test_map_sizes_follow_the_capacity_flags(harness: Harness) -> None:
    # maps.h sizes a map by a -D define; the agent creates it from map_entries():
    # both must name the same capacity flag.
    defines = dict(f.removeprefix("-D").split("=", 1)
                   for f in cflags(harness.caps, Timeouts()))
    sizes = map_entries(harness.caps)
    for name, size in MAP_DEF.findall((L.BPF_DIR / "maps.h").read_text()):
        created = harness.maps[name].info.max_entries
        if name in sizes:
            assert int(defines[size]) == sizes[name] == created, name
        else:  # a fixed size: what bcc compiled
            assert created == harness.dp.bpf[name.encode()].max_entries, name


def _c_enum_stat() -> list[str]:
    text = (L.BPF_DIR / "layout.h").read_text()
    body = re.search(r"enum\s+stat\s*\{(.*?)\};", text, re.S)
    assert body is not None
    without_comments = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    entries = [e.strip() for e in without_comments.split(",") if e.strip()]
    names = []
    for i, e in enumerate(entries):
        name, _, value = (p.strip() for p in e.partition("="))
        if value:
            assert int(value, 0) == i, f"{name} = {value} breaks the implicit numbering"
        names.append(name)
    return names


def test_stat_enum_matches_c() -> None:
    names = _c_enum_stat()
    assert names[-1] == "ST_MAX"
    assert names[:-1] == [f"ST_{s.name}" for s in L.Stat]
    assert [s.value for s in L.Stat] == list(range(len(L.Stat)))


@pytest.mark.parametrize(("c_name", "py_value"), [
    ("LF_SNI", L.LF_SNI), ("LF_CLIENT_IP", L.LF_CLIENT_IP),
    ("LF_SRC_ROUTES", L.LF_SRC_ROUTES), ("GF_IN_USE", L.GF_IN_USE),
    ("CT_REPLIED", L.CT_REPLIED), ("CT_FIN_FWD", L.CT_FIN_FWD),
    ("CT_FIN_REV", L.CT_FIN_REV), ("CT_RST", L.CT_RST),
])
def test_flag_values_match_c(c_name: str, py_value: int) -> None:
    text = (L.BPF_DIR / "layout.h").read_text()
    m = re.search(rf"#define\s+{c_name}\s+(\w+)", text)
    assert m is not None and int(m.group(1), 0) == py_value
