"""The Grafana dashboards in the chart only query metrics the code really exports.

Each dashboard is valid JSON with unique panel ids, titled panels and a
Prometheus data source variable; every PromQL expression parses (promtool),
and every metric and label it names is exported by the workers, the gateway
or the operator (collected from their real registries), or comes from an
explicit allow-list of third-party exporters (kube-state-metrics, DCGM).
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from disagfusion.worker.metrics import GatewayMetrics, StageMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "charts" / "disagfusion" / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
OPERATOR_METRICS_MODULE = "disagfusion.operator.metrics"

# Labels Prometheus adds to every scraped series (target labels), not the exporter.
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "container", "endpoint"}

# Third-party metrics a dashboard may query, with the labels their exporters set.
ALLOWED_EXTERNAL: dict[str, set[str]] = {
    # kube-state-metrics
    "kube_statefulset_replicas": {"namespace", "statefulset"},
    "kube_statefulset_status_replicas": {"namespace", "statefulset"},
    "kube_statefulset_status_replicas_ready": {"namespace", "statefulset"},
    # NVIDIA dcgm-exporter (namespace/pod/container from its Kubernetes pod mapping)
    **{
        name: {"gpu", "UUID", "device", "modelName", "Hostname", "namespace", "pod", "container"}
        for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE")
    },
}

# Grafana variables and the values substituted for a syntax check with promtool.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$namespace": "default",
    "$pipeline": "demo",
}


# --- exported metrics ---------------------------------------------------------------------


# The series a metric family exposes, by type (a counter `x` is scraped as `x_total`).
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def registry_metrics(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Every series name a registry exposes -> its label names.

    Names come from `collect()`: the series each family exposes (a histogram
    `x` as `x_bucket`, `x_sum`, `x_count`) and the sample names. Labels come
    from the samples and, for labelled metrics with no child yet, from the
    collector's label names.
    """
    metrics: dict[str, set[str]] = {}
    collector_labels: dict[str, set[str]] = {}
    for collector in list(registry._collector_to_names):  # no public API for label names
        for name in registry._collector_to_names[collector]:
            collector_labels[name] = set(getattr(collector, "_labelnames", ()))
    for family in registry.collect():
        suffixes = SERIES_SUFFIXES.get(family.type, ("",))
        names = {family.name + suffix for suffix in suffixes} | {s.name for s in family.samples}
        for name in names:
            labels = metrics.setdefault(name, set())
            labels |= collector_labels.get(name, set())
            labels |= collector_labels.get(family.name, set())
            labels |= {k for s in family.samples for k in s.labels if k != "le"}
            if name.endswith("_bucket"):
                labels.add("le")
    return metrics


def worker_metrics() -> dict[str, set[str]]:
    merged: dict[str, set[str]] = {}
    stage = StageMetrics("encoder", "p", "m")
    gateway = GatewayMetrics("p", "m")
    for registry in (stage.registry, gateway.registry):
        for name, labels in registry_metrics(registry).items():
            merged.setdefault(name, set()).update(labels)
    return merged


def operator_registries() -> list[CollectorRegistry]:
    """The operator's metric registries; fails when the module does not exist."""
    try:
        module = importlib.import_module(OPERATOR_METRICS_MODULE)
    except ModuleNotFoundError as exc:
        pytest.fail(
            f"{OPERATOR_METRICS_MODULE} does not exist ({exc}); the operator dashboard's "
            "disagfusion_operator_* metrics cannot be checked against real code"
        )
    # Registries the module defines (not the process-wide default it may import) and the
    # registries of the metric holders it defines that build without arguments.
    registries = [
        v for v in vars(module).values() if isinstance(v, CollectorRegistry) and v is not REGISTRY
    ]
    for value in vars(module).values():
        if isinstance(value, type) and value.__module__ == module.__name__:
            try:
                instance = value()
            except TypeError:
                continue
            registry = getattr(instance, "registry", None)
            if isinstance(registry, CollectorRegistry):
                registries.append(registry)
    assert registries, f"{OPERATOR_METRICS_MODULE} exposes no CollectorRegistry"
    return registries


def all_exported(needs_operator: bool) -> dict[str, set[str]]:
    exported = worker_metrics()
    if needs_operator:
        for registry in operator_registries():
            for name, labels in registry_metrics(registry).items():
                exported.setdefault(name, set()).update(labels)
    return exported


# --- a small PromQL reader ----------------------------------------------------------------

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# Numbers, and durations such as `5m` or `1h30m` (after `offset` or `@`).
NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d*\.?\d+([eE][+-]?\d+)?((ms|[smhdwy])(\d+(ms|[smhdwy]))*)?")
OPERATOR = re.compile(r"=~|!~|!=|=")


@dataclass
class Selector:
    metric: str
    labels: list[str] = field(default_factory=list)


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    created: set[str] = field(default_factory=set)  # label_replace / label_join targets
    aggregated: bool = False  # has an aggregation: only its `by` labels survive
    without: bool = False  # ... unless it aggregates `without` some labels


def read_string(expr: str, i: int) -> tuple[str, int]:
    quote, i, out = expr[i], i + 1, []
    while expr[i] != quote:
        if expr[i] == "\\":
            i += 1
        out.append(expr[i])
        i += 1
    return "".join(out), i + 1


def skip_space(expr: str, i: int) -> int:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return i


def parse_promql(expr: str) -> Query:
    """Metric selectors, grouping labels and created labels of one expression."""
    query = Query()
    calls: list[list[Any]] = []  # [function name or None, argument index]
    pending_call: str | None = None
    i = 0
    while i < len(expr):
        c = expr[i]
        if c.isspace():
            i += 1
        elif c in "\"'`":
            text, i = read_string(expr, i)
            if calls and calls[-1][0] in ("label_replace", "label_join") and calls[-1][1] == 1:
                query.created.add(text)
        elif c == "[":
            i = expr.index("]", i) + 1
        elif c == "$":
            m = re.compile(r"\$(\{[^}]*\}|\w+)").match(expr, i)
            assert m, expr[i:]
            i = m.end()
        elif c == "(":
            calls.append([pending_call, 0])
            pending_call = None
            i += 1
        elif c == ")":
            calls.pop()
            i += 1
        elif c == ",":
            if calls:
                calls[-1][1] += 1
            i += 1
        elif c == "{":
            raise AssertionError(f"selector without a metric name in {expr!r}")
        elif (m := IDENT.match(expr, i)) and not c.isdigit():
            word, i = m.group(), m.end()
            keyword = word.lower()  # PromQL keywords are case-insensitive
            j = skip_space(expr, i)
            nxt = expr[j] if j < len(expr) else ""
            if keyword in GROUPING:
                query.without |= keyword == "without"
                if nxt == "(":
                    end = expr.index(")", j)
                    query.grouping |= {x.strip() for x in expr[j + 1 : end].split(",") if x.strip()}
                    i = end + 1
            elif keyword in KEYWORDS:
                pass
            elif keyword in AGGREGATIONS or nxt == "(":
                query.aggregated |= keyword in AGGREGATIONS
                pending_call = word
            elif nxt == "{":
                selector = Selector(word)
                i = j + 1
                while True:
                    i = skip_space(expr, i)
                    if expr[i] == "}":
                        i += 1
                        break
                    if expr[i] == ",":
                        i += 1
                        continue
                    label = IDENT.match(expr, i)
                    assert label, f"bad matcher at {expr[i:]!r}"
                    selector.labels.append(label.group())
                    op = OPERATOR.match(expr, skip_space(expr, label.end()))
                    assert op, f"bad matcher at {expr[i:]!r}"
                    _, i = read_string(expr, skip_space(expr, op.end()))
                query.selectors.append(selector)
            else:
                query.selectors.append(Selector(word))
        elif m := NUMBER.match(expr, i):
            i = m.end()
        else:
            i += 1  # arithmetic and comparison operators
    return query


# --- the dashboards -----------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(variable name, the series selector queried, the label whose values it lists)."""
    for var in variables(dashboard).values():
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
            assert m, f"variable {var['name']}: expected label_values(...), got {var['definition']}"
            assert var["query"]["query"] == var["definition"], var["name"]
            yield var["name"], m[1], m[2]


def uses_operator_metrics(dashboard: dict[str, Any]) -> bool:
    return any("disagfusion_operator_" in t["expr"] for _, t in targets(dashboard))


def test_the_chart_ships_the_pipeline_and_operator_dashboards() -> None:
    names = {p.name for p in DASHBOARD_FILES}
    assert {"disagfusion-pipeline.json", "disagfusion-operator.json"} <= names


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = load(path)
    assert dashboard["title"] and dashboard["uid"]
    assert len(dashboard["uid"]) <= 40
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None, "exported dashboards carry no database id"

    all_panels = list(panels(dashboard))
    assert all_panels
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in all_panels:
        assert panel.get("title"), f"panel {panel['id']} has no title"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    titles = [p["title"] for p in all_panels]
    assert len(titles) == len(set(titles)), f"duplicate panel titles in {path.name}"

    ds = variables(dashboard).get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    for panel in all_panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]
    for var in variables(dashboard).values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}", var["name"]


def test_pipeline_dashboard_is_per_pipeline() -> None:
    dashboard = load(DASHBOARDS / "disagfusion-pipeline.json")
    assert {"datasource", "namespace", "pipeline"} <= set(variables(dashboard))
    for title, target in targets(dashboard):
        if "disagfusion_" in target["expr"]:
            assert 'pipeline="$pipeline"' in target["expr"], title
        assert 'namespace="$namespace"' in target["expr"], title
    exprs = "\n".join(t["expr"] for _, t in targets(dashboard))
    for needle in (
        "histogram_quantile(0.5, sum by (le) (rate(disagfusion_gateway_request_duration",
        "histogram_quantile(0.95, sum by (le) (rate(disagfusion_gateway_request_duration",
        "histogram_quantile(0.99, sum by (le) (rate(disagfusion_gateway_request_duration",
        'disagfusion_gateway_requests_total{namespace="$namespace", pipeline="$pipeline", '
        'code!~"2.."}',
        "kube_statefulset_replicas",
        "kube_statefulset_status_replicas_ready",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
    ):
        assert needle in exprs, needle
    gpu_panels = [p for p in panels(dashboard) if "DCGM_" in json.dumps(p.get("targets", []))]
    assert gpu_panels
    for panel in gpu_panels:
        assert "dcgm-exporter" in panel["description"], panel["title"]


def test_operator_dashboard_covers_reconciles() -> None:
    exprs = "\n".join(t["expr"] for _, t in targets(load(DASHBOARDS / "disagfusion-operator.json")))
    assert "disagfusion_operator_reconcile_total" in exprs
    assert "disagfusion_operator_reconcile_errors_total" in exprs
    assert "disagfusion_operator_reconcile_duration_seconds_bucket" in exprs


def test_operator_dashboard_covers_autoscaling() -> None:
    exprs = "\n".join(t["expr"] for _, t in targets(load(DASHBOARDS / "disagfusion-operator.json")))
    for metric in (
        "disagfusion_operator_desired_replicas",
        "disagfusion_operator_current_replicas",
        "disagfusion_operator_predicted_service_time_seconds",
        "disagfusion_operator_observed_service_time_seconds",
        "disagfusion_operator_scaling_decisions_total",
        "disagfusion_operator_metrics_available",
    ):
        assert metric in exprs, metric
    assert "by (pipeline, stage, direction, reason, applied)" in exprs


def test_operator_metrics_do_not_clash_with_target_labels() -> None:
    """Prometheus would rename an exported `namespace` to `exported_namespace`."""
    for registry in operator_registries():
        for name, labels in registry_metrics(registry).items():
            assert not labels & TARGET_LABELS, (name, labels & TARGET_LABELS)


def query_problems(queries: list[tuple[str, str, str]], exported: dict[str, set[str]]) -> list[str]:
    """What is wrong with (title, PromQL, legend) triples, given the exported metrics."""
    problems: list[str] = []
    for title, expr, legend in queries:
        query = parse_promql(expr)
        if not query.selectors:
            problems.append(f"{title}: no metric in {expr!r}")
        available: set[str] = set(TARGET_LABELS) | query.created
        for sel in query.selectors:
            if sel.metric.startswith("disagfusion_"):
                if sel.metric not in exported:
                    problems.append(f"{title}: {sel.metric} is not exported by the code")
                    continue
                known = exported[sel.metric] | TARGET_LABELS
            elif sel.metric in ALLOWED_EXTERNAL:
                known = ALLOWED_EXTERNAL[sel.metric] | TARGET_LABELS
            else:
                problems.append(f"{title}: {sel.metric} is neither disagfusion_* nor allowed")
                continue
            available |= known
            problems += [
                f"{title}: {sel.metric} has no label {label!r}"
                for label in sel.labels
                if label not in known
            ]
        problems += [
            f"{title}: groups by {label!r}, which no metric in the query has"
            for label in sorted(query.grouping - available)
        ]
        by_only = query.aggregated and not query.without
        kept = query.grouping | query.created if by_only else available
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        problems += [
            f"{title}: legend uses {label!r}, which the query does not keep"
            for label in sorted(legend_labels - kept)
        ]
    return problems


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_metric_and_label_is_exported(path: Path) -> None:
    dashboard = load(path)
    exported = all_exported(needs_operator=uses_operator_metrics(dashboard))
    queries = [(title, t["expr"], t.get("legendFormat", "")) for title, t in targets(dashboard)]
    queries += [
        (f"variable {name}", expr, "{{" + label + "}}")
        for name, expr, label in variable_queries(dashboard)
    ]
    problems = query_problems(queries, exported)
    assert not problems, "\n".join(problems)


def test_the_metric_check_catches_mistakes() -> None:
    exported = worker_metrics()
    rate = "[$__rate_interval]"
    cases = {
        "disagfusion_stage_queue_depths": "is not exported",
        "disagfusion_stage_service_time_seconds": "is not exported",  # a histogram's bare name
        "disagfusion_gateway_requests": "is not exported",  # a counter without _total
        "up": "neither disagfusion_* nor allowed",
        'disagfusion_stage_busy{stagee="x"}': "has no label 'stagee'",
        'disagfusion_gateway_pending_requests{stage="x"}': "has no label 'stage'",
        f"sum by (reason) (rate(disagfusion_handoff_bytes_total{rate}))": "groups by 'reason'",
    }
    for expr, message in cases.items():
        problems = query_problems([("t", expr, "")], exported)
        assert len(problems) == 1 and message in problems[0], (expr, problems)
    legend = query_problems([("t", "sum(disagfusion_stage_busy)", "{{ stage }}")], exported)
    assert legend == ["t: legend uses 'stage', which the query does not keep"]
    assert "operator" not in str(exported), "operator names come only from the operator module"


def test_the_promql_reader_sees_selectors_grouping_and_created_labels() -> None:
    q = parse_promql(
        'label_replace(sum by (stage, le) (rate(a_bucket{x="1", y=~"$v-(a|b)"}[$__rate_interval]))'
        ' / on (stage) b, "dst", "$1", "src", "(.+)") + 0.5 * c offset 1h30m > bool Inf'
    )
    assert [(s.metric, s.labels) for s in q.selectors] == [
        ("a_bucket", ["x", "y"]),
        ("b", []),
        ("c", []),
    ]
    assert q.grouping == {"stage", "le"}
    assert q.created == {"dst"}
    assert q.aggregated
    assert not parse_promql('label_replace(k{a="1"}, "b", "$1", "a", "(.*)")').aggregated
    assert parse_promql("sum without (x) (k)").without


def promtool_expr(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert not re.search(r"\$(?!\d)", expr), f"unknown Grafana variable in {expr!r}"
    return expr


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_expression_parses_with_promtool(path: Path, tmp_path: Path) -> None:
    dashboard = load(path)
    rules = [
        {"record": f"check:panel{n}", "expr": promtool_expr(t["expr"])}
        for n, (_, t) in enumerate(targets(dashboard))
    ]
    rules += [
        {"record": f"check:var_{name}", "expr": promtool_expr(expr)}
        for name, expr, _ in variable_queries(dashboard)
    ]
    rules_file = tmp_path / "rules.yaml"  # JSON is YAML
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
