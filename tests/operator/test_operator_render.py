"""Pure operator policy: spec parsing, manifest rendering, conditions, CRD schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from disagfusion import __version__
from disagfusion.cli import build_parser
from disagfusion.operator import conditions as cond
from disagfusion.operator.children import render_all
from disagfusion.operator.context import merge_patch
from disagfusion.operator.kube import in_sync, is_subset
from disagfusion.operator.render import (
    GRPC_PORT,
    HASH_ANNOTATION,
    HTTP_PORT,
    JOB_STORE_ENV,
    JOB_VOLUME,
    RUN_AS_USER,
    TOPOLOGY_DIR,
    Child,
    Owner,
    effective_replicas,
    topology,
)
from disagfusion.operator.spec import (
    DEFAULT_IMAGE,
    DEFAULT_REDIS_URL_KEY,
    DEFAULT_VIDEO_RETENTION_S,
    DEFAULT_VIDEO_TIMEOUT_S,
    GATEWAY_MOUNTED_PATHS,
    JOB_STORE_TYPES,
    MAX_SERVED_NAME,
    MIN_VIDEO_RETENTION_S,
    JobStoreSpec,
    PipelineSpec,
    SecretKeyRef,
    SpecDefaults,
    SpecError,
    parse_spec,
    spec_warnings,
    validate_spec,
)

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "disagfusion.io_diffusionpipelines.yaml"
OWNER = Owner(name="sd", namespace="ml", uid="uid-1")
NOW = "2026-11-27T12:00:00Z"
LATER = "2026-11-27T12:05:00Z"


def spec(**extra: Any) -> dict[str, Any]:
    return {"model": {"source": "builtin:tiny-unet"}, **extra}


def by_name(children: list[Child]) -> dict[str, dict[str, Any]]:
    return {f"{c.kind}/{c.name}": c.body for c in children}


def container(body: dict[str, Any]) -> dict[str, Any]:
    return body["spec"]["template"]["spec"]["containers"][0]


# spec


def test_defaults() -> None:
    s = parse_spec(spec())
    assert s.image == DEFAULT_IMAGE
    assert s.model.family == "auto" and s.model.dtype == "auto"
    assert s.transport.backend == "grpc"
    assert s.autoscaling_mode == "Disabled"
    assert s.gateway.port == 8000 and s.gateway.replicas == 1
    for stage in s.stages.values():
        assert (stage.replicas, stage.min_replicas, stage.max_replicas) == (1, 1, 1)
        assert stage.image == DEFAULT_IMAGE


def test_the_fallback_image_is_the_one_the_readme_builds() -> None:
    # Not an image of a registry nobody publishes to: what `docker build -t` makes.
    assert f"disagfusion-worker:{__version__}" == DEFAULT_IMAGE


def images(s: PipelineSpec) -> dict[str, str]:
    """Workload -> its container's image."""
    return {
        f"{c.kind}/{c.name}": container(c.body)["image"]
        for c in render_all(OWNER, s)
        if c.kind in ("StatefulSet", "Deployment")
    }


def test_the_operators_worker_image_is_the_default() -> None:
    """SpecDefaults.image (the operator's DISAGFUSION_WORKER_IMAGE) fills spec.image."""
    s = parse_spec(spec(), SpecDefaults(image="registry.example.com/w:2"))
    assert s.image == s.gateway.image == "registry.example.com/w:2"
    assert {st.image for st in s.stages.values()} == {"registry.example.com/w:2"}
    assert set(images(s).values()) == {"registry.example.com/w:2"}
    # The pipeline's own images win over the operator's.
    own = parse_spec(
        spec(image="mine:1", stages={"decoder": {"image": "dec:1"}}, gateway={"image": "gw:1"}),
        SpecDefaults(image="registry.example.com/w:2"),
    )
    assert images(own) == {
        "StatefulSet/sd-encoder": "mine:1",
        "StatefulSet/sd-denoiser": "mine:1",
        "StatefulSet/sd-decoder": "dec:1",
        "Deployment/sd-gateway": "gw:1",
    }


def test_replicas_alone_widen_max() -> None:
    s = parse_spec(spec(stages={"denoiser": {"replicas": 3}}))
    assert s.stages["denoiser"].max_replicas == 3


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "spec.model.source"),
        (spec(stages={"encoder": {"minReplicas": 3, "maxReplicas": 2}}), "spec.stages.encoder"),
        (
            spec(stages={"decoder": {"replicas": 5, "maxReplicas": 2}}),
            "spec.stages.decoder.replicas",
        ),
        (spec(stages={"denoiser": {"replicas": "two"}}), "spec.stages.denoiser.replicas"),
        (spec(stages={"vae": {}}), "spec.stages.vae"),
        (spec(transport={"backend": "carrier-pigeon"}), "spec.transport.backend"),
        (
            spec(transport={"backend": "shm", "options": {"chunk_bytes": "1"}}),
            "spec.transport.options.chunk_bytes",
        ),
        (
            spec(transport={"backend": "torch", "options": {"store_port": "http"}}),
            "spec.transport.options.store_port",
        ),
        (spec(autoscaling={"mode": "Sometimes"}), "spec.autoscaling.mode"),
        (spec(autoscaling={"profile": "builtin:nope"}), "spec.autoscaling.profile"),
        (spec(autoscaling={"profile": "qwen"}), "spec.autoscaling.profile"),
        (spec(autoscaling={"customProfile": {"stages": {}}}), "spec.autoscaling.customProfile"),
        (spec(autoscaling={"targetUtilization": 1.5}), "spec.autoscaling.targetUtilization"),
        (spec(autoscaling={"intervalSeconds": 0}), "spec.autoscaling.intervalSeconds"),
        (spec(autoscaling={"slo": "fast"}), "spec.autoscaling.slo"),
        (spec(autoscaling={"maxStepUp": 0}), "spec.autoscaling.maxStepUp"),
        (spec(autoscaling={"prometheusUrl": "prom:9090"}), "spec.autoscaling.prometheusUrl"),
        (
            spec(autoscaling={"profile": "builtin:qwen-image-h100", "accelerators": {"vae": "x"}}),
            "spec.autoscaling.accelerators.vae",
        ),
        (
            spec(
                autoscaling={
                    "profile": "builtin:qwen-image-h100",
                    "accelerators": {"decoder": "TPU"},
                }
            ),
            "spec.autoscaling.accelerators.decoder",
        ),
        (spec(model={"source": "x", "family": "gan"}), "spec.model.family"),
        (spec(gateway={"port": 70000}), "spec.gateway.port"),
        (spec(gateway={"apiKeySecretRef": {"key": "k"}}), "spec.gateway.apiKeySecretRef.name"),
        (spec(image=""), "spec.image"),
        (spec(model={"source": "x", "servedName": ""}), "spec.model.servedName"),
        (spec(model={"source": "x", "servedName": 7}), "spec.model.servedName"),
        (spec(gateway={"jobStore": {"type": "etcd"}}), "spec.gateway.jobStore.type"),
        (spec(gateway={"jobStore": {"type": "redis"}}), "spec.gateway.jobStore.urlSecretRef"),
        (
            spec(gateway={"jobStore": {"type": "redis", "urlSecretRef": {}}}),
            "spec.gateway.jobStore.urlSecretRef",
        ),
        (
            spec(gateway={"jobStore": {"type": "redis", "urlSecretRef": {"key": "url"}}}),
            "spec.gateway.jobStore.urlSecretRef.name",
        ),
        (
            spec(gateway={"jobStore": {"urlSecretRef": {"name": "r"}}}),
            "spec.gateway.jobStore.urlSecretRef",
        ),
        (
            spec(
                gateway={
                    "jobStore": {
                        "type": "redis",
                        "urlSecretRef": {"name": "r"},
                        "persistentVolumeClaim": {"claimName": "jobs"},
                    }
                }
            ),
            "spec.gateway.jobStore.persistentVolumeClaim",
        ),
        (
            spec(gateway={"jobStore": {"persistentVolumeClaim": {}}}),
            "spec.gateway.jobStore.persistentVolumeClaim.claimName",
        ),
        (spec(gateway={"jobStore": {"mountPath": "data"}}), "spec.gateway.jobStore.mountPath"),
        (spec(gateway={"jobStore": {"mountPath": "/tmp"}}), "spec.gateway.jobStore.mountPath"),
        (
            spec(gateway={"jobStore": {"mountPath": "/etc/disagfusion/"}}),
            "spec.gateway.jobStore.mountPath",
        ),
        (spec(gateway={"jobStore": {"mountPath": "/models"}}), "spec.gateway.jobStore.mountPath"),
        (spec(gateway={"jobStore": {}, "replicas": 2}), "spec.gateway.replicas"),
        (
            spec(model={"source": "x", "family": "wan"}, gateway={"replicas": 3}),
            "spec.gateway.replicas",
        ),
        (spec(gateway={"videoRetentionSeconds": 59}), "spec.gateway.videoRetentionSeconds"),
        (spec(gateway={"videoTimeoutSeconds": 0}), "spec.gateway.videoTimeoutSeconds"),
        (
            spec(model={"source": "x", "servedName": "m" * (MAX_SERVED_NAME + 1)}),
            "spec.model.servedName",
        ),
    ],
)
def test_invalid_specs_name_the_field(raw: dict[str, Any], field: str) -> None:
    problems = validate_spec(raw)
    assert any(p.startswith(field) for p in problems), problems
    with pytest.raises(SpecError):
        parse_spec(raw)


def test_autoscaling_knobs() -> None:
    auto = parse_spec(
        spec(
            stages={"denoiser": {"replicas": 2, "minReplicas": 1, "maxReplicas": 6}},
            autoscaling={
                "mode": "Active",
                "profile": "builtin:qwen-image-h100",
                "accelerators": {"denoiser": "H100"},
                "prometheusUrl": "http://prom:9090",
                "slo": "2x",
                "maxGpus": 12,
                "scaleDownWindowSeconds": 30,
                "maxStepDown": 2,
            },
        )
    ).autoscaling
    assert auto.mode == "Active" and auto.prometheus_url == "http://prom:9090"
    assert auto.profile is not None and auto.profile.name == "qwen-image-h100"
    assert auto.accelerators == {"denoiser": "H100"}
    k = auto.knobs
    assert (k.mode, k.slo, k.max_gpus, k.scale_down_window_s, k.max_step_down) == (
        "Active",
        "2x",
        12,
        30.0,
        2,
    )
    assert k.min_for("denoiser") == 1 and k.max_for("denoiser", 99) == 6
    assert k.max_for("encoder", 99) == 1
    # An inline profile is parsed with profile.parse_profile.
    from disagfusion.scheduling.builtin_profiles import BUILTIN_PROFILES

    custom = dict(BUILTIN_PROFILES["qwen-image-h100"])
    inline = parse_spec(spec(autoscaling={"customProfile": {"name": "mine", **custom}}))
    assert inline.autoscaling.profile is not None
    assert inline.autoscaling.profile.name == inline.autoscaling.profile_name == "mine"


def test_autoscaling_defaults_match_the_crd_and_knobs() -> None:
    from disagfusion.scheduling.scaling import Knobs

    _, version = crd_schema()
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    auto = props["autoscaling"]["properties"]
    parsed = parse_spec(spec()).autoscaling
    assert parsed.mode == auto["mode"]["default"] == "Disabled" and parsed.profile is None
    fields = {
        "intervalSeconds": "interval_s",
        "targetUtilization": "target_utilization",
        "tolerance": "tolerance",
        "scaleUpWindowSeconds": "scale_up_window_s",
        "scaleDownWindowSeconds": "scale_down_window_s",
        "maxStepUp": "max_step_up",
        "maxStepDown": "max_step_down",
        "staleAfterSeconds": "stale_after_s",
        "drainSeconds": "drain_seconds",
    }
    for key, attr in fields.items():
        assert auto[key]["default"] == getattr(parsed.knobs, attr) == getattr(Knobs(), attr), key
    for key, prop in auto.items():
        assert prop.get("description"), f"spec.autoscaling.{key} has no description"
    # Knobs without a default fall back to the profile's (documented in the description).
    for key in ("slo", "maxGpus", "forecastSeconds", "profile", "prometheusUrl"):
        assert "default" not in auto[key] and "default" in auto[key]["description"], key


def test_effective_replicas_override_spec_within_bounds() -> None:
    s = parse_spec(spec(stages={"denoiser": {"replicas": 2, "minReplicas": 1, "maxReplicas": 5}}))
    assert effective_replicas(s) == {"encoder": 1, "denoiser": 2, "decoder": 1}
    assert effective_replicas(s, {"denoiser": 4})["denoiser"] == 4
    assert effective_replicas(s, {"denoiser": 9, "encoder": 0}) == {
        "encoder": 1,
        "denoiser": 5,
        "decoder": 1,
    }
    children = by_name(render_all(OWNER, s, {"denoiser": 4}))
    assert children["StatefulSet/sd-denoiser"]["spec"]["replicas"] == 4
    assert children["StatefulSet/sd-encoder"]["spec"]["replicas"] == 1
    plain = by_name(render_all(OWNER, s))
    assert plain["StatefulSet/sd-denoiser"]["spec"]["replicas"] == 2
    # The size is an input of the hash, so a scale is a write and drift back is repaired.
    assert (
        children["StatefulSet/sd-denoiser"]["metadata"]["annotations"][HASH_ANNOTATION]
        != plain["StatefulSet/sd-denoiser"]["metadata"]["annotations"][HASH_ANNOTATION]
    )


def test_a_scale_rewrites_only_the_statefulset() -> None:
    """Neither a spec replica change nor an autoscaler size touches the topology
    ConfigMap (it lists addresses up to maxReplicas), the gateway or the Services."""
    bounds = {"minReplicas": 1, "maxReplicas": 5}
    before = render_all(OWNER, parse_spec(spec(stages={"denoiser": {"replicas": 1, **bounds}})))
    by_spec = render_all(OWNER, parse_spec(spec(stages={"denoiser": {"replicas": 3, **bounds}})))
    by_autoscaler = render_all(
        OWNER, parse_spec(spec(stages={"denoiser": {"replicas": 1, **bounds}})), {"denoiser": 4}
    )
    for after in (by_spec, by_autoscaler):
        moved = {
            f"{a.kind}/{a.name}"
            for a, b in zip(before, after, strict=True)
            if (a.body, a.input_hash) != (b.body, b.input_hash)
        }
        assert moved == {"StatefulSet/sd-denoiser"}
        topo_before, topo_after = (by_name(x)["ConfigMap/sd-topology"] for x in (before, after))
        assert topo_before == topo_after
        assert (
            topo_before["metadata"]["annotations"][HASH_ANNOTATION]
            == topo_after["metadata"]["annotations"][HASH_ANNOTATION]
        )
    # The topology lists maxReplicas addresses: widening it is a rewrite (and rolls the gateway).
    wider = render_all(
        OWNER, parse_spec(spec(stages={"denoiser": {"replicas": 1, "maxReplicas": 6}}))
    )
    assert by_name(wider)["ConfigMap/sd-topology"] != by_name(before)["ConfigMap/sd-topology"]


# Environment variables something in the pod reads: the Hugging Face hub's, the builtin
# models' cache (worker/models/builtin.py), the gateway's key, its Redis job store's URL
# (worker/gateway/serve.py) and its advertised address.
READ_ENV = {
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "DISAGFUSION_CACHE",
    "DISAGFUSION_API_KEY",
    "DISAGFUSION_JOB_STORE",
    "POD_IP",
}


def everything_set() -> PipelineSpec:
    """A spec with every field that could become an environment variable."""
    return parse_spec(
        spec(
            model={
                "source": "org/model",
                "family": "mmdit",
                "revision": "v2",
                "volume": {"persistentVolumeClaim": {"claimName": "weights"}},
            },
            transport={"backend": "grpc", "options": {"chunk_bytes": "65536"}},
            gateway={
                "apiKeySecretRef": {"name": "keys"},
                "jobStore": {"type": "redis", "urlSecretRef": {"name": "jobs-redis"}},
            },
        )
    )


def written_env(children: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """Workload -> the names of its container's environment variables."""
    return {
        key: {e["name"] for e in container(body)["env"]}
        for key, body in children.items()
        if key.split("/")[0] in ("StatefulSet", "Deployment")
    }


def test_the_operator_writes_only_what_the_pods_read() -> None:
    """The workers take the spec from their args; nothing reads family, revision or
    transport options from the environment, nor a pipeline.json from the ConfigMap."""
    children = by_name(render_all(OWNER, everything_set()))
    assert set(children["ConfigMap/sd-topology"]["data"]) == {"topology.json"}
    for key, names in written_env(children).items():
        assert names <= READ_ENV, f"{key} writes {sorted(names - READ_ENV)}"
    assert written_env(children)["Deployment/sd-gateway"] == READ_ENV
    # The pipeline's own env is passed through as it is.
    own = parse_spec(spec(stages={"encoder": {"env": [{"name": "X", "value": "1"}]}}))
    encoder = container(by_name(render_all(OWNER, own))["StatefulSet/sd-encoder"])
    assert {"name": "X", "value": "1"} in encoder["env"]


def test_every_disagfusion_variable_written_is_read_somewhere() -> None:
    """A write-only variable is dead weight in every pod template: its reader must exist."""
    sources = "".join(
        path.read_text()
        for folder in ("worker", "disagfusion/cli")
        for path in (REPO / folder).rglob("*.py")
    )
    written = set().union(*written_env(by_name(render_all(OWNER, everything_set()))).values())
    for name in sorted(n for n in written if n.startswith("DISAGFUSION_")):
        assert f'"{name}"' in sources, f"nothing in worker/ or the CLI reads ${name}"


# rendering


def test_children_and_names() -> None:
    children = by_name(render_all(OWNER, parse_spec(spec())))
    assert set(children) == {
        "ConfigMap/sd-topology",
        "StatefulSet/sd-encoder",
        "Service/sd-encoder",
        "StatefulSet/sd-denoiser",
        "Service/sd-denoiser",
        "StatefulSet/sd-decoder",
        "Service/sd-decoder",
        "Deployment/sd-gateway",
        "Service/sd-gateway",
        *(f"NetworkPolicy/sd-{c}" for c in ("gateway", "encoder", "denoiser", "decoder")),
    }
    for body in children.values():
        meta = body["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "disagfusion.io/v1alpha1",
                "kind": "DiffusionPipeline",
                "name": "sd",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "disagfusion-operator"
        assert meta["labels"]["disagfusion.io/pipeline"] == "sd"
        assert HASH_ANNOTATION in meta["annotations"]


def test_worker_statefulset() -> None:
    s = parse_spec(
        spec(
            model={
                "source": "stabilityai/sd-2",
                "dtype": "bfloat16",
                "volume": {"persistentVolumeClaim": {"claimName": "weights"}},
            },
            stages={
                "denoiser": {
                    "replicas": 2,
                    "maxReplicas": 3,
                    "queueCapacity": 4,
                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                    "nodeSelector": {"gpu": "h100"},
                    "tolerations": [{"key": "gpu", "operator": "Exists"}],
                    "env": [{"name": "X", "value": "1"}],
                },
                "decoder": {"replicas": 2},
            },
        )
    )
    children = by_name(render_all(OWNER, s))
    sts = children["StatefulSet/sd-denoiser"]
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["serviceName"] == "sd-denoiser"
    assert sts["metadata"]["labels"]["disagfusion.io/stage"] == "denoiser"
    pod = sts["spec"]["template"]
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(HTTP_PORT),
        "prometheus.io/path": "/metrics",
    }
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert pod["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["spec"]["terminationGracePeriodSeconds"] > 120
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights"}} in pod["spec"][
        "volumes"
    ]
    c = container(sts)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": HTTP_PORT}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": HTTP_PORT}
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert {"name": "X", "value": "1"} in c["env"]
    # The args are exactly what `disagfusion worker` accepts.
    args = build_parser().parse_args(c["args"])
    assert args.role == "denoiser" and args.model == "stabilityai/sd-2"
    assert (args.port, args.http_port, args.host) == (GRPC_PORT, HTTP_PORT, "0.0.0.0")
    assert args.pipeline == "sd" and args.queue_capacity == 4
    assert args.device == "cuda" and args.dtype == "bfloat16"
    assert args.next.split(",") == [
        "sd-decoder-0.sd-decoder.ml.svc:50051",
        "sd-decoder-1.sd-decoder.ml.svc:50051",
    ]
    enc = build_parser().parse_args(container(children["StatefulSet/sd-encoder"])["args"])
    assert len(enc.next.split(",")) == 3  # up to the denoiser's maxReplicas
    assert enc.device == "cpu"
    dec = build_parser().parse_args(container(children["StatefulSet/sd-decoder"])["args"])
    assert dec.next == ""
    svc = children["Service/sd-denoiser"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True


def test_the_transport_reaches_every_pod_as_flags_the_pods_read() -> None:
    from disagfusion.cli.common import transport_settings

    s = parse_spec(spec(transport={"backend": "torch", "options": {"timeout_s": "5"}}))
    children = by_name(render_all(OWNER, s))
    workloads = [k for k in children if k.split("/")[0] in ("StatefulSet", "Deployment")]
    assert len(workloads) == 4
    for key in workloads:
        c = container(children[key])
        args = build_parser().parse_args(c["args"])
        assert transport_settings(args) == (
            "torch",
            {"store_port": "29500", "timeout_s": "5"},
        ), key
        assert {"name": "torch-store", "containerPort": 29500} in c["ports"], key
    # The default passes nothing: every pod runs grpc.
    plain = by_name(render_all(OWNER, parse_spec(spec())))
    for key in workloads:
        assert "--transport" not in container(plain[key])["args"], key


def test_gateway_and_topology() -> None:
    s = parse_spec(
        spec(
            gateway={
                "replicas": 2,
                "serviceType": "LoadBalancer",
                "port": 9000,
                "maxQueue": 8,
                "requestTimeoutSeconds": 60,
                "apiKeySecretRef": {"name": "keys", "key": "token"},
            }
        )
    )
    children = by_name(render_all(OWNER, s))
    deploy = children["Deployment/sd-gateway"]
    assert deploy["spec"]["replicas"] == 2
    c = container(deploy)
    args = build_parser().parse_args(c["args"])
    assert args.command == "gateway"
    assert (args.host, args.port, args.advertise_host) == ("0.0.0.0", 9000, "$(POD_IP)")
    assert args.topology == "@/etc/disagfusion/topology.json"
    assert args.max_queue == 8 and args.request_timeout == 60
    env = {e["name"]: e for e in c["env"]}
    assert env["DISAGFUSION_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "keys",
        "key": "token",
    }
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert c["readinessProbe"]["httpGet"]["port"] == 9000
    svc = children["Service/sd-gateway"]
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["ports"][0]["port"] == 9000
    topo = json.loads(children["ConfigMap/sd-topology"]["data"]["topology.json"])
    assert topo == topology("sd", "ml", s)
    assert topo["encoder"] == ["sd-encoder-0.sd-encoder.ml.svc:50051"]
    assert args.served_model_name is None  # unset: the gateway's own default


@pytest.mark.parametrize("name", ["sd3-medium", "org/Model.v2:latest", "m" * MAX_SERVED_NAME])
def test_served_name_reaches_the_gateway_only(name: str) -> None:
    s = parse_spec(spec(model={"source": "builtin:tiny-unet", "servedName": name}))
    assert s.model.served_name == name
    children = by_name(render_all(OWNER, s))
    c = container(children["Deployment/sd-gateway"])
    assert build_parser().parse_args(c["args"]).served_model_name == name
    assert c["args"].count("--served-model-name") == 1
    for stage in ("encoder", "denoiser", "decoder"):  # workers do not take the flag
        assert "--served-model-name" not in container(children[f"StatefulSet/sd-{stage}"])["args"]


# the gateway's video job store


def gateway_of(s: PipelineSpec) -> dict[str, Any]:
    return by_name(render_all(OWNER, s))["Deployment/sd-gateway"]


def video(**gateway: Any) -> dict[str, Any]:
    """A video pipeline's spec (its gateway serves the Videos API) with these gateway fields."""
    return spec(model={"source": "builtin:tiny-wan", "family": "wan"}, gateway=gateway)


def pod_spec(body: dict[str, Any]) -> dict[str, Any]:
    spec_: dict[str, Any] = body["spec"]["template"]["spec"]
    return spec_


def test_a_sqlite_job_store_on_a_claim_is_mounted_read_write_and_rolls_by_recreate() -> None:
    s = parse_spec(
        video(jobStore={"persistentVolumeClaim": {"claimName": "jobs"}, "mountPath": "/var/jobs"})
    )
    assert s.gateway.job_store == JobStoreSpec("sqlite", claim_name="jobs", mount_path="/var/jobs")
    assert not s.gateway.job_store.ephemeral and spec_warnings(s) == []
    deploy = gateway_of(s)
    pod, c = pod_spec(deploy), container(deploy)
    (volume,) = [v for v in pod["volumes"] if v["name"] == JOB_VOLUME]
    assert volume == {"name": JOB_VOLUME, "persistentVolumeClaim": {"claimName": "jobs"}}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == JOB_VOLUME]
    assert mount == {"name": JOB_VOLUME, "mountPath": "/var/jobs"}  # read-write
    assert pod["securityContext"]["fsGroup"] == RUN_AS_USER  # the gateway's user may write it
    args = build_parser().parse_args(c["args"])
    assert args.data_dir == "/var/jobs" and args.job_store is None
    assert c["args"].count("--data-dir") == 1
    assert JOB_STORE_ENV not in {e["name"] for e in c["env"]}
    # Two pods must never share the SQLite file: the old pod goes before the new one starts.
    assert deploy["spec"]["strategy"] == {"type": "Recreate", "rollingUpdate": None}
    # Merge-patched onto a Deployment the API server defaulted to RollingUpdate, the
    # result is a Recreate strategy the API server accepts (no rollingUpdate left).
    live = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}
    assert merge_patch(live, deploy["spec"]["strategy"]) == {"type": "Recreate"}
    # The stage workers get neither the volume nor the flag.
    for stage in ("encoder", "denoiser", "decoder"):
        sts = by_name(render_all(OWNER, s))[f"StatefulSet/sd-{stage}"]
        assert JOB_VOLUME not in {v["name"] for v in pod_spec(sts)["volumes"]}
        assert "--data-dir" not in container(sts)["args"]


@pytest.mark.parametrize(
    "raw",
    [video(), video(jobStore={}), video(jobStore={"type": "sqlite", "mountPath": "/data"})],
    ids=["unset", "empty", "sqlite"],
)
def test_a_sqlite_job_store_without_a_claim_is_an_empty_dir_and_warned(
    raw: dict[str, Any],
) -> None:
    s = parse_spec(raw)
    assert s.gateway.job_store == JobStoreSpec() and s.gateway.job_store.ephemeral
    deploy = gateway_of(s)
    pod, c = pod_spec(deploy), container(deploy)
    assert {"name": JOB_VOLUME, "emptyDir": {}} in pod["volumes"]
    assert {"name": JOB_VOLUME, "mountPath": "/data"} in c["volumeMounts"]
    assert build_parser().parse_args(c["args"]).data_dir == "/data"
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate"}
    (warning,) = spec_warnings(s)
    assert warning.startswith("spec.gateway.jobStore: ")
    assert "emptyDir" in warning and "do not survive the gateway pod" in warning


def test_an_image_pipeline_keeps_its_gateway_replicas_and_gets_no_warning() -> None:
    """Its gateway runs no video jobs: several replicas without a jobStore stay valid."""
    for family in ("auto", "sd3", "qwen-image"):
        raw = spec(model={"source": "org/m", "family": family}, gateway={"replicas": 2})
        assert validate_spec(raw) == [], family
        assert spec_warnings(parse_spec(raw)) == [], family
    # An explicit SQLite store is one replica's, whatever the model.
    (problem,) = validate_spec(spec(gateway={"replicas": 2, "jobStore": {"type": "sqlite"}}))
    assert problem == (
        "spec.gateway.replicas: a SQLite job store serves one gateway replica; use type: redis"
        " for several (spec.gateway.jobStore.type), got 2"
    )
    # A video family's default store is SQLite too, and so is refused with two replicas.
    (problem,) = validate_spec(video(replicas=2))
    assert problem.startswith("spec.gateway.replicas: a SQLite job store serves one gateway")
    assert validate_spec(video(replicas=0)) == validate_spec(video(replicas=1)) == []


def test_a_redis_job_store_url_comes_from_its_secret_and_never_shows_in_the_pod_spec() -> None:
    s = parse_spec(
        video(
            replicas=3,
            jobStore={"type": "redis", "urlSecretRef": {"name": "jobs-redis", "key": "dsn"}},
        )
    )
    assert s.gateway.job_store.url_secret_ref == SecretKeyRef("jobs-redis", "dsn")
    assert spec_warnings(s) == []
    deploy = gateway_of(s)
    pod, c = pod_spec(deploy), container(deploy)
    (var,) = [e for e in c["env"] if e["name"] == JOB_STORE_ENV]
    assert var == {
        "name": JOB_STORE_ENV,
        "valueFrom": {"secretKeyRef": {"name": "jobs-redis", "key": "dsn"}},
    }
    args = build_parser().parse_args(c["args"])
    assert args.job_store is None  # the gateway then reads $DISAGFUSION_JOB_STORE
    assert args.data_dir is None
    assert not any("redis" in a for a in c["args"])
    assert JOB_VOLUME not in {v["name"] for v in pod["volumes"]}
    assert JOB_VOLUME not in {m["name"] for m in c["volumeMounts"]}
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate"}
    # The key defaults to url.
    default_key = parse_spec(video(jobStore={"type": "redis", "urlSecretRef": {"name": "r"}}))
    assert default_key.gateway.job_store.url_secret_ref == SecretKeyRef("r", "url")
    # The stage workers never get the URL.
    for key, names in written_env(by_name(render_all(OWNER, s))).items():
        assert (JOB_STORE_ENV in names) == (key == "Deployment/sd-gateway"), key


@pytest.mark.parametrize(
    ("gateway", "retention", "timeout"),
    [
        ({}, 86400, 3600),
        ({"videoRetentionSeconds": 60, "videoTimeoutSeconds": 1}, 60, 1),
        ({"videoRetentionSeconds": 604800, "videoTimeoutSeconds": 7200}, 604800, 7200),
    ],
)
def test_video_retention_and_timeout_reach_the_gateway(
    gateway: dict[str, Any], retention: int, timeout: int
) -> None:
    s = parse_spec(video(**gateway))
    assert (s.gateway.video_retention_seconds, s.gateway.video_timeout_seconds) == (
        retention,
        timeout,
    )
    c = container(gateway_of(s))
    args = build_parser().parse_args(c["args"])
    assert (args.video_retention, args.video_timeout) == (retention, timeout)
    assert c["args"].count("--video-retention") == c["args"].count("--video-timeout") == 1


def test_the_job_store_changes_roll_the_gateway_only() -> None:
    plain = render_all(OWNER, parse_spec(video()))
    claimed = render_all(
        OWNER, parse_spec(video(jobStore={"persistentVolumeClaim": {"claimName": "jobs"}}))
    )
    moved = {
        f"{a.kind}/{a.name}"
        for a, b in zip(plain, claimed, strict=True)
        if a.input_hash != b.input_hash
    }
    assert moved == {"Deployment/sd-gateway"}


def test_the_job_store_defaults_match_the_crd_and_the_gateway_cli() -> None:
    _, version = crd_schema()
    gw = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["gateway"]
    props = gw["properties"]
    defaults = parse_spec(spec()).gateway
    cli = build_parser().parse_args(
        ["gateway", "--model", "m", "--grpc-port", "1", "--topology", "{}"]
    )
    assert props["videoRetentionSeconds"]["default"] == defaults.video_retention_seconds
    assert defaults.video_retention_seconds == DEFAULT_VIDEO_RETENTION_S == cli.video_retention
    assert props["videoRetentionSeconds"]["minimum"] == MIN_VIDEO_RETENTION_S
    assert props["videoTimeoutSeconds"]["default"] == defaults.video_timeout_seconds
    assert defaults.video_timeout_seconds == DEFAULT_VIDEO_TIMEOUT_S == cli.video_timeout
    assert props["videoTimeoutSeconds"]["minimum"] == 1
    store = props["jobStore"]
    # No default object: an image pipeline without one keeps several gateway replicas.
    assert "default" not in store
    fields = store["properties"]
    assert fields["type"]["enum"] == list(JOB_STORE_TYPES)
    assert fields["type"]["default"] == defaults.job_store.type == "sqlite"
    assert fields["mountPath"]["default"] == defaults.job_store.mount_path == "/data"
    assert fields["urlSecretRef"]["properties"]["key"]["default"] == DEFAULT_REDIS_URL_KEY
    assert fields["urlSecretRef"]["required"] == ["name"]
    assert fields["persistentVolumeClaim"]["required"] == ["claimName"]
    for path, node in _walk(store, "jobStore"):
        assert node.get("description"), f"spec.gateway.{path} has no description"
    for key in ("videoRetentionSeconds", "videoTimeoutSeconds"):
        assert props[key]["description"] and props[key]["type"] == "integer", key
    assert "does not survive the gateway pod" in " ".join(store["description"].split())
    # The paths a job store may not take are the ones render.py mounts.
    assert TOPOLOGY_DIR in GATEWAY_MOUNTED_PATHS and "/tmp" in GATEWAY_MOUNTED_PATHS


def defaults_family() -> str:
    return parse_spec(spec()).model.family


@pytest.mark.parametrize(
    ("family", "flag"),
    [
        (None, None),  # unset: auto
        ("auto", None),  # the worker reads the family from model_index.json
        ("unet", "unet"),
        ("sd3", "sd3"),
        ("mmdit", "sd3"),  # the deprecated name, normalised
        ("flux", "flux"),
        ("sdxl", "sdxl"),
        ("qwen-image", "qwen-image"),
    ],
)
def test_a_pinned_family_reaches_every_worker_and_the_gateway(
    family: str | None, flag: str | None
) -> None:
    model = {"source": "org/model", "dtype": "bfloat16"}
    if family is not None:
        model["family"] = family
    s = parse_spec(spec(model=model))
    assert s.model.family == (flag or "auto")
    children = by_name(render_all(OWNER, s))
    for key in (
        "StatefulSet/sd-encoder",
        "StatefulSet/sd-denoiser",
        "StatefulSet/sd-decoder",
        "Deployment/sd-gateway",
    ):
        args = container(children[key])["args"]
        if flag is None:
            assert "--family" not in args, key
        else:
            assert args.count("--family") == 1, key
            assert args[args.index("--family") + 1] == flag, key


def test_hash_is_stable_and_tracks_inputs() -> None:
    a = {c.name + c.kind: c.input_hash for c in render_all(OWNER, parse_spec(spec()))}
    b = {c.name + c.kind: c.input_hash for c in render_all(OWNER, parse_spec(spec()))}
    assert a == b
    c = {
        x.name + x.kind: x.input_hash
        for x in render_all(OWNER, parse_spec(spec(stages={"decoder": {"image": "other:1"}})))
    }
    assert c["sd-decoderStatefulSet"] != a["sd-decoderStatefulSet"]
    assert c["sd-encoderStatefulSet"] == a["sd-encoderStatefulSet"]


def test_in_sync_detects_edits_and_tolerates_server_defaults() -> None:
    child = next(c for c in render_all(OWNER, parse_spec(spec())) if c.kind == "StatefulSet")
    live = json.loads(json.dumps(child.body))
    live["metadata"]["uid"] = "x"
    live["spec"]["revisionHistoryLimit"] = 10  # defaulted by the API server
    container(live)["imagePullPolicy"] = "IfNotPresent"
    assert in_sync(child, live)
    container(live)["image"] = "edited"
    assert not in_sync(child, live)
    assert is_subset({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2, "c": 3}], "d": 4})
    assert not is_subset({"a": [1]}, {"a": [1, 2]})


# conditions


def test_set_condition_keeps_transition_time() -> None:
    first = cond.set_condition([], "Ready", False, "Creating", "wait", NOW, 1)
    same = cond.set_condition(first, "Ready", False, "RollingOut", "still", LATER, 2)
    assert same[0]["lastTransitionTime"] == NOW and same[0]["reason"] == "RollingOut"
    assert same[0]["observedGeneration"] == 2
    flipped = cond.set_condition(same, "Ready", True, "AllReplicasReady", "ok", LATER, 2)
    assert flipped[0]["lastTransitionTime"] == LATER and flipped[0]["status"] == "True"


def w(
    name: str, desired: int = 1, ready: int = 1, replicas: int | None = None, exists: bool = True
) -> cond.WorkloadState:
    return cond.WorkloadState(
        name=name,
        exists=exists,
        desired=desired,
        ready=ready,
        replicas=desired if replicas is None else replicas,
        updated=ready,
        generation=1,
        observed_generation=1,
    )


def test_readiness_evaluation() -> None:
    assert cond.evaluate([w("encoder"), w("gateway")]).ready
    missing = cond.evaluate([w("encoder"), w("gateway", exists=False)])
    assert (missing.ready, missing.progressing, missing.reason) == (False, True, "Creating")
    rolling = cond.evaluate([w("denoiser", desired=2, ready=1)])
    assert rolling.reason == "RollingOut" and "denoiser 1/2" in rolling.message
    dead = cond.evaluate([w("decoder", desired=1, ready=0, replicas=1)])
    assert dead.degraded and dead.reason == "NoReadyReplicas"
    conds = cond.apply_readiness([], dead, NOW, 3)
    assert {c["type"]: c["status"] for c in conds} == {
        "InvalidSpec": "False",
        "Ready": "False",
        "Progressing": "True",
        "Degraded": "True",
    }
    invalid = cond.apply_invalid(conds, ["spec.model.source: required"], LATER, 4)
    got = cond.get_condition(invalid, "InvalidSpec")
    assert got is not None and got["status"] == "True" and got["lastTransitionTime"] == LATER


def test_workload_state_from_object() -> None:
    state = cond.WorkloadState.from_object(
        "encoder",
        {
            "metadata": {"generation": 2},
            "status": {"replicas": 2, "readyReplicas": 1, "observedGeneration": 2},
        },
        2,
    )
    assert (state.replicas, state.ready, state.generation) == (2, 1, 2)
    assert not cond.WorkloadState.from_object("x", None, 1).exists


# the CRD


def crd_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    version = crd["spec"]["versions"][0]
    return crd, version


def test_crd_identity() -> None:
    crd, version = crd_schema()
    assert crd["metadata"]["name"] == "diffusionpipelines.disagfusion.io"
    assert crd["spec"]["group"] == "disagfusion.io" and crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == "DiffusionPipeline"
    assert crd["spec"]["names"]["shortNames"] == ["dfp"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Denoiser"] == ".status.stages.denoiser.readyReplicas"
    assert columns["Age"] == ".metadata.creationTimestamp"


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for key, sub in (schema.get("properties") or {}).items():
        out += _walk(sub, f"{path}.{key}")
    if "items" in schema:
        out += _walk(schema["items"], f"{path}[]")
    return out


def test_crd_schema_is_structural_and_matches_the_parser() -> None:
    _, version = crd_schema()
    root = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        # Structural: every node has a type unless it is int-or-string / preserved.
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert "$ref" not in node, path
    spec_schema = root["properties"]["spec"]
    stage = spec_schema["properties"]["stages"]["properties"]["denoiser"]
    rules = [r["rule"] for r in stage["x-kubernetes-validations"]]
    assert any("minReplicas <= self.maxReplicas" in r for r in rules)
    assert any("self.replicas <= self.maxReplicas" in r for r in rules)
    for key in (
        "image",
        "resources",
        "nodeSelector",
        "tolerations",
        "affinity",
        "env",
        "replicas",
        "minReplicas",
        "maxReplicas",
        "queueCapacity",
    ):
        assert key in stage["properties"], key
    model = spec_schema["properties"]["model"]
    assert model["required"] == ["source"]
    family = model["properties"]["family"]
    assert family["enum"] == [
        "auto",
        "unet",
        "sd3",
        "flux",
        "sdxl",
        "qwen-image",
        "wan",
        "wan-i2v",
        "mmdit",
    ]
    assert family["default"] == defaults_family() == "auto"
    assert "mmdit is the deprecated name of sd3" in family["description"]
    assert "model_index.json" in family["description"]
    source = model["properties"]["source"]["description"]
    for name in ("tiny-unet", "tiny-mmdit", "tiny-flux", "tiny-sdxl", "tiny-qwen-image"):
        assert f"builtin:{name}," in source, name
    assert spec_schema["properties"]["transport"]["properties"]["backend"]["default"] == "grpc"
    # The CRD's defaults are the parser's defaults.
    defaults = parse_spec(spec())
    gw = spec_schema["properties"]["gateway"]["properties"]
    assert gw["port"]["default"] == defaults.gateway.port
    assert gw["maxQueue"]["default"] == defaults.gateway.max_queue
    # No CRD default for spec.image: unset means the operator's worker image.
    image = spec_schema["properties"]["image"]
    assert "default" not in image and image["minLength"] == 1
    assert "operator's worker image" in image["description"]
    assert defaults.image == DEFAULT_IMAGE
    served = model["properties"]["servedName"]
    assert served["type"] == "string" and served["minLength"] == 1
    assert served["maxLength"] == MAX_SERVED_NAME and "default" not in served
    assert served["description"] == (
        "public model id the gateway reports and accepts; default: the model's display name"
    )
    assert (
        stage["properties"]["queueCapacity"]["default"]
        == defaults.stages["denoiser"].queue_capacity
    )
    status = root["properties"]["status"]["properties"]
    assert set(status["stages"]["properties"]["encoder"]["properties"]) == {
        "replicas",
        "readyReplicas",
        "desiredReplicas",
    }
    assert "endpoint" in status["gateway"]["properties"]


def test_operator_command_line() -> None:
    args = build_parser().parse_args(["operator", "--all-namespaces", "--metrics-port", "9090"])
    assert args.command == "operator" and args.all_namespaces and args.metrics_port == 9090
    args = build_parser().parse_args(["operator", "--namespace", "a", "--namespace", "b"])
    assert args.namespace == ["a", "b"] and not args.all_namespaces
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--namespace", "a", "--all-namespaces"])


def test_operator_prometheus_url_option() -> None:
    args = build_parser().parse_args(["operator", "--prometheus-url", "http://prom:9090"])
    assert args.prometheus_url == "http://prom:9090"
    assert build_parser().parse_args(["operator"]).prometheus_url is None


def test_scaling_conditions() -> None:
    active, limited, metrics = cond.scaling_checks("Active", "builtin:x", True, "", {})
    assert (active.status, active.reason) == (True, "Scaling")
    assert (limited.status, metrics.status) == (False, True)
    active, limited, metrics = cond.scaling_checks(
        "Active", "builtin:x", False, "Prometheus query failed: refused", {}
    )
    assert (active.status, active.reason) == (False, "HoldingSizes")
    assert metrics.status is False and "refused" in metrics.message
    active, limited, _ = cond.scaling_checks(
        "Advisory", "builtin:x", True, "", {"denoiser": "max", "encoder": "budget"}
    )
    assert (active.status, active.reason) == (False, "Advisory")
    assert (limited.status, limited.reason) == (True, "BudgetReached")
    assert "denoiser by max" in limited.message
    _, limited, _ = cond.scaling_checks("Active", "builtin:x", True, "", {"decoder": "max"})
    assert limited.reason == "MaxReplicasReached"
    assert cond.scaling_checks("Active", None, True, "", {})[0].reason == "NoProfile"

    checks = cond.scaling_checks("Active", "builtin:x", True, "", {})
    ready = cond.set_condition([], cond.READY, True, "AllReplicasReady", "ok", NOW)
    out = cond.apply_scaling(ready, checks, NOW, 3)
    assert [c["type"] for c in out] == ["Ready", *cond.SCALING_CONDITIONS]
    again = cond.apply_scaling(out, checks, LATER, 4)
    assert all(c["lastTransitionTime"] == NOW for c in again)
    assert [c["type"] for c in cond.without_scaling(again)] == ["Ready"]


def test_status_merge_patch_is_rfc7386() -> None:
    old = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert merge_patch(old, {"a": {"c": [3], "e": None}, "d": None}) == {"a": {"b": 1, "c": [3]}}
    assert merge_patch({"a": 1}, {"a": {"x": None, "y": 2}}) == {"a": {"y": 2}}
    assert old == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not modified in place


def test_operator_metric_names() -> None:
    from prometheus_client import generate_latest

    from disagfusion.operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    metrics.reconcile_total.labels(result="ok").inc()
    metrics.reconcile_errors.labels(reason="api_error").inc()
    metrics.reconcile_duration.observe(0.2)
    text = generate_latest(metrics.registry).decode()
    assert 'disagfusion_operator_reconcile_total{result="ok"} 1.0' in text
    assert 'disagfusion_operator_reconcile_errors_total{reason="api_error"} 1.0' in text
    assert "disagfusion_operator_reconcile_duration_seconds_bucket" in text
    metrics.scaling.desired.labels("ml", "sd", "denoiser").set(3)
    metrics.scaling.decisions.labels("ml", "sd", "denoiser", "up", "load", "true").inc()
    text = generate_latest(metrics.registry).decode()
    assert (
        'disagfusion_operator_desired_replicas{pipeline="sd",pipeline_namespace="ml",'
        'stage="denoiser"} 3.0'
    ) in text
    assert "disagfusion_operator_scaling_decisions_total{" in text
    metrics.scaling.forget("ml", "sd")
    assert (
        "disagfusion_operator_desired_replicas{" not in generate_latest(metrics.registry).decode()
    )
