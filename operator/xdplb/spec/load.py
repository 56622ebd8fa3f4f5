"""Load LoadBalancer manifests from multi-document YAML.

Every problem of every document is collected before raising, so one run of
the agent (or a dry run) shows the whole list instead of one error at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from xdplb.errors import XdplbError
from xdplb.memory import gc_paused
from xdplb.spec.errors import format_errors, show_value
from xdplb.spec.model import Listener, LoadBalancer, SniRoute, SourceRoute
from xdplb.spec.yamldoc import documents

__all__ = ["DEFAULT_LIMITS", "Limits", "SpecError", "load_file", "parse_manifests"]


class SpecError(XdplbError):
    """Invalid configuration; `errors` holds one `<source>: <path>: <message>` per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


@dataclass(frozen=True)
class Limits:
    """Capacity of the data-plane maps (agent flags); the schema bounds one manifest only."""

    max_listeners: int = 4096  # listener entries across all documents
    max_backends_per_group: int = 1024  # cannot usefully exceed the schema's 1024
    max_source_routes: int = 1_000_000  # sum across all listeners
    max_sni_routes: int = 1_000_000
    # Service backends need EndpointSlices, so only the agent in Kubernetes mode has them.
    service_backends: bool = False


DEFAULT_LIMITS = Limits()


def _yaml_documents(text: str, source: str, first_line: int = 0) -> list[Any]:
    try:
        return documents(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {first_line + mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        raise SpecError([f"{source}: {where}{exc.problem}{context}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{source}: invalid YAML: {exc}"]) from None


def _name_of(doc: Any) -> str:
    """' (default/web)' for a label, when a name can be found."""
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("name"), str):
        namespace = meta.get("namespace")
        namespace = namespace if isinstance(namespace, str) else "default"
        return f" ({namespace}/{meta['name']})"
    return ""


@dataclass(frozen=True)
class _Document:
    """One document, validated on its own: the model, or what is wrong with it."""

    name: str  # for labels: ' (namespace/name)' or ''
    lb: LoadBalancer | None
    problems: tuple[str, ...]


def _validate_document(doc: Any) -> _Document:
    problems = _document_errors(doc)
    if not problems:
        try:
            return _Document(_name_of(doc),
                             LoadBalancer.parse(doc), ())
        except ValidationError as exc:
            problems = format_errors(exc)
    return _Document(_name_of(doc), None, tuple(problems))


# The end of the line before a line that starts a document. Manifests are
# mappings, so such a line at column 0 can only be a document marker.
_DOC_START = re.compile(r"\n---(?=[ \t\r\n]|$)")


def _chunks(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each document's part of the file."""
    cuts = [0, *[m.start() + 1 for m in _DOC_START.finditer(text)], len(text)]
    chunks, line = [], 0
    for a, b in pairwise(cuts):
        chunks.append((line, text[a:b]))
        line += text.count("\n", a, b)
    return chunks


class DocumentCache:
    """Validated documents by their exact text, as of the last parse: reading the
    file again parses and validates only the documents that changed (a one-route
    change in a 100,000-route file costs one document, not the file)."""

    def __init__(self) -> None:
        self.entries: dict[str, list[_Document | None]] = {}


def _document_errors(doc: Any) -> list[str]:
    """Reasons the raw document is not a LoadBalancer at all (checked before the model)."""
    if not isinstance(doc, dict):
        kind = "a list" if isinstance(doc, list) else f"{type(doc).__name__} {doc!r}"
        return [f"document must be a mapping, got {kind}"]
    # Another kind (a Service in the same file, say) would only drown in field errors.
    if "kind" not in doc:
        return ["kind: is required"]
    if doc["kind"] != "LoadBalancer":
        return [f"kind: expected LoadBalancer, got {show_value(doc['kind'])}"]
    return []


def parse_manifests(
    text: str, source: str = "<config>", limits: Limits = DEFAULT_LIMITS,
    cache: DocumentCache | None = None,
) -> list[LoadBalancer]:
    """Parse and validate every LoadBalancer in `text`; raise SpecError listing all problems.
    Documents are read one at a time (only one document's raw data is held at once)."""
    with gc_paused():
        return _parse(text, source, limits, cache)


def _parse(text: str, source: str, limits: Limits,
           cache: DocumentCache | None) -> list[LoadBalancer]:
    errors: list[str] = []
    valid: list[tuple[str, LoadBalancer]] = []
    seen: dict[str, list[_Document | None]] = {}
    number = 0
    for first_line, chunk in _chunks(text):
        docs = cache.entries.get(chunk) if cache is not None else None
        if docs is None:
            docs = [None if doc is None else _validate_document(doc)  # None: empty document
                    for doc in _yaml_documents(chunk, source, first_line)]
        seen[chunk] = docs
        for doc in docs:
            number += 1
            if doc is None:
                continue
            label = f"{source} document {number}{doc.name}"
            if doc.lb is not None:
                valid.append((label, doc.lb))
            errors += [f"{label}: {problem}" for problem in doc.problems]
    if cache is not None:
        cache.entries = seen

    errors += _cross_document_errors(valid)
    errors += _limit_errors(valid, source, limits)
    if errors:
        raise SpecError(errors)
    return [lb for _, lb in valid]


def _cross_document_errors(valid: list[tuple[str, LoadBalancer]]) -> Iterator[str]:
    names: dict[str, str] = {}
    # Same-document duplicates are the model's; here only pairs across documents.
    listeners: dict[tuple[str | None, int, str, str], tuple[int, str]] = {}
    for doc_index, (label, lb) in enumerate(valid):
        if lb.qualified_name in names:
            yield (
                f"{label}: metadata.name: LoadBalancer {lb.qualified_name} "
                f"is also defined by {names[lb.qualified_name]}"
            )
        else:
            names[lb.qualified_name] = label
        for i, listener in enumerate(lb.spec.listeners):
            where = f"{lb.qualified_name} spec.listeners[{i}]"
            first = listeners.setdefault(listener.identity, (doc_index, where))
            if first[0] != doc_index:
                yield (
                    f"{label}: spec.listeners[{i}]: listener {listener.endpoint} "
                    f"is also defined by {first[1]}"
                )


def _limit_errors(valid: list[tuple[str, LoadBalancer]], source: str, limits: Limits) -> list[str]:
    errors: list[str] = [
        f"{label}: spec.trafficPolicy: it picks among a Service's endpoints, which needs the "
        "agent in Kubernetes mode (--kubernetes)"
        for label, lb in valid if lb.spec.traffic_policy is not None and not limits.service_backends
    ]
    listeners = [(label, i, ln) for label, lb in valid for i, ln in enumerate(lb.spec.listeners)]
    def too_large(group: Listener | SourceRoute | SniRoute) -> bool:
        return bool(group.backends) and len(group.backends or ()) > limits.max_backends_per_group

    def needs_services(group: Listener | SourceRoute | SniRoute) -> bool:
        return group.service is not None and not limits.service_backends

    for label, i, listener in listeners:
        groups: list[tuple[str, Listener | SourceRoute | SniRoute]] = [
            (f"spec.listeners[{i}]", listener)
        ]
        # Paths are spelled only for the routes at fault (a listener has up to 20,000).
        route_lists: tuple[tuple[str, Sequence[SourceRoute | SniRoute]], ...] = (
            ("sourceRoutes", listener.source_routes),
            ("sniRoutes", listener.sni_routes),
        )
        groups += [
            (f"spec.listeners[{i}].{kind}[{j}]", route)
            for kind, routes in route_lists
            for j, route in enumerate(routes)
            if too_large(route) or needs_services(route)
        ]
        errors += [
            f"{label}: {path}.backends: {len(group.backends or ())} backends exceed the "
            f"capacity {limits.max_backends_per_group} of a group"
            for path, group in groups if too_large(group)
        ]
        errors += [
            f"{label}: {path}.service: Service backends need the agent in Kubernetes mode"
            " (--kubernetes); list backends instead"
            for path, group in groups if needs_services(group)
        ]

    totals = [
        (len(listeners), "listeners", limits.max_listeners, "--max-listeners"),
        (
            sum(len(ln.source_routes) for _, _, ln in listeners),
            "source routes",
            limits.max_source_routes,
            "--max-source-routes",
        ),
        (
            sum(len(ln.sni_routes) for _, _, ln in listeners),
            "SNI routes",
            limits.max_sni_routes,
            "the SNI map",
        ),
    ]
    errors += [
        f"{source}: {count} {what} exceed the capacity {capacity} ({why})"
        for count, what, capacity, why in totals
        if count > capacity
    ]
    return errors


def load_file(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> list[LoadBalancer]:
    """Read `path` and parse it; unreadable files are a SpecError too (no traceback)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: not UTF-8 text: {exc.reason}"]) from None
    return parse_manifests(text, source=str(path), limits=limits)
