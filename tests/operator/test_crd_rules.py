"""The CRD's CEL rules and the operator's own checks agree.

A cluster may not enforce `x-kubernetes-validations`, so the operator repeats
them (operator/spec.py). Both are evaluated here on the same stage specs, the
CEL rules with a real CEL interpreter after the schema's defaults are applied,
as the API server does.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from disagfusion.operator.spec import validate_spec

CRD = Path(__file__).resolve().parents[2] / "crds" / "disagfusion.io_diffusionpipelines.yaml"
STAGES = ("encoder", "denoiser", "decoder")


def stage_schema(stage: str) -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return dict(spec["properties"]["stages"]["properties"][stage])


def cel_verdict(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Messages of the rules `obj` breaks, after schema defaulting."""
    defaulted = {
        key: prop["default"]
        for key, prop in schema["properties"].items()
        if "default" in prop and key not in obj
    } | obj
    env = celpy.Environment()
    failed = []
    for rule in schema["x-kubernetes-validations"]:
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(defaulted)}):
            failed.append(rule["message"])
    return failed


def stage_specs() -> list[dict[str, Any]]:
    """Every combination of replicas / minReplicas / maxReplicas the schema admits."""
    out = []
    for replicas, low, high in itertools.product((None, 0, 1, 3), (None, 0, 1, 2), (None, 1, 2, 4)):
        obj = {
            k: v
            for k, v in (("replicas", replicas), ("minReplicas", low), ("maxReplicas", high))
            if v is not None
        }
        out.append(obj)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_the_replica_rules(stage: str) -> None:
    messages = {r["message"] for r in stage_schema(stage)["x-kubernetes-validations"]}
    assert messages == {
        "minReplicas must be <= maxReplicas",
        "replicas must be within [minReplicas, maxReplicas]",
    }


@pytest.mark.parametrize("obj", stage_specs(), ids=str)
def test_operator_rejects_exactly_what_the_cel_rules_reject(obj: dict[str, Any]) -> None:
    schema = stage_schema("denoiser")
    cel_failures = cel_verdict(schema, obj)
    problems = [
        p
        for p in validate_spec(
            {"model": {"source": "builtin:tiny-unet"}, "stages": {"denoiser": obj}}
        )
        if "denoiser" in p
    ]
    assert bool(cel_failures) == bool(problems), (obj, cel_failures, problems)


def autoscaling_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return dict(spec["properties"]["autoscaling"])


PROFILE = {
    "accelerators": [{"name": "A"}],
    "stages": {s: {"A": {"a": 1.0}} for s in STAGES},
}


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"mode": "Active"},
        {"profile": "builtin:qwen-image-h100"},
        {"customProfile": PROFILE},
        {"profile": "builtin:qwen-image-h100", "customProfile": PROFILE},
    ],
    ids=str,
)
def test_autoscaling_profile_rule_agrees(obj: dict[str, Any]) -> None:
    cel_failures = cel_verdict(autoscaling_schema(), obj)
    problems = [
        p
        for p in validate_spec({"model": {"source": "builtin:tiny-unet"}, "autoscaling": obj})
        if p.startswith("spec.autoscaling")
    ]
    assert bool(cel_failures) == bool(problems), (obj, cel_failures, problems)
