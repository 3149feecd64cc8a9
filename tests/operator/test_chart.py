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

REPO = Path(__file__).resolve().parents[2]
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
# --set escapes the dots of a label key.
PROM_NS_LABEL = "kubernetes\\.io/metadata\\.name"

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
        f"networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.{PROM_NS_LABEL}=monitoring",
    ],
    "no-rbac-no-sa": [
        "rbac.create=false",
        "serviceAccount.create=false",
        "serviceAccount.name=platform-operator",
        "metrics.service.enabled=false",
        "dashboards.enabled=false",
        "networkPolicy.enabled=false",
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
    # What the README builds (no registry publishes an image): repository:appVersion.
    assert c["image"] == "disagfusion-operator:0.1.0"
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
    # The operator's own fallback is the chart's default, so both name one image.
    from disagfusion.operator.spec import DEFAULT_IMAGE

    assert env["DISAGFUSION_WORKER_IMAGE"] == "disagfusion-worker:0.1.0" == DEFAULT_IMAGE
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


def images(docs: list[Doc]) -> tuple[str, str]:
    """(operator image, the operator's default worker image) of a rendered chart."""
    c = operator_container(docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    return c["image"], env["DISAGFUSION_WORKER_IMAGE"]


def test_worker_image_values_reach_the_operator() -> None:
    docs = template(["workerImage.repository=registry.example.com/w", "workerImage.tag=0.2"])
    assert images(docs) == ("disagfusion-operator:0.1.0", "registry.example.com/w:0.2")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # --set types digits as an integer; the schema accepted only strings.
        (["image.tag=1", "workerImage.tag=2"], ("disagfusion-operator:1", "disagfusion-worker:2")),
        (["image.tag=0"], ("disagfusion-operator:0", "disagfusion-worker:0.1.0")),
        (["image.tag=1.5"], ("disagfusion-operator:1.5", "disagfusion-worker:0.1.0")),
        (
            ["image.tag=v1", "workerImage.tag=latest"],
            ("disagfusion-operator:v1", "disagfusion-worker:latest"),
        ),
    ],
)
def test_numeric_tags_are_accepted_and_render_as_written(
    values: list[str], expected: tuple[str, str]
) -> None:
    assert images(template(values)) == expected
    assert "0 chart(s) failed" in helm("lint", str(CHART), "--strict", *set_args(values)).stdout


def test_numeric_tags_from_a_values_file(tmp_path: Path) -> None:
    """A values file gives float64s: 2000000 must not render as 2e+06, 3.0 not as 3.0."""
    values = tmp_path / "values.yaml"
    values.write_text("image:\n  tag: 2000000\nworkerImage:\n  tag: 3.0\n")
    docs = template([], CHART, "--values", str(values))
    assert images(docs) == ("disagfusion-operator:2000000", "disagfusion-worker:3")
    values.write_text("image:\n  tag: 1.5\n")
    assert images(template([], CHART, "--values", str(values)))[0] == "disagfusion-operator:1.5"


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
    ("networking.k8s.io", "networkpolicies"): WRITE,
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


# --- the operator's NetworkPolicy -------------------------------------------------------


def test_operator_network_policy_admits_only_its_metrics_and_health_ports(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["default"]
    policy = one(docs, "NetworkPolicy")
    assert policy["metadata"]["name"] == f"{FULLNAME}-operator"
    assert policy["metadata"]["namespace"] == NAMESPACE
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"].items() <= pod_labels.items()
    assert selector["matchLabels"]["app.kubernetes.io/component"] == "operator"
    # Ingress only: the operator opens its own connections (API server, Prometheus).
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"]: p["containerPort"] for p in operator_container(docs)["ports"]}
    rules = policy["spec"]["ingress"]
    assert [r["ports"] for r in rules] == [
        [{"protocol": "TCP", "port": ports["metrics"]}],
        [{"protocol": "TCP", "port": ports["health"]}],
    ]
    assert all("from" not in r for r in rules)  # any source, by default


def test_operator_network_policy_follows_the_ports_and_metrics_from() -> None:
    docs = template(
        [
            "metrics.port=9100",
            "operator.healthPort=9101",
            f"networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.{PROM_NS_LABEL}=mon",
            "networkPolicy.metricsFrom[1].ipBlock.cidr=10.0.0.0/8",
        ]
    )
    metrics, health = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert metrics == {
        "ports": [{"protocol": "TCP", "port": 9100}],
        "from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}},
            {"ipBlock": {"cidr": "10.0.0.0/8"}},
        ],
    }
    # The kubelet probes the health port from the node: it stays open.
    assert health == {"ports": [{"protocol": "TCP", "port": 9101}]}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(one(docs, "NetworkPolicy"), version, strict=True)


def test_the_operator_takes_the_charts_network_peers_for_every_pipeline() -> None:
    """networkPolicy.metricsFrom and .probesFrom reach the operator (as JSON in its
    environment), which admits them to every stage worker's HTTP port by default."""
    from disagfusion.operator.run import spec_defaults_from_env
    from disagfusion.operator.spec import SpecDefaults
    from tests.operator.test_examples import METRICS_FROM_SET, MONITORING

    def defaults(values: list[str]) -> SpecDefaults:
        env = {e["name"]: e.get("value") for e in operator_container(template(values))["env"]}
        return spec_defaults_from_env(env)

    assert defaults([]) == SpecDefaults()
    # the examples' install line, as a shell passes it to helm
    value = METRICS_FROM_SET.removeprefix("--set ").strip("'")
    nodes = "networkPolicy.probesFrom[0].ipBlock.cidr=172.18.0.0/16"
    got = defaults([value, nodes])
    assert got.metrics_from == [MONITORING]
    assert got.probes_from == [{"ipBlock": {"cidr": "172.18.0.0/16"}}]


def test_operator_network_policy_can_be_switched_off(rendered: dict[str, list[Doc]]) -> None:
    assert not by_kind(rendered["no-rbac-no-sa"], "NetworkPolicy")
    assert by_kind(rendered["namespaced-monitors"], "NetworkPolicy")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["networkPolicy"] == {"enabled": True, "metricsFrom": [], "probesFrom": []}


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
        ("image.tag=true", "/image/tag"),
        ("workerImage.tag=-1", "/workerImage/tag"),
        ("workerImage.repository=", "/workerImage/repository"),
        ("workerImage.pullPolicy=Always", "/workerImage"),  # not a worker-image setting
        ("networkPolicy.enabled=maybe", "/networkPolicy/enabled"),
        ("networkPolicy.metricsFrom[0].port=80", "/networkPolicy/metricsFrom/0"),
        (
            "networkPolicy.metricsFrom[0].podSelector.matchExpressions[0].operator=Near",
            "/networkPolicy/metricsFrom/0/podSelector/matchExpressions/0",
        ),
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


# --- the copy-paste path: build + load the images, install, apply an example -----------


def build_steps() -> list[str]:
    """The commands that make the chart's default images exist on a kind cluster."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    tag = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    worker = f"{values['workerImage']['repository']}:{tag}"
    operator = f"{values['image']['repository']}:{tag}"
    return [
        f"docker build -f worker/Dockerfile -t {worker} .",
        f"docker build -f operator/Dockerfile -t {operator} .",
        f"kind load docker-image {worker} {operator}",
    ]


def command_lines(text: str) -> set[str]:
    """Lines as a user copies them: without indentation or a YAML comment's '#'."""
    return {line.strip().lstrip("#").strip() for line in text.splitlines()}


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def install_notes(*values: str) -> str:
    proc = helm(
        "install",
        RELEASE,
        str(CHART),
        "--dry-run=client",
        "--namespace",
        NAMESPACE,
        *set_args(list(values)),
    )
    return proc.stdout[proc.stdout.index("NOTES:") :]


def test_build_steps_match_the_chart_defaults(rendered: dict[str, list[Doc]]) -> None:
    operator, worker = images(rendered["default"])
    assert build_steps()[2] == f"kind load docker-image {worker} {operator}"


@pytest.mark.parametrize(
    "where",
    ["README.md#Deploy on Kubernetes", "charts/README.md", "NOTES.txt"],
)
def test_every_install_path_builds_and_loads_the_images_first(where: str) -> None:
    if where == "NOTES.txt":
        text = install_notes()
    elif where.startswith("README.md#"):
        text = readme_section(where.split("#", 1)[1])
    else:
        text = (REPO / where).read_text()
    missing = [step for step in build_steps() if step not in command_lines(text)]
    assert not missing, f"{where} lacks {missing}"
    # The pipeline is applied as it is: its image is the operator's default.
    if where != "NOTES.txt":
        assert "kubectl apply -f examples/tiny-local.yaml" in command_lines(text), where
    assert "ghcr.io" not in text, f"{where} names an image no registry publishes"


def test_notes_name_the_images_the_release_runs() -> None:
    notes = install_notes(
        "image.repository=reg/op", "workerImage.repository=reg/w", "workerImage.tag=7"
    )
    lines = command_lines(notes)
    assert "docker build -f worker/Dockerfile -t reg/w:7 ." in lines
    assert "docker build -f operator/Dockerfile -t reg/op:0.1.0 ." in lines
    assert "kind load docker-image reg/w:7 reg/op:0.1.0" in lines


def test_no_copy_paste_path_names_the_unpublished_image() -> None:
    paths = [
        REPO / "README.md",
        REPO / "worker" / "Dockerfile",
        REPO / "operator" / "Dockerfile",
        REPO / "operator" / "spec.py",
        *sorted((REPO / "crds").iterdir()),
        *sorted(p for p in CHART.rglob("*") if p.is_file()),
        *sorted((REPO / "examples").glob("*.yaml")),
    ]
    offenders = [str(p.relative_to(REPO)) for p in paths if "ghcr.io/disagfusion" in p.read_text()]
    assert not offenders
