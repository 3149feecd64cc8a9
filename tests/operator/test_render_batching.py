"""Dynamic batching and queue order (spec.batching, spec.queueOrder, per stage) and the
gateway's SLO: parsed, validated by field path, rendered as the flags the pods read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from disagfusion.cli import build_parser
from disagfusion.operator import conditions as cond
from disagfusion.operator.children import render_all
from disagfusion.operator.render import Child, Owner
from disagfusion.operator.spec import (
    QUEUE_ORDERS,
    BatchingSpec,
    SpecError,
    parse_spec,
    validate_spec,
)
from disagfusion.scheduling.builtin_profiles import builtin_profile
from tests.operator.emulator import CRD, EVENTS, Cluster, condition, eventually, pipeline

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "disagfusion" / "dashboards" / "disagfusion-pipeline.json"
OWNER = Owner(name="sd", namespace="ml", uid="uid-1")
STAGES = ("encoder", "denoiser", "decoder")
BATCH_FLAGS = ("--max-batch", "--batch-wait-ms", "--queue-order")


def spec(**extra: Any) -> dict[str, Any]:
    return {"model": {"source": "builtin:tiny-unet"}, **extra}


def args_by_component(children: list[Child]) -> dict[str, list[str]]:
    """encoder / denoiser / decoder / gateway -> its container's args."""
    return {
        c.body["metadata"]["labels"]["app.kubernetes.io/component"]: c.body["spec"]["template"][
            "spec"
        ]["containers"][0]["args"]
        for c in children
        if c.kind in ("StatefulSet", "Deployment")
    }


def flags(args: list[str], names: tuple[str, ...] = BATCH_FLAGS) -> dict[str, str]:
    """The given flags in `args` with their values; each may appear at most once."""
    out = {}
    for name in names:
        assert args.count(name) <= 1, (name, args)
        if name in args:
            out[name] = args[args.index(name) + 1]
    return out


def rendered(raw: dict[str, Any]) -> dict[str, list[str]]:
    return args_by_component(render_all(OWNER, parse_spec(raw)))


# Rendering: inheritance and override, stage by stage.

CASES: list[tuple[str, dict[str, Any], dict[str, dict[str, str]]]] = [
    ("nothing set: no flag, the worker's defaults", {}, {s: {} for s in STAGES}),
    (
        "pipeline-wide reaches every stage",
        {"batching": {"maxBatch": 4, "batchWaitMs": 2.5}, "queueOrder": "edf"},
        {s: {"--max-batch": "4", "--batch-wait-ms": "2.5", "--queue-order": "edf"} for s in STAGES},
    ),
    (
        "a stage's field wins, the others inherit",
        {
            "batching": {"maxBatch": 8, "batchWaitMs": 10},
            "queueOrder": "edf",
            "stages": {
                "denoiser": {"batching": {"maxBatch": 1}, "queueOrder": "fifo"},
                "decoder": {"batching": {"batchWaitMs": 0}},
            },
        },
        {
            "encoder": {"--max-batch": "8", "--batch-wait-ms": "10", "--queue-order": "edf"},
            "denoiser": {"--max-batch": "1", "--batch-wait-ms": "10", "--queue-order": "fifo"},
            "decoder": {"--max-batch": "8", "--batch-wait-ms": "0", "--queue-order": "edf"},
        },
    ),
    (
        "stage-only settings leave the other stages alone",
        {"stages": {"encoder": {"batching": {"maxBatch": 16}, "queueOrder": "edf"}}},
        {"encoder": {"--max-batch": "16", "--queue-order": "edf"}, "denoiser": {}, "decoder": {}},
    ),
    (
        "only a wait: no --max-batch (the worker picks the size)",
        {"batching": {"batchWaitMs": 0.25}},
        {s: {"--batch-wait-ms": "0.25"} for s in STAGES},
    ),
    (
        "an empty stage batching object inherits everything",
        {"batching": {"maxBatch": 2}, "stages": {"decoder": {"batching": {}}}},
        {s: {"--max-batch": "2"} for s in STAGES},
    ),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_stage_worker_gets_exactly_its_flags(
    raw: dict[str, Any], expected: dict[str, dict[str, str]]
) -> None:
    args = rendered(spec(**raw))
    assert {s: flags(args[s]) for s in STAGES} == expected
    # The gateway batches nothing and orders no stage queue.
    assert flags(args["gateway"]) == {}


def test_the_rendered_flags_are_the_ones_the_worker_cli_reads() -> None:
    args = rendered(
        spec(
            batching={"maxBatch": 4, "batchWaitMs": 7.5},
            queueOrder="edf",
            stages={"denoiser": {"batching": {"maxBatch": 2}, "queueOrder": "fifo"}},
        )
    )
    parsed = {s: build_parser().parse_args(args[s]) for s in STAGES}
    assert [(p.max_batch, p.batch_wait_ms, p.queue_order) for p in parsed.values()] == [
        (4, 7.5, "edf"),
        (2, 7.5, "fifo"),
        (4, 7.5, "edf"),
    ]


def test_parsed_spec_keeps_the_pipeline_values_and_each_stages_result() -> None:
    s = parse_spec(
        spec(
            batching={"maxBatch": 3},
            stages={"encoder": {"batching": {"batchWaitMs": 1}, "queueOrder": "edf"}},
        )
    )
    assert s.batching == BatchingSpec(max_batch=3) and s.queue_order is None
    assert s.stages["encoder"].batching == BatchingSpec(max_batch=3, batch_wait_ms=1.0)
    assert s.stages["encoder"].queue_order == "edf"
    assert s.stages["denoiser"].batching == BatchingSpec(max_batch=3)
    assert s.stages["denoiser"].queue_order is None


def test_a_batching_change_rolls_only_the_stages_it_changes() -> None:
    def hashes(raw: dict[str, Any]) -> dict[str, str]:
        return {f"{c.kind}/{c.name}": c.input_hash for c in render_all(OWNER, parse_spec(raw))}

    before = hashes(spec(batching={"maxBatch": 4}))
    after = hashes(
        spec(batching={"maxBatch": 4}, stages={"denoiser": {"batching": {"maxBatch": 2}}})
    )
    assert {k for k in before if before[k] != after[k]} == {"StatefulSet/sd-denoiser"}


# Validation: every bad value is a problem naming its field.

BAD_VALUES: list[tuple[str, Any]] = [
    ("maxBatch", 0),
    ("maxBatch", -3),
    ("maxBatch", 1.5),
    ("maxBatch", "4"),
    ("maxBatch", True),
    ("batchWaitMs", -1),
    ("batchWaitMs", "5ms"),
    ("batchWaitMs", False),
    ("batchWaitMs", math.inf),
    ("batchWaitMs", math.nan),
]


def where(scope: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` placed at spec level ("spec") or in a stage ("spec.stages.<stage>")."""
    if scope == "spec":
        return spec(**body)
    return spec(stages={scope.rsplit(".", 1)[1]: body})


SCOPES = ["spec", "spec.stages.encoder", "spec.stages.denoiser", "spec.stages.decoder"]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=str)
def test_a_bad_batching_value_names_its_field(scope: str, key: str, value: Any) -> None:
    raw = where(scope, {"batching": {key: value}})
    field = f"{scope}.batching.{key}"
    problems = validate_spec(raw)
    assert problems and all(p.startswith(field + ": ") for p in problems), problems
    with pytest.raises(SpecError):
        parse_spec(raw)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("value", ["lifo", "EDF", "", 1, ["edf"]], ids=str)
def test_a_bad_queue_order_names_its_field(scope: str, value: Any) -> None:
    problems = validate_spec(where(scope, {"queueOrder": value}))
    assert len(problems) == 1 and problems[0].startswith(f"{scope}.queueOrder: "), problems
    if isinstance(value, str) and value:
        assert "fifo, edf" in problems[0] and repr(value) in problems[0]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("value", ["fast", 4, [1]], ids=str)
def test_batching_must_be_an_object(scope: str, value: Any) -> None:
    assert validate_spec(where(scope, {"batching": value})) == [
        f"{scope}.batching: must be an object"
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"batching": {"maxBatch": 1}},
        {"batching": {"maxBatch": 64, "batchWaitMs": 0}},
        {"batching": {"batchWaitMs": 0.5}},
        {"batching": {}},
        {"queueOrder": "fifo"},
        {"queueOrder": "edf"},
    ],
    ids=str,
)
@pytest.mark.parametrize("scope", SCOPES)
def test_good_values_are_accepted(scope: str, body: dict[str, Any]) -> None:
    assert validate_spec(where(scope, body)) == []


def test_every_problem_is_reported_at_once() -> None:
    problems = validate_spec(
        spec(
            batching={"maxBatch": 0, "batchWaitMs": -2},
            queueOrder="lifo",
            stages={"decoder": {"batching": {"maxBatch": "x"}, "queueOrder": "sjf"}},
        )
    )
    assert [p.split(":")[0] for p in problems] == [
        "spec.batching.maxBatch",
        "spec.batching.batchWaitMs",
        "spec.queueOrder",
        "spec.stages.decoder.batching.maxBatch",
        "spec.stages.decoder.queueOrder",
    ]


def test_the_problem_becomes_the_invalid_spec_condition() -> None:
    problems = validate_spec(spec(stages={"denoiser": {"batching": {"maxBatch": 0}}}))
    conditions = cond.apply_invalid([], problems, "2026-12-02T12:00:00Z", 3)
    invalid = cond.get_condition(conditions, "InvalidSpec")
    assert invalid is not None and invalid["status"] == "True"
    assert invalid["message"] == "spec.stages.denoiser.batching.maxBatch: must be >= 1, got 0"


@pytest.mark.timeout(60)
async def test_a_bad_batching_spec_gets_the_condition_and_a_warning_event(
    cluster: Cluster,
) -> None:
    async with cluster.operator():
        await cluster.create(pipeline("batchy", queueOrder="lifo"))
        body = await eventually(
            lambda: (
                condition(cluster.get(CRD, "batchy"), "InvalidSpec") and cluster.get(CRD, "batchy")
            )
        )
        invalid = condition(body, "InvalidSpec")
        assert invalid is not None and invalid["message"].startswith("spec.queueOrder: ")
        events = await eventually(
            lambda: [
                obj.raw
                for key, obj in cluster.emulator.objects.items()
                if key[0] == EVENTS and not obj.deleted and obj.raw.get("reason") == "InvalidSpec"
            ]
        )
        assert events[0]["type"] == "Warning" and "spec.queueOrder" in events[0]["message"]


# The gateway's SLO: the one the autoscaler sizes for.


def gateway_slo(raw: dict[str, Any]) -> str | None:
    return flags(rendered(raw)["gateway"], ("--slo",)).get("--slo")


def test_the_gateway_gets_the_autoscaling_slo() -> None:
    raw = spec(autoscaling={"slo": "30s"}, queueOrder="edf")
    assert gateway_slo(raw) == "30s"
    assert build_parser().parse_args(rendered(raw)["gateway"]).slo == "30s"
    assert gateway_slo(spec(autoscaling={"slo": "3x", "mode": "Advisory"})) == "3x"
    # Workers get no --slo: the gateway stamps the deadlines they sort by.
    for stage in STAGES:
        assert "--slo" not in rendered(raw)[stage]


def test_without_an_slo_the_profiles_default_else_none() -> None:
    profile = builtin_profile("qwen-image-h100")
    assert profile.default_slo is not None
    assert gateway_slo(spec(autoscaling={"profile": "builtin:qwen-image-h100"})) == (
        profile.default_slo
    )
    # The pipeline's own SLO wins over the profile's.
    assert gateway_slo(spec(autoscaling={"profile": "builtin:qwen-image-h100", "slo": "9s"})) == (
        "9s"
    )
    assert gateway_slo(spec()) is None
    assert gateway_slo(spec(queueOrder="edf")) is None


# The dashboard shows what batching does.


def dashboard_panels() -> dict[str, dict[str, Any]]:
    data = json.loads(DASHBOARD.read_text())
    return {p["title"]: p for p in data["panels"]}


@pytest.mark.parametrize(
    ("title", "metric"),
    [
        ("Batch size per stage", "disagfusion_stage_batch_size"),
        ("Batch wait per stage", "disagfusion_stage_batch_wait_seconds"),
    ],
)
def test_the_pipeline_dashboard_has_the_batching_panels(title: str, metric: str) -> None:
    panel = dashboard_panels()[title]
    exprs = [t["expr"] for t in panel["targets"]]
    sel = '{namespace="$namespace", pipeline="$pipeline", stage!="gateway"}[$__rate_interval]'
    for q in ("0.5", "0.95"):
        assert f"histogram_quantile({q}, sum by (stage, le) (rate({metric}_bucket{sel})))" in exprs
    assert (
        f"sum by (stage) (rate({metric}_sum{sel})) / sum by (stage) (rate({metric}_count{sel}))"
        in exprs
    )
    assert [t["legendFormat"] for t in panel["targets"]] == [
        "{{stage}} p50",
        "{{stage}} p95",
        "{{stage}} mean",
    ]
    assert metric in panel["description"]


def test_the_worker_cli_takes_every_queue_order_and_no_other() -> None:
    base = ["worker", "--stage", "encoder", "--model", "m", "--port", "1", "--http-port", "2"]
    for order in QUEUE_ORDERS:
        assert build_parser().parse_args([*base, "--queue-order", order]).queue_order == order
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--queue-order", "sjf"])
