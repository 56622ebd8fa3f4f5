"""The Helm chart and deploy/: lint, render, validate offline, and run what they install.

`helm` is the real binary (v4). Rendered objects are validated against the
Kubernetes 1.35 schemas in strict mode (kubernetes-validate); the operator then
runs against the API emulator exactly as the chart's Deployment configures it,
with exactly the chart's RBAC, and the uninstall hook runs as its Job would.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart import CHART, CUSTOM_VALUES, HELM, ROOT, find, grants_of, helm, render
from tests.k8s.cluster import Cluster, wait_for
from tests.test_health import free_port
from tests.test_leader import probe
from tests.test_operator import seed_operator_pod
from xdplb.agent.cluster import AGENT_NAMESPACE_RULES, AGENT_RULES
from xdplb.k8s.client import Kube
from xdplb.k8s.daemonset import CAPABILITIES
from xdplb.k8s.finalizer import FINALIZER
from xdplb.k8s.rbac import OPERATOR_NAMESPACE_RULES, OPERATOR_RULES
from xdplb.k8s.uninstall import UNINSTALL_NAMESPACE_RULES, UNINSTALL_RULES

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="run scripts/setup.sh for helm")

XDPLB = ROOT / ".venv" / "bin" / "xdplb"
K8S_VERSION = "1.35"
DEFAULT = ()
CUSTOM = (str(CUSTOM_VALUES),)
HOOK = "helm.sh/hook"
# What the pods' processes inherit here: a PATH, and the tree under test when it is not
# the one installed in .venv (PYTHONPATH).
BASE_ENV = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH")}


def validate(doc: dict[str, Any]) -> None:
    """Strict validation against the Kubernetes 1.35 OpenAPI schemas (unknown fields fail)."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {e}") from None


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def normalized(rules: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])),
                   tuple(r.get("resourceNames") or ())) for r in rules)


# --- lint and render --------------------------------------------------------------------


@pytest.mark.parametrize("values", [DEFAULT, CUSTOM], ids=["defaults", "custom"])
def test_helm_lint_strict(values: tuple[str, ...]) -> None:
    out = helm("lint", "--strict", str(CHART), *[a for v in values for a in ("-f", v)]).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize("values", [DEFAULT, CUSTOM], ids=["defaults", "custom"])
def test_rendered_objects_validate_against_kubernetes_1_35(values: tuple[str, ...]) -> None:
    docs = render(values=values)
    kinds = sorted({d["kind"] for d in docs})
    expected = {"ClusterRole", "ClusterRoleBinding", "Deployment", "Job", "Role", "RoleBinding",
                "ServiceAccount"}
    if values == CUSTOM:
        expected |= {"Service", "ServiceMonitor"}
    assert set(kinds) == expected
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":  # a Prometheus Operator kind: not in the schemas
            validate(doc)
    for crd in (CHART / "crds").glob("*.yaml"):
        validate(yaml.safe_load(crd.read_text()))


def test_values_schema_rejects_bad_values_naming_the_field() -> None:
    bad = helm("template", "x", str(CHART), "--set", "agent.xdpMode=turbo", check=False)
    assert bad.returncode != 0 and "xdpMode" in bad.stderr, bad.stderr
    bad = helm("template", "x", str(CHART), "--set", "agent.conntrackCapacity=10", check=False)
    assert bad.returncode != 0 and "conntrackCapacity" in bad.stderr, bad.stderr
    bad = helm("template", "x", str(CHART), "--set", "operator.replica=2", check=False)
    assert bad.returncode != 0 and "replica" in bad.stderr, bad.stderr


def test_chart_crds_are_the_generated_ones() -> None:
    top = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert top and chart == top, "charts/xdplb/crds drifted: run .venv/bin/python scripts/render.py"


def test_deploy_is_the_chart_rendered_with_defaults(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / ".venv/bin/python"), str(ROOT / "scripts/render.py"),
                    "--output-dir", str(tmp_path)], check=True)
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.yaml")}
    kept = {p.name: p.read_text() for p in (ROOT / "deploy").glob("*.yaml")}
    assert fresh == kept, "deploy/ drifted from the chart: run .venv/bin/python scripts/render.py"
    docs = [d for p in sorted((ROOT / "deploy").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]
    assert not any(HOOK in (d["metadata"].get("annotations") or {}) for d in docs)
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for doc in docs:
        validate(doc)


# --- RBAC: exactly the code's rules, no wildcards ------------------------------------------


@pytest.mark.parametrize(("component", "cluster_rules", "namespace_rules"), [
    ("operator", OPERATOR_RULES, OPERATOR_NAMESPACE_RULES),
    ("agent", AGENT_RULES, AGENT_NAMESPACE_RULES),
    ("uninstall", UNINSTALL_RULES, UNINSTALL_NAMESPACE_RULES),
])
def test_rbac_is_exactly_the_code_rules(component: str, cluster_rules: list[dict[str, Any]],
                                        namespace_rules: list[dict[str, Any]]) -> None:
    docs = render()
    name = f"xdplb-{component}"
    assert normalized(find(docs, "ClusterRole", name)["rules"]) == normalized(cluster_rules)
    assert normalized(find(docs, "Role", name)["rules"]) == normalized(namespace_rules)
    for kind, role in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = find(docs, kind, name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role,
                                      "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name,
                                        "namespace": "xdplb-system"}]
    for doc in docs:
        for rule in doc.get("rules", []):
            assert "*" not in [*rule["apiGroups"], *rule["resources"], *rule["verbs"]], doc


# --- security contexts and probes ----------------------------------------------------------


@pytest.mark.parametrize("values", [DEFAULT, CUSTOM], ids=["defaults", "custom"])
def test_operator_and_hook_run_as_non_root_read_only(values: tuple[str, ...]) -> None:
    docs = render(values=values)
    for doc in (find(docs, "Deployment", "xdplb-operator"), find(docs, "Job", "xdplb-uninstall")):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod.get("hostNetwork") is not True
        sc = container(doc)["securityContext"]
        assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
    op = container(find(docs, "Deployment", "xdplb-operator"))
    (port,) = op["ports"]
    env = {e["name"]: e.get("value") for e in op["env"]}
    assert port["containerPort"] == int(env["XDPLB_HEALTH_PORT"])
    assert op["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert op["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    hook = find(docs, "Job", "xdplb-uninstall")["metadata"]["annotations"]
    assert hook[HOOK] == "pre-delete"


@pytest.mark.parametrize("values", [DEFAULT, CUSTOM], ids=["defaults", "custom"])
def test_service_class_settings_reach_the_operator(values: tuple[str, ...],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from xdplb.k8s.settings import add_args, settings_from_args

    v = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in values:
        v["operator"] |= yaml.safe_load(Path(f).read_text())["operator"]
    op = container(find(render(values=values), "Deployment", "xdplb-operator"))
    for name, value in container_env(op, {"metadata.name": "p", "metadata.namespace": "ns"}
                                     ).items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_args(parser)
    settings = settings_from_args(parser.parse_args([]))
    assert (settings.service_class, settings.default_service_class) == (
        v["operator"]["serviceClass"], v["operator"]["defaultServiceClass"])
    bad = helm("template", "x", str(CHART), "--set", "operator.serviceClass=nope", check=False)
    assert bad.returncode != 0 and "serviceClass" in bad.stderr, bad.stderr


def test_uninstall_hook_can_be_turned_off() -> None:
    docs = render(values=(str(CUSTOM_VALUES),))
    assert any(d["kind"] == "Job" for d in docs)
    out = helm("template", "x", str(CHART), "--set", "uninstallHook.enabled=false").stdout
    assert "kind: Job" not in out and "xdplb uninstall -n" in helm(
        "install", "x", str(CHART), "--dry-run=client", "--set",
        "uninstallHook.enabled=false").stdout


# --- the chart's Deployment runs the operator; its Job uninstalls --------------------------


def container_env(c: dict[str, Any], fields: dict[str, str]) -> dict[str, str]:
    """A container's environment as kubelet sets it (fieldRefs resolved from ``fields``)."""
    env = {}
    for e in c.get("env", []):
        env[e["name"]] = (fields[e["valueFrom"]["fieldRef"]["fieldPath"]] if "valueFrom" in e
                          else e["value"])
    return env


def namespace_doc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


@pytest.mark.parametrize("values", [DEFAULT, CUSTOM], ids=["deploy-dir", "custom"])
def test_chart_runs_the_operator_and_uninstalls(tmp_path: Path, values: tuple[str, ...]) -> None:
    ns = "xdplb-system"
    docs = render(values=values)
    with Cluster(tmp_path) as cluster:
        if values == DEFAULT:  # exactly what `kubectl apply -f deploy/` installs
            cluster.kubectl("apply", "-f", str(ROOT / "deploy"))
        else:
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps(namespace_doc(ns)))
            cluster.kubectl("apply", "-f", str(CHART / "crds"))
            plain = [d for d in docs if HOOK not in (d["metadata"].get("annotations") or {})
                     and d["kind"] not in ("ServiceMonitor", "Service")]
            cluster.kubectl("apply", "-f", "-", stdin="\n".join(json.dumps(d) for d in plain))
        admin = Kube(str(cluster.admin_kubeconfig))
        deployment = admin.get(f"/apis/apps/v1/namespaces/{ns}/deployments/xdplb-operator")
        pod_name = seed_operator_pod(admin, deployment)
        cluster.emulator.grant("op-token", f"system:serviceaccount:{ns}:xdplb-operator",
                               grants_of(docs, "xdplb-operator", ns))
        op = container(find(docs, "Deployment", "xdplb-operator"))
        env = container_env(op, {"metadata.name": pod_name, "metadata.namespace": ns})
        health = free_port()  # the chart's port may be taken on this machine
        env |= {"XDPLB_HEALTH_PORT": str(health)}
        watched = env.get("XDPLB_NAMESPACE", "default")
        proc = subprocess.Popen(
            [str(XDPLB), *op["args"]],
            env={**BASE_ENV, "HOME": str(tmp_path), **env,
                 "KUBECONFIG": str(cluster.kubeconfig("operator", "op-token"))},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"the operator exited:\n{proc.communicate()[0]}")
                return probe(health, "/readyz")[0] == 200
            wait_for("/readyz 200", ready, timeout=30)
            # Ready as a standby too: the Lease may still be being taken.
            wait_for("/healthz as the leader",
                     lambda: probe(health, "/healthz") == (200, "ok: leader"), timeout=20)
            lease = wait_for("the Lease held by the pod", lambda: (
                (le := admin.get(f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/"
                                 f"xdplb-operator"))["spec"].get("holderIdentity") == pod_name
                and le), timeout=20)
            assert lease["spec"]["leaseDurationSeconds"] > 0

            def daemonset() -> dict[str, Any] | None:
                try:
                    return admin.get(f"/apis/apps/v1/namespaces/{ns}/daemonsets/xdplb-agent")
                except Exception:
                    return None
            ds = wait_for("the agent DaemonSet", daemonset, timeout=20)
            validate({k: v for k, v in ds.items() if k != "status"})
            check_daemonset(ds, deployment, values)

            lb = yaml.safe_load((ROOT / "examples/cluster/basic.yaml").read_text())
            lb["metadata"]["namespace"] = watched
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps(namespace_doc(watched)))
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps(lb))
            lb_path = (f"/apis/xdplb.io/v1alpha1/namespaces/{watched}/loadbalancers/"
                       f"{lb['metadata']['name']}")
            wait_for("the finalizer", lambda: FINALIZER in (
                admin.get(lb_path)["metadata"].get("finalizers") or []), timeout=20)
            admin.request("POST", "/apis/xdplb.io/v1alpha1/nodestates",
                          {"metadata": {"name": "gone-node"}})

            # helm uninstall: the pre-delete Job, with its own rules.
            job = find(docs, "Job", "xdplb-uninstall")
            hook = cluster.emulator.grant(
                "hook-token", f"system:serviceaccount:{ns}:xdplb-uninstall",
                grants_of(docs, "xdplb-uninstall", ns))
            hc = container(job)
            uninstall = subprocess.Popen(
                [str(XDPLB), *hc["args"]],
                env={**BASE_ENV, "HOME": str(tmp_path),
                     **container_env(hc, {"metadata.namespace": ns}),
                     "KUBECONFIG": str(cluster.kubeconfig("hook", "hook-token"))},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            wait_for("the Deployment deleted", lambda: not any(
                d["metadata"]["name"] == "xdplb-operator" for d in admin.get(
                    f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]), timeout=20)
            # The hook waits for the operator's pod: the finalizer is not released under it.
            assert uninstall.poll() is None
            assert FINALIZER in (admin.get(lb_path)["metadata"].get("finalizers") or [])
            proc.terminate()  # what kubelet does to the pod of a deleted Deployment
            proc.wait(20)
            admin.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{pod_name}")
            out = uninstall.communicate(timeout=30)[0]
            assert uninstall.returncode == 0, out
            assert FINALIZER not in (admin.get(lb_path)["metadata"].get("finalizers") or [])
            assert admin.get("/apis/xdplb.io/v1alpha1/nodestates")["items"] == []
            assert admin.get(f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases")[
                "items"] == []
            assert hook.unused() == []
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)


def check_daemonset(ds: dict[str, Any], deployment: dict[str, Any],
                    values: tuple[str, ...]) -> None:
    """The DaemonSet the operator made carries the chart's values."""
    v = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in values:
        custom = yaml.safe_load(Path(f).read_text())
        for key in ("image", "agent"):
            v[key] |= custom.get(key, {})
        v["logFormat"] = custom.get("logFormat", v["logFormat"])
    pod = ds["spec"]["template"]["spec"]
    c = container(ds)
    image = f"{v['image']['repository']}:{v['image']['tag'] or '0.1.0'}"
    assert (c["image"], c["imagePullPolicy"]) == (image, v["image"]["pullPolicy"])
    assert pod["serviceAccountName"] == "xdplb-agent"
    assert pod["nodeSelector"] == v["agent"]["nodeSelector"]
    assert pod["tolerations"] == v["agent"]["tolerations"]
    assert c["resources"] == v["agent"]["resources"]
    assert pod["hostNetwork"] is True
    args = c["args"]

    def arg(flag: str) -> str:
        return str(args[args.index(flag) + 1])
    t = v["agent"]["timeouts"]
    assert (arg("--xdp-mode"), arg("--conntrack-capacity"), arg("--metrics-port"),
            arg("--log-format"), arg("--tcp-established-timeout"), arg("--tcp-closing-timeout"),
            arg("--tcp-unreplied-timeout"), arg("--udp-timeout"), arg("--daemonset")) == (
        v["agent"]["xdpMode"], str(v["agent"]["conntrackCapacity"]),
        str(v["agent"]["metricsPort"]), v["logFormat"], str(t["tcpEstablished"]),
        str(t["tcpClosing"]), str(t["tcpUnreplied"]), str(t["udp"]), "xdplb-system/xdplb-agent")
    assert arg("--l2-lease-seconds") == str(v["agent"]["l2LeaseSeconds"])
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": sorted(CAPABILITIES)}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    (owner,) = ds["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Deployment", deployment["metadata"]["uid"])


def test_crd_upgrade_path_is_kubectl_apply_of_the_chart_crds(tmp_path: Path) -> None:
    """`helm upgrade` never touches crds/: the documented step updates them in place and
    keeps every LoadBalancer."""
    new = yaml.safe_load((CHART / "crds" / "loadbalancers.xdplb.io.yaml").read_text())
    old = json.loads(json.dumps(new))
    listener = old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    del listener["properties"]["trafficPolicy"]  # an older release without the field
    with Cluster(tmp_path) as cluster:
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(old))
        lb = yaml.safe_load((ROOT / "examples/cluster/basic.yaml").read_text())
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(lb))
        cluster.kubectl("apply", "-f", str(CHART / "crds"))
        admin = Kube(str(cluster.admin_kubeconfig))
        stored = admin.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                           "loadbalancers.xdplb.io")
        assert stored["spec"] == new["spec"]
        name = lb["metadata"]["name"]
        kept = admin.get(f"/apis/xdplb.io/v1alpha1/namespaces/"
                         f"{lb['metadata'].get('namespace', 'default')}/loadbalancers/{name}")
        assert kept["spec"] == lb["spec"]
