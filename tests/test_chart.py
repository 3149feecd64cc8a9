"""The Helm chart charts/disagfusion, checked with the real helm binary.

`make test` installs helm first (`make helm`: tools/get_helm.py puts it in
.venv/bin/helm); without it these tests fail rather than skip, so CI cannot
silently stop checking the chart. Built-in kinds are validated offline against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "disagfusion"
CRD_NAME = "disagfusion.io_diffusionpipelines.yaml"
CRD_SOURCE = REPO / "crds" / CRD_NAME
CRD_COPY = CHART / "crds" / CRD_NAME
RELEASE = "rel"
NAMESPACE = "disagfusion-system"
WATCHED = "pipelines"
FULLNAME = f"{RELEASE}-disagfusion"
# The oldest Kubernetes the chart targets in practice and the newest schemas known.
K8S_VERSIONS = ["1.30.0", f"{kubernetes_validate.latest_version()}.0"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}

Doc = dict[str, Any]

# Named value sets: default, everything optional on + one namespace, and
# RBAC/ServiceAccount left to the cluster admin.
VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "namespaced-monitors": [
        f"watchNamespace={WATCHED}",
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
        "metrics.serviceMonitor.scrapeTimeout=10s",
        "metrics.podMonitor.enabled=true",
        "metrics.podMonitor.labels.release=kube-prometheus-stack",
        "prometheus.url=http://prometheus-operated.monitoring:9090",
        "image.tag=0.1.0-rc1",
        "image.pullPolicy=Always",
        "logLevel=DEBUG",
        "dashboards.annotations.grafana_folder=disagfusion",
    ],
    "no-rbac-no-sa": [
        "rbac.create=false",
        "serviceAccount.create=false",
        "serviceAccount.name=platform-operator",
        "metrics.service.enabled=false",
        "dashboards.enabled=false",
    ],
}


def helm_binary() -> str:
    candidates = [os.environ.get("HELM", ""), str(Path(sys.executable).parent / "helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("helm")
    if found:
        return found
    pytest.fail(
        "helm not found (looked at $HELM, the venv's bin/ and PATH): run `make helm` "
        "(or `.venv/bin/python tools/get_helm.py`) to install it",
        pytrace=False,
    )


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def set_args(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        out += ["--set", value]
    return out


def template(values: list[str], chart: Path = CHART, *extra: str) -> list[Doc]:
    out = helm(
        "template", RELEASE, str(chart), "--namespace", NAMESPACE, *extra, *set_args(values)
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {name: template(values, CHART, "--include-crds") for name, values in VALUE_SETS.items()}


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str) -> Doc:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(docs: list[Doc]) -> Doc:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return dict(containers[0])


# --- helm lint / template --------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_strict(name: str) -> None:
    proc = helm(
        "lint", str(CHART), "--strict", "--namespace", NAMESPACE, *set_args(VALUE_SETS[name])
    )
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


def test_helm_is_v4() -> None:
    assert helm("version", "--short").stdout.startswith("v4."), "expected helm v4"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_manifest_validates(rendered: dict[str, list[Doc]], name: str) -> None:
    docs = rendered[name]
    assert docs
    for doc in docs:
        kind = doc["kind"]
        if kind in MONITORING_KINDS:
            check_monitor_shape(doc)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(
                    f"{name}: {kind}/{doc['metadata']['name']} invalid for {version}: {err}"
                )
        # Namespaced objects land in the release namespace (or the watched one).
        if kind not in {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}:
            assert doc["metadata"]["namespace"] in {NAMESPACE, WATCHED}, doc["metadata"]


def test_validator_is_strict() -> None:
    """Guard against a validator that silently accepts anything."""
    deployment = one(template([]), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["bogusField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def check_monitor_shape(doc: Doc) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == NAMESPACE
    spec = doc["spec"]
    labels = spec["selector"]["matchLabels"]
    assert labels and all(isinstance(v, str) and v for v in labels.values())
    assert set(spec["selector"]) == {"matchLabels"}
    ns_sel = spec["namespaceSelector"]
    assert ns_sel == {"any": True} or (
        set(ns_sel) == {"matchNames"} and all(isinstance(n, str) for n in ns_sel["matchNames"])
    )
    key = "endpoints" if doc["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
    assert set(spec) == {"selector", "namespaceSelector", key}
    for endpoint in spec[key]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics"


# --- operator Deployment ---------------------------------------------------------------


def test_operator_deployment_defaults(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    c = operator_container(docs)
    assert c["image"] == "ghcr.io/disagfusion/disagfusion:0.1.0"
    assert c["command"] == ["disagfusion"]
    assert c["args"] == [
        "operator",
        "--all-namespaces",
        "--metrics-port",
        "8080",
        "--liveness-port",
        "8081",
    ]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["DISAGFUSION_PROMETHEUS_URL"] == ""
    assert env["DISAGFUSION_LOG_LEVEL"] == "INFO"
    # The operator pod must not look like a pipeline pod to the workers' PodMonitor.
    assert "app.kubernetes.io/part-of" not in deployment["spec"]["template"]["metadata"]["labels"]
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "PodMonitor")


def test_operator_deployment_custom(rendered: dict[str, list[Doc]]) -> None:
    c = operator_container(rendered["namespaced-monitors"])
    assert c["args"][:3] == ["operator", "--namespace", WATCHED]
    assert "--all-namespaces" not in c["args"]
    assert c["image"].endswith(":0.1.0-rc1") and c["imagePullPolicy"] == "Always"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["DISAGFUSION_PROMETHEUS_URL"] == "http://prometheus-operated.monitoring:9090"
    assert env["DISAGFUSION_LOG_LEVEL"] == "DEBUG"


def test_metrics_service_selects_operator(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    svc = one(docs, "Service")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


# --- RBAC ------------------------------------------------------------------------------

WRITE = {"get", "create", "patch", "delete"}
COMMON_RULES = {
    ("disagfusion.io", "diffusionpipelines"): {"get", "list", "watch", "patch"},
    ("disagfusion.io", "diffusionpipelines/status"): {"get", "patch"},
    ("apps", "statefulsets"): WRITE,
    ("apps", "deployments"): WRITE,
    ("", "services"): WRITE,
    ("", "configmaps"): WRITE,
    ("", "events"): {"create"},
}
CLUSTER_RULES = {
    **COMMON_RULES,
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}
NAMESPACED_RULES = COMMON_RULES


def grants(role: Doc) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames etc.
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def check_binding(binding: Doc, role: Doc, sa_name: str) -> None:
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role["kind"],
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}
    ]


def test_rbac_all_namespaces_is_exact(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["default"]
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    role = one(docs, "ClusterRole")
    assert grants(role) == CLUSTER_RULES
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["name"] == FULLNAME
    check_binding(one(docs, "ClusterRoleBinding"), role, FULLNAME)


def test_rbac_one_namespace_is_exact_and_namespaced(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["namespaced-monitors"]
    # Watching one namespace needs no cluster-scoped permission at all.
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == WATCHED
    assert grants(role) == NAMESPACED_RULES
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == WATCHED
    check_binding(binding, role, FULLNAME)


def test_rbac_and_service_account_off(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["no-rbac-no-sa"]
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    assert "ServiceAccount" not in kinds and "Service" not in kinds and "ConfigMap" not in kinds
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-operator"


# --- monitors --------------------------------------------------------------------------


def test_service_monitor_targets_operator_metrics(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["namespaced-monitors"]
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    assert "metrics" in port_names


def test_pod_monitor_targets_pipeline_pods(rendered: dict[str, list[Doc]]) -> None:
    pm = one(rendered["namespaced-monitors"], "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/part-of": "disagfusion"}}
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [WATCHED]}
    assert pm["spec"]["podMetricsEndpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s"}
    ]
    cluster = template(["metrics.podMonitor.enabled=true"])
    assert one(cluster, "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


# --- CRD -------------------------------------------------------------------------------


def test_chart_crd_is_identical_to_source() -> None:
    assert CRD_SOURCE.is_file(), f"missing CRD source {CRD_SOURCE}"
    assert CRD_COPY.is_file(), f"missing chart CRD copy {CRD_COPY}: cp {CRD_SOURCE} {CRD_COPY}"
    assert CRD_COPY.read_bytes() == CRD_SOURCE.read_bytes(), (
        f"{CRD_COPY} drifted from {CRD_SOURCE}: cp {CRD_SOURCE} {CRD_COPY}"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [CRD_NAME]


def test_crd_installed_from_crds_folder(rendered: dict[str, list[Doc]]) -> None:
    crd = one(rendered["default"], "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "diffusionpipelines.disagfusion.io"
    assert "dfp" in crd["spec"]["names"]["shortNames"]
    # Without --include-crds, helm template leaves crds/ out: it is not a template.
    assert not by_kind(template([]), "CustomResourceDefinition")


# --- values.schema.json ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("imageTag=latest", ""),  # unknown top-level key (a typo of image.tag)
        ("metrics.port=0", "/metrics/port"),
        ("watchNamespace=Not_A_Namespace", "/watchNamespace"),
        ("operator.replicas=2", "/operator/replicas"),
        ("rbac.create=maybe", "/rbac/create"),
        ("prometheus.url=prometheus:9090", "/prometheus/url"),
        ("logLevel=LOUD", "/logLevel"),
    ],
)
def test_values_schema_rejects(bad: str, where: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0, f"--set {bad} was accepted"
    assert "schema" in proc.stderr and f"at '{where}'" in proc.stderr, proc.stderr


def test_values_schema_is_valid_json() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])


def test_chart_versions_match_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    from disagfusion import __version__

    assert chart["appVersion"] == __version__


# --- dashboards ------------------------------------------------------------------------


def dashboard_maps(docs: list[Doc]) -> dict[str, Doc]:
    return {
        d["metadata"]["name"]: d
        for d in by_kind(docs, "ConfigMap")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "dashboards"
    }


def check_dashboards(docs: list[Doc], files: list[Path]) -> None:
    maps = dashboard_maps(docs)
    assert len(maps) == len(files)
    shipped: dict[str, Any] = {}
    for cm in maps.values():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert len(cm["metadata"]["name"]) <= 63
        ((key, text),) = cm["data"].items()
        shipped[key] = json.loads(text)
    assert sorted(shipped.values(), key=json.dumps) == sorted(
        (json.loads(f.read_text()) for f in files), key=json.dumps
    )


def test_shipped_dashboards_become_configmaps(rendered: dict[str, list[Doc]]) -> None:
    files = sorted((CHART / "dashboards").glob("*.json"))
    check_dashboards(rendered["default"], files)
    if files:
        annotated = dashboard_maps(rendered["namespaced-monitors"])
        assert all(
            cm["metadata"]["annotations"] == {"grafana_folder": "disagfusion"}
            for cm in annotated.values()
        )


@pytest.fixture
def chart_copy(tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "disagfusion"
    shutil.copytree(CHART, copy)
    shutil.rmtree(copy / "dashboards", ignore_errors=True)
    (copy / "dashboards").mkdir()
    yield copy


def test_dashboards_configmaps_from_files(chart_copy: Path) -> None:
    boards = chart_copy / "dashboards"
    (boards / "Stage Overview.json").write_text(json.dumps({"title": "a", "expr": "{{x}}"}))
    (boards / "queue_depth.json").write_text(json.dumps({"title": "b", "panels": []}))
    (boards / "notes.txt").write_text("not a dashboard")
    docs = template([], chart_copy)
    check_dashboards(docs, sorted(boards.glob("*.json")))
    assert sorted(dashboard_maps(docs)) == [
        f"{FULLNAME}-dashboard-queue-depth",
        f"{FULLNAME}-dashboard-stage-overview",
    ]
    assert not dashboard_maps(template(["dashboards.enabled=false"], chart_copy))


def test_no_dashboards_renders_no_configmaps(chart_copy: Path) -> None:
    docs = template([], chart_copy)
    assert not dashboard_maps(docs)
    assert helm("lint", str(chart_copy), "--strict").returncode == 0
