"""The examples are valid DiffusionPipelines: they pass the CRD's schema and the operator.

Each example is checked against the openAPIV3Schema of the CRD in `crds/`
the way a strict API server would (`kubectl apply --validate=strict`):
types, required fields, enums and bounds, and no unknown field in an object
that does not preserve unknown fields. The CEL rules are the operator's own
spec validation, run here too, and the operator's renderer turns each example
into the StatefulSets it describes.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from disagfusion.operator import conditions as cond
from disagfusion.operator.children import render_all
from disagfusion.operator.render import Child, Owner
from disagfusion.operator.spec import (
    DEFAULT_IMAGE,
    FAMILIES,
    FAMILY_ALIASES,
    MAX_SERVED_NAME,
    JobStoreSpec,
    SecretKeyRef,
    SpecDefaults,
    parse_spec,
    spec_warnings,
    validate_spec,
)

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "disagfusion.io_diffusionpipelines.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def load_crd() -> dict[str, Any]:
    assert CRD.exists(), f"{CRD.relative_to(REPO)} is missing; the examples cannot be checked"
    crd: dict[str, Any] = yaml.safe_load(CRD.read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    return crd


def strict(schema: Any) -> Any:
    """A structural schema as a JSON Schema (draft 4, like OpenAPI 3.0) that rejects unknowns.

    Objects with `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` reject other fields, as a strict
    server-side field validation does; int-or-string becomes an anyOf;
    `nullable` allows null.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if k != "x-kubernetes-validations"}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validator() -> jsonschema.Draft4Validator:
    crd = load_crd()
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def api_version() -> str:
    crd = load_crd()
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    return f"{crd['spec']['group']}/{version['name']}"


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} is empty"
    return docs


def pipelines(path: Path) -> list[dict[str, Any]]:
    return [d for d in documents(path) if d.get("kind") == "DiffusionPipeline"]


def errors(obj: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator().iter_errors(obj)
    ]


def example(name: str) -> dict[str, Any]:
    (pipeline,) = pipelines(REPO / "examples" / name)
    return pipeline


def test_the_crd_exists() -> None:
    load_crd()


def test_the_examples_exist() -> None:
    """The tests below run over every examples/*.yaml; these must be among them."""
    assert {
        "tiny-local.yaml",
        "tiny-autoscaled.yaml",
        "sd3-gpu.yaml",
        "flux-gpu.yaml",
        "qwen-image-gpu.yaml",
        "wan22-t2v-gpu.yaml",
        "wan22-i2v-gpu.yaml",
    } <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_the_crd_schema(path: Path) -> None:
    found = pipelines(path)
    assert found, f"{path.name} holds no DiffusionPipeline"
    crd = load_crd()
    for obj in found:
        assert obj["apiVersion"] == api_version()
        assert obj["kind"] == crd["spec"]["names"]["kind"]
        name = obj["metadata"]["name"]
        # Child names are <name>-<stage>-<ordinal> pods behind <name>-<stage> Services.
        assert DNS_LABEL.fullmatch(name) and len(name) <= 40, name
        assert "status" not in obj
        assert errors(obj) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_the_operators_spec_validation(path: Path) -> None:
    for obj in pipelines(path):
        assert validate_spec(obj["spec"]) == []


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda o: o["spec"].update(bogus=1), "spec"),
        (lambda o: o["spec"]["stages"]["denoiser"].update(replica=2), "spec.stages.denoiser"),
        (lambda o: o["spec"]["autoscaling"].update(mode="Sometimes"), "spec.autoscaling.mode"),
        (lambda o: o["spec"]["model"].pop("source"), "spec.model"),
        (lambda o: o["spec"]["stages"]["encoder"].update(replicas="1"), "spec.stages.encoder"),
        (lambda o: o["spec"]["stages"]["decoder"].update(replicas=-1), "spec.stages.decoder"),
        (lambda o: o["spec"]["gateway"].update(requestTimeoutSeconds=0), "spec.gateway"),
        (lambda o: o["spec"]["model"].update(mountPath="models"), "spec.model.mountPath"),
    ],
)
def test_the_schema_check_rejects_mistakes(mutate: Any, where: str) -> None:
    obj = copy.deepcopy(example("tiny-local.yaml"))
    mutate(obj)
    found = errors(obj)
    assert found and all(e.startswith(where) for e in found), found


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("servedName", ""),
        ("servedName", "m"),
        ("servedName", "m" * MAX_SERVED_NAME),
        ("servedName", "m" * (MAX_SERVED_NAME + 1)),
        ("servedName", 7),
        ("image", ""),
        ("image", "registry.example.com/w:1"),
    ],
)
def test_the_schema_and_the_operator_agree_on_strings(key: str, value: Any) -> None:
    """spec.model.servedName and spec.image: the CRD rejects exactly what the operator does."""
    obj = copy.deepcopy(example("tiny-local.yaml"))
    (obj["spec"]["model"] if key == "servedName" else obj["spec"])[key] = value
    assert bool(errors(obj)) == bool(validate_spec(obj["spec"])), (errors(obj), key, value)


def test_preserved_fields_stay_open() -> None:
    obj = copy.deepcopy(example("sd3-gpu.yaml"))
    obj["spec"]["model"]["volume"] = {"nfs": {"server": "nfs.local", "path": "/models"}}
    obj["spec"]["stages"]["denoiser"]["affinity"] = {"nodeAffinity": {"x": 1}}
    obj["spec"]["stages"]["denoiser"]["resources"]["limits"]["example.com/fpga"] = 2
    assert errors(obj) == []


def replicas(obj: dict[str, Any]) -> tuple[int, ...]:
    return tuple(obj["spec"]["stages"][s]["replicas"] for s in ("encoder", "denoiser", "decoder"))


def gpus(stage: dict[str, Any]) -> Any:
    return (stage.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")


def test_tiny_local_is_a_cpu_builtin_one_to_one_to_one() -> None:
    obj = example("tiny-local.yaml")
    assert obj["spec"]["model"]["source"] == "builtin:tiny-unet"
    assert replicas(obj) == (1, 1, 1)
    assert all(gpus(s) is None for s in obj["spec"]["stages"].values())
    # The e2e test scales the denoiser to 2.
    assert obj["spec"]["stages"]["denoiser"]["maxReplicas"] >= 2


def test_sd3_gpu_is_one_to_four_to_one_on_gpus_from_a_pvc() -> None:
    obj = example("sd3-gpu.yaml")
    spec = obj["spec"]
    assert spec["model"]["family"] == "sd3"
    assert spec["model"]["volume"]["persistentVolumeClaim"]["claimName"]
    assert replicas(obj) == (1, 4, 1)
    denoiser = spec["stages"]["denoiser"]
    assert gpus(denoiser) == 1
    assert denoiser["nodeSelector"]
    assert spec["autoscaling"]["mode"] == "Advisory"


def rendered(obj: dict[str, Any]) -> list[Child]:
    return render_all(Owner(obj["metadata"]["name"], "default", "uid-1"), parse_spec(obj["spec"]))


def rendered_statefulsets(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.name: c.body for c in rendered(obj) if c.kind == "StatefulSet"}


def workloads(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Component (encoder, denoiser, decoder, gateway) -> its rendered pod spec."""
    return {
        c.body["metadata"]["labels"]["app.kubernetes.io/component"]: c.body["spec"]["template"][
            "spec"
        ]
        for c in rendered(obj)
        if c.kind in ("StatefulSet", "Deployment")
    }


def flag(args: list[str], name: str) -> str | None:
    """The value of `name` in a container's args (None when absent; never given twice)."""
    assert args.count(name) <= 1, args
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_renders_every_stage_and_the_gateway(path: Path) -> None:
    for obj in pipelines(path):
        spec = parse_spec(obj["spec"])
        pods = workloads(obj)
        assert set(pods) == {"encoder", "denoiser", "decoder", "gateway"}
        sizes = {
            c.body["metadata"]["labels"]["app.kubernetes.io/component"]: c.body["spec"]["replicas"]
            for c in rendered(obj)
            if c.kind == "StatefulSet"
        }
        assert sizes == {s: spec.stages[s].replicas for s in ("encoder", "denoiser", "decoder")}
        for component, pod in pods.items():
            (container,) = pod["containers"]
            args = container["args"]
            assert args[0] == ("gateway" if component == "gateway" else "worker")
            assert flag(args, "--model") == obj["spec"]["model"]["source"]
            # A pinned family reaches every pod as --family; auto (the default) passes none.
            family = spec.model.family
            assert flag(args, "--family") == (None if family == "auto" else family), component


GPU_EXAMPLES = [
    # example, family, (encoder, denoiser, decoder) replicas, GPU per stage
    ("sd3-gpu.yaml", "sd3", (1, 4, 1), ("NVIDIA-L4", "NVIDIA-H100-80GB-HBM3", "NVIDIA-L4")),
    ("flux-gpu.yaml", "flux", (1, 4, 2), ("NVIDIA-L4", "NVIDIA-H100-80GB-HBM3", "NVIDIA-L4")),
    (
        "qwen-image-gpu.yaml",
        "qwen-image",
        (1, 6, 1),
        ("NVIDIA-L40S", "NVIDIA-H100-80GB-HBM3", "NVIDIA-L4"),
    ),
    ("wan22-t2v-gpu.yaml", "wan", (1, 8, 1), ("NVIDIA-L4", "NVIDIA-H200", "NVIDIA-L40S")),
    ("wan22-i2v-gpu.yaml", "wan-i2v", (1, 4, 1), ("NVIDIA-L4", "NVIDIA-H200", "NVIDIA-L40S")),
]


@pytest.mark.parametrize(
    ("name", "family", "sizes", "products"), GPU_EXAMPLES, ids=[e[0] for e in GPU_EXAMPLES]
)
def test_gpu_examples_render_their_family_on_gpus_from_a_read_only_pvc(
    name: str, family: str, sizes: tuple[int, ...], products: tuple[str, ...]
) -> None:
    obj = example(name)
    assert obj["spec"]["model"]["family"] == family
    assert obj["spec"]["model"]["dtype"] == "bfloat16"
    assert replicas(obj) == sizes
    assert obj["spec"]["gateway"]["apiKeySecretRef"]["name"]
    assert obj["spec"]["autoscaling"]["mode"] == "Advisory"
    claim = obj["spec"]["model"]["volume"]["persistentVolumeClaim"]["claimName"]
    pods = workloads(obj)
    for component, pod in pods.items():
        (container,) = pod["containers"]
        assert flag(container["args"], "--family") == family, component
        assert flag(container["args"], "--dtype") == (
            None if component == "gateway" else "bfloat16"
        )
        # Every pod, the gateway too (it reads model_index.json), mounts the weights read-only.
        (volume,) = [
            v
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim
        ]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount == {"name": volume["name"], "mountPath": "/models", "readOnly": True}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HOME"] == "/models" and env["HF_HUB_OFFLINE"] == "1"
    for stage, product in zip(("encoder", "denoiser", "decoder"), products, strict=True):
        pod = pods[stage]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, stage
        assert flag(container["args"], "--device") == "cuda", stage
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product}, stage
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"]), stage
    assert "nvidia.com/gpu" not in str(pods["gateway"]["containers"][0].get("resources", {}))


def test_flux_gpu_serves_flux1_schnell() -> None:
    spec = example("flux-gpu.yaml")["spec"]
    assert spec["model"]["source"] == "black-forest-labs/FLUX.1-schnell"
    assert spec["model"]["volume"]["persistentVolumeClaim"]["claimName"] == "flux-weights"
    assert spec["gateway"]["apiKeySecretRef"]["name"] == "flux-api-key"


def test_qwen_image_gpu_is_sized_by_the_builtin_qwen_image_profile() -> None:
    spec = example("qwen-image-gpu.yaml")["spec"]
    assert spec["model"]["source"] == "Qwen/Qwen-Image"
    assert spec["model"]["volume"]["persistentVolumeClaim"]["claimName"] == "qwen-image-weights"
    assert spec["gateway"]["apiKeySecretRef"]["name"] == "qwen-image-api-key"
    auto = parse_spec(spec).autoscaling
    assert auto.profile_name == "builtin:qwen-image-h100" and auto.profile is not None
    # The GPU budget covers every stage at its maxReplicas.
    stages = parse_spec(spec).stages
    assert auto.knobs.max_gpus == sum(st.max_replicas for st in stages.values())
    # Each stage's weights fit the memory of the card it runs on (the profile's GB).
    memory = {"NVIDIA-L40S": 48, "NVIDIA-H100-80GB-HBM3": 80, "NVIDIA-L4": 24}
    for stage, st in stages.items():
        (cost,) = auto.profile.stages[stage].values()
        assert cost.memory_gb < memory[st.node_selector["nvidia.com/gpu.product"]], stage


# The Wan2.2 video examples: sized by the Wan2.1-14B profile, each with a job store.

GPU_MEMORY_GB = {"NVIDIA-L4": 24, "NVIDIA-L40S": 48, "NVIDIA-H200": 141}


def gateway_deployment(obj: dict[str, Any]) -> dict[str, Any]:
    (deploy,) = [c.body for c in rendered(obj) if c.kind == "Deployment"]
    return deploy


def videos_call(path: Path) -> dict[str, Any]:
    """The constant keywords of the Videos API call in an example's Python snippet
    (the comment lines from "in Python" to the blank-ish "(or ..." line), which must
    parse, use the served model name and send the reference image for image-to-video."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# in Python")) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("# (or "))
    code = "\n".join(line.removeprefix("#   ") for line in lines[start:end])
    (call,) = [
        node
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "create_and_poll"
    ]
    out: dict[str, Any] = {
        str(k.arg): k.value.value for k in call.keywords if isinstance(k.value, ast.Constant)
    }
    spec = pipelines(path)[0]["spec"]
    assert out.pop("model") == spec["model"]["servedName"]
    assert out.pop("prompt")
    refs = [k for k in call.keywords if k.arg == "input_reference"]
    assert len(refs) == (spec["model"]["family"] == "wan-i2v"), path.name
    assert "download_content(video.id).write_to_file(" in code
    return {"model": spec["model"]["servedName"], **out}


@pytest.mark.parametrize("name", ["wan22-t2v-gpu.yaml", "wan22-i2v-gpu.yaml"])
def test_wan22_examples_are_sized_by_the_wan21_profile_and_fit_their_cards(name: str) -> None:
    spec = parse_spec(example(name)["spec"])
    auto = spec.autoscaling
    assert auto.mode == "Advisory"
    assert auto.profile_name == "builtin:wan2.1-14b-t2v-h100" and auto.profile is not None
    assert auto.knobs.max_gpus == sum(st.max_replicas for st in spec.stages.values())
    assert spec.model.served_name is not None
    products = {s: st.node_selector["nvidia.com/gpu.product"] for s, st in spec.stages.items()}
    costs = {s: next(iter(auto.profile.stages[s].values())) for s in spec.stages}
    # Wan2.2 A14B: two experts of Wan2.1-14B's size, both in every denoiser pod, with
    # room for the activations of 81 frames (more than an 80 GB H100 leaves).
    assert 2 * costs["denoiser"].memory_gb + 20 < GPU_MEMORY_GB[products["denoiser"]]
    assert GPU_MEMORY_GB[products["encoder"]] > 11  # UMT5-XXL in bfloat16
    assert costs["decoder"].memory_gb < GPU_MEMORY_GB[products["decoder"]]
    # The denoisers are the bottleneck: the light stages stay under half busy
    # even at the stage's slowest assumed time (8x / 2.5x an H100's).
    rate = spec.stages["denoiser"].replicas / costs["denoiser"].seconds(
        auto.profile.default_request
    )
    assert rate * 8 * costs["encoder"].seconds(auto.profile.default_request) < 0.5
    assert rate * 2.5 * costs["decoder"].seconds(auto.profile.default_request) < 0.5


def test_wan22_t2v_shares_a_redis_job_store_between_two_gateways() -> None:
    path = REPO / "examples" / "wan22-t2v-gpu.yaml"
    obj = example(path.name)
    spec = parse_spec(obj["spec"], installed(path))
    assert spec.model.source == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert spec.model.family == "wan" and spec.model.volume is not None
    assert spec.model.volume["persistentVolumeClaim"]["claimName"] == "wan-weights"
    assert spec.gateway.replicas == 2
    assert spec.gateway.job_store == JobStoreSpec(
        type="redis", url_secret_ref=SecretKeyRef("wan-jobs-redis", "url")
    )
    assert spec_warnings(spec) == []
    deploy = gateway_deployment(obj)
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate"}
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DISAGFUSION_JOB_STORE"] == {
        "name": "DISAGFUSION_JOB_STORE",
        "valueFrom": {"secretKeyRef": {"name": "wan-jobs-redis", "key": "url"}},
    }
    args = container["args"]
    assert flag(args, "--job-store") is None and flag(args, "--data-dir") is None
    assert not any("redis" in a for a in args)
    assert flag(args, "--video-retention") == "86400" and flag(args, "--video-timeout") == "3600"
    lines = comment_lines(path)
    assert (
        "kubectl create secret generic wan-jobs-redis"
        " --from-literal=url=redis://:PASSWORD@redis:6379/0" in lines
    )
    assert "kubectl create secret generic wan-t2v-api-key" in path.read_text()
    assert videos_call(path) == {"model": "wan2.2-t2v-a14b", "size": "832x480", "seconds": "5"}


def test_wan22_i2v_keeps_its_jobs_in_sqlite_on_a_claim_behind_one_gateway() -> None:
    path = REPO / "examples" / "wan22-i2v-gpu.yaml"
    obj = example(path.name)
    spec = parse_spec(obj["spec"], installed(path))
    assert spec.model.source == "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
    assert spec.model.family == "wan-i2v"
    assert spec.gateway.replicas == 1
    assert spec.gateway.job_store == JobStoreSpec(
        type="sqlite", claim_name="wan-i2v-jobs", mount_path="/data"
    )
    assert spec_warnings(spec) == []
    deploy = gateway_deployment(obj)
    # The old pod is gone before the new one opens the SQLite file.
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (jobs,) = [
        v
        for v in pod["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == "wan-i2v-jobs"
    ]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == jobs["name"]]
    assert mount["mountPath"] == "/data" and not mount.get("readOnly")
    assert flag(container["args"], "--data-dir") == "/data"
    assert "DISAGFUSION_JOB_STORE" not in {e["name"] for e in container["env"]}
    assert videos_call(path) == {"model": "wan2.2-i2v-a14b", "size": "832x480", "seconds": "5"}
    # A second gateway replica would share the file: refused.
    more = copy.deepcopy(obj)
    more["spec"]["gateway"]["replicas"] = 2
    (problem,) = validate_spec(more["spec"])
    assert problem.startswith("spec.gateway.replicas: a SQLite job store serves one gateway")


@pytest.mark.parametrize(
    ("job_store", "where"),
    [
        ({"type": "etcd"}, "spec.gateway.jobStore.type"),
        ({"type": "redis", "urlSecretRef": {"key": "url"}}, "spec.gateway.jobStore.urlSecretRef"),
        ({"type": "redis", "urlSecretRef": {"name": ""}}, "spec.gateway.jobStore.urlSecretRef"),
        ({"persistentVolumeClaim": {}}, "spec.gateway.jobStore.persistentVolumeClaim"),
        (
            {"persistentVolumeClaim": {"claimName": ""}},
            "spec.gateway.jobStore.persistentVolumeClaim",
        ),
        ({"mountPath": "data"}, "spec.gateway.jobStore.mountPath"),
        ({"type": "sqlite", "claimName": "jobs"}, "spec.gateway.jobStore"),
    ],
)
def test_the_schema_and_the_operator_reject_job_store_mistakes(
    job_store: dict[str, Any], where: str
) -> None:
    obj = copy.deepcopy(example("wan22-i2v-gpu.yaml"))
    obj["spec"]["gateway"]["jobStore"] = job_store
    found = errors(obj)
    assert found and all(e.startswith(where) for e in found), found
    if where != "spec.gateway.jobStore":  # an unknown field: the operator ignores it
        problems = validate_spec(obj["spec"])
        assert problems and all(p.startswith(where) for p in problems), problems


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("videoRetentionSeconds", 60, True),
        ("videoRetentionSeconds", 59, False),
        ("videoRetentionSeconds", 3600.5, False),
        ("videoTimeoutSeconds", 1, True),
        ("videoTimeoutSeconds", 0, False),
        ("videoTimeoutSeconds", "1h", False),
    ],
)
def test_the_schema_and_the_operator_agree_on_video_times(key: str, value: Any, ok: bool) -> None:
    obj = copy.deepcopy(example("wan22-t2v-gpu.yaml"))
    obj["spec"]["gateway"][key] = value
    assert (errors(obj) == []) is ok, errors(obj)
    problems = validate_spec(obj["spec"])
    assert (problems == []) is ok, problems
    assert all(p.startswith(f"spec.gateway.{key}: ") for p in problems), problems


# Families: the CRD's enum, the operator's FAMILIES and the deprecated names agree.


def family_enum() -> list[str]:
    crd = load_crd()
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    model = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["model"]
    enum: list[str] = model["properties"]["family"]["enum"]
    return enum


def test_the_crd_and_the_operator_name_the_same_families() -> None:
    # The worker's family registry is checked against FAMILIES by the worker tests,
    # so the CRD, the operator and the workers all accept the same family names.
    enum = family_enum()
    assert len(enum) == len(set(enum))
    assert set(FAMILIES) - {"auto"} == set(enum) - {"auto", "mmdit"}
    assert {"auto", *FAMILY_ALIASES} <= set(enum)
    assert FAMILY_ALIASES == {"mmdit": "sd3"}
    assert set(FAMILIES) == {"auto", "unet", "sd3", "flux", "sdxl", "qwen-image", "wan", "wan-i2v"}


def test_the_operator_renders_the_sd3_denoisers_on_gpus() -> None:
    sets = rendered_statefulsets(example("sd3-gpu.yaml"))
    assert {name: s["spec"]["replicas"] for name, s in sets.items()} == {
        "sd3-encoder": 1,
        "sd3-denoiser": 4,
        "sd3-decoder": 1,
    }
    pod = sets["sd3-denoiser"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--device" in container["args"] and "cuda" in container["args"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["sd3-weights"]


def test_the_operator_renders_the_tiny_pipeline_on_cpu() -> None:
    sets = rendered_statefulsets(example("tiny-local.yaml"))
    assert sorted(sets) == ["tiny-decoder", "tiny-denoiser", "tiny-encoder"]
    for body in sets.values():
        (container,) = body["spec"]["template"]["spec"]["containers"]
        assert "cuda" not in container["args"]
        assert "builtin:tiny-unet" in container["args"]


def images(obj: dict[str, Any], default_image: str = DEFAULT_IMAGE) -> set[str]:
    owner = Owner(obj["metadata"]["name"], "default", "uid-1")
    children = render_all(owner, parse_spec(obj["spec"], SpecDefaults(image=default_image)))
    return {
        c.body["spec"]["template"]["spec"]["containers"][0]["image"]
        for c in children
        if c.kind in ("StatefulSet", "Deployment")
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_run_the_operators_worker_image(path: Path) -> None:
    """No image in an example: applied unchanged, it runs the chart's workerImage."""
    for obj in pipelines(path):
        spec = obj["spec"]
        assert "image" not in spec and "image" not in spec.get("gateway", {})
        assert all("image" not in s for s in spec.get("stages", {}).values())
        assert images(obj) == {DEFAULT_IMAGE}
        assert images(obj, "registry.example.com/w:2") == {"registry.example.com/w:2"}


# What an example's install comment adds so that Prometheus (in `monitoring`) may
# scrape the stage workers through the pipeline's NetworkPolicies.
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
METRICS_FROM_SET = (
    "--set 'networkPolicy.metricsFrom[0].namespaceSelector.matchLabels"
    ".kubernetes\\.io/metadata\\.name=monitoring'"
)


def installed(path: Path) -> SpecDefaults:
    """The operator's defaults after the chart install the example's comments give."""
    return SpecDefaults(metrics_from=[MONITORING] if METRICS_FROM_SET in path.read_text() else [])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_autoscaled_examples_let_their_prometheus_through(path: Path) -> None:
    """An example the autoscaler watches (or advises on) says how to admit Prometheus
    to its workers, and with that install draws no metricsFrom warning."""
    for obj in pipelines(path):
        spec = parse_spec(obj["spec"], installed(path))
        if spec.autoscaling.mode == "Disabled" or not spec.autoscaling.profile_name:
            continue
        assert [w for w in spec_warnings(spec) if "metricsFrom" in w] == [], path.name
        bare = spec_warnings(parse_spec(obj["spec"]))  # the chart's defaults: nobody
        if not obj["spec"].get("networkPolicy", {}).get("metricsFrom"):
            assert any(w.startswith("spec.networkPolicy.metricsFrom: empty") for w in bare)


def comment_lines(path: Path) -> set[str]:
    return {
        line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")
    }


def build_steps(worker_build: str = "docker build -f worker/Dockerfile") -> list[str]:
    """What makes the chart's default images exist on kind (values.yaml, Chart.yaml)."""
    chart = REPO / "charts" / "disagfusion"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    tag = yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]
    worker = f"{values['workerImage']['repository']}:{tag}"
    operator = f"{values['image']['repository']}:{tag}"
    return [
        f"{worker_build} -t {worker} .",
        f"docker build -f operator/Dockerfile -t {operator} .",
        f"kind load docker-image {worker} {operator}",
    ]


CUDA_WORKER = (
    "docker build -f worker/Dockerfile "
    "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"
)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_comments_build_and_load_the_images_first(path: Path) -> None:
    # The GPU example needs a worker with CUDA torch; the others the default CPU build.
    steps = build_steps(CUDA_WORKER if "gpu" in path.name else "docker build -f worker/Dockerfile")
    lines = comment_lines(path)
    missing = [step for step in steps if step not in lines]
    assert not missing, f"{path.name} lacks {missing}"
    assert any(line.startswith("helm install disagfusion charts/disagfusion") for line in lines)
    assert "ghcr.io" not in path.read_text()


def with_family(family: Any) -> dict[str, Any]:
    obj = copy.deepcopy(example("sd3-gpu.yaml"))
    obj["spec"]["model"]["family"] = family
    return obj


def test_the_deprecated_family_mmdit_still_means_sd3() -> None:
    """Pipelines applied with family: mmdit keep passing the CRD and reconciling, as sd3."""
    obj = with_family("mmdit")
    assert errors(obj) == []
    assert validate_spec(obj["spec"]) == []
    assert parse_spec(obj["spec"]).model.family == "sd3"
    for component, pod in workloads(obj).items():
        assert flag(pod["containers"][0]["args"], "--family") == "sd3", component
    assert [c.body for c in rendered(obj)] == [c.body for c in rendered(with_family("sd3"))]


@pytest.mark.parametrize("family", ["dalle", "MMDiT", "qwen_image", "sd3 "])
def test_an_unknown_family_is_rejected_naming_the_families(family: str) -> None:
    obj = with_family(family)
    found = errors(obj)
    assert found and all(e.startswith("spec.model.family: ") for e in found), found
    assert all(f"'{name}'" in found[0] for name in family_enum()), found
    # The operator's own check (what it reports as the InvalidSpec condition and Event).
    (problem,) = validate_spec(obj["spec"])
    assert problem.startswith("spec.model.family: must be one of "), problem
    assert f"got {family!r}" in problem
    named = problem.removeprefix("spec.model.family: must be one of ").split(" (")[0]
    assert named.split(", ") == list(FAMILIES), problem
    assert "(mmdit: the deprecated name of sd3)" in problem
    conditions = cond.apply_invalid([], [problem], "2026-11-27T12:00:00Z", 1)
    ready = cond.get_condition(conditions, "Ready")
    assert ready is not None and ready["message"] == problem
