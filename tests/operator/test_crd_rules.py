"""The CRD's CEL rules and the operator's own checks agree.

A cluster may not enforce `x-kubernetes-validations`, so the operator repeats
them (operator/spec.py). Both are evaluated here on the same stage specs, the
CEL rules with a real CEL interpreter after the schema's defaults are applied,
as the API server does.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from disagfusion.operator.spec import NetworkPolicySpec, parse_spec, validate_spec

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


# The gateway's job store: its own rules and the spec-level one on gateway replicas.


@functools.cache
def spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])


def defaulted(schema: dict[str, Any], obj: Any) -> Any:
    """`obj` with the schema's defaults filled in at every level, list items too, as the
    API server does."""
    if isinstance(obj, list) and "items" in schema:
        return [defaulted(schema["items"], item) for item in obj]
    if not isinstance(obj, dict) or "properties" not in schema:
        return obj
    out = dict(obj)
    for key, prop in schema["properties"].items():
        if key not in out and "default" in prop:
            out[key] = prop["default"]
        if key in out:
            out[key] = defaulted(prop, out[key])
    return out


@functools.cache
def cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def broken_rules(schema: dict[str, Any], obj: Any) -> list[str]:
    """Messages of every rule, at any depth, that the defaulted `obj` breaks."""
    failed = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = cel_program(rule["rule"])
        if not program.evaluate({"self": celpy.json_to_cel(obj)}):
            failed.append(rule["message"])
    if isinstance(obj, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if key in obj:
                failed += broken_rules(prop, obj[key])
    if isinstance(obj, list) and "items" in schema:
        for item in obj:
            failed += broken_rules(schema["items"], item)
    return failed


JOB_STORES: list[dict[str, Any] | None] = [
    None,
    {},
    {"type": "sqlite"},
    {"type": "sqlite", "persistentVolumeClaim": {"claimName": "jobs"}},
    {"type": "sqlite", "urlSecretRef": {"name": "r"}},
    {"type": "redis"},
    {"type": "redis", "urlSecretRef": {"name": "r"}},
    {"type": "redis", "urlSecretRef": {"name": "r", "key": "dsn"}, "mountPath": "/data"},
    {"type": "redis", "urlSecretRef": {"name": "r"}, "persistentVolumeClaim": {"claimName": "j"}},
    {"urlSecretRef": {"name": "r"}},
]


def job_store_specs() -> list[dict[str, Any]]:
    out = []
    for family, replicas, store in itertools.product(
        (None, "sd3", "wan", "wan-i2v"), (None, 0, 1, 2), JOB_STORES
    ):
        model: dict[str, Any] = {"source": "org/m"}
        if family is not None:
            model["family"] = family
        gateway: dict[str, Any] = {}
        if replicas is not None:
            gateway["replicas"] = replicas
        if store is not None:
            gateway["jobStore"] = store
        out.append({"model": model, "gateway": gateway})
    return out


def test_the_job_store_rules_exist() -> None:
    schema = spec_schema()
    store = schema["properties"]["gateway"]["properties"]["jobStore"]
    assert {r["message"] for r in store["x-kubernetes-validations"]} == {
        "type redis needs urlSecretRef",
        "urlSecretRef is only for type redis",
        "persistentVolumeClaim is only for type sqlite",
    }
    (replicas,) = schema["x-kubernetes-validations"]
    assert "a SQLite job store serves one gateway replica" in replicas["message"]


@pytest.mark.parametrize("obj", job_store_specs(), ids=str)
def test_operator_rejects_exactly_the_job_stores_the_cel_rules_reject(obj: dict[str, Any]) -> None:
    schema = spec_schema()
    cel_failures = broken_rules(schema, defaulted(schema, obj))
    problems = validate_spec(obj)
    assert all(p.startswith("spec.gateway.") for p in problems), problems
    assert bool(cel_failures) == bool(problems), (obj, cel_failures, problems)
    # The replica rule says the same in both places.
    (replica_rule,) = schema["x-kubernetes-validations"]
    in_cel = replica_rule["message"] in cel_failures
    assert in_cel == any(replica_rule["message"] in p for p in problems), (cel_failures, problems)


def test_the_replica_rule_holds_for_the_expected_cases() -> None:
    """The agreement above could hold with both sides wrong: pin the verdicts down."""
    schema = spec_schema()

    def refused(obj: dict[str, Any]) -> bool:
        return bool(broken_rules(schema, defaulted(schema, obj)))

    wan = {"source": "org/m", "family": "wan"}
    redis = {"type": "redis", "urlSecretRef": {"name": "r"}}
    assert refused({"model": wan, "gateway": {"replicas": 2}})
    assert refused({"model": wan, "gateway": {"replicas": 2, "jobStore": {}}})
    assert not refused({"model": wan, "gateway": {"replicas": 2, "jobStore": redis}})
    assert not refused({"model": wan, "gateway": {"replicas": 1}})
    assert not refused({"model": {"source": "org/m"}, "gateway": {"replicas": 2}})
    assert refused({"model": {"source": "org/m"}, "gateway": {"replicas": 2, "jobStore": {}}})
    assert refused({"model": wan, "gateway": {"jobStore": {"type": "redis"}}})


# spec.networkPolicy: on by default, its peers refused alike by the CRD and the operator.


def network_policy_schema() -> dict[str, Any]:
    return dict(spec_schema()["properties"]["networkPolicy"])


def test_network_policies_are_on_by_default_in_the_crd_and_the_operator() -> None:
    schema = spec_schema()
    raw = {"model": {"source": "builtin:tiny-unet"}}
    applied = defaulted(schema, raw)
    assert applied["networkPolicy"] == {"enabled": True}
    props = network_policy_schema()["properties"]
    assert props["enabled"]["default"] is NetworkPolicySpec().enabled is True
    assert "default" not in props["metricsFrom"]
    # What the API server stores and what a cluster that defaults nothing sends parse alike.
    assert parse_spec(applied).network_policy == parse_spec(raw).network_policy
    assert parse_spec(applied).network_policy.metrics_from == []
    off = defaulted(schema, {**raw, "networkPolicy": {"enabled": False}})
    assert off["networkPolicy"] == {"enabled": False}
    assert parse_spec(off).network_policy.enabled is False


NS = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
PEERS: list[Any] = [
    {"namespaceSelector": NS},
    {"namespaceSelector": {}},
    {"namespaceSelector": NS, "podSelector": {"matchLabels": {"app": "prometheus"}}},
    {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["p"]}]}},
    {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}},
    {"ipBlock": {"cidr": "10.0.0.0/8"}},
    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
    {},
    {"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": NS},
    {"ipBlock": {}},
    {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
    {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": []}]}},
    {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}},
    {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
    {"podSelector": {"matchExpressions": [{"operator": "Exists"}]}},
    {"podSelector": {"matchLabels": {"app": 1}}},
    {"podSelector": {}, "port": 8080},
    "monitoring",
]


@pytest.mark.parametrize("peer", PEERS, ids=str)
def test_the_crd_and_the_operator_refuse_the_same_peers(peer: Any) -> None:
    from tests.operator.test_examples import api_version, errors

    spec = {"model": {"source": "builtin:tiny-unet"}, "networkPolicy": {"metricsFrom": [peer]}}
    obj = {"apiVersion": api_version(), "kind": "DiffusionPipeline", "metadata": {"name": "p"}}
    obj["spec"] = spec
    schema = spec_schema()
    # The schema first (a CEL rule never sees an object the schema refused).
    crd = errors(obj) or broken_rules(schema, defaulted(schema, spec))
    problems = validate_spec(spec)
    assert all(p.startswith("spec.networkPolicy.metricsFrom") for p in problems), problems
    assert bool(crd) == bool(problems), (peer, crd, problems)


def test_the_peer_rules_hold_for_the_expected_cases() -> None:
    """Agreement could hold with both sides wrong: pin the CEL verdicts down."""
    schema = network_policy_schema()

    def refused(peer: dict[str, Any]) -> bool:
        return bool(broken_rules(schema, defaulted(schema, {"metricsFrom": [peer]})))

    assert not refused({"namespaceSelector": NS})
    assert not refused({"namespaceSelector": NS, "podSelector": {}})
    assert not refused({"ipBlock": {"cidr": "10.0.0.0/8"}})
    assert refused({})
    assert refused({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}})
    assert refused({"podSelector": {"matchExpressions": [{"key": "a", "operator": "NotIn"}]}})
    assert not refused(
        {"podSelector": {"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}}
    )
