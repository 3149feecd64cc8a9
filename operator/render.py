"""Render a DiffusionPipeline's children (pure): what the operator applies.

Per stage a headless Service and a StatefulSet per pool: the stage's own
`<name>-<stage>` for a stage without pools, `<name>-<stage>-<pool>` for each
named pool, all governed by the stage's Service, so every pod has the stable
DNS name `<statefulset>-<i>.<name>-<stage>.<ns>.svc`. Then the gateway
Deployment and Service, a ConfigMap with the topology the gateway reads, and
(spec.networkPolicy.enabled) a NetworkPolicy per component (netpol.py). Every child
carries an input-hash annotation so an unchanged child is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from disagfusion.operator.spec import (
    STAGES,
    TLS_KEYS,
    TLS_MOUNT,
    PipelineSpec,
    PoolSpec,
    StageSpec,
)

GROUP = "disagfusion.io"
VERSION = "v1alpha1"
KIND = "DiffusionPipeline"
PLURAL = "diffusionpipelines"
HASH_ANNOTATION = "disagfusion.io/input-hash"
GRPC_PORT = 50051
# The gateway's Stage service, where the stages deliver results (`--result-port`): apart
# from the clients' GRPC_PORT so a NetworkPolicy can admit only the pipeline's stages.
RESULT_PORT = 50052
HTTP_PORT = 8080
TORCH_STORE_PORT = 29500  # the torch transport's TCPStore, where senders rendezvous
GPU_RESOURCE = "nvidia.com/gpu"
TOPOLOGY_DIR = "/etc/disagfusion"
TOPOLOGY_FILE = "topology.json"
PRESTOP_SLEEP_S = 5
# The worker's own drain budget (`--drain-timeout`) plus the preStop sleep and slack.
DRAIN_TIMEOUT_S = 120
TERMINATION_GRACE_S = DRAIN_TIMEOUT_S + PRESTOP_SLEEP_S + 15
RUN_AS_USER = 1000
# The gateway's job store: the Redis URL's variable (read when there is no --job-store)
# and the SQLite volume's name.
JOB_STORE_ENV = "DISAGFUSION_JOB_STORE"
JOB_VOLUME = "jobs"
# spec.transport.tls: the Secret's volume in every worker and gateway pod (at TLS_MOUNT),
# readable by the pod's group (fsGroup) only.
TLS_VOLUME = "tls"
TLS_FILE_MODE = 0o440
# The pod labels of a named pool (the stage's default pool carries neither).
POOL_LABEL = "disagfusion.io/pool"
ACCELERATOR_LABEL = "disagfusion.io/accelerator"


@dataclass(frozen=True)
class Owner:
    """The DiffusionPipeline the children belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class Child:
    """One rendered object: API coordinates plus the full body to apply."""

    api_version: str
    kind: str
    name: str
    body: dict[str, Any]

    @property
    def input_hash(self) -> str:
        return str(self.body["metadata"]["annotations"][HASH_ANNOTATION])


def stage_name(pipeline: str, stage: str) -> str:
    return f"{pipeline}-{stage}"


def pool_name(pipeline: str, stage: StageSpec, pool: PoolSpec) -> str:
    """A pool's StatefulSet: the stage's own name for a stage without pools."""
    base = stage_name(pipeline, stage.name)
    return f"{base}-{pool.name}" if stage.pools else base


def gateway_name(pipeline: str) -> str:
    return f"{pipeline}-gateway"


def topology_name(pipeline: str) -> str:
    return f"{pipeline}-topology"


def stage_addresses(pipeline: str, namespace: str, stage: StageSpec) -> list[str]:
    """Every pod a stage may run, pool by pool up to each pool's maxReplicas: the
    stage's Service governs every pool's StatefulSet, so each has a DNS name under it."""
    svc = stage_name(pipeline, stage.name)
    return [
        f"{pool_name(pipeline, stage, pool)}-{i}.{svc}.{namespace}.svc:{GRPC_PORT}"
        for pool in stage.effective_pools
        for i in range(pool.max_replicas)
    ]


def topology(pipeline: str, namespace: str, spec: PipelineSpec) -> dict[str, list[str]]:
    """What `disagfusion gateway --topology` reads: every stage's instance addresses."""
    return {stage: stage_addresses(pipeline, namespace, spec.stages[stage]) for stage in STAGES}


def labels(pipeline: str, component: str) -> dict[str, str]:
    out = selector_labels(pipeline, component)
    out.update(
        {
            "app.kubernetes.io/managed-by": "disagfusion-operator",
            "app.kubernetes.io/part-of": "disagfusion",
        }
    )
    return out


def selector_labels(pipeline: str, component: str) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "disagfusion",
        "app.kubernetes.io/instance": pipeline,
        "app.kubernetes.io/component": component,
        "disagfusion.io/pipeline": pipeline,
    }
    if component in STAGES:
        out["disagfusion.io/stage"] = component
    return out


def input_hash(body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pool_labels(stage: StageSpec, pool: PoolSpec) -> dict[str, str]:
    """What tells one pool's pods from another's (none for a stage without pools)."""
    if not stage.pools:
        return {}
    return {POOL_LABEL: pool.name, ACCELERATOR_LABEL: pool.accelerator or ""}


def _finish(
    owner: Owner,
    component: str,
    api_version: str,
    kind: str,
    name: str,
    body: dict[str, Any],
    extra_labels: Mapping[str, str] | None = None,
) -> Child:
    body = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels(owner.name, component) | dict(extra_labels or {}),
            "ownerReferences": [owner.reference()],
        },
        **body,
    }
    body["metadata"]["annotations"] = {HASH_ANNOTATION: input_hash(body)}
    return Child(api_version, kind, name, body)


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _probes(port: int) -> dict[str, Any]:
    return {
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": port},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": port},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        # Model loading may take minutes: liveness starts counting once /healthz answers.
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": port},
            "periodSeconds": 5,
            "failureThreshold": 120,
        },
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
    }


def _scrape_annotations(port: int) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def _model_env(spec: PipelineSpec) -> list[dict[str, Any]]:
    """Only variables something in the pod reads (the rest of the spec travels as args)."""
    env: list[dict[str, Any]] = []
    if spec.model.volume is not None:  # the Hugging Face hub: weights from the volume only
        env += [
            {"name": "HF_HOME", "value": spec.model.mount_path},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
        ]
    # The builtin models' cache (worker/models/builtin.py), on the writable /tmp volume.
    env.append({"name": "DISAGFUSION_CACHE", "value": "/tmp/disagfusion-cache"})
    return env


def _model_volumes(spec: PipelineSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if spec.model.volume is not None:
        volumes.append({"name": "model", **spec.model.volume})
        mounts.append({"name": "model", "mountPath": spec.model.mount_path, "readOnly": True})
    return volumes, mounts


def worker_args(
    pipeline: str,
    namespace: str,
    spec: PipelineSpec,
    stage: StageSpec,
    pool: PoolSpec | None = None,
) -> list[str]:
    """A stage worker's args; `pool` (default: the stage's first) decides the device."""
    pool = pool or stage.effective_pools[0]
    args = [
        "worker",
        "--stage",
        stage.name,
        "--model",
        spec.model.source,
        "--port",
        str(GRPC_PORT),
        "--http-port",
        str(HTTP_PORT),
        "--host",
        "0.0.0.0",
        "--pipeline",
        pipeline,
        "--queue-capacity",
        str(stage.queue_capacity),
        "--drain-timeout",
        str(DRAIN_TIMEOUT_S),
    ]
    nxt = STAGES.index(stage.name) + 1
    if nxt < len(STAGES):
        addrs = stage_addresses(pipeline, namespace, spec.stages[STAGES[nxt]])
        args += ["--next", ",".join(addrs)]
    if _gpus(pool.resources):
        args += ["--device", "cuda"]
    if spec.model.dtype != "auto":
        args += ["--dtype", spec.model.dtype]
    args += _batching_args(stage) + _family_args(spec) + _transport_args(spec)
    return args + _tls_args(spec)


def _batching_args(stage: StageSpec) -> list[str]:
    """A stage worker's `--max-batch`, `--batch-wait-ms` and `--queue-order`, each only
    when set (the stage's or the pipeline's); unset, the worker's own default applies."""
    b = stage.batching
    args = [] if b.max_batch is None else ["--max-batch", str(b.max_batch)]
    if b.batch_wait_ms is not None:
        args += ["--batch-wait-ms", f"{b.batch_wait_ms:g}"]
    if stage.queue_order is not None:
        args += ["--queue-order", stage.queue_order]
    return args


def _transport_args(spec: PipelineSpec) -> list[str]:
    """`--transport NAME` and its options; none for the default (grpc, no options).
    The torch backend's store gets a fixed port so it can be named in the pod."""
    t = spec.transport
    options = dict(t.options)
    if t.backend == "torch":
        options.setdefault("store_port", str(TORCH_STORE_PORT))
    if t.backend == "grpc" and not options:
        return []
    args = ["--transport", t.backend]
    for key, value in sorted(options.items()):
        args += ["--transport-option", f"{key}={value}"]
    return args


def _tls_args(spec: PipelineSpec) -> list[str]:
    """`--tls-cert/--tls-key/--tls-ca` from the mounted Secret; none without spec.transport.tls."""
    tls = spec.transport.tls
    if tls is None:
        return []
    cert, key, ca = (f"{TLS_MOUNT}/{name}" for name in TLS_KEYS)
    args = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]
    return args + (["--tls-allow-plaintext-data"] if tls.allow_plaintext_data else [])


def _tls_volumes(spec: PipelineSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The Secret's volume and mount. `items` names the three keys, so a Secret that
    lacks one fails the pod's start with an event saying which, not a worker error."""
    tls = spec.transport.tls
    if tls is None:
        return [], []
    secret = {
        "secretName": tls.secret_name,
        "items": [{"key": k, "path": k} for k in TLS_KEYS],
        "defaultMode": TLS_FILE_MODE,
    }
    return (
        [{"name": TLS_VOLUME, "secret": secret}],
        [{"name": TLS_VOLUME, "mountPath": TLS_MOUNT, "readOnly": True}],
    )


def _transport_ports(spec: PipelineSpec) -> list[dict[str, Any]]:
    if spec.transport.backend != "torch":
        return []
    port = int(spec.transport.options.get("store_port", TORCH_STORE_PORT))
    return [{"name": "torch-store", "containerPort": port}]


def _family_args(spec: PipelineSpec) -> list[str]:
    """`--family NAME` for a pinned family (the worker then checks model_index.json's
    pipeline class); none for auto, where it reads the family from model_index.json."""
    return [] if spec.model.family == "auto" else ["--family", spec.model.family]


def _gpus(resources: dict[str, Any]) -> bool:
    for section in ("limits", "requests"):
        value = (resources.get(section) or {}).get(GPU_RESOURCE)
        if value not in (None, 0, "0"):
            return True
    return False


def _resources(resources: dict[str, Any]) -> dict[str, Any]:
    """Extended resources (GPUs) must sit in limits; mirror a GPU request there."""
    out = {k: dict(v) for k, v in resources.items() if isinstance(v, dict)}
    gpu = (out.get("requests") or {}).get(GPU_RESOURCE)
    if gpu is not None:
        out.setdefault("limits", {}).setdefault(GPU_RESOURCE, gpu)
    return out


def pool_replicas(stage: StageSpec, total: int) -> dict[str, int]:
    """A stage's size split over its pools: each pool's own replicas, the difference
    to `total` added to the pools in order (up to each maxReplicas) or taken from them
    in reverse order (down to each minReplicas). `total` equal to the spec's sum gives
    every pool its own replicas, so a user's per-pool sizes render as written."""
    pools = stage.effective_pools
    if not stage.pools:
        return {pools[0].name: total}
    sizes = {p.name: p.replicas for p in pools}
    left = total - sum(sizes.values())
    for pool in pools if left > 0 else tuple(reversed(pools)):
        if left > 0:
            step = min(left, pool.max_replicas - sizes[pool.name])
        else:
            step = max(left, pool.min_replicas - sizes[pool.name])
        sizes[pool.name] += step
        left -= step
    return sizes


def stage_pool_sizes(
    stage: StageSpec, total: int, pools: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Each pool's size: `pools` when it names every pool (each within its own bounds),
    else `total` split in list order (pool_replicas)."""
    names = [p.name for p in stage.effective_pools]
    if stage.pools and pools is not None and set(pools) == set(names):
        return {
            p.name: max(p.min_replicas, min(p.max_replicas, int(pools[p.name])))
            for p in stage.pools
        }
    return pool_replicas(stage, total)


def render_stage(
    owner: Owner,
    spec: PipelineSpec,
    stage: StageSpec,
    replicas: int | None = None,
    pools: Mapping[str, int] | None = None,
) -> list[Child]:
    """A stage's StatefulSets (one per pool) and its one headless Service, which selects
    every pool's pods; `replicas` overrides the spec's size of the whole stage, `pools`
    (pool name -> size, the autoscaler's per-pool sizes) that of each pool."""
    name = stage_name(owner.name, stage.name)
    sizes = stage_pool_sizes(stage, stage.replicas if replicas is None else replicas, pools)
    children = [
        _render_pool(owner, spec, stage, pool, sizes[pool.name]) for pool in stage.effective_pools
    ]
    svc = _finish(
        owner,
        stage.name,
        "v1",
        "Service",
        name,
        {
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": selector_labels(owner.name, stage.name),
                "ports": [
                    {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc"},
                    {"name": "http", "port": HTTP_PORT, "targetPort": "http"},
                ],
            },
        },
    )
    return [*children, svc]


def _render_pool(
    owner: Owner, spec: PipelineSpec, stage: StageSpec, pool: PoolSpec, replicas: int
) -> Child:
    """One pool's StatefulSet, governed by the stage's Service (its pods' DNS domain)."""
    volumes, mounts = _model_volumes(spec)
    tls_volumes, tls_mounts = _tls_volumes(spec)
    volumes, mounts = volumes + tls_volumes, mounts + tls_mounts
    container: dict[str, Any] = {
        "name": stage.name,
        "image": stage.image,
        "args": worker_args(owner.name, owner.namespace, spec, stage, pool),
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT},
            {"name": "http", "containerPort": HTTP_PORT},
            *_transport_ports(spec),
        ],
        "env": _model_env(spec) + stage.env,
        "resources": _resources(pool.resources),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
        **_probes(HTTP_PORT),
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "fsGroup": RUN_AS_USER},
        "volumes": volumes,
    }
    if pool.node_selector:
        pod_spec["nodeSelector"] = pool.node_selector
    if pool.tolerations:
        pod_spec["tolerations"] = pool.tolerations
    if pool.affinity:
        pod_spec["affinity"] = pool.affinity
    own = pool_labels(stage, pool)
    return _finish(
        owner,
        stage.name,
        "apps/v1",
        "StatefulSet",
        pool_name(owner.name, stage, pool),
        {
            "spec": {
                "serviceName": stage_name(owner.name, stage.name),
                "replicas": replicas,
                "podManagementPolicy": "Parallel",
                # Each pool selects only its own pods: two StatefulSets sharing a
                # selector would fight over them.
                "selector": {"matchLabels": selector_labels(owner.name, stage.name) | own},
                "template": {
                    "metadata": {
                        "labels": labels(owner.name, stage.name) | own,
                        "annotations": _scrape_annotations(HTTP_PORT),
                    },
                    "spec": pod_spec,
                },
            },
        },
        own,
    )


def _job_store(
    spec: PipelineSpec,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The gateway's job store: (env, volumes, mounts, args).

    SQLite: `--data-dir` on a read-write volume, the claim or an emptyDir. Redis: the
    URL (it may hold a password) from its Secret as DISAGFUSION_JOB_STORE, which the
    gateway reads when there is no `--job-store`; it never appears in the pod spec.
    """
    store = spec.gateway.job_store
    if store.type == "redis":
        ref = store.url_secret_ref
        if ref is None:  # parse_spec refuses such a spec
            raise ValueError("a redis job store needs its URL's Secret")
        secret = {"secretKeyRef": {"name": ref.name, "key": ref.key}}
        return [{"name": JOB_STORE_ENV, "valueFrom": secret}], [], [], []
    source: dict[str, Any] = (
        {"emptyDir": {}}
        if store.claim_name is None
        else {"persistentVolumeClaim": {"claimName": store.claim_name}}
    )
    return (
        [],
        [{"name": JOB_VOLUME, **source}],
        [{"name": JOB_VOLUME, "mountPath": store.mount_path}],
        ["--data-dir", store.mount_path],
    )


def _gateway_strategy(spec: PipelineSpec) -> dict[str, Any]:
    """Recreate when the SQLite file outlives the pod on a claim: during a rolling update
    the old and the new pod would write it together. `rollingUpdate: None` removes the
    server's default from a Deployment that was RollingUpdate (a JSON merge patch
    keeps it otherwise, and the API server refuses it with Recreate)."""
    store = spec.gateway.job_store
    if store.type == "sqlite" and store.claim_name is not None:
        return {"type": "Recreate", "rollingUpdate": None}
    return {"type": "RollingUpdate"}


def render_gateway(owner: Owner, spec: PipelineSpec) -> list[Child]:
    gw = spec.gateway
    name = gateway_name(owner.name)
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        *_model_env(spec),
    ]
    if gw.api_key_secret_ref is not None:
        env.append(
            {
                "name": "DISAGFUSION_API_KEY",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": gw.api_key_secret_ref.name,
                        "key": gw.api_key_secret_ref.key,
                    }
                },
            }
        )
    volumes, mounts = _model_volumes(spec)
    volumes.append({"name": "topology", "configMap": {"name": topology_name(owner.name)}})
    mounts.append({"name": "topology", "mountPath": TOPOLOGY_DIR, "readOnly": True})
    store_env, store_volumes, store_mounts, store_args = _job_store(spec)
    env += store_env
    volumes += store_volumes
    mounts += store_mounts
    tls_volumes, tls_mounts = _tls_volumes(spec)
    volumes += tls_volumes
    mounts += tls_mounts
    args = [
        "gateway",
        "--model",
        spec.model.source,
        "--host",
        "0.0.0.0",
        "--port",
        str(gw.port),
        "--grpc-port",
        str(GRPC_PORT),
        "--result-port",
        str(RESULT_PORT),
        # The stages deliver results to <pod IP>:RESULT_PORT, never through the Service.
        "--advertise-host",
        "$(POD_IP)",
        "--topology",
        f"@{TOPOLOGY_DIR}/{TOPOLOGY_FILE}",
        "--pipeline",
        owner.name,
        "--max-queue",
        str(gw.max_queue),
        "--request-timeout",
        f"{gw.request_timeout_seconds:g}",
    ]
    args += [
        *store_args,
        "--video-retention",
        str(gw.video_retention_seconds),
        "--video-timeout",
        str(gw.video_timeout_seconds),
    ]
    if spec.model.served_name is not None:
        args += ["--served-model-name", spec.model.served_name]
    if spec.slo is not None:  # the deadline the stages' EDF queue order sorts by
        args += ["--slo", spec.slo]
    args += _family_args(spec) + _transport_args(spec) + _tls_args(spec)
    container: dict[str, Any] = {
        "name": "gateway",
        "image": gw.image,
        "args": args,
        "ports": [
            {"name": "http", "containerPort": gw.port},
            {"name": "grpc", "containerPort": GRPC_PORT},
            {"name": "results", "containerPort": RESULT_PORT},
            *_transport_ports(spec),
        ],
        "env": env,
        "securityContext": _security_context(),
        "volumeMounts": mounts,
        **_probes(gw.port),
    }
    # The topology is part of the pod's inputs: a change rolls the gateway.
    topo_hash = input_hash(topology(owner.name, owner.namespace, spec))
    deploy = _finish(
        owner,
        "gateway",
        "apps/v1",
        "Deployment",
        name,
        {
            "spec": {
                "replicas": gw.replicas,
                "strategy": _gateway_strategy(spec),
                "selector": {"matchLabels": selector_labels(owner.name, "gateway")},
                "template": {
                    "metadata": {
                        "labels": labels(owner.name, "gateway"),
                        "annotations": {
                            **_scrape_annotations(gw.port),
                            "disagfusion.io/topology-hash": topo_hash,
                        },
                    },
                    "spec": {
                        "containers": [container],
                        "terminationGracePeriodSeconds": int(gw.request_timeout_seconds)
                        + PRESTOP_SLEEP_S
                        + 15,
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": RUN_AS_USER,
                            "fsGroup": RUN_AS_USER,
                        },
                        "volumes": volumes,
                    },
                },
            },
        },
    )
    svc = _finish(
        owner,
        "gateway",
        "v1",
        "Service",
        name,
        {
            "spec": {
                "type": gw.service_type,
                "selector": selector_labels(owner.name, "gateway"),
                "ports": [{"name": "http", "port": gw.port, "targetPort": "http"}],
            },
        },
    )
    return [deploy, svc]


def render_topology(owner: Owner, spec: PipelineSpec) -> Child:
    """The gateway's `--topology` file. It lists every stage's addresses up to maxReplicas,
    never the current sizes, so a scale leaves it (and the gateway's pods) alone."""
    data = {TOPOLOGY_FILE: json.dumps(topology(owner.name, owner.namespace, spec), indent=1)}
    return _finish(owner, "topology", "v1", "ConfigMap", topology_name(owner.name), {"data": data})


def effective_replicas(
    spec: PipelineSpec, replicas: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Per stage: the override (the autoscaler's size) within [min, max], else the spec's."""
    out = {}
    for s in STAGES:
        st = spec.stages[s]
        wanted = (replicas or {}).get(s)
        out[s] = (
            st.replicas if wanted is None else max(st.min_replicas, min(st.max_replicas, wanted))
        )
    return out


def gateway_endpoint(owner: Owner, spec: PipelineSpec) -> str:
    return f"http://{gateway_name(owner.name)}.{owner.namespace}.svc:{spec.gateway.port}"
