"""Which declared CEL rules fail on a validated model, and where.

A model class declares its rules in the ClassVars ``cel_rules`` (on the object)
and ``cel_field_rules`` (on a field, by alias); a pydantic model without them
has none. Each rule sees the JSON form the API server would, converted only as
far as the rule reads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from xdplb.spec.cel import CelRule, evaluate
from xdplb.spec.errors import join_path

__all__ = ["cel_problems"]


def _object_rules(cls: type[BaseModel]) -> tuple[CelRule, ...]:
    return getattr(cls, "cel_rules", ())


def _field_rules(cls: type[BaseModel]) -> dict[str, tuple[CelRule, ...]]:
    return getattr(cls, "cel_field_rules", {})


@dataclass(frozen=True)
class _View:
    """What of an object one rule can observe (None: everything)."""

    values: frozenset[str] | None  # field names whose JSON value the rule reads
    presence: tuple[tuple[str, str], ...] = ()  # (alias, name) the rule tests only with has()
    sizes: tuple[tuple[str, str], ...] = ()  # (alias, name) of lists read only by has(), size()


def _is_list(annotation: Any) -> bool:
    """Whether a field's annotation is a list, or a union with one."""
    return any(get_origin(t) is list for t in (annotation, *get_args(annotation)))


@cache
def _view(cls: type[BaseModel], rule: CelRule) -> _View:
    by_alias = {(f.alias or name): name for name, f in cls.model_fields.items()}
    named = re.findall(r"\bself\.(\w+)", rule.rule)
    if not set(named) <= by_alias.keys() or re.search(r"\bself\b(?!\.)", rule.rule):
        return _View(None)
    tested = re.findall(r"\bhas\(self\.(\w+)\)", rule.rule)
    sized = re.findall(r"\bsize\(self\.(\w+)\)", rule.rule)
    presence = {a for a in tested if named.count(a) == tested.count(a)}
    sizes = {a for a in sized if named.count(a) == tested.count(a) + sized.count(a)
             and _is_list(cls.model_fields[by_alias[a]].annotation)}
    return _View(
        frozenset(by_alias[a] for a in set(named) - presence - sizes),
        tuple(sorted((a, by_alias[a]) for a in presence)),
        tuple(sorted((a, by_alias[a]) for a in sizes)),
    )


# What a rule sees of a field it only tests or counts: absent (None), present (-1),
# or a list of that many items.
_Shape = tuple[tuple[str, int | None], ...]


def _shape(model: BaseModel, seen: Iterable[tuple[str, str, bool]]) -> _Shape:
    """What rules see of the fields ``seen``, as (alias, name, counted by its length)."""
    return tuple((a, None if (v := getattr(model, n)) is None else len(v) if counted else -1)
                 for a, n, counted in seen)


def _stand_in(shape: _Shape) -> dict[str, Any]:
    return {a: True if n < 0 else [0] * n for a, n in shape if n is not None}


@dataclass(frozen=True)
class _Rules:
    """The CEL rules of a class, split by what they observe."""

    shaped: tuple[tuple[str, str, bool], ...]  # (alias, name, counted) the shape rules see
    by_shape: tuple[CelRule, ...]  # rules that see only presence and list lengths
    by_value: tuple[CelRule, ...]


@cache
def _rules(cls: type[BaseModel]) -> _Rules:
    views = {rule: _view(cls, rule) for rule in _object_rules(cls)}
    by_shape = tuple(r for r, v in views.items() if v.values == frozenset())
    shaped = {(a, n, False) for r in by_shape for a, n in views[r].presence}
    shaped |= {(a, n, True) for r in by_shape for a, n in views[r].sizes}
    return _Rules(tuple(sorted(shaped)), by_shape,
                  tuple(r for r in _object_rules(cls) if r not in by_shape))


@cache
def _failing_for_shape(cls: type[BaseModel], shape: _Shape) -> tuple[CelRule, ...]:
    data = _stand_in(shape)
    return tuple(r for r in _rules(cls).by_shape if not evaluate(r, data))


def _failing(model: BaseModel) -> Iterator[CelRule]:
    """The rules of ``model`` that fail on its JSON form, as far as each rule can see it.

    A rule observes only the fields it names, so the others are not converted
    (a listener's 10,000 routes, say). A field it only tests with has()
    matters by its presence alone, and a list it only counts by its length,
    so verdicts that depend on nothing else are computed once per shape (the
    100,000 routes of a file have one or two). Absent (None) fields stay
    absent, as in the API.
    """
    rules = _rules(type(model))
    if rules.by_shape:
        yield from _failing_for_shape(type(model), _shape(model, rules.shaped))
    for rule in rules.by_value:
        view = _view(type(model), rule)
        shape = _shape(model, ((a, n, False) for a, n in view.presence))
        shape += _shape(model, ((a, n, True) for a, n in view.sizes))
        data = model.model_dump(mode="json", by_alias=True, exclude_none=True,
                                include=None if view.values is None else set(view.values))
        if not evaluate(rule, {**_stand_in(shape), **data}):
            yield rule


def cel_problems(model: BaseModel, path: str = "") -> Iterator[tuple[str, str]]:
    """Every declared CEL rule that fails in ``model`` and below, as (path, message)."""
    for rule in _failing(model):
        field = rule.field_path.lstrip(".")
        yield (join_path(path, field) if field else path), rule.message
    for alias, rules in _field_rules(type(model)).items():
        name = next(n for n, f in type(model).model_fields.items() if (f.alias or n) == alias)
        value = getattr(model, name)
        for rule in rules if value is not None else ():
            if not evaluate(rule, value):
                yield join_path(path, alias), rule.message
    for name, alias in _ruled_fields(type(model)):
        value, where = getattr(model, name), join_path(path, alias)
        if isinstance(value, BaseModel):
            yield from cel_problems(value, where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if not _passes_by_shape(item):
                    yield from cel_problems(item, f"{where}[{i}]")


def _passes_by_shape(model: BaseModel) -> bool:
    """Whether ``model`` passes every rule on what its shape alone decides: no rule
    reads a value, and no field with rules below is set (a route naming backends: the
    quick answer for 100,000 of them)."""
    plan = _shape_plan(type(model))
    if plan is None:
        return False
    ruled, shaped = plan
    if any(getattr(model, n) is not None for n in ruled):
        return False
    return not _failing_for_shape(type(model), _shape(model, shaped))


@cache
def _shape_plan(cls: type[BaseModel]) -> tuple[tuple[str, ...],
                                               tuple[tuple[str, str, bool], ...]] | None:
    """For _passes_by_shape: the fields with rules below and the fields the shape rules
    see, or None when a rule of ``cls`` reads values."""
    if _field_rules(cls) or _rules(cls).by_value:
        return None
    return tuple(n for n, _a in _ruled_fields(cls)), _rules(cls).shaped


@cache
def _ruled_fields(cls: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    """(name, alias) of the fields whose models declare CEL rules, here or below."""
    return tuple((name, info.alias or name) for name, info in cls.model_fields.items()
                 if any(_has_rules(t) for t in _model_types(info.annotation)))


@cache
def _has_rules(cls: type[BaseModel]) -> bool:
    """Whether ``cls`` or a model below it declares CEL rules."""
    return bool(_object_rules(cls) or _field_rules(cls) or _ruled_fields(cls))


def _model_types(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in getattr(annotation, "__args__", ()):
        yield from _model_types(arg)
