"""The CRD's batching and queue-order fields: where they are, their bounds, and that the
schema (as a strict API server applies it) refuses exactly what the operator refuses."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import yaml

from disagfusion.operator.spec import QUEUE_ORDERS, validate_spec
from tests.operator.test_examples import CRD, errors, example

STAGES = ("encoder", "denoiser", "decoder")


@functools.cache
def spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])


def scopes() -> dict[str, dict[str, Any]]:
    """Field path -> the schema object holding batching and queueOrder."""
    spec = spec_schema()
    out = {"spec": spec}
    for stage in STAGES:
        out[f"spec.stages.{stage}"] = spec["properties"]["stages"]["properties"][stage]
    return out


@pytest.mark.parametrize("scope", list(scopes()))
def test_batching_and_queue_order_are_in_the_spec_and_every_stage(scope: str) -> None:
    props = scopes()[scope]["properties"]
    batching = props["batching"]
    assert batching["type"] == "object" and batching["description"]
    fields = batching["properties"]
    assert set(fields) == {"maxBatch", "batchWaitMs"}
    assert (fields["maxBatch"]["type"], fields["maxBatch"]["minimum"]) == ("integer", 1)
    assert (fields["batchWaitMs"]["type"], fields["batchWaitMs"]["minimum"]) == ("number", 0)
    assert "--max-batch" in fields["maxBatch"]["description"]
    assert "--batch-wait-ms" in fields["batchWaitMs"]["description"]
    order = props["queueOrder"]
    assert order["type"] == "string" and tuple(order["enum"]) == QUEUE_ORDERS
    assert "--queue-order" in order["description"]
    # No defaults anywhere: unset means the worker's own default, and a stage's unset
    # field inherits the pipeline's (a schema default would hide both).
    for node in (batching, *fields.values(), order):
        assert "default" not in node


def placed(scope: str, body: dict[str, Any]) -> dict[str, Any]:
    """The tiny-local example with `body` merged at `scope`."""
    obj = copy.deepcopy(example("tiny-local.yaml"))
    target = obj["spec"]
    if scope != "spec":
        target = target["stages"].setdefault(scope.rsplit(".", 1)[1], {})
    target.update(body)
    return obj


VALUES: list[dict[str, Any]] = [
    {"batching": {}},
    {"batching": {"maxBatch": 1}},
    {"batching": {"maxBatch": 64, "batchWaitMs": 0}},
    {"batching": {"maxBatch": 0}},
    {"batching": {"maxBatch": -2}},
    {"batching": {"maxBatch": 2.5}},
    {"batching": {"maxBatch": "4"}},
    {"batching": {"maxBatch": True}},
    {"batching": {"batchWaitMs": 2.5}},
    {"batching": {"batchWaitMs": 1000}},
    {"batching": {"batchWaitMs": -0.5}},
    {"batching": {"batchWaitMs": "5"}},
    {"batching": {"batchWaitMs": True}},
    {"batching": "on"},
    {"queueOrder": "fifo"},
    {"queueOrder": "edf"},
    {"queueOrder": "lifo"},
    {"queueOrder": ""},
    {"queueOrder": 2},
]


@pytest.mark.parametrize("body", VALUES, ids=str)
@pytest.mark.parametrize("scope", list(scopes()))
def test_the_schema_and_the_operator_agree(scope: str, body: dict[str, Any]) -> None:
    obj = placed(scope, body)
    schema_errors = errors(obj)
    problems = validate_spec(obj["spec"])
    assert bool(schema_errors) == bool(problems), (schema_errors, problems)
    key = next(iter(body))
    assert all(p.startswith(f"{scope}.{key}") for p in problems), problems


def test_the_agreement_is_not_vacuous() -> None:
    """Both sides could agree by accepting everything: pin a refusal and an acceptance."""
    bad = placed("spec.stages.denoiser", {"batching": {"maxBatch": 0}})
    assert errors(bad) and validate_spec(bad["spec"])
    good = placed("spec", {"batching": {"maxBatch": 4, "batchWaitMs": 2}, "queueOrder": "edf"})
    assert errors(good) == [] and validate_spec(good["spec"]) == []
