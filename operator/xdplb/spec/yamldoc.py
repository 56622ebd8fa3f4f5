"""YAML text -> plain Python documents, with the semantics of PyYAML's safe loader.

PyYAML (YAML 1.1, like kubectl) decides what a manifest means. It builds a
node object per scalar, which makes a 100,000-route file take seconds, so a
document whose text cannot mean anything else under YAML 1.2 is read by
yaml-rs (a Rust parser) instead, an order of magnitude faster. Anything
where the two could differ, or that yaml-rs rejects, goes through PyYAML, so
the result and every error message are PyYAML's.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
import yaml_rs

__all__ = ["documents"]

# Where YAML 1.1 (PyYAML) and 1.2 (yaml-rs) may read a text differently, or
# where only PyYAML's message is wanted: anything but printable ASCII and line
# feeds; tags, anchors and aliases, complex and merge keys, directives,
# reserved characters, escapes, block scalars, document ends and a second
# document.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_MARKERS = ("!", "&", "*", "?", "%", "@", "`", "\\", "=", "|", ">", "<<", "\n...", "\n---")
# Also where libyaml is stricter than yaml-rs: a flow collection over several
# lines (a key may not span lines), a ':' right before a flow indicator.
_STRICTER = re.compile(r"[\[{][^\]}\n]*\n|:[,\[\]{}]")
# And a plain scalar that is a 1.1 boolean (yes/no/on/off) or starts like a number
# without being a decimal integer, an IPv4 address or a CIDR (octal, hex,
# underscores, even leading ones, which yaml-rs reads as a number: `_80` is 80;
# sexagesimal, floats, dates, .inf), and a ':' anywhere but at the
# end of a token (empty keys, which libyaml refuses). A non-string scalar cannot hold
# a space or a flow indicator, so its first whitespace-separated token shows it;
# other tokens (of strings, quoted or not) pass, and a false alarm only costs time.
_FLOW_TO_SPACE = str.maketrans("[]{},", "     ")
_SAFE_TOKEN = re.compile(
    r"(?:[-+]?(?:0|[1-9][0-9]*)"
    r"|[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?:/[0-9]{1,2})?"
    r"|(?!(?:[yY]es|YES|[nN]o|NO|[oO]n|ON|[oO]ff|OFF):?$)[^-+._0-9:][^:]*"
    r"|[-+](?![._0-9])[^:]*"
    r"|\.(?![_0-9A-Za-z])[^:]*"
    r"):?",
    re.S,
)


# Whole-line comments, or lines of a quoted string: characters and escapes are
# checked on the whole text, the rest without these lines (in a quoted string
# they are a string either way).
_COMMENT_LINES = re.compile(r"^[ ]*#.*$", re.M)


def _same_in_both(text: str) -> bool:
    if not text.isascii() or _CONTROL.search(text) or "\\" in text:
        return False
    return _plain(text) or ("#" in text and _plain(_COMMENT_LINES.sub("", text)))


def _plain(text: str) -> bool:
    if text.startswith("...") or any(marker in text for marker in _MARKERS):
        return False
    if _STRICTER.search(text):
        return False
    return all(_SAFE_TOKEN.fullmatch(t) for t in set(text.translate(_FLOW_TO_SPACE).split()))


def documents(text: str) -> list[Any]:
    """The documents of `text` (one chunk of a manifest file: at most one '---'
    line, at its start); raises yaml.YAMLError as PyYAML would."""
    if _same_in_both(text):
        try:
            doc = yaml_rs.loads(text, parse_datetime=False)
        except yaml_rs.YAMLDecodeError:
            pass  # PyYAML says where and why
        else:
            if doc is not None:  # None: no document or an empty one, which PyYAML tells apart
                return [doc]
    return list(yaml.load_all(text, Loader=_Loader))  # _Loader is a SafeLoader


# libyaml's parser when present: the pure-Python one needs ~0.5 ms per route.
_SafeBase = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")


class _Loader(_SafeBase):  # type: ignore[valid-type,misc]  # a base chosen at run time
    """A safe loader that rejects duplicate mapping keys, which PyYAML silently overwrites.

    Documents are built by a direct walk of the node tree for the plain shapes
    a manifest is made of (maps with unique keys, lists, strings, decimal
    integers), several times faster than the generic constructor on 100,000
    routes; any other node (merge keys, other tags, YAML 1.1 number forms)
    goes through the safe constructor, so the result is the same."""

    _scalar_tags: dict[str, str]

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        # The tag of a plain scalar depends on its text alone (a safe loader has no
        # path resolvers), and keys like "address" repeat 100,000 times.
        if kind is yaml.ScalarNode and implicit[0]:
            tags: dict[str, str] = self.__dict__.setdefault("_scalar_tags", {})
            tag = tags.get(value)
            if tag is None:
                tag = tags[value] = super().resolve(kind, value, implicit)
            return tag
        if kind is yaml.MappingNode:
            return _MAP_TAG
        if kind is yaml.SequenceNode:
            return _SEQ_TAG
        return super().resolve(kind, value, implicit)  # type: ignore[no-any-return]

    def construct_document(self, node: yaml.Node) -> Any:
        self._building: set[int] = set()
        try:
            return self._build(node)
        finally:
            self.constructed_objects.clear()
            self.recursive_objects.clear()

    def _build(self, node: yaml.Node) -> Any:
        tag = node.tag
        if tag == _STR_TAG:
            return node.value
        if tag == _INT_TAG and _DECIMAL.fullmatch(node.value):
            return int(node.value)
        plain_map = tag == _MAP_TAG and not any(k.tag == _MERGE_TAG for k, _ in node.value)
        if (tag != _SEQ_TAG and not plain_map) or id(node) in self._building:
            # Anything else, and aliases that refer to themselves: the safe constructor.
            return self.construct_object(node, deep=True)
        self._building.add(id(node))
        try:
            if tag == _SEQ_TAG:
                return [self._build(item) for item in node.value]
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._build(key_node)
                if isinstance(key, list | dict):
                    return self.construct_object(node, deep=True)  # reports it
                if key in result:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                result[key] = self._build(value_node)
            return result
        finally:
            self._building.discard(id(node))

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Fast path: plain string keys (all of a manifest's) compare by their text.
        if all(k.tag == _STR_TAG for k, _ in node.value):
            keys = [k.value for k, _ in node.value]
            if len(set(keys)) == len(keys):
                return dict(super().construct_mapping(node, deep=deep))
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return dict(super().construct_mapping(node, deep=deep))


