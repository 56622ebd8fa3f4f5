"""Worst-case cost of the CRD's CEL rules, estimated as the API server does.

The API server refuses a CRD whose rules may cost too much: it estimates each
expression from the schema's bounds (``maxItems``, ``maxLength``,
``maxProperties``) and multiplies it by the rule's cardinality, the most
times the rule can run in one object (the product of the ``maxItems`` and
``maxProperties`` above it). This module follows cel-go's estimator for the
standard CEL subset our rules use, rounding up everywhere:

- literal, identifier, field selection, ``has()``: 1 each;
- a function call or operator: 1 plus its operands; ``&&`` and ``||``: their
  operands (no call cost); ``c ? a : b``: ``c`` plus the dearer branch;
- string equality: 0.1 per character of the shorter maximum length;
- ``s.matches(re)``: ceil(0.1 x (maxLength(s) + 1)) x ceil(0.25 x len(re));
- a macro over a list or map (``all``, ``exists``, ...): its range plus
  N x (predicate + 4), N its ``maxItems``/``maxProperties`` (the expanded
  loop's condition and step cost at most 4 beyond the predicate).

Map keys have no schema of their own; they are counted as
:data:`MAP_KEY_MAX_LENGTH` characters (a Kubernetes label key), more than the
API server assumes. Anything else unbounded is an error, and so is any
function outside the standard library, so the estimate can only be high.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xdplb.errors import XdplbError

__all__ = ["MAP_KEY_MAX_LENGTH", "RuleCost", "estimate", "parse", "rule_costs"]

Schema = dict[str, Any]
Node = tuple[Any, ...]  # a parsed expression: (kind, ...)
MAP_KEY_MAX_LENGTH = 317  # prefix (253) + '/' + name (63)

# The standard library functions and macros this estimator knows.
MACROS = {"all", "exists", "exists_one", "map", "filter"}
FUNCTIONS = {"size", "matches", "contains", "startsWith", "endsWith", "int", "string", "type"}

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+)|(?P<str>r?'(?:[^'\\]|\\.)*'|r?\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<id>[A-Za-z_]\w*)|(?P<op>&&|\|\||==|!=|<=|>=|[-+*/%<>!?:.,()\[\]]))"
)


class CostError(XdplbError, ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise CostError(f"cannot read {text[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    """Precedence climbing over CEL's grammar; nodes are tuples."""

    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> str:
        return self.toks[self.i][1] if self.i < len(self.toks) else ""

    def take(self, want: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.toks) or (want is not None and self.toks[self.i][1] != want):
            raise CostError(f"expected {want!r} at token {self.i}")
        self.i += 1
        return self.toks[self.i - 1]

    def expr(self) -> Node:
        cond = self.binary(0)
        if self.peek() == "?":
            self.take("?")
            then = self.expr()
            self.take(":")
            return ("cond", cond, then, self.expr())
        return cond

    LEVELS = (("||",), ("&&",), ("==", "!=", "<", "<=", ">", ">=", "in"), ("+", "-"),
              ("*", "/", "%"))

    def binary(self, level: int) -> Node:
        if level == len(self.LEVELS):
            return self.unary()
        node = self.binary(level + 1)
        while self.peek() in self.LEVELS[level]:
            op = self.take()[1]
            node = ("op", op, node, self.binary(level + 1))
        return node

    def unary(self) -> Node:
        if self.peek() in ("!", "-"):
            op = self.take()[1]
            return ("op", op, self.unary())
        return self.member()

    def args(self) -> list[Node]:
        self.take("(")
        out = []
        while self.peek() != ")":
            out.append(self.expr())
            if self.peek() == ",":
                self.take(",")
        self.take(")")
        return out

    def member(self) -> Node:
        node = self.primary()
        while self.peek() in (".", "["):
            if self.take()[1] == "[":
                node = ("index", node, self.expr())
                self.take("]")
                continue
            name = self.take()[1]
            if self.peek() != "(":
                node = ("select", node, name)
            elif name in MACROS:
                self.take("(")
                var = self.take()[1]
                self.take(",")
                pred = self.expr()
                self.take(")")
                node = ("macro", name, node, var, pred)
            else:
                node = ("call", name, node, self.args())
        return node

    def primary(self) -> Node:
        kind, text = self.take()
        if kind == "num":
            return ("lit", int(text))
        if kind == "str":
            raw = text.startswith("r")
            body = text[2:-1] if raw else text[1:-1]
            return ("lit", body if raw else re.sub(r"\\(.)", r"\1", body))
        if text == "(":
            node = self.expr()
            self.take(")")
            return node
        if kind == "id" and text in ("true", "false", "null"):
            return ("lit", text)
        if kind == "id":
            if self.peek() != "(":
                return ("ident", text)
            if text == "has":
                self.take("(")
                inner = self.expr()
                self.take(")")
                if inner[0] != "select":
                    raise CostError("has() needs a field selection")
                return ("has", inner)
            return ("call", text, None, self.args())
        raise CostError(f"unexpected {text!r}")


def parse(text: str) -> Node:
    p = _Parser(text)
    node = p.expr()
    if p.i != len(p.toks):
        raise CostError(f"trailing input at token {p.i}")
    return node


@dataclass
class _Est:
    env: dict[str, Schema]

    def size(self, shape: Schema | None, what: str) -> int:
        """The most characters (string) or items (list, map) a value of ``shape`` holds."""
        if shape is None:
            raise CostError(f"{what}: unknown type")
        key = {"string": "maxLength", "array": "maxItems", "object": "maxProperties"}.get(
            shape.get("type", ""), ""
        )
        if key not in shape:
            raise CostError(f"{what}: no {key or 'size bound'} in {shape}")
        return int(shape[key])

    def cost(self, node: Node) -> tuple[int, Schema | None]:
        kind = node[0]
        if kind == "lit":
            value = node[1]
            return 1, ({"type": "string", "maxLength": len(value)} if isinstance(value, str)
                       else {"type": "integer"})
        if kind == "ident":
            if node[1] not in self.env:
                raise CostError(f"unknown variable {node[1]}")
            return 1, self.env[node[1]]
        if kind in ("select", "has"):
            inner = node[1] if kind == "has" else node
            c, shape = self.cost(inner[1])
            field = (shape or {}).get("properties", {}).get(inner[2])
            if field is None:
                raise CostError(f"no field {inner[2]!r}")
            return c + 1, ({"type": "boolean"} if kind == "has" else field)
        if kind == "index":
            c1, shape = self.cost(node[1])
            c2, _ = self.cost(node[2])
            return c1 + c2 + 1, (shape or {}).get("items")
        if kind == "cond":
            cc, _ = self.cost(node[1])
            (ct, shape), (cf, _) = self.cost(node[2]), self.cost(node[3])
            return cc + max(ct, cf), shape
        if kind == "op":
            return self.operator(node)
        if kind == "macro":
            return self.macro(node)
        if kind == "call":
            return self.call(node)
        raise CostError(f"unknown node {kind}")

    def operator(self, node: Node) -> tuple[int, Schema | None]:
        op, operands = node[1], [self.cost(x) for x in node[2:]]
        total = sum(c for c, _ in operands)
        if op in ("&&", "||"):
            return total, {"type": "boolean"}
        if op in ("==", "!=") and all((s or {}).get("type") == "string" for _, s in operands):
            # The shorter side bounds the comparison; a literal always has a length.
            known: list[Schema | None] = [s for _, s in operands
                                          if s is not None and "maxLength" in s]
            shortest = min(self.size(s, "string comparison") for s in known or [None])
            return total + math.ceil(0.1 * shortest), {"type": "boolean"}
        if op == "in":
            return total + self.size(operands[1][1], "in"), {"type": "boolean"}
        result = {"type": "boolean"} if op in ("==", "!=", "<", "<=", ">", ">=", "!") else {
            "type": "integer"}
        return total + 1, result

    def macro(self, node: Node) -> tuple[int, Schema | None]:
        _, name, target, var, pred = node
        c_range, shape = self.cost(target)
        count = self.size(shape, f"{name}() range")
        item = (shape or {}).get("items") if (shape or {}).get("type") == "array" else {
            "type": "string", "maxLength": MAP_KEY_MAX_LENGTH}
        saved = self.env.get(var)
        self.env[var] = item or {}
        c_pred, _ = self.cost(pred)
        if saved is None:
            del self.env[var]
        else:
            self.env[var] = saved
        out = shape if name in ("map", "filter") else {"type": "boolean"}
        return c_range + 2 + count * (c_pred + 4), out

    def call(self, node: Node) -> tuple[int, Schema | None]:
        _, name, target, args = node
        if name not in FUNCTIONS:
            raise CostError(f"{name}() is not a standard CEL function known here")
        c_target, s_target = self.cost(target) if target is not None else (0, None)
        costs = [self.cost(a) for a in args]
        total = c_target + sum(c for c, _ in costs)
        if name == "matches":
            (_, regex_shape), = costs
            text = math.ceil(0.1 * (self.size(s_target, "matches() target") + 1))
            regex = math.ceil(0.25 * self.size(regex_shape, "regex"))
            return total + text * regex, {"type": "boolean"}
        if name in ("contains", "startsWith", "endsWith"):
            (_, sub), = costs
            length = self.size(s_target, f"{name}() target")
            return total + math.ceil(0.1 * length) * max(1, math.ceil(
                0.1 * self.size(sub, name))), {"type": "boolean"}
        return total + 1, {"type": "integer"} if name in ("size", "int") else {"type": "string"}


def estimate(rule: str, self_schema: Schema) -> int:
    """Worst-case cost of one evaluation of ``rule`` with ``self`` of ``self_schema``."""
    cost, _ = _Est({"self": self_schema}).cost(parse(rule))
    return cost


@dataclass(frozen=True)
class RuleCost:
    path: str
    rule: str
    cost: int  # one evaluation, worst case
    cardinality: int  # the most evaluations in one object

    @property
    def total(self) -> int:
        return self.cost * self.cardinality


def rule_costs(schema: Schema, path: str = "", cardinality: int = 1) -> Iterator[RuleCost]:
    """Every ``x-kubernetes-validations`` rule under ``schema`` with its worst case."""
    for entry in schema.get("x-kubernetes-validations", []):
        yield RuleCost(path or "<root>", entry["rule"], estimate(entry["rule"], schema),
                       cardinality)
    for name, prop in schema.get("properties", {}).items():
        yield from rule_costs(prop, f"{path}.{name}" if path else name, cardinality)
    if isinstance(schema.get("items"), dict):
        yield from rule_costs(schema["items"], f"{path}[]",
                              cardinality * _bound(schema, "maxItems", path))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from rule_costs(schema["additionalProperties"], f"{path}{{}}",
                              cardinality * _bound(schema, "maxProperties", path))


def _bound(schema: Schema, key: str, path: str) -> int:
    if key not in schema:
        raise CostError(f"{path}: no {key}, so the rules below it are unbounded")
    return int(schema[key])
