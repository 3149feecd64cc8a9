"""What every scaling policy reads and returns (pure data, no I/O).

The operator builds a `Snapshot` from Kubernetes and Prometheus, the local
launcher from its processes' metrics, the simulator from its own state; all
of them hand it to the same policy code and act on the `Decision`.
A policy is a pure function of (snapshot, its previous state, profile, knobs):
the time is `snapshot.now`, never a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from disagfusion.scheduling.profile import Profile, RequestShape
from disagfusion.scheduling.stages import STAGES

if TYPE_CHECKING:
    from disagfusion.scheduling.sim.simulate import Future

MODES = ("Disabled", "Advisory", "Active")


@dataclass(frozen=True)
class StageObservation:
    """One stage as seen now. None means the metric is missing (not zero)."""

    ready: int  # instances serving
    starting: int  # asked for, not ready yet: capacity already on the way
    desired: int  # replicas currently asked for
    accelerator: str = ""  # "" means the profile's default for the stage
    queue_depth: float | None = None  # payloads waiting for compute, all instances
    in_flight: float | None = None  # payloads held: queued, computing or handing off
    busy: float | None = None  # instances computing right now (mean over the window)
    service_time_s: float | None = None  # observed mean compute seconds per request
    throughput_rps: float | None = None  # completions per second over the window
    # Heterogeneous pools: replicas asked for per accelerator type (they add up to
    # `desired`); empty: one pool, all on `accelerator`.
    pools: Mapping[str, int] = field(default_factory=dict)

    def pool_sizes(self, default_accelerator: str) -> dict[str, int]:
        """Replicas asked for per accelerator type, one pool when `pools` is empty."""
        return dict(self.pools) or {self.accelerator or default_accelerator: self.desired}


@dataclass(frozen=True)
class Snapshot:
    now: float  # seconds, any epoch; only differences matter
    stages: Mapping[str, StageObservation]
    arrival_rps: float | None = None  # requests/s reaching the gateway over the window
    mix: tuple[tuple[RequestShape, float], ...] = ()  # recent shapes and their share
    waiting: float | None = None  # accepted by the gateway, not yet taken by the encoder
    slo_attainment: float | None = None  # share of recent requests that met the SLO
    metrics_age_s: float | None = 0.0  # age of the newest sample; None: no metrics at all


@dataclass(frozen=True)
class Knobs:
    """The tunables (the CRD's spec.autoscaling documents each default)."""

    mode: str = "Active"
    interval_s: float = 15.0  # how often the policy runs
    target_utilization: float = 0.9  # most busy share a stage is sized for (small pools: less)
    slo: str | None = None  # "30s" or "2x"; None: the profile's default
    max_gpus: int | None = None  # GPU budget across all stages; None: the profile's default
    min_replicas: Mapping[str, int] = field(default_factory=dict)  # per stage, default 1
    max_replicas: Mapping[str, int] = field(default_factory=dict)  # per stage, default budget
    tolerance: float = 0.1  # ignore changes within ±10 % of the current size
    scale_up_window_s: float = 0.0  # scale up to the lowest recommendation in this window
    scale_down_window_s: float = 300.0  # scale down to the highest recommendation in it
    max_step_up: int = 4  # pods added per stage per decision, at least (or +100 %)
    max_step_down: int = 0  # pods removed per stage per decision; 0: no limit
    stale_after_s: float = 120.0  # older metrics hold the current size
    drain_seconds: float = 60.0  # size to clear a backlog within this time
    forecast_seconds: float | None = None  # look-ahead; None: start-up + interval - SLO slack
    # Heterogeneous pools: the most instances per stage and accelerator (a pool's max).
    max_pool_replicas: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def min_for(self, stage: str) -> int:
        return self.min_replicas.get(stage, 1)

    def max_for(self, stage: str, default: int) -> int:
        return self.max_replicas.get(stage, default)


@dataclass(frozen=True)
class StageDecision:
    replicas: int  # what the stage should run (Advisory: what it would run)
    accelerator: str
    predicted: int  # the performance model's balanced size before feedback and limits
    reason: str  # one line a person can read in `kubectl describe`
    limited: str = ""  # "budget", "max" or "" when nothing capped the wish
    # Heterogeneous pools: (accelerator, replicas) per pool, adding up to `replicas`;
    # empty: one pool on `accelerator`.
    pools: tuple[tuple[str, int], ...] = ()

    def pool_sizes(self) -> dict[str, int]:
        """Replicas per accelerator type (one entry when the stage has one pool)."""
        return dict(self.pools) if self.pools else {self.accelerator: self.replicas}


@dataclass(frozen=True)
class Decision:
    stages: Mapping[str, StageDecision]
    state: Any  # the policy's own state, handed back on the next call
    metrics_ok: bool = True  # False: metrics stale or missing, sizes held
    predicted_throughput_rps: float | None = None

    def replicas(self) -> dict[str, int]:
        return {s: d.replicas for s, d in self.stages.items()}


class Policy(Protocol):
    """A scaling policy; implementations keep no hidden state between calls.

    `interval_s`, `monolithic` and `prepare` are for the simulator (the
    operator and the launcher run every policy at `knobs.interval_s`);
    `PolicyBase` gives them their defaults.
    """

    name: str

    @property
    def interval_s(self) -> float | None:
        """How often the policy runs; None: every `knobs.interval_s`."""
        ...

    @property
    def monolithic(self) -> bool:
        """True: one MONOLITHIC pool runs the whole pipeline instead of a pool per stage."""
        ...

    def prepare(self, future: Future) -> None:
        """Called once before a simulation with what an oracle may know in advance."""
        ...

    def initial_state(self) -> Any: ...

    def decide(
        self, snapshot: Snapshot, state: Any, profile: Profile, knobs: Knobs
    ) -> Decision: ...


class PolicyBase:
    """The defaults of Policy's simulator hooks: run at the knobs' interval, one pool
    per stage, nothing to prepare."""

    interval_s: float | None = None
    monolithic: bool = False

    def prepare(self, future: Future) -> None:
        del future  # only an oracle looks ahead


def mix_or_default(snapshot: Snapshot, profile: Profile) -> tuple[tuple[RequestShape, float], ...]:
    """The observed shape mix, normalised; the profile's default request when none was seen."""
    total = sum(w for _, w in snapshot.mix if w > 0)
    if total <= 0:
        return ((profile.default_request, 1.0),)
    return tuple((shape, w / total) for shape, w in snapshot.mix if w > 0)


def accelerators_of(snapshot: Snapshot, profile: Profile) -> dict[str, str]:
    return {
        s: (snapshot.stages[s].accelerator if s in snapshot.stages else "")
        or profile.default_accelerator(s)
        for s in STAGES
    }


def queued_for(snapshot: Snapshot, stage: str) -> float:
    """Requests waiting for a stage; the gateway's waiting ones are the first stage's."""
    q = snapshot.stages[stage].queue_depth or 0.0
    return q + (snapshot.waiting or 0.0 if stage == STAGES[0] else 0.0)
