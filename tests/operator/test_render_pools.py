"""Heterogeneous pools (spec.stages.<stage>.pools): parsed and validated by field path,
rendered as one StatefulSet per pool behind the stage's one headless Service, split
sizes per pool, and a CRD whose schema and CEL rules refuse what the operator refuses."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from disagfusion.operator.children import render_all
from disagfusion.operator.render import (
    ACCELERATOR_LABEL,
    POOL_LABEL,
    Child,
    Owner,
    effective_replicas,
    pool_replicas,
    topology,
)
from disagfusion.operator.spec import DEFAULT_POOL, SpecError, parse_spec, validate_spec
from tests.operator.test_crd_rules import cel_program, defaulted, spec_schema
from tests.operator.test_examples import errors

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pools" / "sd3-mixed-gpus.yaml"
OWNER = Owner(name="sd", namespace="ml", uid="uid-1")
H100 = {
    "name": "h100",
    "accelerator": "H100",
    "replicas": 2,
    "minReplicas": 1,
    "maxReplicas": 3,
    "resources": {"limits": {"nvidia.com/gpu": 1}},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
CPU = {
    "name": "cpu",
    "accelerator": "cpu",
    "replicas": 1,
    "minReplicas": 0,
    "maxReplicas": 2,
    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
}


def spec(**extra: Any) -> dict[str, Any]:
    return {"model": {"source": "builtin:tiny-unet"}, **extra}


def pooled(*pools: dict[str, Any], **stage: Any) -> dict[str, Any]:
    return spec(stages={"denoiser": {"pools": list(pools), **stage}})


def statefulsets(children: list[Child]) -> dict[str, dict[str, Any]]:
    return {c.name: c.body for c in children if c.kind == "StatefulSet"}


def services(children: list[Child]) -> dict[str, dict[str, Any]]:
    return {c.name: c.body for c in children if c.kind == "Service"}


def pod(body: dict[str, Any]) -> dict[str, Any]:
    return dict(body["spec"]["template"]["spec"])


def selects(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
    return all(pod_labels.get(k) == v for k, v in selector.items())


# rendering


def test_a_stage_without_pools_renders_as_before() -> None:
    children = render_all(OWNER, parse_spec(spec()))
    sts = statefulsets(children)
    assert set(sts) == {"sd-encoder", "sd-denoiser", "sd-decoder"}
    for body in sts.values():
        assert POOL_LABEL not in body["metadata"]["labels"]
        assert POOL_LABEL not in body["spec"]["template"]["metadata"]["labels"]
        assert POOL_LABEL not in body["spec"]["selector"]["matchLabels"]
        assert body["spec"]["serviceName"] == body["metadata"]["name"]
    (pool,) = parse_spec(spec()).stages["denoiser"].effective_pools
    assert pool.name == DEFAULT_POOL and pool.accelerator is None


def test_one_statefulset_per_pool_and_one_service_per_stage() -> None:
    children = render_all(OWNER, parse_spec(pooled(H100, CPU)))
    sts = statefulsets(children)
    assert set(sts) == {"sd-encoder", "sd-denoiser-h100", "sd-denoiser-cpu", "sd-decoder"}
    assert set(services(children)) == {"sd-encoder", "sd-denoiser", "sd-decoder", "sd-gateway"}
    svc = services(children)["sd-denoiser"]["spec"]
    h100, cpu = sts["sd-denoiser-h100"], sts["sd-denoiser-cpu"]
    for body, other in ((h100, cpu), (cpu, h100)):
        template = body["spec"]["template"]["metadata"]["labels"]
        # The stage's Service selects every pool's pods; its pods' DNS domain is that Service.
        assert selects(svc["selector"], template)
        assert body["spec"]["serviceName"] == "sd-denoiser"
        # Each StatefulSet selects only its own pool's pods.
        own = body["spec"]["selector"]["matchLabels"]
        assert selects(own, template)
        assert not selects(own, other["spec"]["template"]["metadata"]["labels"])
        assert body["metadata"]["labels"]["app.kubernetes.io/component"] == "denoiser"
    assert h100["spec"]["template"]["metadata"]["labels"][POOL_LABEL] == "h100"
    assert h100["spec"]["template"]["metadata"]["labels"][ACCELERATOR_LABEL] == "H100"
    assert cpu["metadata"]["labels"][POOL_LABEL] == "cpu"


def test_each_pool_has_its_own_size_resources_and_scheduling() -> None:
    sts = statefulsets(render_all(OWNER, parse_spec(pooled(H100, CPU))))
    h100, cpu = sts["sd-denoiser-h100"], sts["sd-denoiser-cpu"]
    assert (h100["spec"]["replicas"], cpu["spec"]["replicas"]) == (2, 1)
    assert pod(h100)["nodeSelector"] == H100["nodeSelector"]
    assert pod(h100)["tolerations"] == H100["tolerations"]
    assert "affinity" not in pod(h100)
    assert pod(cpu)["affinity"] == CPU["affinity"]
    assert "nodeSelector" not in pod(cpu) and "tolerations" not in pod(cpu)
    h100_c, cpu_c = pod(h100)["containers"][0], pod(cpu)["containers"][0]
    assert h100_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cpu_c["resources"] == {}
    assert "--device" in h100_c["args"] and "--device" not in cpu_c["args"]
    # The stage's own settings (image, queue capacity, env) reach every pool alike.
    assert h100_c["image"] == cpu_c["image"]
    assert h100_c["args"][h100_c["args"].index("--queue-capacity") + 1] == "2"


def test_upstream_peers_and_the_gateway_see_every_pool_up_to_its_max() -> None:
    s = parse_spec(pooled(H100, CPU))
    want = [f"sd-denoiser-h100-{i}.sd-denoiser.ml.svc:50051" for i in range(3)] + [
        f"sd-denoiser-cpu-{i}.sd-denoiser.ml.svc:50051" for i in range(2)
    ]
    encoder = statefulsets(render_all(OWNER, s))["sd-encoder"]
    args = pod(encoder)["containers"][0]["args"]
    assert args[args.index("--next") + 1].split(",") == want
    assert topology("sd", "ml", s)["denoiser"] == want
    # The denoiser pools' own --next is the decoder, the same for every pool.
    sts = statefulsets(render_all(OWNER, s))
    nexts = {
        name: pod(body)["containers"][0]["args"][
            pod(body)["containers"][0]["args"].index("--next") + 1
        ]
        for name, body in sts.items()
        if name.startswith("sd-denoiser-")
    }
    assert set(nexts.values()) == {"sd-decoder-0.sd-decoder.ml.svc:50051"}


def test_a_pooled_stage_sums_its_pools() -> None:
    st = parse_spec(pooled(H100, CPU)).stages["denoiser"]
    assert (st.replicas, st.min_replicas, st.max_replicas) == (3, 1, 5)
    assert parse_spec(pooled(H100, CPU)).autoscaling.knobs.max_replicas["denoiser"] == 5


# Stage size asked for -> (h100, cpu): from the spec's (2, 1), growth fills the pools in
# order (h100 up to 3, then cpu up to 2), shrinking empties them from the last (cpu to 0,
# then h100 to 1); outside [1, 5] the size is clamped first.
SPLITS = {0: (1, 0), 1: (1, 0), 2: (2, 0), 3: (2, 1), 4: (3, 1), 5: (3, 2), 9: (3, 2)}


@pytest.mark.parametrize(("total", "want"), SPLITS.items())
def test_a_stage_size_splits_over_pools_within_each_pools_bounds(
    total: int, want: tuple[int, int]
) -> None:
    s = parse_spec(pooled(H100, CPU))
    clamped = effective_replicas(s, {"denoiser": total})["denoiser"]
    sizes = pool_replicas(s.stages["denoiser"], clamped)
    assert (sizes["h100"], sizes["cpu"]) == want
    sts = statefulsets(render_all(OWNER, s, {"denoiser": total}))
    assert (
        sts["sd-denoiser-h100"]["spec"]["replicas"],
        sts["sd-denoiser-cpu"]["spec"]["replicas"],
    ) == want


def test_the_spec_total_gives_every_pool_its_own_replicas() -> None:
    st = parse_spec(pooled({**H100, "replicas": 1}, {**CPU, "replicas": 2})).stages["denoiser"]
    assert pool_replicas(st, st.replicas) == {"h100": 1, "cpu": 2}


def test_a_new_size_changes_only_the_pools_it_must() -> None:
    s = parse_spec(pooled(H100, CPU))
    before = {c.name: c.input_hash for c in render_all(OWNER, s)}
    after = {c.name: c.input_hash for c in render_all(OWNER, s, {"denoiser": 4})}
    assert {n for n in before if before[n] != after[n]} == {"sd-denoiser-h100"}
    after = {c.name: c.input_hash for c in render_all(OWNER, s, {"denoiser": 5})}
    assert {n for n in before if before[n] != after[n]} == {"sd-denoiser-h100", "sd-denoiser-cpu"}


# validation


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            pooled(H100, {**CPU, "name": "h100"}),
            'spec.stages.denoiser.pools[1].name: "h100" is used twice',
        ),
        (
            pooled(H100, {**CPU, "accelerator": "H100"}),
            'spec.stages.denoiser.pools[1].accelerator: "H100" is used twice',
        ),
        (pooled({**H100, "name": "H100"}), "spec.stages.denoiser.pools[0].name: 'H100' must match"),
        (pooled({**H100, "name": "a" * 13}), "spec.stages.denoiser.pools[0].name: at most 12"),
        (
            pooled({k: v for k, v in H100.items() if k != "accelerator"}),
            "spec.stages.denoiser.pools[0].accelerator: required",
        ),
        (pooled({"accelerator": "H100"}), "spec.stages.denoiser.pools[0].name: required"),
        (
            pooled({**H100, "replicas": 5}),
            "spec.stages.denoiser.pools[0].replicas: 5 must be within",
        ),
        (
            pooled({**H100, "minReplicas": 4}),
            "spec.stages.denoiser.pools[0]: minReplicas (4) must be <= maxReplicas (3)",
        ),
        (pooled(H100, maxReplicas=4), "spec.stages.denoiser.maxReplicas: set it per pool"),
        (
            pooled(H100, nodeSelector={"a": "b"}),
            "spec.stages.denoiser.nodeSelector: set it per pool",
        ),
        (pooled(H100, replicas=3), "spec.stages.denoiser.replicas: set it per pool"),
        (spec(stages={"denoiser": {"pools": []}}), "spec.stages.denoiser.pools: must be a list"),
        (spec(stages={"denoiser": {"pools": ["h100"]}}), "spec.stages.denoiser.pools[0]: must be"),
        (
            pooled(*({**CPU, "name": f"p{i}", "accelerator": f"a{i}"} for i in range(9))),
            "spec.stages.denoiser.pools: must be a list of 1 to 8",
        ),
        (
            {**pooled(H100), "autoscaling": {"accelerators": {"denoiser": "H100"}}},
            "spec.autoscaling.accelerators.denoiser: the stage has pools",
        ),
        (
            {**pooled(H100, CPU), "autoscaling": {"profile": "builtin:qwen-image-h100-l40s"}},
            "spec.stages.denoiser.pools[1].accelerator: 'cpu' is not in the profile",
        ),
    ],
)
def test_bad_pools_are_named_by_field_path(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_the_stage_replicas_default_of_one_is_accepted_with_pools() -> None:
    """The CRD defaults a stage's replicas to 1, so with pools 1 counts as unset."""
    assert validate_spec(pooled(H100, replicas=1)) == []


def test_a_pooled_stage_is_sized_on_its_first_pools_accelerator() -> None:
    s = parse_spec(
        {
            **pooled(H100, {**CPU, "accelerator": "L40S"}),
            "autoscaling": {"profile": "builtin:qwen-image-h100-l40s"},
        }
    )
    assert s.autoscaling.accelerators == {"denoiser": "H100"}


# the CRD


def stages_schema() -> dict[str, Any]:
    return dict(spec_schema()["properties"]["stages"])


def broken(schema: dict[str, Any], obj: Any) -> list[str]:
    """Messages of every CEL rule, at any depth and in list items, that `obj` breaks."""
    failed = [
        rule["message"]
        for rule in schema.get("x-kubernetes-validations", [])
        if not cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(obj)})
    ]
    if isinstance(obj, list) and "items" in schema:
        failed += [m for item in obj for m in broken(schema["items"], item)]
    if isinstance(obj, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if key in obj:
                failed += broken(prop, obj[key])
    return failed


def stage_with_pools() -> list[dict[str, Any]]:
    """Stage objects with pools: every stage-level conflict, duplicate and bound."""
    base = {"name": "a", "accelerator": "A"}
    out: list[dict[str, Any]] = [
        {"pools": [base]},
        {"pools": [base], "replicas": 1},
        {"pools": [base], "replicas": 2},
        {"pools": [base], "resources": {"limits": {"cpu": 1}}},
        {"pools": [base], "affinity": {}},
        {"pools": [base, {"name": "a", "accelerator": "B"}]},
        {"pools": [base, {"name": "b", "accelerator": "A"}]},
        {"pools": [base, {"name": "b", "accelerator": "B"}]},
    ]
    for replicas, low, high in itertools.product((None, 0, 2), (None, 0, 1, 3), (None, 1, 2)):
        pool: dict[str, Any] = dict(base)
        for key, value in (("replicas", replicas), ("minReplicas", low), ("maxReplicas", high)):
            if value is not None:
                pool[key] = value
        out.append({"pools": [pool]})
    return out


@pytest.mark.parametrize("stage", stage_with_pools(), ids=str)
def test_the_crd_refuses_exactly_what_the_operator_refuses(stage: dict[str, Any]) -> None:
    stages = {"denoiser": stage}
    cel = broken(stages_schema(), defaulted(stages_schema(), stages))
    problems = [
        p
        for p in validate_spec(spec(stages=copy.deepcopy(stages)))
        if p.startswith("spec.stages.denoiser")
    ]
    assert bool(cel) == bool(problems), (stage, cel, problems)


@pytest.mark.parametrize("stage", ["encoder", "denoiser", "decoder"])
def test_every_stage_has_pools_in_the_crd(stage: str) -> None:
    pools = stages_schema()["properties"][stage]["properties"]["pools"]
    item = pools["items"]
    assert item["required"] == ["name", "accelerator"]
    assert set(item["properties"]) == {
        "name",
        "accelerator",
        "replicas",
        "minReplicas",
        "maxReplicas",
        "resources",
        "nodeSelector",
        "tolerations",
        "affinity",
    }
    assert item["properties"]["name"]["maxLength"] == 12
    assert f"<pipeline>-{stage}-<name>" in pools["description"]
    crd = yaml.safe_load((REPO / "crds" / "disagfusion.io_diffusionpipelines.yaml").read_text())
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    entry = root["properties"]["status"]["properties"]["pools"]["properties"][stage]["items"]
    assert set(entry["properties"]) == {
        "name",
        "accelerator",
        "statefulSet",
        "replicas",
        "readyReplicas",
        "desiredReplicas",
    }


def test_the_pools_example_is_valid_and_renders_both_pools() -> None:
    (obj,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    assert errors(obj) == []
    assert validate_spec(obj["spec"]) == []
    children = render_all(Owner(obj["metadata"]["name"], "default", "u"), parse_spec(obj["spec"]))
    sts = statefulsets(children)
    assert {"sd3mix-denoiser-h100", "sd3mix-denoiser-l40s"} <= set(sts)
    assert "sd3mix-denoiser" in services(children) and "sd3mix-denoiser" not in sts
    products = {
        name: pod(body)["nodeSelector"]["nvidia.com/gpu.product"]
        for name, body in sts.items()
        if name.startswith("sd3mix-denoiser-")
    }
    assert products == {
        "sd3mix-denoiser-h100": "NVIDIA-H100-80GB-HBM3",
        "sd3mix-denoiser-l40s": "NVIDIA-L40S",
    }
