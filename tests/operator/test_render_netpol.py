"""The NetworkPolicies the operator renders per pipeline (operator/netpol.py).

Flows are checked, not YAML: a small evaluator of the NetworkPolicy semantics
("does any policy selecting the target admit this source on this port?") runs over
the pods the operator itself renders (their labels from the StatefulSet and
Deployment templates), a second pipeline in the same namespace, the same pipeline
name in another namespace, and a Prometheus pod.

What is admitted differs from "each stage admits only its upstream" in two places,
both needed by the data plane: the gateway polls every stage's Health over gRPC
(its readiness), so every stage's gRPC port admits the gateway too; and every stage
sends terminal errors and progress reports to the gateway's result port (the
request's reply_to), so it admits every stage, not only the last.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes_validate
import pytest

from disagfusion.cli import build_parser
from disagfusion.operator.children import render_all
from disagfusion.operator.netpol import (
    COMPONENTS,
    render_network_policies,
    stale_network_policies,
)
from disagfusion.operator.render import (
    GRPC_PORT,
    HTTP_PORT,
    RESULT_PORT,
    TORCH_STORE_PORT,
    Child,
    Owner,
)
from disagfusion.operator.spec import SpecDefaults, SpecError, parse_spec, validate_spec

OWNER = Owner(name="sd", namespace="ml", uid="uid-1")
K8S_VERSIONS = ["1.30.0", f"{kubernetes_validate.latest_version()}.0"]
# Namespace -> its labels (the API server sets kubernetes.io/metadata.name on every one).
NAMESPACES = {ns: {"kubernetes.io/metadata.name": ns} for ns in ("ml", "elsewhere", "monitoring")}
NAMESPACES["(node)"] = {}  # a node's own address (the kubelet) is in no namespace
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
NODE_IP = "172.18.0.2"
NODES = {"ipBlock": {"cidr": "172.18.0.0/16"}}
# The chart's networkPolicy.metricsFrom and .probesFrom, as the operator gets them.
CHART = SpecDefaults(metrics_from=[PROMETHEUS], probes_from=[NODES])
POOLS = [
    {"name": "h100", "accelerator": "H100", "replicas": 1, "maxReplicas": 2},
    {"name": "cpu", "accelerator": "cpu", "replicas": 1, "maxReplicas": 2},
]

Doc = dict[str, Any]


def spec(**extra: Any) -> dict[str, Any]:
    return {"model": {"source": "builtin:tiny-unet"}, **extra}


def pooled(**extra: Any) -> dict[str, Any]:
    """Two pools for the encoder and for the denoiser: every pool must be admitted."""
    stages = {"encoder": {"pools": POOLS}, "denoiser": {"pools": POOLS}}
    return spec(stages=stages, **extra)


# --- the evaluator -------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ports: frozenset[int] = frozenset()
    ip: str = "10.1.2.3"


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector: matchLabels and every matchExpression hold ({} selects all)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        held = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not held:
            return False
    return True


def peer_admits(peer: Mapping[str, Any], policy_ns: str, source: Pod) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(source.ip)
        inside = ip in ipaddress.ip_network(block["cidr"], strict=False)
        return inside and not any(
            ip in ipaddress.ip_network(e, strict=False) for e in block.get("except", [])
        )
    ns_selector = peer.get("namespaceSelector")
    if ns_selector is None:  # no namespaceSelector: the policy's own namespace
        ns_ok = source.namespace == policy_ns
    else:
        ns_ok = selects(ns_selector, NAMESPACES[source.namespace])
    pod_selector = peer.get("podSelector")
    return ns_ok and (pod_selector is None or selects(pod_selector, source.labels))


def rule_admits(rule: Mapping[str, Any], policy_ns: str, source: Pod, port: int) -> bool:
    ports = rule.get("ports")
    if ports is not None and not any(
        p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports
    ):
        return False
    peers = rule.get("from")
    return peers is None or any(peer_admits(p, policy_ns, source) for p in peers)


def admits(policies: list[Doc], target: Pod, source: Pod, port: int) -> bool:
    """Whether `source` may open a TCP connection to `target`'s `port`."""
    isolating = [
        p
        for p in policies
        if p["metadata"]["namespace"] == target.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], target.labels)
    ]
    if not isolating:
        return True  # a pod no policy selects is not isolated
    return any(
        rule_admits(rule, p["metadata"]["namespace"], source, port)
        for p in isolating
        for rule in p["spec"].get("ingress") or []
    )


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": op} | ({"values": list(values)} if values else {})


def test_the_evaluator_follows_the_networkpolicy_rules() -> None:
    """It must be able to say no: pinned verdicts on a hand-written policy."""
    policy = {
        "metadata": {"namespace": "ml"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchExpressions": [expr("tier", "In", "web")]}},
                        PROMETHEUS,
                        {"ipBlock": {"cidr": "10.9.0.0/16", "except": ["10.9.9.0/24"]}},
                    ],
                    "ports": [{"protocol": "TCP", "port": 5432}],
                },
                {"ports": [{"protocol": "TCP", "port": 80}]},
            ],
        },
    }
    db = Pod("db", "ml", {"app": "db"})
    web = Pod("web", "ml", {"tier": "web"})
    assert admits([policy], db, web, 5432)
    assert not admits([policy], db, web, 5433)
    assert not admits([policy], db, Pod("web", "elsewhere", {"tier": "web"}), 5432)
    assert not admits([policy], db, Pod("job", "ml", {"tier": "batch"}), 5432)
    assert admits([policy], db, Pod("prom", "monitoring", {}), 5432)
    assert admits([policy], db, Pod("x", "elsewhere", {}, ip="10.9.1.1"), 5432)
    assert not admits([policy], db, Pod("x", "elsewhere", {}, ip="10.9.9.1"), 5432)
    assert admits([policy], db, Pod("anyone", "elsewhere", {}), 80)
    assert admits([policy], Pod("other", "ml", {"app": "cache"}), web, 1234)  # not isolated
    assert selects({"matchExpressions": [expr("a", "DoesNotExist")]}, {})
    assert not selects({"matchExpressions": [expr("a", "NotIn", "1")]}, {"a": "1"})
    assert selects({"matchExpressions": [expr("a", "NotIn", "1")]}, {})


# --- the rendered pipeline -----------------------------------------------------------


def pods_of(children: list[Child], namespace: str) -> dict[str, Pod]:
    """One pod per workload (a pool's StatefulSet or the gateway Deployment), as rendered."""
    out = {}
    for c in children:
        if c.kind not in ("StatefulSet", "Deployment"):
            continue
        template = c.body["spec"]["template"]
        ports = frozenset(
            p["containerPort"] for ct in template["spec"]["containers"] for p in ct["ports"]
        )
        out[c.name] = Pod(c.name, namespace, dict(template["metadata"]["labels"]), ports)
    return out


def policies_of(children: list[Child]) -> list[Doc]:
    return [c.body for c in children if c.kind == "NetworkPolicy"]


@dataclass
class World:
    policies: list[Doc]
    pods: dict[str, Pod]  # this pipeline's, by workload name
    strangers: dict[str, Pod]  # every other source

    def admitted(self, target: str, port: int) -> set[str]:
        sources = {**self.pods, **self.strangers}
        return {
            name
            for name, pod in sources.items()
            if admits(self.policies, self.pods[target], pod, port)
        }


def world(raw: dict[str, Any], defaults: SpecDefaults | None = None) -> World:
    """Our pipeline, another in our namespace and a twin in another, all parsed with
    the operator's `defaults`; and pods that are none of theirs."""
    children = render_all(OWNER, parse_spec(raw, defaults))
    other = render_all(Owner("other", "ml", "uid-2"), parse_spec(raw, defaults))
    twin = render_all(Owner("sd", "elsewhere", "uid-3"), parse_spec(raw, defaults))
    strangers = {f"other/{k}": v for k, v in pods_of(other, "ml").items()}
    strangers |= {f"elsewhere/{k}": v for k, v in pods_of(twin, "elsewhere").items()}
    strangers |= {
        "prometheus": Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
        "random-ml-pod": Pod("random", "ml", {"app": "notebook"}),
        "kubelet": Pod("kubelet", "(node)", {}, ip=NODE_IP),  # probes come from the node
    }
    # Every pipeline's policies are in the cluster at once.
    return World(
        policies_of(children) + policies_of(other) + policies_of(twin),
        pods_of(children, "ml"),
        strangers,
    )


ENCODERS = {"sd-encoder-h100", "sd-encoder-cpu"}
DENOISERS = {"sd-denoiser-h100", "sd-denoiser-cpu"}
STAGE_PODS = ENCODERS | DENOISERS | {"sd-decoder"}


def test_every_policy_validates_and_is_owned_by_the_pipeline() -> None:
    for raw in (
        spec(),
        pooled(networkPolicy={"metricsFrom": [PROMETHEUS]}),
        spec(transport={"backend": "torch"}),
    ):
        children = render_all(OWNER, parse_spec(raw))
        policies = [c for c in children if c.kind == "NetworkPolicy"]
        assert sorted(c.name for c in policies) == sorted(f"sd-{c}" for c in COMPONENTS)
        for child in policies:
            assert child.api_version == "networking.k8s.io/v1"
            meta = child.body["metadata"]
            assert meta["namespace"] == "ml"
            assert meta["ownerReferences"] == [OWNER.reference()]
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "disagfusion-operator"
            assert child.input_hash
            assert child.body["spec"]["policyTypes"] == ["Ingress"]  # egress left alone
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(child.body, version, strict=True)
    # Applied before the workloads, so no pod starts unprotected.
    kinds = [c.kind for c in render_all(OWNER, parse_spec(spec()))]
    last_policy = max(i for i, k in enumerate(kinds) if k == "NetworkPolicy")
    assert kinds.index("StatefulSet") > last_policy


def test_each_stage_admits_its_upstream_and_the_gateway_on_grpc() -> None:
    w = world(pooled())
    for encoder in ENCODERS:
        assert w.admitted(encoder, GRPC_PORT) == {"sd-gateway"}
    for denoiser in DENOISERS:
        # Both encoder pools reach both denoiser pools: selectors match by stage labels.
        assert w.admitted(denoiser, GRPC_PORT) == ENCODERS | {"sd-gateway"}
    assert w.admitted("sd-decoder", GRPC_PORT) == DENOISERS | {"sd-gateway"}


def test_the_gateway_result_port_admits_only_this_pipelines_stages() -> None:
    w = world(pooled())
    assert w.admitted("sd-gateway", RESULT_PORT) == STAGE_PODS
    assert "sd-decoder" in w.admitted("sd-gateway", RESULT_PORT)  # the last stage's results


def test_the_gateway_http_and_client_grpc_ports_are_open_to_everyone() -> None:
    w = world(pooled())
    everyone = set(w.pods) | set(w.strangers)
    port = parse_spec(pooled()).gateway.port
    assert w.admitted("sd-gateway", port) == everyone
    assert w.admitted("sd-gateway", GRPC_PORT) == everyone
    assert w.admitted("sd-gateway", port + 1000) == set()


def test_the_stage_http_port_admits_only_metrics_from() -> None:
    closed = world(pooled())
    for stage in STAGE_PODS:
        assert closed.admitted(stage, HTTP_PORT) == set()
    scraped = world(pooled(networkPolicy={"metricsFrom": [PROMETHEUS]}))
    for stage in STAGE_PODS:
        assert scraped.admitted(stage, HTTP_PORT) == {"prometheus"}
        # metricsFrom opens the HTTP port only.
        assert scraped.admitted(stage, GRPC_PORT) == closed.admitted(stage, GRPC_PORT)
    both = world(
        pooled(
            networkPolicy={
                "metricsFrom": [
                    PROMETHEUS,
                    {"podSelector": {"matchLabels": {"app": "notebook"}}},
                ]
            }
        )
    )
    assert both.admitted("sd-decoder", HTTP_PORT) == {"prometheus", "random-ml-pod"}


def test_the_charts_peers_are_the_default_and_its_probe_sources_always_admitted() -> None:
    w = world(pooled(), CHART)
    for stage in STAGE_PODS:
        assert w.admitted(stage, HTTP_PORT) == {"prometheus", "kubelet"}
        assert not {"prometheus", "kubelet"} & w.admitted(stage, GRPC_PORT)
    assert "kubelet" not in w.admitted("sd-gateway", RESULT_PORT)
    # The pipeline's own metricsFrom replaces the chart's; the probe sources stay.
    notebook = {"podSelector": {"matchLabels": {"app": "notebook"}}}
    own = world(pooled(networkPolicy={"metricsFrom": [notebook]}), CHART)
    assert own.admitted("sd-decoder", HTTP_PORT) == {"random-ml-pod", "kubelet"}
    # An explicit empty list admits no scraper at all.
    none = world(pooled(networkPolicy={"metricsFrom": []}), CHART)
    assert none.admitted("sd-decoder", HTTP_PORT) == {"kubelet"}
    # A peer in both lists is listed once.
    same = parse_spec(spec(), SpecDefaults(metrics_from=[NODES], probes_from=[NODES]))
    assert same.network_policy.http_from == [NODES]
    for child in render_all(OWNER, parse_spec(pooled(), CHART)):
        if child.kind == "NetworkPolicy":
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(child.body, version, strict=True)


def test_other_ports_and_other_pipelines_are_refused() -> None:
    w = world(pooled())
    for target in STAGE_PODS:
        admitted = w.admitted(target, GRPC_PORT) | w.admitted(target, TORCH_STORE_PORT)
        assert not admitted & set(w.strangers), target
        assert w.admitted(target, TORCH_STORE_PORT) == set()
    assert not w.admitted("sd-gateway", RESULT_PORT) & set(w.strangers)
    # The other pipeline's stages reach its own gateway's results, not ours.
    other = world(pooled())
    other.pods, other.strangers = other.strangers, other.pods
    assert other.admitted("other/other-gateway", RESULT_PORT) == {
        f"other/other-{name.removeprefix('sd-')}" for name in STAGE_PODS
    }


@pytest.mark.parametrize("backend", ["torch", "nixl"])
def test_run_time_port_transports_admit_the_pipelines_own_pods_on_every_port(
    backend: str,
) -> None:
    w = world(pooled(transport={"backend": backend}))
    for target in [*STAGE_PODS, "sd-gateway"]:
        for port in (TORCH_STORE_PORT, 41234, GRPC_PORT):
            assert set(w.pods) <= w.admitted(target, port), (target, port)
            if target != "sd-gateway" or port != GRPC_PORT:  # the open client port
                assert not w.admitted(target, port) & set(w.strangers), (target, port)


@pytest.mark.parametrize("backend", ["grpc", "shm"])
def test_grpc_port_transports_keep_the_narrow_flows(backend: str) -> None:
    w = world(pooled(transport={"backend": backend}))
    assert w.admitted("sd-decoder", GRPC_PORT) == DENOISERS | {"sd-gateway"}
    assert w.admitted("sd-decoder", 41234) == set()


def test_every_admitted_port_is_a_port_of_the_pods_it_protects() -> None:
    """A port renamed in the workloads but not in the policies would be closed silently."""
    for raw in (pooled(networkPolicy={"metricsFrom": [PROMETHEUS]}), spec(gateway={"port": 9000})):
        children = render_all(OWNER, parse_spec(raw))
        pods = pods_of(children, "ml")
        for policy in policies_of(children):
            targets = [p for p in pods.values() if selects(policy["spec"]["podSelector"], p.labels)]
            assert targets, policy["metadata"]["name"]
            for rule in policy["spec"]["ingress"]:
                for port in rule.get("ports") or []:
                    assert all(port["port"] in t.ports for t in targets), (policy, port)


def test_the_gateway_serves_results_on_the_port_it_advertises() -> None:
    children = render_all(OWNER, parse_spec(spec()))
    (deploy,) = [c for c in children if c.kind == "Deployment"]
    (container,) = deploy.body["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["results"] == RESULT_PORT and ports["grpc"] == GRPC_PORT
    args = build_parser().parse_args(container["args"])
    assert (args.grpc_port, args.result_port) == (GRPC_PORT, RESULT_PORT)
    # The stages reach the results at the pod's own IP, not through the Service.
    assert args.advertise_host == "$(POD_IP)"
    (svc,) = [c for c in children if c.kind == "Service" and c.name == "sd-gateway"]
    assert [p["name"] for p in svc.body["spec"]["ports"]] == ["http"]


# --- switching off, pruning, hashes --------------------------------------------------


def test_disabled_renders_none_and_lists_every_policy_to_prune() -> None:
    off = parse_spec(spec(networkPolicy={"enabled": False}))
    assert render_network_policies(OWNER, off) == []
    assert not [c for c in render_all(OWNER, off) if c.kind == "NetworkPolicy"]
    stale = stale_network_policies(OWNER, off)
    assert sorted(c.name for c in stale) == sorted(f"sd-{c}" for c in COMPONENTS)
    for child in stale:
        assert (child.api_version, child.kind) == ("networking.k8s.io/v1", "NetworkPolicy")
        assert child.body["metadata"]["namespace"] == "ml"
    assert stale_network_policies(OWNER, parse_spec(spec())) == []


def test_metrics_from_changes_the_stage_policies_and_restarts_no_pod() -> None:
    before = {f"{c.kind}/{c.name}": c.input_hash for c in render_all(OWNER, parse_spec(pooled()))}
    raw = pooled(networkPolicy={"metricsFrom": [PROMETHEUS]})
    after = {f"{c.kind}/{c.name}": c.input_hash for c in render_all(OWNER, parse_spec(raw))}
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {f"NetworkPolicy/sd-{s}" for s in ("encoder", "denoiser", "decoder")}


# --- the spec ------------------------------------------------------------------------


def test_defaults_are_on_with_no_metrics_peers() -> None:
    policy = parse_spec(spec()).network_policy
    assert policy.enabled is True and policy.metrics_from == []


def test_metrics_from_keeps_what_the_peer_says() -> None:
    peers = [
        PROMETHEUS,
        {
            "namespaceSelector": {},
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/name": "prometheus"},
                "matchExpressions": [{"key": "team", "operator": "Exists"}],
            },
        },
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
    ]
    assert parse_spec(spec(networkPolicy={"metricsFrom": peers})).network_policy.metrics_from == (
        peers
    )


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        ({"enabled": "yes"}, "spec.networkPolicy.enabled: must be true or false"),
        ({"metricsFrom": {"a": 1}}, "spec.networkPolicy.metricsFrom: must be a list of objects"),
        ({"metricsFrom": [{}]}, "spec.networkPolicy.metricsFrom[0]: set ipBlock, or"),
        (
            {"metricsFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]},
            "spec.networkPolicy.metricsFrom[0]: set ipBlock, or",
        ),
        (
            {"metricsFrom": [{"podSelector": {}, "ports": [80]}]},
            "spec.networkPolicy.metricsFrom[0].ports: unknown field",
        ),
        (
            {"metricsFrom": [{"ipBlock": {"cidr": "10.0.0/33"}}]},
            "spec.networkPolicy.metricsFrom[0].ipBlock.cidr: '10.0.0/33' is not a CIDR",
        ),
        (
            {"metricsFrom": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]},
            "spec.networkPolicy.metricsFrom[0].ipBlock.except: '10.1.0.0/24' must be a CIDR"
            " strictly within 10.0.0.0/16",
        ),
        (
            {"metricsFrom": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}]},
            "spec.networkPolicy.metricsFrom[0].ipBlock.except: '10.0.0.0/16' must be a CIDR",
        ),
        (
            {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"bad key!": "x"}}}]},
            "spec.networkPolicy.metricsFrom[0].namespaceSelector.matchLabels: bad key!='x' is"
            " not a valid label",
        ),
        (
            {"metricsFrom": [{"podSelector": {"matchExpressions": [expr("a", "In")]}}]},
            "spec.networkPolicy.metricsFrom[0].podSelector.matchExpressions[0].values: In needs"
            " at least one value",
        ),
        (
            {"metricsFrom": [{"podSelector": {"matchExpressions": [expr("a", "Exists", "1")]}}]},
            "spec.networkPolicy.metricsFrom[0].podSelector.matchExpressions[0].values: Exists"
            " takes no values",
        ),
        (
            {"metricsFrom": [{"podSelector": {"matchExpressions": [expr("a", "Is")]}}]},
            "spec.networkPolicy.metricsFrom[0].podSelector.matchExpressions[0].operator: must be"
            " one of In, NotIn, Exists, DoesNotExist",
        ),
        (
            {"metricsFrom": [PROMETHEUS] * 17},
            "spec.networkPolicy.metricsFrom: at most 16 peers",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_network_policies_are_named_by_field_path(policy: dict[str, Any], problem: str) -> None:
    problems = validate_spec(spec(networkPolicy=policy))
    assert any(p.startswith(problem) for p in problems), problems
    with pytest.raises(SpecError):
        parse_spec(spec(networkPolicy=policy))
