"""Server-side printing, as an API server does it for `kubectl get` (meta.k8s.io/v1 Table).

kubectl asks for a Table and prints its columns; without one it prints names only. The
columns are a CRD's additionalPrinterColumns (their JSONPath evaluated as the
apiextensions table convertor does: the first result, a date as an age), and for
Services the columns of the built-in printer (NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S)
AGE), so a test reads `kubectl get svc` and `kubectl get xpool` as a user would.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

Json = dict[str, Any]

NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0,
               "description": "Name must be unique within a namespace."}


def _age(stamp: Any) -> str:
    if not isinstance(stamp, str):
        return "<unknown>"
    then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


_STEP = re.compile(r"\.([A-Za-z0-9_-]+)|\[\*\]|\[\?\(@\.([A-Za-z0-9_]+)==\"([^\"]*)\"\)\]")


def jsonpath(obj: Any, path: str) -> list[Any]:
    """The values ``path`` (``.a.b``, ``[*]``, ``[?(@.k=="v")]``) selects in ``obj``."""
    values, pos = [obj], 0
    while pos < len(path):
        m = _STEP.match(path, pos)
        if not m:
            raise ValueError(f"unsupported JSONPath {path!r} at {pos}")
        pos = m.end()
        if m.group(1):
            values = [v[m.group(1)] for v in values if isinstance(v, dict) and m.group(1) in v]
        elif m.group(0) == "[*]":
            values = [x for v in values if isinstance(v, list) for x in v]
        else:
            key, want = m.group(2), m.group(3)
            values = [x for v in values if isinstance(v, list) for x in v
                      if isinstance(x, dict) and str(x.get(key)) == want]
    return values


def _cell(column: Json, obj: Json) -> Any:
    found = jsonpath(obj, column["jsonPath"])
    if not found:
        return None
    value = found[0]
    if column.get("type") == "date":
        return _age(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return value


def _service_row(svc: Json) -> list[Any]:
    spec, status = svc.get("spec") or {}, svc.get("status") or {}
    kind = spec.get("type") or "ClusterIP"
    external = ",".join(spec.get("externalIPs") or []) or "<none>"
    if kind == "LoadBalancer":
        ips = [i.get("ip") or i.get("hostname") for i in
               (status.get("loadBalancer") or {}).get("ingress") or []]
        external = ",".join(i for i in ips if i) or "<pending>"
    ports = ",".join(
        f"{p.get('port')}{':' + str(p['nodePort']) if p.get('nodePort') else ''}"
        f"/{p.get('protocol') or 'TCP'}" for p in spec.get("ports") or []) or "<none>"
    selector = ",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items()) or "<none>"
    return [svc["metadata"]["name"], kind, spec.get("clusterIP") or "<none>", external, ports,
            _age(svc["metadata"].get("creationTimestamp")), selector]


SERVICE_COLUMNS = [
    NAME_COLUMN,
    {"name": "Type", "type": "string", "format": "", "priority": 0, "description": ""},
    {"name": "Cluster-IP", "type": "string", "format": "", "priority": 0, "description": ""},
    {"name": "External-IP", "type": "string", "format": "", "priority": 0, "description": ""},
    {"name": "Port(s)", "type": "string", "format": "", "priority": 0, "description": ""},
    {"name": "Age", "type": "string", "format": "", "priority": 0, "description": ""},
    {"name": "Selector", "type": "string", "format": "", "priority": 1, "description": ""},
]


def table(kind: str, columns: list[Json] | None, objects: list[Json]) -> Json:
    """The Table of ``objects`` of one kind; ``columns``: a CRD's printer columns."""
    if kind == "Service":
        definitions = SERVICE_COLUMNS
        rows = [_service_row(o) for o in objects]
    elif columns:
        definitions = [NAME_COLUMN, *({"name": c["name"], "type": c.get("type", "string"),
                                       "format": c.get("format", ""),
                                       "priority": c.get("priority", 0),
                                       "description": c.get("description", "")}
                                      for c in columns)]
        rows = [[o["metadata"]["name"], *(_cell(c, o) for c in columns)] for o in objects]
    else:
        definitions = [NAME_COLUMN, {"name": "Age", "type": "string", "format": "",
                                     "priority": 0, "description": ""}]
        rows = [[o["metadata"]["name"], _age(o["metadata"].get("creationTimestamp"))]
                for o in objects]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {},
            "columnDefinitions": definitions,
            "rows": [{"cells": cells, "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": o["metadata"]}} for cells, o in zip(rows, objects, strict=True)]}
