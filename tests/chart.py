"""The Helm chart rendered by the real `helm` binary, and the RBAC grants it makes.

The operator, agent and uninstall tests run with exactly the rules rendered
here (the API emulator answers 403 to anything else).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
HELM = ROOT / ".tools" / "bin" / "helm"
CHART = ROOT / "charts" / "xdplb"
CUSTOM_VALUES = CHART / "ci" / "custom-values.yaml"

Json = dict[str, Any]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@functools.cache
def _render(release: str, namespace: str, values: tuple[str, ...]) -> str:
    args = [a for v in values for a in ("-f", v)]
    return helm("template", release, str(CHART), "--namespace", namespace, *args).stdout


def render(release: str = "xdplb", namespace: str = "xdplb-system",
           values: tuple[str, ...] = ()) -> list[Json]:
    """The rendered objects (hooks included), freshly parsed (callers may change them)."""
    return [d for d in yaml.safe_load_all(_render(release, namespace, values)) if d]


def find(docs: list[Json], kind: str, name: str) -> Json:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} rendered"
    return hits[0]


def grants_of(docs: list[Json], name: str, namespace: str) -> list[Json]:
    """The rules of ClusterRole ``name`` plus those of Role ``name`` (marked with their
    ``namespace``), as the emulator takes them."""
    return [*find(docs, "ClusterRole", name)["rules"],
            *({**r, "namespace": namespace} for r in find(docs, "Role", name)["rules"])]


def chart_grants(component: str, namespace: str = "xdplb-system") -> list[Json]:
    """What the chart (default values) grants the ServiceAccount ``xdplb-<component>``."""
    return grants_of(render(namespace=namespace), f"xdplb-{component}", namespace)
