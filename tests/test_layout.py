"""The mirror (dataplane/layout.py) against layout.h: the ctypes structures against the
C ones as bcc builds them from the compiled source and as the kernel created the maps;
every #define and enum against layout.py's constants."""

from __future__ import annotations

import ast
import ctypes
import operator
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


# --- every constant of layout.h against its mirror in layout.py ---------------------

def _layout_h() -> str:
    """layout.h without comments, continuation lines joined."""
    text = (L.BPF_DIR / "layout.h").read_text()
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S).replace("\\\n", " ")


DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(?:\(([^)]*)\))?(.*)$", re.M)
ENUM = re.compile(r"\benum\s+(\w+)\s*\{(.*?)\}\s*;", re.S)

# (parameters or None, body) of every #define with a value; a bare #define (the
# include guard) has nothing to mirror.
DEFINES = {m[1]: (None if m[2] is None else [a.strip() for a in m[2].split(",")],
                  m[3].strip())
           for m in DEFINE.finditer(_layout_h()) if m[3].strip()}
OBJECT_MACROS = sorted(n for n, (params, _) in DEFINES.items() if params is None)
FUNCTION_MACROS = sorted(n for n, (params, _) in DEFINES.items() if params is not None)

_C_INT = re.compile(r"\b(0[xX][0-9a-fA-F]+|[0-9]+)[uUlL]*\b")
_C_OPS = {ast.BitOr: operator.or_, ast.BitAnd: operator.and_, ast.BitXor: operator.xor,
          ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.Add: operator.add,
          ast.Sub: operator.sub, ast.Mult: operator.mul}


def c_value(expr: str, names: dict[str, int] | None = None) -> int:
    """An integer constant expression of layout.h (literals, other object-like
    macros, names given, | & ^ << >> + - *), as C computes it for small values."""
    names = names or {}

    def ev(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            if node.id in names:
                return names[node.id]
            if node.id in DEFINES and DEFINES[node.id][0] is None:
                return c_value(DEFINES[node.id][1])
        if isinstance(node, ast.BinOp) and type(node.op) in _C_OPS:
            return _C_OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"cannot evaluate {ast.unparse(node)!r} in {expr!r}: teach c_value")

    return ev(ast.parse(_C_INT.sub(r"\1", expr), mode="eval").body)


def c_enums() -> dict[str, list[tuple[str, int]]]:
    """Every enum of layout.h: its members and their values, in order."""
    enums = {}
    for name, body in ENUM.findall(_layout_h()):
        members, value = [], 0
        for entry in filter(None, (e.strip() for e in body.split(","))):
            member, _, explicit = (part.strip() for part in entry.partition("="))
            value = c_value(explicit) if explicit else value
            members.append((member, value))
            value += 1
        enums[name] = members
    return enums


def test_layout_h_is_parsed() -> None:
    # A parser that found nothing would pass every test below.
    assert {"LF_SNAT", "CT_PAIRED", "BF_LIVE", "MAX_SNI_ROUTES"} <= set(OBJECT_MACROS)
    assert {"PF_LISTENER", "PF_SNAT"} <= set(FUNCTION_MACROS)
    assert "stat" in c_enums()


@pytest.mark.parametrize("name", OBJECT_MACROS)
def test_define_matches_layout_py(name: str) -> None:
    value = c_value(DEFINES[name][1])
    assert hasattr(L, name), f"layout.h defines {name} ({value}); layout.py lacks {name}"
    assert getattr(L, name) == value, f"{name}: layout.h {value}, layout.py {getattr(L, name)}"


@pytest.mark.parametrize("name", FUNCTION_MACROS)
def test_function_macro_matches_layout_py(name: str) -> None:
    # PF_LISTENER(proto) <-> layout.pf_listener(proto), for every protocol used.
    params, body = DEFINES[name]
    assert params is not None and len(params) == 1, f"{name}: one parameter expected"
    py = getattr(L, name.lower(), None)
    assert py is not None, f"layout.h defines {name}(); layout.py lacks {name.lower()}()"
    for proto in L.PROTO.values():
        c = c_value(body, {params[0]: proto})
        assert py(proto) == c, f"{name}({proto}): layout.h {c}, layout.py {py(proto)}"


def test_layout_py_has_no_constant_layout_h_lacks() -> None:
    # The other way round: a constant of a family layout.h uses (LF_, CT_, ...)
    # that layout.py still holds after layout.h dropped or renamed it.
    families = tuple({n.split("_")[0] + "_" for n in OBJECT_MACROS})
    stale = [n for n, v in vars(L).items()
             if n.startswith(families) and type(v) is int and n not in DEFINES]
    assert not stale, f"layout.py defines {stale}, layout.h does not"


@pytest.mark.parametrize("name", sorted(c_enums()))
def test_enum_matches_layout_py(name: str) -> None:
    # enum stat <-> layout.Stat: ST_NOMATCH is Stat.NOMATCH; a last ST_MAX counts them.
    members = c_enums()[name]
    py_name = "".join(part.capitalize() for part in name.split("_"))
    py = getattr(L, py_name, None)
    assert py is not None, f"layout.h has enum {name}; layout.py lacks {py_name}"
    prefix = members[0][0].split("_")[0] + "_"
    count = members.pop()[1] if members[-1][0] == f"{prefix}MAX" else None
    c = {m.removeprefix(prefix): v for m, v in members}
    missing = [prefix + m for m in c if m not in py.__members__]
    assert not missing, f"enum {name} has {missing}; layout.py's {py_name} lacks them"
    extra = [m for m in py.__members__ if m not in c]
    assert not extra, f"layout.py's {py_name} has {extra}; enum {name} lacks them"
    assert {m.name: m.value for m in py} == c, f"values of enum {name} and {py_name} differ"
    if count is not None:
        assert count == len(py), f"{prefix}MAX is {count}, layout.py's {py_name} has {len(py)}"
