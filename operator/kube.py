"""Kubernetes I/O for the operator: apply children, read their state, post Events.

Plain JSON over the `kubernetes` client's authenticated ApiClient (kubeconfig
or in-cluster): no model classes, so whatever the API server returns is kept
as-is, and patches are JSON merge patches (a list such as `containers` is
replaced whole, which is what a rendered child means).
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config

from disagfusion.operator.render import GROUP, HASH_ANNOTATION, PLURAL, VERSION, Child

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
PLURALS = {
    "StatefulSet": "statefulsets",
    "Deployment": "deployments",
    "Service": "services",
    "ConfigMap": "configmaps",
    "NetworkPolicy": "networkpolicies",
    "Event": "events",
    "DiffusionPipeline": PLURAL,
}
COMPONENT = "disagfusion-operator"


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


def is_subset(desired: Any, live: Any) -> bool:
    """Whether every field of `desired` is in `live` (the server may add defaults)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            # A desired null (a field a merge patch must clear) matches an absent one.
            (live.get(k) is None) if v is None else (k in live and is_subset(v, live[k]))
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(desired) == len(live)
            and all(is_subset(d, x) for d, x in zip(desired, live, strict=True))
        )
    return bool(desired == live)


def in_sync(child: Child, live: Mapping[str, Any]) -> bool:
    """No write needed: same input hash and nobody edited the fields we own."""
    meta = live.get("metadata") or {}
    if (meta.get("annotations") or {}).get(HASH_ANNOTATION) != child.input_hash:
        return False
    owned = {k: v for k, v in child.body.items() if k not in ("apiVersion", "kind", "metadata")}
    wanted_meta = {k: child.body["metadata"][k] for k in ("labels", "ownerReferences")}
    return is_subset(owned, live) and is_subset(wanted_meta, meta)


class Kube:
    """The few API calls the operator makes."""

    def __init__(self, api_client: client.ApiClient, timeout_s: float = 30.0) -> None:
        self.api = api_client
        self.timeout_s = timeout_s
        # One request at a time per client: handlers of several pipelines run in
        # kopf's thread pool, and the operator's traffic is small.
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> Kube:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.ApiClient())

    @classmethod
    def for_host(cls, host: str, timeout_s: float = 30.0) -> Kube:
        cfg = client.Configuration()
        cfg.host = host
        return cls(client.ApiClient(cfg), timeout_s)

    def close(self) -> None:
        self.api.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """One call; None for 404; KubeError for any other failure."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, payload, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            with self._lock:
                response = self.api.call_api(
                    method,
                    url,
                    header_params=headers,
                    body=payload,
                    _request_timeout=self.timeout_s,
                )
                data = response.read()
        except Exception as err:  # connection refused, timeouts: retried by the caller
            raise KubeError(0, f"{method} {path}: {err}") from err
        if response.status == 404:
            return None
        if not 200 <= response.status < 300:
            text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
            raise KubeError(response.status, text[:500])
        if not data:
            return {}
        result = json.loads(data)
        return result if isinstance(result, dict) else {}

    # children

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", object_path(api_version, kind, namespace, name))

    def apply(self, child: Child) -> str:
        """Create or merge-patch one child; 'created', 'updated' or 'unchanged' (no write)."""
        ns = child.body["metadata"]["namespace"]
        live = self.get(child.api_version, child.kind, ns, child.name)
        if live is None:
            self.request("POST", object_path(child.api_version, child.kind, ns), child.body)
            return "created"
        if in_sync(child, live):
            return "unchanged"
        self.request(
            "PATCH",
            object_path(child.api_version, child.kind, ns, child.name),
            child.body,
            MERGE_PATCH,
        )
        return "updated"

    def delete_owned(self, child: Child, owner_uid: str) -> bool:
        """Delete a child if it still belongs to `owner_uid` (never someone else's object)."""
        ns = child.body["metadata"]["namespace"]
        live = self.get(child.api_version, child.kind, ns, child.name)
        if live is None:
            return False
        refs = (live.get("metadata") or {}).get("ownerReferences") or []
        if not any(ref.get("uid") == owner_uid for ref in refs):
            return False
        self.request("DELETE", object_path(child.api_version, child.kind, ns, child.name))
        return True

    # the pipeline itself

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        path = object_path(f"{GROUP}/{VERSION}", "DiffusionPipeline", namespace, name)
        self.request("PATCH", f"{path}/status", {"status": status}, MERGE_PATCH)

    def event(
        self,
        involved: Mapping[str, Any],
        type_: str,
        reason: str,
        message: str,
        now: datetime.datetime | None = None,
    ) -> None:
        """Post a core/v1 Event about the pipeline; failures are logged, never raised."""
        meta = involved.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'pipeline')}.", "namespace": ns},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": involved.get("kind", "DiffusionPipeline"),
                "name": meta.get("name"),
                "namespace": ns,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.request("POST", object_path("v1", "Event", ns), body)
        except Exception as err:  # an Event is best effort
            log.warning("could not post event %s for %s: %s", reason, meta.get("name"), err)
