"""A Kubernetes API emulator close enough to a real API server for the operator tests.

kmock's ``KubernetesEmulator`` serves discovery and keeps objects as merged
dicts. This subclass serves the object API itself, with what the operator and
kubectl rely on from a real server:

- backbone resources in discovery, and CustomResourceDefinitions that register
  their resources when created (as ``kubectl apply -f crds/`` does on a cluster);
- ``uid``, ``resourceVersion``, ``generation`` (bumped on changes outside
  ``metadata`` and ``status``), ``creationTimestamp``, ``generateName``;
- typed lists (``kind: FooList``), label and field selectors on list and watch,
  watches that resume from a ``resourceVersion``, honour ``timeoutSeconds`` and
  serve watch-lists (``sendInitialEvents``, ending in the initial-events bookmark);
- merge, strategic-merge (as merge) and JSON patches with ``test`` preconditions
  (422), ``resourceVersion`` preconditions on PUT (409);
- the status subresource: a write to the object keeps its status, a write to
  ``/status`` changes only the status;
- server-side printing (``kubectl get`` asks for a Table: tables.py);
- finalizers and ``deletionTimestamp``;
- RBAC: a request with a known ServiceAccount token is allowed only by that
  account's ClusterRole and Role rules (403 otherwise; a rule with a ``namespace``
  key is a Role's), and every rule a request used is
  recorded so a test can find grants nothing needed.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock

from tests.k8s.tables import table

Json = dict[str, Any]
ResKey = tuple[str, str, str]  # (group, version, plural)


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = False  # has a status subresource
    shortnames: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


# What a cluster serves before anything is installed; a small slice of a real one.
BACKBONE = [
    ResourceType("", "v1", "namespaces", "Namespace", False, True, ("ns",)),
    ResourceType("", "v1", "nodes", "Node", False, True, ("no",)),
    ResourceType("", "v1", "events", "Event", True, False, ("ev",)),
    ResourceType("", "v1", "services", "Service", True, True, ("svc",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, False, ("sa",)),
    ResourceType("", "v1", "pods", "Pod", True, True, ("po",)),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", True, True, ("ds",)),
    ResourceType("apps", "v1", "deployments", "Deployment", True, True, ("deploy",)),
    ResourceType("apps", "v1", "replicasets", "ReplicaSet", True, True, ("rs",)),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
    ResourceType("batch", "v1", "jobs", "Job", True, True),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
                 False),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                 "CustomResourceDefinition", False, True, ("crd", "crds")),
]
CRD_KEY = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]


def _qualified(rt: ResourceType) -> str:
    return f"{rt.plural}.{rt.group}" if rt.group else rt.plural


@dataclass(frozen=True)
class Route:
    """An object-API request: which resource, namespace, name and subresource."""

    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclass
class Account:
    """A ServiceAccount: its ClusterRole rules and which (rule, verb, resource) it used."""

    user: str
    rules: list[Json]
    used: set[tuple[int, str, str, str]] = field(default_factory=set)

    def unused(self) -> list[str]:
        """Every granted (group, resource, verb) that no request needed."""
        left = []
        for i, rule in enumerate(self.rules):
            for group in rule.get("apiGroups", []):
                for res in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        if (i, group, res, verb) not in self.used:
                            left.append(f"{verb} {res}.{group or 'core'}")
        return left


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def response(self) -> aiohttp.web.Response:
        return aiohttp.web.json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
             "message": self.message, "reason": self.reason, "code": self.code},
            status=self.code)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lookup(obj: Json, path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


_REQ = re.compile(r"\s*([A-Za-z0-9_./-]+)\s*(notin|in)\s*\(([^)]*)\)\s*|\s*(!?)([A-Za-z0-9_./-]+)"
                  r"\s*(?:(==|=|!=)\s*([A-Za-z0-9_.-]*))?\s*")


def label_matcher(selector: str) -> Any:
    """The predicate for a label selector string (=, ==, !=, in, notin, exists, !exists)."""
    checks = []
    pos = 0
    while pos < len(selector):
        m = _REQ.match(selector, pos)
        if not m or m.end() == pos:
            raise ApiError(400, "BadRequest", f"unable to parse label selector {selector!r}")
        pos = m.end()
        if pos < len(selector):
            if selector[pos] != ",":
                raise ApiError(400, "BadRequest", f"unable to parse label selector {selector!r}")
            pos += 1
        if m.group(1):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                checks.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                checks.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif m.group(6):
            key, op, value = m.group(5), m.group(6), m.group(7)
            if op == "!=":
                checks.append(lambda lb, k=key, v=value: lb.get(k) != v)
            else:
                checks.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif m.group(4):
            key = m.group(5)
            checks.append(lambda lb, k=key: k not in lb)
        else:
            key = m.group(5)
            checks.append(lambda lb, k=key: k in lb)
    return lambda obj: all(c(obj.get("metadata", {}).get("labels") or {}) for c in checks)


def field_matcher(selector: str) -> Any:
    """The predicate for a field selector (path=value, path==value, path!=value)."""
    checks = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        m = re.fullmatch(r"([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector {term!r}")
        path, op, value = m.groups()
        eq = op != "!="
        checks.append(lambda o, p=path, v=value, e=eq: (str(_lookup(o, p) or "") == v) == e)
    return lambda obj: all(c(obj) for c in checks)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _without(obj: Json, *keys: str) -> Json:
    return {k: v for k, v in obj.items() if k not in keys}


@attrs.define(kw_only=True)
class ApiEmulator(kmock.KubernetesEmulator):
    """kmock's emulator serving the object API with real-server semantics (see module doc)."""

    types: dict[ResKey, ResourceType] = attrs.field(factory=dict)
    columns: dict[ResKey, list[Json]] = attrs.field(factory=dict)  # CRD printer columns
    store: dict[tuple[ResKey, str | None, str], Json] = attrs.field(factory=dict)
    accounts: dict[str, Account] = attrs.field(factory=dict)  # bearer token -> account
    revoked: set[str] = attrs.field(factory=set)
    log: list[tuple[int, ResKey, str, Json]] = attrs.field(factory=list)  # (rv, res, type, obj)
    revision: int = 0
    closing: bool = False
    _changed: asyncio.Condition | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for rtype in BACKBONE:
            self.declare(rtype)

    # --- set-up ---------------------------------------------------------------

    def declare(self, rtype: ResourceType) -> None:
        key = (rtype.group, rtype.version, rtype.plural)
        self.types[key] = rtype
        self.resources[kmock.resource(*key)] = kmock.ResourceInfo(
            kind=rtype.kind, namespaced=rtype.namespaced, singular=rtype.kind.lower(),
            verbs=set(VERBS), shortnames=set(rtype.shortnames),
            subresources={"status"} if rtype.status else set())

    def grant(self, token: str, user: str, rules: list[Json]) -> Account:
        """Requests bearing ``token`` act as ``user``, allowed only by ``rules``."""
        self.accounts[token] = Account(user, copy.deepcopy(rules))
        return self.accounts[token]

    def revoke(self, token: str) -> None:
        """``token`` stops working (401), as when its ServiceAccount is deleted."""
        self.accounts.pop(token, None)
        self.revoked.add(token)

    async def end_watches(self) -> None:
        """End every watch stream, so that the server stops without waiting for clients."""
        self.closing = True
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    # --- HTTP -------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw.path.startswith("/openapi/v3"):
            return self._openapi(raw.path.removeprefix("/openapi/v3").strip("/"))
        route = self._route(raw.path)
        if route is None:
            try:  # discovery and /version: kmock serves them
                return await super().__call__(raw)
            except kmock.KubernetesError as e:
                return await self._render_error(e)
        try:
            if route.subresource and not (route.subresource == "status" and route.rtype.status):
                raise ApiError(404, "NotFound", f"{raw.path}: no such subresource")
            verb = self._verb(raw, route)
            self._authorize(raw, route, verb)
            if verb == "watch":
                return await self._watch(raw, route)
            body = await raw.json() if raw.can_read_body else None
            result = self._serve(raw, route, verb, body)
            return aiohttp.web.json_response(result, status=201 if verb == "create" else 200)
        except ApiError as e:
            return e.response()

    def _route(self, path: str) -> Route | None:
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in self.types:
            namespace, rest = rest[1], rest[2:]
        if not rest or (group, version, rest[0]) not in self.types:
            return None
        rtype = self.types[(group, version, rest[0])]
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        return Route(rtype, namespace if rtype.namespaced else None, name, sub)

    @staticmethod
    def _verb(raw: aiohttp.web.BaseRequest, route: Route) -> str:
        if raw.method == "GET":
            if raw.query.get("watch") in ("true", "1"):
                return "watch"
            return "get" if route.name else "list"
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(
            raw.method)
        if verb is None or (verb != "create") != bool(route.name):
            raise ApiError(405, "MethodNotAllowed", f"{raw.method} {raw.path} is not supported")
        return verb

    def _authorize(self, raw: aiohttp.web.BaseRequest, route: Route, verb: str) -> None:
        auth = raw.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip()
        if token in self.revoked:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        account = self.accounts.get(token)
        if account is None:
            return  # the cluster admin (kubectl, test set-up)
        rt = route.rtype
        resource = rt.plural + (f"/{route.subresource}" if route.subresource else "")
        for i, rule in enumerate(account.rules):
            groups, resources, verbs = (rule.get(k, []) for k in ("apiGroups", "resources",
                                                                   "verbs"))
            names = rule.get("resourceNames") or []
            if rule.get("namespace") not in (None, route.namespace):
                continue  # a Role's rule: its namespace only
            if ((rt.group in groups or "*" in groups)
                    and (resource in resources or "*" in resources)
                    and (verb in verbs or "*" in verbs)
                    and (not names or route.name in names)):
                account.used.add((i, rt.group if rt.group in groups else "*",
                                  resource if resource in resources else "*",
                                  verb if verb in verbs else "*"))
                return
        where = f' in the namespace "{route.namespace}"' if route.namespace else ""
        what = f'{_qualified(rt)} "{route.name}"' if route.name else _qualified(rt)
        raise ApiError(403, "Forbidden",
                       f'{what} is forbidden: User "{account.user}" cannot {verb} resource'
                       f' "{resource}" in API group "{rt.group}"{where}')

    def _openapi(self, gv_path: str) -> aiohttp.web.StreamResponse:
        """Just enough OpenAPI v3 for kubectl to see that the server validates fields.

        kubectl then sends ``fieldValidation=Strict`` instead of validating against
        schemas itself. The emulator validates nothing: the CRD schemas and CEL rules
        have tests of their own.
        """
        gvs = {(f"apis/{g}/{v}" if g else f"api/{v}"): (g, v) for g, v, _ in self.types}
        if not gv_path:
            return aiohttp.web.json_response({"paths": {
                p: {"serverRelativeURL": f"/openapi/v3/{p}?hash={self.revision}"} for p in gvs}})
        if gv_path not in gvs:
            return ApiError(404, "NotFound", f"no OpenAPI document for {gv_path}").response()
        paths = {}
        for rt in self.types.values():
            if (rt.group, rt.version) == gvs[gv_path]:
                ns = "namespaces/{namespace}/" if rt.namespaced else ""
                paths[f"/{gv_path}/{ns}{rt.plural}/{{name}}"] = {"patch": {
                    "x-kubernetes-group-version-kind": {"group": rt.group, "version": rt.version,
                                                        "kind": rt.kind},
                    "parameters": [{"name": "fieldValidation", "in": "query",
                                    "schema": {"type": "string"}}]}}
        return aiohttp.web.json_response({"openapi": "3.0.0", "info": {"title": "emulator",
                                                                       "version": "v1"},
                                          "paths": paths})

    async def _serve_version(self, request: Any) -> Json:
        """APIResourceList of a group version, with each status subresource listed."""
        gv = request.resource
        found = [rt for (g, v, _), rt in self.types.items() if (g, v) == (gv.group, gv.version)]
        if not found:
            raise kmock.KubernetesResourceNotFoundError()
        resources: list[Json] = []
        for rt in found:
            resources.append({"name": rt.plural, "singularName": rt.kind.lower(),
                              "namespaced": rt.namespaced, "kind": rt.kind, "verbs": VERBS,
                              "shortNames": list(rt.shortnames)})
            if rt.status:
                resources.append({"name": f"{rt.plural}/status", "singularName": "",
                                  "namespaced": rt.namespaced, "kind": rt.kind,
                                  "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{gv.group}/{gv.version}".lstrip("/"), "resources": resources}

    # --- object semantics -------------------------------------------------------

    def _key(self, route: Route, name: str) -> tuple[ResKey, str | None, str]:
        rt = route.rtype
        return (rt.group, rt.version, rt.plural), route.namespace, name

    def _get(self, route: Route) -> Json:
        assert route.name
        obj = self.store.get(self._key(route, route.name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{_qualified(route.rtype)} "{route.name}" not found')
        return obj

    def _serve(self, raw: aiohttp.web.BaseRequest, route: Route, verb: str, body: Any) -> Json:
        rt = route.rtype
        as_table = "as=Table" in raw.headers.get("Accept", "")
        key = (rt.group, rt.version, rt.plural)
        if verb == "list":
            items = [copy.deepcopy(o) for o in self._select(raw, route)]
            if as_table:
                return {**table(rt.kind, self.columns.get(key), items),
                        "metadata": {"resourceVersion": str(self.revision)}}
            return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                    "metadata": {"resourceVersion": str(self.revision)}, "items": items}
        if verb == "get":
            if as_table:
                return table(rt.kind, self.columns.get(key), [copy.deepcopy(self._get(route))])
            return copy.deepcopy(self._get(route))
        if verb == "create":
            return self._create(route, body)
        if verb == "delete":
            return self._delete(route)
        old = self._get(route)
        if verb == "update":
            mine = body.get("metadata", {}).get("resourceVersion")
            if mine and mine != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.plural}'
                                                f' "{route.name}": the object has been modified')
            new = copy.deepcopy(body)
        else:
            new = self._patched(old, raw.headers.get("Content-Type", ""), body)
        return self._update(route, old, new)

    def _patched(self, old: Json, ctype: str, patch: Any) -> Json:
        if ctype.startswith("application/json-patch+json"):
            try:
                return jsonpatch.apply_patch(copy.deepcopy(old), patch)
            except jsonpatch.JsonPatchTestFailed as e:
                raise ApiError(422, "Invalid", f"the server rejected the patch: {e}") from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, "Invalid", str(e)) from None
        if ctype.startswith(("application/merge-patch+json",
                             "application/strategic-merge-patch+json")):
            return merge_patch(old, patch)  # strategic merge treated as merge: lists replace
        raise ApiError(415, "UnsupportedMediaType", f"patch type {ctype!r} is not supported")

    def _create(self, route: Route, body: Json) -> Json:
        rt = route.rtype
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if rt.namespaced:
            meta["namespace"] = route.namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        key = self._key(Route(rt, meta.get("namespace"), None, None), meta["name"])
        if key in self.store:
            raise ApiError(409, "AlreadyExists",
                           f'{_qualified(rt)} "{meta["name"]}" already exists')
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        if rt.status:
            obj.pop("status", None)  # a create never sets the status of such a resource
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        for transient in ("deletionTimestamp", "resourceVersion"):
            meta.pop(transient, None)
        if key[0] == CRD_KEY:
            self._register_crd(obj)
        return self._commit(key, "ADDED", obj)

    def _update(self, route: Route, old: Json, new: Json) -> Json:
        rt = route.rtype
        if route.subresource == "status":
            new = {**copy.deepcopy(old), "status": copy.deepcopy(new.get("status"))}
            if new["status"] is None:
                new.pop("status")
        elif rt.status:  # the main resource ignores status changes
            new = _without(new, "status")
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "generation",
                      "deletionTimestamp", "resourceVersion"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        if new == old:
            return copy.deepcopy(old)  # a no-op write changes nothing, not even the version
        if _without(new, "metadata", "status") != _without(old, "metadata", "status"):
            meta["generation"] = old_meta.get("generation", 1) + 1
        key = self._key(route, route.name or "")
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key, new)
        if key[0] == CRD_KEY:
            self._register_crd(new)
        return self._commit(key, "MODIFIED", new)

    def _delete(self, route: Route) -> Json:
        old = self._get(route)
        key = self._key(route, route.name or "")
        if not old["metadata"].get("finalizers"):
            return self._remove(key, copy.deepcopy(old))
        if old["metadata"].get("deletionTimestamp"):
            return copy.deepcopy(old)
        new = copy.deepcopy(old)
        new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
        return self._commit(key, "MODIFIED", new)

    def _remove(self, key: tuple[ResKey, str | None, str], obj: Json) -> Json:
        self.store.pop(key, None)
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self._publish(key[0], "DELETED", obj)
        return obj

    def _commit(self, key: tuple[ResKey, str | None, str], kind: str, obj: Json) -> Json:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self.store[key] = obj
        self._publish(key[0], kind, obj)
        return copy.deepcopy(obj)

    def _publish(self, res: ResKey, kind: str, obj: Json) -> None:
        self.log.append((self.revision, res, kind, copy.deepcopy(obj)))
        if self._changed is not None:
            changed = self._changed

            async def notify() -> None:
                async with changed:
                    changed.notify_all()

            asyncio.get_running_loop().create_task(notify())

    def _register_crd(self, crd: Json) -> None:
        spec, names = crd.get("spec", {}), crd.get("spec", {}).get("names", {})
        for v in spec.get("versions", []):
            if v.get("served", True):
                self.declare(ResourceType(
                    spec["group"], v["name"], names["plural"], names["kind"],
                    spec.get("scope") == "Namespaced", "status" in (v.get("subresources") or {}),
                    tuple(names.get("shortNames", ()))))
                self.columns[(spec["group"], v["name"], names["plural"])] = [
                    *v.get("additionalPrinterColumns", [])]
        crd["status"] = {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
            "conditions": [{"type": t, "status": "True", "reason": t,
                            "lastTransitionTime": _now(), "message": ""}
                           for t in ("NamesAccepted", "Established")]}

    # --- list and watch -----------------------------------------------------------

    @staticmethod
    def _matcher(raw: aiohttp.web.BaseRequest, route: Route) -> Any:
        """The predicate for the objects a list or watch request asks for."""
        labels = label_matcher(raw.query.get("labelSelector", ""))
        fields = field_matcher(raw.query.get("fieldSelector", ""))
        rt = route.rtype
        res = (rt.group, rt.version, rt.plural)

        def match(key: ResKey, obj: Json) -> bool:
            meta = obj.get("metadata", {})
            return (key == res
                    and (route.namespace is None or meta.get("namespace") == route.namespace)
                    and (route.name is None or meta.get("name") == route.name)
                    and labels(obj) and fields(obj))

        return match

    def _select(self, raw: aiohttp.web.BaseRequest, route: Route) -> Iterator[Json]:
        match = self._matcher(raw, route)
        return (obj for (res, _, _), obj in self.store.items() if match(res, obj))

    async def _watch(self, raw: aiohttp.web.BaseRequest, route: Route
                     ) -> aiohttp.web.StreamResponse:
        match = self._matcher(raw, route)
        if self._changed is None:
            self._changed = asyncio.Condition()
        since = raw.query.get("resourceVersion", "")
        initial = raw.query.get("sendInitialEvents") == "true"
        if since in ("", "0") or initial:
            events = [("ADDED", copy.deepcopy(o)) for o in self._select(raw, route)]
            pos = len(self.log)
            if initial:  # a watch-list: the client waits for this bookmark (kubectl 1.35 does)
                rt = route.rtype
                events.append(("BOOKMARK", {
                    "kind": rt.kind, "apiVersion": rt.api_version,
                    "metadata": {"resourceVersion": str(self.revision),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}))
        else:
            events = []
            pos = next((i for i, e in enumerate(self.log) if e[0] > int(since)), len(self.log))
        timeout = float(raw.query.get("timeoutSeconds", 0) or 0)
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(raw)
        try:
            while True:
                for kind, obj in events:
                    await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                events = [(kind, obj) for _rv, res, kind, obj in self.log[pos:]
                          if match(res, obj)]
                pos = len(self.log)
                if events:
                    continue
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if self.closing or (left is not None and left <= 0):
                    break
                async with self._changed:
                    try:
                        await asyncio.wait_for(self._changed.wait(),
                                               timeout=1.0 if left is None else min(left, 1.0))
                    except TimeoutError:
                        pass
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        await resp.write_eof()
        return resp
