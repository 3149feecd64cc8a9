"""DiffusionPipeline spec: parse, default and validate (pure).

The CRD's OpenAPI schema and CEL rules say the same things, but a cluster may
not enforce them (old API servers, `--validate=false`, emulators), so the
operator checks every rule itself and reports the problems by field path.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from disagfusion import __version__
from disagfusion.scheduling.builtin_profiles import BUILTIN_PREFIX, builtin_profile
from disagfusion.scheduling.profile import Profile, ProfileError, parse_profile, parse_slo
from disagfusion.scheduling.scaling import MODES, Knobs
from disagfusion.scheduling.stages import STAGES

# The worker image of a pipeline without spec.image when the operator is given none:
# the chart's workerImage default (no registry publishes it; the README builds it).
# The operator passes its own (DISAGFUSION_WORKER_IMAGE) in parse_spec's SpecDefaults.
DEFAULT_IMAGE = f"disagfusion-worker:{__version__}"
# spec.model.servedName: an OpenAI-style model id, short enough for logs and labels.
MAX_SERVED_NAME = 128
# spec.model.family: a model family (`disagfusion worker/gateway --family NAME`), or auto:
# no flag, the worker reads model_index.json. The CRD's enum and the worker's family
# registry name the same families (tests/operator/test_examples.py, the worker tests).
FAMILIES = ("auto", "unet", "sd3", "flux", "sdxl", "qwen-image", "wan", "wan-i2v")
# Deprecated family names still accepted (pipelines applied with them keep reconciling),
# and the family each means now.
FAMILY_ALIASES = {"mmdit": "sd3"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# spec.transport.backend: how tensor bytes move between pods (`--transport NAME` on every
# worker and the gateway); the keys each backend's options may set (`--transport-option`).
# The worker's transport registry names the same (tests/worker/test_transports.py).
TRANSPORT_OPTIONS: dict[str, tuple[str, ...]] = {
    "grpc": ("chunk_bytes",),
    "shm": ("inline_below", "dir"),
    "torch": ("inline_below", "host", "store_port", "timeout_s", "connect_timeout_s"),
    "nixl": ("inline_below", "ucx_tls", "poll_sleep_us", "timeout_s"),
}
TRANSPORTS = tuple(TRANSPORT_OPTIONS)
# spec.transport.tls: the Secret (tls.crt, tls.key, ca.crt) every worker and gateway pod
# mounts here for mTLS between stages (`--tls-cert/--tls-key/--tls-ca`).
TLS_MOUNT = "/etc/disagfusion-tls"
TLS_KEYS = ("tls.crt", "tls.key", "ca.crt")
# Backends whose tensor bytes bypass the mTLS gRPC stream over the network: refused
# with TLS unless spec.transport.tls.allowPlaintextData (shm never leaves the host).
PLAINTEXT_BACKENDS = ("torch", "nixl")
# A Secret's name: a DNS subdomain.
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
MAX_DNS_SUBDOMAIN = 253
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
DEFAULT_QUEUE_CAPACITY = 2
# spec.queueOrder / spec.stages.<stage>.queueOrder (`--queue-order`): arrival order, or
# earliest SLO deadline first (the gateway stamps the deadlines with `--slo`).
QUEUE_ORDERS = ("fifo", "edf")
# The families whose gateway serves the Videos API (durable jobs in a job store).
VIDEO_FAMILIES = ("wan", "wan-i2v")
# spec.gateway.jobStore: SQLite files in a directory (`--data-dir`) or a Redis the user runs.
JOB_STORE_TYPES = ("sqlite", "redis")
DEFAULT_JOB_STORE_MOUNT = "/data"
DEFAULT_REDIS_URL_KEY = "url"
# Paths the gateway container already mounts something at (render.py: the writable
# /tmp and the topology ConfigMap); a job store mounted there would clash.
GATEWAY_MOUNTED_PATHS = ("/tmp", "/etc/disagfusion", TLS_MOUNT)
# spec.gateway.videoRetentionSeconds / videoTimeoutSeconds (`--video-retention`,
# `--video-timeout`): the CRD's defaults and minimums, and the gateway CLI's defaults.
DEFAULT_VIDEO_RETENTION_S = 86400
MIN_VIDEO_RETENTION_S = 60
DEFAULT_VIDEO_TIMEOUT_S = 3600
# spec.stages.<stage>.pools[].name: a DNS label short enough that
# `<pipeline>-<stage>-<pool>-<ordinal>` stays a valid pod hostname.
POOL_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_POOL_NAME = 12
# spec.stages.<stage>.pools[].accelerator: a label value (pods carry it).
ACCELERATOR_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
MAX_ACCELERATOR_NAME = 63
MAX_POOLS = 8
# The pool a stage without spec.stages.<stage>.pools is: its own fields, rendered as
# the StatefulSet <pipeline>-<stage> (the name it had before pools existed).
DEFAULT_POOL = "default"
# A stage's fields that each pool sets for itself; with pools, the stage must not.
# (stage replicas is defaulted to 1 by the CRD, so 1 counts as unset.)
POOL_FIELDS = ("minReplicas", "maxReplicas", "resources", "nodeSelector", "tolerations", "affinity")
# spec.networkPolicy.metricsFrom: NetworkPolicyPeers (label selectors, ipBlocks) checked
# as the API server would, so a bad one is reported on the pipeline, not as a failed apply.
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
MAX_PEERS = 16
MAX_EXPRESSIONS = 16  # the CRD's maxItems, also of an ipBlock's except
MAX_VALUES = 64
SQLITE_ONE_REPLICA = (
    "a SQLite job store serves one gateway replica; use type: redis for several"
    " (spec.gateway.jobStore.type)"
)


class SpecError(ValueError):
    """A spec that cannot be served; `problems` name the fields."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ModelSpec:
    source: str
    revision: str | None = None
    family: str = "auto"  # a FAMILIES name (a deprecated one is replaced by what it means)
    dtype: str = "auto"
    volume: dict[str, Any] | None = None
    mount_path: str = "/models"
    served_name: str | None = None  # None: the gateway reports the model's display name


@dataclass(frozen=True)
class BatchingSpec:
    """spec.batching (`--max-batch`, `--batch-wait-ms`); None: the flag is not passed
    and the worker's own default applies (a batch size from the model and device)."""

    max_batch: int | None = None  # >= 1; 1 turns batching off
    batch_wait_ms: float | None = None  # >= 0; 0 batches only what is already queued

    def over(self, base: BatchingSpec) -> BatchingSpec:
        """These settings, each unset one taken from `base` (a stage over the pipeline)."""
        return BatchingSpec(
            max_batch=base.max_batch if self.max_batch is None else self.max_batch,
            batch_wait_ms=base.batch_wait_ms if self.batch_wait_ms is None else self.batch_wait_ms,
        )


@dataclass(frozen=True)
class PoolSpec:
    """One accelerator type serving a stage: its own size bounds and scheduling."""

    name: str
    accelerator: str | None = None  # None: the default pool (spec.autoscaling.accelerators)
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 1
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    """A stage. With `pools` (spec.stages.<stage>.pools) the size fields are the pools'
    sums and the scheduling fields are empty; without, the stage is its one pool."""

    name: str
    image: str
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 1
    queue_capacity: int = DEFAULT_QUEUE_CAPACITY
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    env: list[dict[str, Any]] = field(default_factory=list)
    # What this stage's workers run with: its own settings over the pipeline's.
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    queue_order: str | None = None  # a QUEUE_ORDERS name; None: the worker's default
    pools: tuple[PoolSpec, ...] = ()  # spec.stages.<stage>.pools; () : the single pool

    @property
    def effective_pools(self) -> tuple[PoolSpec, ...]:
        """What the stage renders: its named pools, else its own fields as one pool."""
        if self.pools:
            return self.pools
        return (
            PoolSpec(
                name=DEFAULT_POOL,
                replicas=self.replicas,
                min_replicas=self.min_replicas,
                max_replicas=self.max_replicas,
                resources=self.resources,
                node_selector=self.node_selector,
                tolerations=self.tolerations,
                affinity=self.affinity,
            ),
        )


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str = "api-key"


@dataclass(frozen=True)
class JobStoreSpec:
    """spec.gateway.jobStore: where the Videos API's jobs and finished videos live.

    sqlite: files in `mount_path` (`--data-dir`), on the PersistentVolumeClaim
    `claim_name` or, without one, an emptyDir that dies with the pod; one gateway
    replica. redis: the URL comes from the Secret key `url_secret_ref` as the
    gateway's DISAGFUSION_JOB_STORE, so it never shows in the pod spec.
    """

    type: str = "sqlite"
    claim_name: str | None = None
    mount_path: str = DEFAULT_JOB_STORE_MOUNT
    url_secret_ref: SecretKeyRef | None = None

    @property
    def ephemeral(self) -> bool:
        """Jobs and videos are lost with the gateway pod (SQLite in an emptyDir)."""
        return self.type == "sqlite" and self.claim_name is None


@dataclass(frozen=True)
class GatewaySpec:
    image: str
    replicas: int = 1
    service_type: str = "ClusterIP"
    port: int = 8000
    api_key_secret_ref: SecretKeyRef | None = None
    max_queue: int = 32
    request_timeout_seconds: float = 300.0
    job_store: JobStoreSpec = field(default_factory=JobStoreSpec)
    video_retention_seconds: int = DEFAULT_VIDEO_RETENTION_S
    video_timeout_seconds: int = DEFAULT_VIDEO_TIMEOUT_S


@dataclass(frozen=True)
class TlsSpec:
    """spec.transport.tls: mTLS between the gateway and the stages, from one Secret
    (tls.crt, tls.key, ca.crt) mounted in every pod; its certificate must carry the
    DNS SAN `disagfusion-peer` (what every peer checks, worker/security/tls.py)."""

    secret_name: str
    allow_plaintext_data: bool = False  # torch/nixl tensor bytes bypass TLS


@dataclass(frozen=True)
class TransportSpec:
    backend: str = "grpc"
    options: dict[str, str] = field(default_factory=dict)
    tls: TlsSpec | None = None  # None: plaintext gRPC (the default)


@dataclass(frozen=True)
class NetworkPolicySpec:
    """spec.networkPolicy: the operator renders a NetworkPolicy per component (netpol.py).
    `metrics_from`: the NetworkPolicyPeers admitted to the stage workers' HTTP port
    (/metrics, /healthz, /readyz), e.g. Prometheus' namespace (the operator's default
    when the spec has none); none: nobody. `probes_from`: the operator's, also admitted."""

    enabled: bool = True
    metrics_from: list[dict[str, Any]] = field(default_factory=list)
    probes_from: list[dict[str, Any]] = field(default_factory=list)  # SpecDefaults'

    @property
    def http_from(self) -> list[dict[str, Any]]:
        """Every peer admitted to the stage workers' HTTP port."""
        return [*self.metrics_from, *(p for p in self.probes_from if p not in self.metrics_from)]


@dataclass(frozen=True)
class SpecDefaults:
    """What a spec gets from the operator's installation (the chart's values, passed
    in because this module reads no environment) where it does not say itself."""

    image: str = DEFAULT_IMAGE  # a pipeline without spec.image runs it
    # spec.networkPolicy.metricsFrom of a spec without one (networkPolicy.metricsFrom)
    metrics_from: list[dict[str, Any]] = field(default_factory=list)
    # Admitted to every stage worker's HTTP port whatever the spec says: where kubelet
    # probes come from on CNIs that do not exempt them (networkPolicy.probesFrom).
    probes_from: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class AutoscalingSpec:
    """spec.autoscaling; the defaults are the CRD's (and scaling.Knobs')."""

    mode: str = "Disabled"
    prometheus_url: str | None = None  # None: the operator's --prometheus-url
    profile_name: str | None = None  # "builtin:NAME" or the inline profile's name
    profile: Profile | None = None  # None: no profile given, the autoscaler cannot size
    accelerators: dict[str, str] = field(default_factory=dict)
    knobs: Knobs = field(default_factory=lambda: Knobs(mode="Disabled"))


@dataclass(frozen=True)
class PipelineSpec:
    model: ModelSpec
    image: str
    stages: dict[str, StageSpec]
    transport: TransportSpec
    gateway: GatewaySpec
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)
    # The pipeline-wide spec.batching and spec.queueOrder (each stage's are in its StageSpec).
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    queue_order: str | None = None
    network_policy: NetworkPolicySpec = field(default_factory=NetworkPolicySpec)

    @property
    def autoscaling_mode(self) -> str:
        return self.autoscaling.mode

    @property
    def slo(self) -> str | None:
        """The SLO the gateway stamps deadlines with (`--slo`): the one the autoscaler
        sizes for, spec.autoscaling.slo or else the profile's default; None: neither."""
        a = self.autoscaling
        return a.knobs.slo or (a.profile.default_slo if a.profile is not None else None)


class _Reader:
    """Collects problems while reading typed fields out of plain dicts."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def obj(self, data: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problems.append(f"{path}: must be an object")
            return {}
        return dict(value)

    def str_(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        default: str | None = None,
        choices: tuple[str, ...] = (),
        max_length: int | None = None,
    ) -> str | None:
        value = data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.problems.append(f"{path}: must be a non-empty string")
            return default
        if max_length is not None and len(value) > max_length:
            self.problems.append(f"{path}: at most {max_length} characters, got {len(value)}")
            return default
        if choices and value not in choices:
            self.problems.append(f"{path}: must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def int_(
        self, data: Mapping[str, Any], key: str, path: str, default: int, minimum: int = 0
    ) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{path}: must be an integer")
            return default
        if value < minimum:
            self.problems.append(f"{path}: must be >= {minimum}, got {value}")
            return default
        return value

    def list_(self, data: Mapping[str, Any], key: str, path: str) -> list[dict[str, Any]]:
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            self.problems.append(f"{path}: must be a list of objects")
            return []
        return [dict(v) for v in value]

    def str_map(self, data: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
        value = self.obj(data, key, path)
        if not all(isinstance(v, str) for v in value.values()):
            self.problems.append(f"{path}: values must be strings")
            return {}
        return value


def _transport(r: _Reader, t: Mapping[str, Any]) -> TransportSpec:
    backend = r.str_(t, "backend", "spec.transport.backend", "grpc", TRANSPORTS) or "grpc"
    options = r.str_map(t, "options", "spec.transport.options")
    known = TRANSPORT_OPTIONS.get(backend, ())
    for key in sorted(set(options) - set(known)):
        r.problems.append(
            f"spec.transport.options.{key}: not an option of the {backend} transport"
            f" (it has: {', '.join(known)})"
        )
    for key, check in _NUMERIC_OPTIONS.items():
        if key in options and not check(options[key]):
            r.problems.append(f"spec.transport.options.{key}: invalid value {options[key]!r}")
            options = {k: v for k, v in options.items() if k != key}
    return TransportSpec(backend=backend, options=options, tls=_tls(r, t, backend))


def _tls(r: _Reader, t: Mapping[str, Any], backend: str) -> TlsSpec | None:
    p = "spec.transport.tls"
    if t.get("tls") is None:
        return None
    raw = r.obj(t, "tls", p)
    for extra in sorted(set(raw) - {"secretName", "allowPlaintextData"}):
        r.problems.append(f"{p}.{extra}: unknown field (tls has secretName, allowPlaintextData)")
    name = r.str_(raw, "secretName", f"{p}.secretName", max_length=MAX_DNS_SUBDOMAIN)
    if name is None:
        if "secretName" not in raw:
            r.problems.append(
                f"{p}.secretName: required (a Secret with {', '.join(TLS_KEYS)} in the"
                " pipeline's namespace)"
            )
        return None
    if not DNS_SUBDOMAIN.fullmatch(name):
        r.problems.append(f"{p}.secretName: {name!r} is not a valid Secret name (a DNS subdomain)")
    allow = raw.get("allowPlaintextData", False)
    if not isinstance(allow, bool):
        r.problems.append(f"{p}.allowPlaintextData: must be a boolean")
        allow = False
    if backend in PLAINTEXT_BACKENDS and not allow:
        r.problems.append(
            f"{p}.allowPlaintextData: spec.transport.backend {backend} moves tensor bytes"
            " outside the mTLS gRPC stream, unencrypted; set allowPlaintextData: true to"
            " accept that, or use backend grpc or shm"
        )
    return TlsSpec(secret_name=name, allow_plaintext_data=allow)


def _number_in(low: float, high: float, kind: type = float) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        try:
            return low <= kind(text) <= high
        except ValueError:
            return False

    return check


_NUMERIC_OPTIONS: dict[str, Callable[[str], bool]] = {
    "store_port": _number_in(1, 65535, int),
    "inline_below": _number_in(0, 1 << 40, int),
    "chunk_bytes": _number_in(1, 8 << 20, int),
    "timeout_s": _number_in(0.001, 86400),
    "connect_timeout_s": _number_in(0.001, 86400),
    "poll_sleep_us": _number_in(0, 1e6),
}


def _family(r: _Reader, m: Mapping[str, Any]) -> str:
    """spec.model.family, a deprecated name replaced by the family it means."""
    value = r.str_(m, "family", "spec.model.family", "auto") or "auto"
    value = FAMILY_ALIASES.get(value, value)
    if value not in FAMILIES:
        deprecated = "; ".join(
            f"{a}: the deprecated name of {f}" for a, f in FAMILY_ALIASES.items()
        )
        r.problems.append(
            f"spec.model.family: must be one of {', '.join(FAMILIES)} ({deprecated}), got {value!r}"
        )
        return "auto"
    return value


def _model(r: _Reader, spec: Mapping[str, Any]) -> ModelSpec:
    m = r.obj(spec, "model", "spec.model")
    source = r.str_(m, "source", "spec.model.source")
    if source is None:
        r.problems.append("spec.model.source: required (builtin:tiny-unet, a hub id or a path)")
        source = ""
    volume = m.get("volume")
    if volume is not None and (not isinstance(volume, Mapping) or not volume):
        r.problems.append("spec.model.volume: must be a volume source object")
        volume = None
    mount_path = r.str_(m, "mountPath", "spec.model.mountPath", default="/models") or "/models"
    if not mount_path.startswith("/"):
        r.problems.append("spec.model.mountPath: must be an absolute path")
    return ModelSpec(
        source=source,
        revision=r.str_(m, "revision", "spec.model.revision"),
        family=_family(r, m),
        dtype=r.str_(m, "dtype", "spec.model.dtype", "auto", DTYPES) or "auto",
        volume=dict(volume) if volume is not None else None,
        mount_path=mount_path,
        served_name=r.str_(m, "servedName", "spec.model.servedName", max_length=MAX_SERVED_NAME),
    )


def _batching(r: _Reader, data: Mapping[str, Any], path: str) -> BatchingSpec:
    """`path` (spec.batching or a stage's): maxBatch an integer >= 1, batchWaitMs >= 0."""
    b = r.obj(data, "batching", path)
    max_batch = None
    if b.get("maxBatch") is not None:
        max_batch = r.int_(b, "maxBatch", f"{path}.maxBatch", 1, minimum=1)
    wait = None
    if b.get("batchWaitMs") is not None:
        wait = _number(r, b, "batchWaitMs", f"{path}.batchWaitMs", 0.0, 0.0, False)
        if not math.isfinite(wait):
            r.problems.append(f"{path}.batchWaitMs: must be a finite number")
            wait = 0.0
    return BatchingSpec(max_batch=max_batch, batch_wait_ms=wait)


def _queue_order(r: _Reader, data: Mapping[str, Any], path: str) -> str | None:
    return r.str_(data, "queueOrder", path, choices=QUEUE_ORDERS)


def _bounds(r: _Reader, data: Mapping[str, Any], p: str) -> tuple[int, int, int]:
    """(replicas, minReplicas, maxReplicas) of a stage or a pool at path `p`."""
    replicas = r.int_(data, "replicas", f"{p}.replicas", 1, minimum=0)
    lo = r.int_(data, "minReplicas", f"{p}.minReplicas", min(1, replicas), minimum=0)
    hi = r.int_(data, "maxReplicas", f"{p}.maxReplicas", max(replicas, lo, 1), minimum=1)
    if lo > hi:
        r.problems.append(f"{p}: minReplicas ({lo}) must be <= maxReplicas ({hi})")
    elif not lo <= replicas <= hi:
        r.problems.append(f"{p}.replicas: {replicas} must be within [minReplicas, maxReplicas]")
    return replicas, lo, hi


def _pattern(
    r: _Reader, data: Mapping[str, Any], key: str, path: str, pattern: re.Pattern[str], most: int
) -> str | None:
    if data.get(key) is None:
        r.problems.append(f"{path}: required")
        return None
    value = r.str_(data, key, path, max_length=most)
    if value is not None and not pattern.fullmatch(value):
        r.problems.append(f"{path}: {value!r} must match {pattern.pattern}")
        return None
    return value


def _pool(r: _Reader, data: Mapping[str, Any], p: str) -> PoolSpec | None:
    name = _pattern(r, data, "name", f"{p}.name", POOL_NAME, MAX_POOL_NAME)
    accelerator = _pattern(
        r, data, "accelerator", f"{p}.accelerator", ACCELERATOR_NAME, MAX_ACCELERATOR_NAME
    )
    replicas, lo, hi = _bounds(r, data, p)
    if name is None or accelerator is None:
        return None
    return PoolSpec(
        name=name,
        accelerator=accelerator,
        replicas=replicas,
        min_replicas=lo,
        max_replicas=hi,
        resources=r.obj(data, "resources", f"{p}.resources"),
        node_selector=r.str_map(data, "nodeSelector", f"{p}.nodeSelector"),
        tolerations=r.list_(data, "tolerations", f"{p}.tolerations"),
        affinity=r.obj(data, "affinity", f"{p}.affinity"),
    )


def _pools(r: _Reader, data: Mapping[str, Any], p: str) -> tuple[PoolSpec, ...]:
    """spec.stages.<stage>.pools: unique names and accelerators, no stage-level
    field that a pool sets for itself."""
    if data.get("pools") is None:
        return ()
    raw = data.get("pools")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_POOLS:
        r.problems.append(f"{p}.pools: must be a list of 1 to {MAX_POOLS} pools")
        return ()
    for key in POOL_FIELDS:
        if data.get(key) is not None:
            r.problems.append(f"{p}.{key}: set it per pool when {p}.pools is set")
    if data.get("replicas") not in (None, 1):
        r.problems.append(f"{p}.replicas: set it per pool when {p}.pools is set")
    pools: list[PoolSpec] = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            r.problems.append(f"{p}.pools[{i}]: must be an object")
            continue
        pool = _pool(r, item, f"{p}.pools[{i}]")
        if pool is None:
            continue
        for key, value in (("name", pool.name), ("accelerator", pool.accelerator)):
            if any(getattr(q, key) == value for q in pools):
                r.problems.append(f'{p}.pools[{i}].{key}: "{value}" is used twice')
        pools.append(pool)
    return tuple(pools)


def _stage(
    r: _Reader,
    name: str,
    data: Mapping[str, Any],
    image: str,
    batching: BatchingSpec,
    queue_order: str | None,
) -> StageSpec:
    """spec.stages.<name>; `batching` and `queue_order` are the pipeline's, which the
    stage's own settings override field by field."""
    p = f"spec.stages.{name}"
    pools = _pools(r, data, p)
    if pools:
        replicas = sum(q.replicas for q in pools)
        lo = sum(q.min_replicas for q in pools)
        hi = sum(q.max_replicas for q in pools)
    else:
        replicas, lo, hi = _bounds(r, data, p)
    return StageSpec(
        name=name,
        image=r.str_(data, "image", f"{p}.image", image) or image,
        replicas=replicas,
        min_replicas=lo,
        max_replicas=hi,
        queue_capacity=r.int_(
            data, "queueCapacity", f"{p}.queueCapacity", DEFAULT_QUEUE_CAPACITY, minimum=1
        ),
        resources={} if pools else r.obj(data, "resources", f"{p}.resources"),
        node_selector={} if pools else r.str_map(data, "nodeSelector", f"{p}.nodeSelector"),
        tolerations=[] if pools else r.list_(data, "tolerations", f"{p}.tolerations"),
        affinity={} if pools else r.obj(data, "affinity", f"{p}.affinity"),
        env=r.list_(data, "env", f"{p}.env"),
        batching=_batching(r, data, f"{p}.batching").over(batching),
        queue_order=_queue_order(r, data, f"{p}.queueOrder") or queue_order,
        pools=pools,
    )


def _secret_ref(
    r: _Reader, data: Mapping[str, Any], key: str, path: str, default_key: str
) -> SecretKeyRef | None:
    """A {name, key} Secret key reference (None when absent or unusable)."""
    raw = r.obj(data, key, path)
    if not raw:
        return None
    name = r.str_(raw, "name", f"{path}.name")
    if name is None:
        r.problems.append(f"{path}.name: required")
        return None
    return SecretKeyRef(name, r.str_(raw, "key", f"{path}.key", default_key) or default_key)


def _job_store(
    r: _Reader, g: Mapping[str, Any], replicas: int, family: str, model_mount: str
) -> JobStoreSpec:
    p = "spec.gateway.jobStore"
    given = g.get("jobStore") is not None
    j = r.obj(g, "jobStore", p)
    type_ = r.str_(j, "type", f"{p}.type", "sqlite", JOB_STORE_TYPES) or "sqlite"
    mount = r.str_(j, "mountPath", f"{p}.mountPath", DEFAULT_JOB_STORE_MOUNT)
    mount = mount or DEFAULT_JOB_STORE_MOUNT
    if not mount.startswith("/"):
        r.problems.append(f"{p}.mountPath: must be an absolute path")
    claim = None
    has_pvc = j.get("persistentVolumeClaim") is not None
    pvc = r.obj(j, "persistentVolumeClaim", f"{p}.persistentVolumeClaim")
    if has_pvc:
        claim = r.str_(pvc, "claimName", f"{p}.persistentVolumeClaim.claimName")
        if claim is None:
            r.problems.append(f"{p}.persistentVolumeClaim.claimName: required")
    has_url = j.get("urlSecretRef") is not None
    url = _secret_ref(r, j, "urlSecretRef", f"{p}.urlSecretRef", DEFAULT_REDIS_URL_KEY)
    if type_ == "redis":
        if not j.get("urlSecretRef"):  # absent or {} (a name-less one is reported above)
            r.problems.append(
                f"{p}.urlSecretRef: required for type: redis (the Secret key holding"
                " the redis:// or rediss:// URL)"
            )
        if has_pvc:
            r.problems.append(f"{p}.persistentVolumeClaim: only for type: sqlite")
        return JobStoreSpec(type="redis", mount_path=mount, url_secret_ref=url)
    if has_url:
        r.problems.append(f"{p}.urlSecretRef: only for type: redis")
    if mount.startswith("/") and mount.rstrip("/") in (
        *GATEWAY_MOUNTED_PATHS,
        model_mount.rstrip("/"),
    ):
        r.problems.append(
            f"{p}.mountPath: {mount} is taken (the gateway mounts"
            f" {', '.join(GATEWAY_MOUNTED_PATHS)} and spec.model.mountPath there)"
        )
    # SQLite is one file that two pods must never write at once (not even on a shared
    # volume). Without spec.gateway.jobStore an image pipeline keeps passing: its
    # gateway runs no jobs; a video family's does.
    if replicas > 1 and (given or family in VIDEO_FAMILIES):
        r.problems.append(f"spec.gateway.replicas: {SQLITE_ONE_REPLICA}, got {replicas}")
    return JobStoreSpec(type="sqlite", claim_name=claim, mount_path=mount)


def _gateway(r: _Reader, spec: Mapping[str, Any], image: str, model: ModelSpec) -> GatewaySpec:
    g = r.obj(spec, "gateway", "spec.gateway")
    ref = _secret_ref(r, g, "apiKeySecretRef", "spec.gateway.apiKeySecretRef", "api-key")
    timeout = g.get("requestTimeoutSeconds", 300)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        r.problems.append("spec.gateway.requestTimeoutSeconds: must be a positive number")
        timeout = 300
    port = r.int_(g, "port", "spec.gateway.port", 8000, minimum=1)
    if port > 65535:
        r.problems.append("spec.gateway.port: must be <= 65535")
    replicas = r.int_(g, "replicas", "spec.gateway.replicas", 1, minimum=0)
    return GatewaySpec(
        image=r.str_(g, "image", "spec.gateway.image", image) or image,
        replicas=replicas,
        service_type=r.str_(
            g, "serviceType", "spec.gateway.serviceType", "ClusterIP", SERVICE_TYPES
        )
        or "ClusterIP",
        port=port,
        api_key_secret_ref=ref,
        max_queue=r.int_(g, "maxQueue", "spec.gateway.maxQueue", 32, minimum=1),
        request_timeout_seconds=float(timeout),
        job_store=_job_store(r, g, replicas, model.family, model.mount_path),
        video_retention_seconds=r.int_(
            g,
            "videoRetentionSeconds",
            "spec.gateway.videoRetentionSeconds",
            DEFAULT_VIDEO_RETENTION_S,
            minimum=MIN_VIDEO_RETENTION_S,
        ),
        video_timeout_seconds=r.int_(
            g,
            "videoTimeoutSeconds",
            "spec.gateway.videoTimeoutSeconds",
            DEFAULT_VIDEO_TIMEOUT_S,
            minimum=1,
        ),
    )


def _label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not LABEL_PREFIX.fullmatch(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(LABEL_VALUE.fullmatch(name))


def _label_value(value: str) -> bool:
    return len(value) <= 63 and bool(LABEL_VALUE.fullmatch(value))


def _selector(r: _Reader, data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A LabelSelector ({} selects everything): matchLabels and matchExpressions."""
    labels = r.str_map(data, "matchLabels", f"{path}.matchLabels")
    for key, value in labels.items():
        if not _label_key(key) or not _label_value(value):
            r.problems.append(f"{path}.matchLabels: {key}={value!r} is not a valid label")
    out: dict[str, Any] = {"matchLabels": labels} if labels else {}
    exprs = r.list_(data, "matchExpressions", f"{path}.matchExpressions")
    if len(exprs) > MAX_EXPRESSIONS:
        r.problems.append(f"{path}.matchExpressions: at most {MAX_EXPRESSIONS}")
    clean = []
    for i, e in enumerate(exprs):
        p = f"{path}.matchExpressions[{i}]"
        name = r.str_(e, "key", f"{p}.key")
        op = r.str_(e, "operator", f"{p}.operator", choices=SELECTOR_OPERATORS)
        values = e.get("values") or []
        if name is None or not _label_key(name):
            r.problems.append(f"{p}.key: must be a label key")
        if not isinstance(values, list) or not all(
            isinstance(v, str) and _label_value(v) for v in values
        ):
            r.problems.append(f"{p}.values: must be a list of label values")
            values = []
        if len(values) > MAX_VALUES:
            r.problems.append(f"{p}.values: at most {MAX_VALUES}")
        if op in ("In", "NotIn") and not values:
            r.problems.append(f"{p}.values: {op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            r.problems.append(f"{p}.values: {op} takes no values")
        clean.append({"key": name, "operator": op} | ({"values": values} if values else {}))
    if clean:
        out["matchExpressions"] = clean
    return out


def _strictly_within(text: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        inner = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    if inner.version != net.version or inner.prefixlen <= net.prefixlen:
        return False
    return inner.supernet(new_prefix=net.prefixlen).network_address == net.network_address


def _ip_block(r: _Reader, data: Mapping[str, Any], path: str) -> dict[str, Any]:
    cidr = r.str_(data, "cidr", f"{path}.cidr")
    try:
        net = ipaddress.ip_network(cidr or "", strict=False)
    except ValueError:
        r.problems.append(f"{path}.cidr: {cidr!r} is not a CIDR such as 10.0.0.0/8")
        return {}
    excepts = data.get("except") or []
    if not isinstance(excepts, list) or not all(isinstance(e, str) for e in excepts):
        r.problems.append(f"{path}.except: must be a list of CIDRs")
        excepts = []
    if len(excepts) > MAX_EXPRESSIONS:
        r.problems.append(f"{path}.except: at most {MAX_EXPRESSIONS}")
    for e in excepts:
        if not _strictly_within(e, net):
            r.problems.append(f"{path}.except: {e!r} must be a CIDR strictly within {cidr}")
    return {"cidr": cidr} | ({"except": list(excepts)} if excepts else {})


def _peer(r: _Reader, data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A NetworkPolicyPeer: an ipBlock, or a namespaceSelector and/or a podSelector."""
    selectors = [k for k in ("namespaceSelector", "podSelector") if data.get(k) is not None]
    if (data.get("ipBlock") is not None) == bool(selectors):
        r.problems.append(
            f"{path}: set ipBlock, or namespaceSelector and/or podSelector (one kind of peer)"
        )
    for key in sorted(set(data) - {"ipBlock", "namespaceSelector", "podSelector"}):
        r.problems.append(f"{path}.{key}: unknown field (ipBlock, namespaceSelector, podSelector)")
    if data.get("ipBlock") is not None:
        block = f"{path}.ipBlock"
        return {"ipBlock": _ip_block(r, r.obj(data, "ipBlock", block), block)}
    return {k: _selector(r, r.obj(data, k, f"{path}.{k}"), f"{path}.{k}") for k in selectors}


def _network_policy(
    r: _Reader, spec: Mapping[str, Any], defaults: SpecDefaults
) -> NetworkPolicySpec:
    p = "spec.networkPolicy"
    n = r.obj(spec, "networkPolicy", p)
    enabled = n.get("enabled", True)
    if not isinstance(enabled, bool):
        r.problems.append(f"{p}.enabled: must be true or false")
        enabled = True
    metrics_from = list(defaults.metrics_from)
    if n.get("metricsFrom") is not None:
        metrics_from = _peers(r, n, "metricsFrom", f"{p}.metricsFrom")
    return NetworkPolicySpec(
        enabled=enabled, metrics_from=metrics_from, probes_from=list(defaults.probes_from)
    )


def _peers(r: _Reader, data: Mapping[str, Any], key: str, path: str) -> list[dict[str, Any]]:
    peers = r.list_(data, key, path)
    if len(peers) > MAX_PEERS:
        r.problems.append(f"{path}: at most {MAX_PEERS} peers")
    return [_peer(r, peer, f"{path}[{i}]") for i, peer in enumerate(peers)]


def parse_peers(peers: object, name: str) -> list[dict[str, Any]]:
    """A list of NetworkPolicyPeers from the operator's installation (`name` says
    where it came from); raise SpecError naming every problem."""
    r = _Reader()
    parsed = _peers(r, {name: peers}, name, name)
    if r.problems:
        raise SpecError(r.problems)
    return parsed


# spec.autoscaling's number knobs: CRD field -> (Knobs field, minimum, minimum exclusive).
# Defaults are Knobs' own (the CRD documents the same values; a test keeps them equal).
_KNOB_NUMBERS: dict[str, tuple[str, float, bool]] = {
    "intervalSeconds": ("interval_s", 0.0, True),
    "targetUtilization": ("target_utilization", 0.0, True),
    "tolerance": ("tolerance", 0.0, False),
    "scaleUpWindowSeconds": ("scale_up_window_s", 0.0, False),
    "scaleDownWindowSeconds": ("scale_down_window_s", 0.0, False),
    "staleAfterSeconds": ("stale_after_s", 0.0, True),
    "drainSeconds": ("drain_seconds", 0.0, True),
}
_KNOB_INTS: dict[str, tuple[str, int]] = {
    "maxStepUp": ("max_step_up", 1),
    "maxStepDown": ("max_step_down", 0),
}
_KNOB_DEFAULTS = Knobs()


def _number(
    r: _Reader, data: Mapping[str, Any], key: str, path: str, default: float, low: float, gt: bool
) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        r.problems.append(f"{path}: must be a number")
        return default
    if value < low or (gt and value == low):
        r.problems.append(f"{path}: must be {'>' if gt else '>='} {low:g}, got {value}")
        return default
    return float(value)


def _profile(r: _Reader, a: Mapping[str, Any]) -> tuple[str | None, Profile | None]:
    """spec.autoscaling.profile ("builtin:NAME") or .customProfile (an inline profile)."""
    name = r.str_(a, "profile", "spec.autoscaling.profile")
    custom = a.get("customProfile")
    if name is not None and custom is not None:
        r.problems.append("spec.autoscaling: set profile or customProfile, not both")
        return None, None
    if custom is not None:
        try:
            prof = parse_profile(custom, name="custom")
        except ProfileError as err:
            r.problems += [f"spec.autoscaling.customProfile.{p}" for p in err.problems]
            return None, None
        return prof.name, prof
    if name is None:
        return None, None
    if not name.startswith(BUILTIN_PREFIX):
        r.problems.append(f"spec.autoscaling.profile: use builtin:NAME, got {name!r}")
        return None, None
    try:
        return name, builtin_profile(name.removeprefix(BUILTIN_PREFIX))
    except KeyError as err:
        r.problems.append(f"spec.autoscaling.profile: {err.args[0]}")
        return None, None


def _autoscaling(
    r: _Reader, a: Mapping[str, Any], stages: Mapping[str, StageSpec]
) -> AutoscalingSpec:
    p = "spec.autoscaling"
    mode = r.str_(a, "mode", f"{p}.mode", "Disabled", MODES) or "Disabled"
    url = r.str_(a, "prometheusUrl", f"{p}.prometheusUrl")
    if url is not None and not url.startswith(("http://", "https://")):
        r.problems.append(f"{p}.prometheusUrl: must be an http:// or https:// URL")
        url = None
    profile_name, profile = _profile(r, a)
    accelerators = r.str_map(a, "accelerators", f"{p}.accelerators")
    for stage in sorted(set(accelerators) - set(STAGES)):
        r.problems.append(f"{p}.accelerators.{stage}: unknown stage (use {', '.join(STAGES)})")
    if profile is not None:
        for stage, acc in sorted(accelerators.items()):
            if stage in STAGES and acc not in profile.options(stage):
                options = ", ".join(profile.options(stage))
                r.problems.append(
                    f"{p}.accelerators.{stage}: {acc!r} is not in the profile (use {options})"
                )
    accelerators = {s: v for s, v in accelerators.items() if s in STAGES}
    for stage, st in stages.items():
        if not st.pools:
            continue
        if stage in accelerators:
            r.problems.append(
                f"{p}.accelerators.{stage}: the stage has pools; each pool names its accelerator"
            )
        for i, pool in enumerate(st.pools):
            if profile is not None and pool.accelerator not in profile.options(stage):
                options = ", ".join(profile.options(stage))
                r.problems.append(
                    f"spec.stages.{stage}.pools[{i}].accelerator: {pool.accelerator!r} is not"
                    f" in the profile (use {options})"
                )
        # The policy sizes a stage on one accelerator: a pooled stage on its first pool's.
        accelerators[stage] = st.pools[0].accelerator or ""
    d = _KNOB_DEFAULTS
    values: dict[str, Any] = {
        field_: _number(r, a, key, f"{p}.{key}", getattr(d, field_), low, gt)
        for key, (field_, low, gt) in _KNOB_NUMBERS.items()
    }
    values |= {
        field_: r.int_(a, key, f"{p}.{key}", getattr(d, field_), minimum=low)
        for key, (field_, low) in _KNOB_INTS.items()
    }
    if values["target_utilization"] > 1:
        r.problems.append(f"{p}.targetUtilization: must be <= 1")
        values["target_utilization"] = d.target_utilization
    if values["tolerance"] >= 1:
        r.problems.append(f"{p}.tolerance: must be < 1")
        values["tolerance"] = d.tolerance
    slo = r.str_(a, "slo", f"{p}.slo")
    if slo is not None:
        try:
            parse_slo(slo)
        except ValueError as err:
            r.problems.append(f"{p}.slo: {err}")
            slo = None
    max_gpus = a.get("maxGpus")
    if max_gpus is not None:
        max_gpus = r.int_(a, "maxGpus", f"{p}.maxGpus", 0, minimum=1) or None
    forecast = None
    if a.get("forecastSeconds") is not None:
        forecast = _number(r, a, "forecastSeconds", f"{p}.forecastSeconds", 0.0, 0.0, False)
    knobs = Knobs(
        mode=mode,
        slo=slo,
        max_gpus=max_gpus,
        forecast_seconds=forecast,
        min_replicas={s: st.min_replicas for s, st in stages.items()},
        max_replicas={s: st.max_replicas for s, st in stages.items()},
        **values,
    )
    return AutoscalingSpec(
        mode=mode,
        prometheus_url=url,
        profile_name=profile_name,
        profile=profile,
        accelerators=accelerators,
        knobs=knobs,
    )


def parse_spec(
    spec: Mapping[str, Any] | None, defaults: SpecDefaults | None = None
) -> PipelineSpec:
    """Default and validate a DiffusionPipeline spec; raise SpecError naming every problem.

    `defaults`: what the operator's installation gives a spec that does not say
    (its worker image, the metrics and probe peers of the chart's networkPolicy).
    """
    r = _Reader()
    spec = spec or {}
    defaults = defaults or SpecDefaults()
    model = _model(r, spec)
    image = r.str_(spec, "image", "spec.image") or defaults.image
    raw_stages = r.obj(spec, "stages", "spec.stages")
    for extra in sorted(set(raw_stages) - set(STAGES)):
        r.problems.append(f"spec.stages.{extra}: unknown stage (use {', '.join(STAGES)})")
    batching = _batching(r, spec, "spec.batching")
    queue_order = _queue_order(r, spec, "spec.queueOrder")
    stages = {
        name: _stage(
            r, name, r.obj(raw_stages, name, f"spec.stages.{name}"), image, batching, queue_order
        )
        for name in STAGES
    }
    transport = _transport(r, r.obj(spec, "transport", "spec.transport"))
    gateway = _gateway(r, spec, image, model)
    autoscaling = _autoscaling(r, r.obj(spec, "autoscaling", "spec.autoscaling"), stages)
    network_policy = _network_policy(r, spec, defaults)
    if transport.tls is not None and model.mount_path.rstrip("/") == TLS_MOUNT:
        r.problems.append(
            f"spec.model.mountPath: {TLS_MOUNT} is taken (spec.transport.tls mounts its"
            " Secret there)"
        )
    if r.problems:
        raise SpecError(r.problems)
    return PipelineSpec(
        model=model,
        image=image,
        stages=stages,
        transport=transport,
        gateway=gateway,
        autoscaling=autoscaling,
        batching=batching,
        queue_order=queue_order,
        network_policy=network_policy,
    )


def spec_warnings(spec: PipelineSpec) -> list[str]:
    """What a valid spec risks, for the pipeline's status or a Warning Event."""
    out = []
    if spec.model.family in VIDEO_FAMILIES and spec.gateway.job_store.ephemeral:
        out.append(
            "spec.gateway.jobStore: no persistentVolumeClaim, so the video jobs and finished"
            " videos live in an emptyDir and do not survive the gateway pod"
        )
    policy = spec.network_policy
    if policy.enabled and spec.autoscaling.mode != "Disabled" and not policy.metrics_from:
        out.append(
            "spec.networkPolicy.metricsFrom: empty, and the operator has no default (the"
            " chart's networkPolicy.metricsFrom), so no Prometheus may scrape the stage"
            " workers and the autoscaler sees no stage metrics"
        )
    return out


def validate_spec(spec: Mapping[str, Any] | None) -> list[str]:
    """The problems of a spec (empty when it is valid)."""
    try:
        parse_spec(spec)
    except SpecError as err:
        return err.problems
    return []
