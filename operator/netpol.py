"""A pipeline's NetworkPolicies (pure): which pods may connect to which port.

One policy per component (`<pipeline>-<component>`, ingress only: egress to DNS,
the model hub, Redis or the API server is left alone), selecting the component's
pods by its stage labels, so every pool of a stage is covered and, as a peer,
admitted alike. A peer without a namespaceSelector is a pod of the policy's own
namespace, so another namespace's pods never match; another pipeline's carry
another `disagfusion.io/pipeline` label.

    gateway   spec.gateway.port (HTTP) and GRPC_PORT (Generate): anyone, its clients.
              RESULT_PORT: the pipeline's stage pods. The last stage delivers the
              results there, and every stage sends its terminal errors and progress
              reports (which answer "cancelled") to the same reply_to address.
    encoder   GRPC_PORT: the pipeline's gateway pods.
    denoiser  GRPC_PORT: the encoder's pods, and the gateway's: its readiness polls
    decoder   GRPC_PORT: the denoiser's pods,   every stage's Health over gRPC.
    stages    HTTP_PORT (/metrics, /healthz, /readyz): spec.networkPolicy.metricsFrom
              (Prometheus; the chart's networkPolicy.metricsFrom when the spec has
              none) and the chart's networkPolicy.probesFrom; none given, no pod.
              Kubelet probes come from the pod's own node, which most CNIs (Calico,
              Cilium, Antrea) admit whatever the policy; with one that does not, the
              chart's probesFrom holds the nodes' CIDR as an ipBlock.
    torch, nixl  these transports move tensor bytes on ports they pick at run time
              (gloo/NCCL, UCX), in both directions: the pipeline's own pods are
              admitted on every port of every component.
"""

from __future__ import annotations

from typing import Any

from disagfusion.operator.render import (
    GRPC_PORT,
    HTTP_PORT,
    RESULT_PORT,
    Child,
    Owner,
    _finish,
    selector_labels,
)
from disagfusion.operator.spec import STAGES, PipelineSpec

API_VERSION = "networking.k8s.io/v1"
KIND = "NetworkPolicy"
COMPONENTS = ("gateway", *STAGES)
STAGE_LABEL = "disagfusion.io/stage"
# Transports whose bytes travel outside the gRPC ports, on ports chosen at run time.
OPEN_PORT_TRANSPORTS = ("torch", "nixl")


def policy_name(pipeline: str, component: str) -> str:
    return f"{pipeline}-{component}"


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def _pipeline_labels(pipeline: str) -> dict[str, str]:
    """What every pod of the pipeline carries, gateway and every stage's pools."""
    return {
        k: v
        for k, v in selector_labels(pipeline, "gateway").items()
        if k != "app.kubernetes.io/component"
    }


def _pods_of(pipeline: str, component: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": selector_labels(pipeline, component)}}


def _stage_pods(pipeline: str) -> dict[str, Any]:
    """Every stage's pods of the pipeline (not its gateway's)."""
    return {
        "podSelector": {
            "matchLabels": _pipeline_labels(pipeline),
            "matchExpressions": [{"key": STAGE_LABEL, "operator": "In", "values": list(STAGES)}],
        }
    }


def _ingress(pipeline: str, spec: PipelineSpec, component: str) -> list[dict[str, Any]]:
    if component == "gateway":
        rules: list[dict[str, Any]] = [
            {"ports": _tcp(spec.gateway.port, GRPC_PORT)},  # no `from`: every source
            {"from": [_stage_pods(pipeline)], "ports": _tcp(RESULT_PORT)},
        ]
    else:
        index = STAGES.index(component)
        upstream = ["gateway"] if index == 0 else [STAGES[index - 1], "gateway"]
        rules = [{"from": [_pods_of(pipeline, c) for c in upstream], "ports": _tcp(GRPC_PORT)}]
        if spec.network_policy.http_from:
            rules.append({"from": spec.network_policy.http_from, "ports": _tcp(HTTP_PORT)})
    if spec.transport.backend in OPEN_PORT_TRANSPORTS:
        rules.append({"from": [{"podSelector": {"matchLabels": _pipeline_labels(pipeline)}}]})
    return rules


def render_network_policies(owner: Owner, spec: PipelineSpec) -> list[Child]:
    """The pipeline's policies, gateway first; none when spec.networkPolicy.enabled is false."""
    if not spec.network_policy.enabled:
        return []
    return [
        _finish(
            owner,
            component,
            API_VERSION,
            KIND,
            policy_name(owner.name, component),
            {
                "spec": {
                    "podSelector": {"matchLabels": selector_labels(owner.name, component)},
                    "policyTypes": ["Ingress"],
                    "ingress": _ingress(owner.name, spec, component),
                }
            },
        )
        for component in COMPONENTS
    ]


def stale_network_policies(owner: Owner, spec: PipelineSpec) -> list[Child]:
    """The policies an earlier reconcile may have left that this spec does not render
    (all of them once spec.networkPolicy.enabled is false): for the handler to delete
    with Kube.delete_owned, which leaves anything the pipeline does not own alone."""
    rendered = {c.name for c in render_network_policies(owner, spec)}
    return [
        Child(API_VERSION, KIND, name, {"metadata": {"name": name, "namespace": owner.namespace}})
        for name in (policy_name(owner.name, c) for c in COMPONENTS)
        if name not in rendered
    ]
