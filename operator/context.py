"""The operator's collaborators and in-memory state, shared by the reconcile
handlers and the autoscale timer (kept apart so neither imports the other)."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from disagfusion.operator.kube import Kube
from disagfusion.operator.metrics import OperatorMetrics
from disagfusion.operator.spec import SpecDefaults
from disagfusion.scheduling.scaling import Policy


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Context:
    """The operator's collaborators and its in-memory state (lost on restart, by design)."""

    kube: Kube
    metrics: OperatorMetrics
    policy: Policy | None = None  # None: HybridPolicy
    prometheus_url: str | None = None  # default for spec.autoscaling.prometheusUrl
    # What a spec that does not say gets: the chart's worker image and network peers.
    spec_defaults: SpecDefaults = field(default_factory=SpecDefaults)
    rate_window: str = "1m"  # PromQL range of the autoscaler's rates
    prometheus_timeout_s: float = 5.0
    clock: Callable[[], float] = time.time
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> last written
    scalers: dict[str, Any] = field(default_factory=dict)  # uid -> autoscale.timer.Memory
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, uid: str) -> threading.Lock:
        """One lock per pipeline: its reconcile and autoscale rounds never interleave."""
        with self._guard:
            return self._locks.setdefault(uid, threading.Lock())

    def known_status(self, uid: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The newest status we know of: what we last wrote, else the body's."""
        cached = self.statuses.get(uid)
        return dict(cached if cached is not None else (body.get("status") or {}))

    def write_status(
        self, namespace: str, name: str, uid: str, old: Mapping[str, Any], patch: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch the status unless that changes nothing; remember the result."""
        new = merge_patch(old, patch)
        if new != old:
            self.kube.patch_status(namespace, name, patch)
        self.statuses[uid] = new
        return new

    def forget(self, uid: str) -> None:
        self.statuses.pop(uid, None)
        self.scalers.pop(uid, None)
        with self._guard:
            self._locks.pop(uid, None)


def merge_patch(old: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, as the API server applies it (objects merge, lists replace)."""
    out = dict(old)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping):
            base = out.get(key)
            out[key] = merge_patch(base if isinstance(base, Mapping) else {}, value)
        else:
            out[key] = value
    return out
