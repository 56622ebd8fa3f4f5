"""Cross-field rules written once in CEL, for the API server and for us.

A rule is declared on the model class it applies to. The CRD carries it as
an ``x-kubernetes-validations`` entry of that class's schema; the Python
validator evaluates the very same expression with a CEL implementation
(``common-expression-language``), with ``self`` bound to the JSON form of
the object, so a manifest is judged alike with and without a cluster.
Only standard CEL functions and macros are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import cel

__all__ = ["CelRule", "cel_string", "evaluate"]


def cel_string(text: str) -> str:
    """``text`` as a CEL string literal (a regex keeps its backslashes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class CelRule:
    """``rule`` must hold for ``self``; else ``message`` is reported at ``field_path``."""

    rule: str
    message: str
    # Relative JSON path (".sniRoutes") the API server reports; "" = the object itself.
    field_path: str = ""

    def schema(self) -> dict[str, str]:
        entry = {"rule": self.rule, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry


@cache
def _program(rule: str) -> Any:
    return cel.compile(rule)


def evaluate(rule: CelRule, value: Any) -> bool:
    """Whether ``rule`` holds for ``value`` (JSON data, as the API server sees it)."""
    result = _program(rule.rule).execute({"self": value})
    if not isinstance(result, bool):
        raise TypeError(f"CEL rule {rule.rule!r} gave {result!r}, not a boolean")
    return result
