"""The fast YAML path (yaml-rs) gives exactly what PyYAML's safe loader gives, or is not taken."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from xdplb.spec import yamldoc
from xdplb.spec.yamldoc import documents

ROOT = Path(__file__).resolve().parent.parent

# Scalars where YAML 1.1 and 1.2 agree, where they differ, and YAML syntax.
WORDS = [
    "web", "api.example.com", "10.0.0.1", "10.0.0.0/24", "0", "7", "8080", "-1", "+12",
    "true", "False", "TRUE", "null", "Null", "~", "", "a b", "a:b", "x#y", "-", "--", ".",
    "yes", "No", "ON", "off", "y", "n", "017", "0o17", "0x1F", "0b11", "1_000", "1e3",
    "1.5", ".5", ".inf", "-.Inf", ".NaN", "1:30", "2001-12-14", "2001-12-14 21:59:43",
    "1.2.3", "01.2.3.4", "=", "<<", "&a", "*a", "!!str 5", "!custom x", "|", ">", "?",
    "%x", "@x", "`x", "a\\tb", "é", "#c", "[", "]", "{", "}", ",", ":", "'", '"', "...",
    "---", "tRUE", "nO", "0.", "1.", "+.5", "-0", "00", "12:30:00", "1,5", "_80", "-_1",
]


def scalar() -> st.SearchStrategy[str]:
    word = st.sampled_from(WORDS)
    return st.one_of(
        word,
        word.map(lambda w: "'" + w.replace("'", "''") + "'"),
        word.map(lambda w: '"' + w.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    )


def flow(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(children, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(scalar(), children), max_size=3).map(
            lambda kvs: "{" + ", ".join(f"{k}: {v}" for k, v in kvs) + "}"),
    )


def block(depth: int) -> st.SearchStrategy[list[str]]:
    """The lines of a block collection, indented by the caller."""
    value: st.SearchStrategy[Any] = st.one_of(scalar(), flow(scalar()))
    if depth > 0:
        value = st.one_of(value, block(depth - 1))

    def lines(pairs: list[tuple[str, Any]], seq: bool) -> list[str]:
        out = []
        for key, v in pairs:
            lead = "- " if seq else f"{key}:"
            if isinstance(v, list):
                out.append(lead.rstrip() if seq else lead)
                out += ["  " + line for line in v]
            else:
                out.append(f"{lead} {v}" if not seq else f"- {v}")
        return out

    pairs = st.lists(st.tuples(scalar(), value), min_size=1, max_size=4)
    return st.tuples(pairs, st.booleans()).map(lambda p: lines(*p))


def typed(x: Any) -> Any:
    """`x` with every type spelled out (True == 1 and 1.0 == 1 in Python)."""
    if isinstance(x, dict):
        return ("map", tuple((typed(k), typed(v)) for k, v in x.items()))
    if isinstance(x, list | tuple):
        return ("seq", tuple(typed(i) for i in x))
    if isinstance(x, float) and math.isnan(x):
        return ("float", "nan")
    return (type(x).__name__, x)


def outcome(load: Any, text: str) -> Any:
    try:
        return typed(load(text))
    except yaml.YAMLError:
        return "error"


def pyyaml(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=yamldoc._Loader))


# Derandomized: the same examples every run, so CI never meets a new one by chance
# (explored beyond that with many more examples while writing the guard).
@settings(max_examples=600, deadline=None, derandomize=True)
@given(st.one_of(block(2).map("\n".join), flow(flow(scalar()))),
       st.sampled_from(["", "---\n", "# note\n"]))
def test_same_result_as_pyyaml(body: str, head: str) -> None:
    text = head + body + "\n"
    assert outcome(documents, text) == outcome(pyyaml, text), text


EXAMPLES = [(ROOT / "examples" / name).read_text().split("\n---\n")[0] for name in
            ("lab.yaml", "source-nat.yaml", "cluster/basic.yaml", "cluster/web.yaml")]
EDITS = [*" :-,[]{}#'\"\nab01/._y", "  ", "- ", ": ", "\n  ", "\n- ", "yes", "'x'", "{}"]


@settings(max_examples=600, deadline=None, derandomize=True)
@given(st.sampled_from(EXAMPLES), st.lists(st.tuples(
    st.floats(0, 1), st.sampled_from(["insert", "delete", "copy line"]), st.sampled_from(EDITS)),
    min_size=1, max_size=6))
def test_edited_manifests_same_result_as_pyyaml(
        text: str, edits: list[tuple[float, str, str]]) -> None:
    """Manifests with typos where libyaml is stricter than yaml-rs (a key split
    over lines, a ':' before a ',', an empty key)."""
    for where, how, what in edits:
        at = int(where * len(text))
        if how == "insert":
            text = text[:at] + what + text[at:]
        elif how == "delete":
            text = text[:at] + text[at + len(what):]
        else:
            lines = text.split("\n")
            lines.insert(at % len(lines), lines[len(what) % len(lines)])
            text = "\n".join(lines)
    assert outcome(documents, text) == outcome(pyyaml, text), text


def test_plain_manifests_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = EXAMPLES
    expected = [pyyaml(t) for t in texts]

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("PyYAML was used")

    monkeypatch.setattr(yaml, "load_all", refuse)
    assert [documents(t) for t in texts] == expected


@pytest.mark.parametrize("text", [
    "port: 017\n",            # 15 in YAML 1.1, 17 in 1.2
    "enabled: yes\n",         # a boolean in 1.1, a string in 1.2
    "x: 1e3\n",               # a string in 1.1, a float in 1.2
    "a: &x {p: 1}\nb:\n  <<: *x\n",  # merge keys are 1.1 only
    "port: _80\n",            # a string in 1.1; 80 for yaml-rs
    "- :\n",                  # an empty key: libyaml refuses it, yaml-rs does not
    "m: {na\n  me: web}\n",   # a key over two lines: likewise
    "m: {name:, web}\n",      # a ':' before a ',': likewise
])
def test_yaml_11_and_stricter_forms_are_read_by_pyyaml(text: str) -> None:
    assert not yamldoc._same_in_both(text)
    assert outcome(documents, text) == outcome(pyyaml, text)


def test_errors_are_pyyaml_s() -> None:
    assert yamldoc._same_in_both("a: 1\na: 2\n")  # yaml-rs refuses it, without a line
    with pytest.raises(yaml.MarkedYAMLError, match="duplicate key 'a'") as info:
        documents("a: 1\na: 2\n")
    assert info.value.problem_mark is not None and info.value.problem_mark.line == 1


@settings(max_examples=600, deadline=None, derandomize=True)
@given(st.text(alphabet="0123456789_.+-eExXoObB:aAnNyYtTfFlLiIsS~/ ", min_size=1, max_size=7),
       st.sampled_from(["k: {}\n", "- {}\n", "{}: v\n", "k: [{}, x]\n", "k: {{a: {}}}\n"]))
def test_plain_scalars_same_result_as_pyyaml(token: str, context: str) -> None:
    """Scalars where the 1.1 and 1.2 core schemas, or the two parsers, read numbers,
    booleans and nulls differently (yaml-rs reads `_80` as 80)."""
    text = context.format(token)
    assert outcome(documents, text) == outcome(pyyaml, text), text
