"""`serve --local --autoscale`: snapshot building, applying decisions, and real processes."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from disagfusion.cli import main
from disagfusion.scheduling.hybrid import HybridPolicy
from disagfusion.scheduling.profile import RequestShape
from disagfusion.scheduling.scaling import Decision, Knobs, PolicyBase, Snapshot, StageDecision
from disagfusion.worker.local import elastic
from disagfusion.worker.local.elastic import (
    Autoscaler,
    Observation,
    ProcessSample,
    apply_decision,
    build_snapshot,
    local_knobs,
    local_profile,
    parse_metrics,
)
from disagfusion.worker.local.launcher import LocalCluster, LocalOptions
from disagfusion.worker.metrics import GatewayMetrics, StageMetrics
from tests.worker.cluster_utils import generate, metric_value, scrape, start_cluster

# ---- canned scrapes, written by the real metric classes so the names stay in sync ----


def _stage_text(
    stage: str, done: int, seconds: float, queued: int = 0, held: int = 0, busy: int = 0
) -> str:
    m = StageMetrics(stage, "local", "builtin:tiny-unet")
    for _ in range(done):
        m.service_time.observe(seconds / done)
        m.completed.inc()
    m.queue_depth.set(queued)
    m.in_flight.set(held)
    m.busy.set(busy)
    return generate_latest(m.registry).decode()


def _gateway_text(arrivals: Mapping[RequestShape, int], waiting: int = 0) -> str:
    m = GatewayMetrics("local", "builtin:tiny-unet")
    for shape, n in arrivals.items():
        m.arrived(shape.width, shape.height, shape.frames, shape.steps, n)
    m.waiting.set(waiting)
    return generate_latest(m.registry).decode()


BIG = RequestShape(128, 128, 1, 10)
SMALL = RequestShape(64, 64, 1, 10)


def _obs(now: float, procs: list[tuple[str, str, bool, str | None]], **desired: int) -> Observation:
    samples = tuple(
        ProcessSample(key, role, ready, parse_metrics(text) if text is not None else None)
        for key, role, ready, text in procs
    )
    return Observation(now=now, processes=samples, desired=desired)


def _two_scrapes() -> tuple[Observation, Observation]:
    before = _obs(
        100.0,
        [
            ("gateway@1", "gateway", True, _gateway_text({BIG: 10})),
            ("encoder-0@2", "encoder", True, _stage_text("encoder", 10, 0.2)),
            ("denoiser-0@3", "denoiser", True, _stage_text("denoiser", 10, 2.0)),
            ("decoder-0@5", "decoder", True, _stage_text("decoder", 10, 0.3)),
        ],
        encoder=1,
        denoiser=2,
        decoder=1,
    )
    after = _obs(
        104.0,
        [
            ("gateway@1", "gateway", True, _gateway_text({BIG: 26, SMALL: 4}, waiting=3)),
            ("encoder-0@2", "encoder", True, _stage_text("encoder", 30, 0.6, queued=1)),
            ("denoiser-0@3", "denoiser", True, _stage_text("denoiser", 26, 5.2, 2, 3, 1)),
            ("denoiser-1@4", "denoiser", False, None),  # spawned, not serving yet
            # restarted on the same slot: a new pid, so its counters are not differenced
            ("decoder-0@6", "decoder", True, _stage_text("decoder", 2, 0.06)),
        ],
        encoder=1,
        denoiser=2,
        decoder=1,
    )
    return before, after


def test_parse_metrics_reads_stage_and_gateway_pages() -> None:
    stage = parse_metrics(_stage_text("denoiser", 4, 2.0, queued=2, held=3, busy=1))
    assert (stage.service_count, stage.completed, stage.queue_depth) == (4, 4, 2)
    assert (stage.in_flight, stage.busy) == (3, 1)
    assert stage.service_sum == pytest.approx(2.0)
    gateway = parse_metrics(_gateway_text({BIG: 3, SMALL: 2}, waiting=5))
    assert gateway.arrivals == {BIG: 3, SMALL: 2}
    assert gateway.waiting == 5


def test_snapshot_from_two_scrapes_has_rates_over_the_interval() -> None:
    snap = build_snapshot(*_two_scrapes())
    assert snap.now == 104.0
    assert snap.arrival_rps == pytest.approx(20 / 4)  # 16 big + 4 small in 4 s
    assert dict(snap.mix) == {BIG: 16, SMALL: 4}
    assert snap.waiting == 3
    assert snap.metrics_age_s == 0.0
    enc = snap.stages["encoder"]
    assert enc.throughput_rps == pytest.approx(20 / 4)
    assert enc.service_time_s == pytest.approx(0.4 / 20)
    assert enc.busy == pytest.approx(0.4 / 4)
    assert enc.queue_depth == 1
    den = snap.stages["denoiser"]
    assert (den.ready, den.starting, den.desired) == (1, 1, 2)
    assert den.service_time_s == pytest.approx(3.2 / 16)
    assert den.busy == pytest.approx(3.2 / 4)  # compute seconds per second
    assert (den.queue_depth, den.in_flight) == (2, 3)
    dec = snap.stages["decoder"]  # only a new process: gauges yes, rates unknown
    assert dec.queue_depth == 0
    assert (dec.service_time_s, dec.throughput_rps, dec.busy) == (None, None, None)


def test_first_scrape_gives_no_rates_so_the_policy_holds() -> None:
    before, _ = _two_scrapes()
    snap = build_snapshot(None, before)
    assert snap.arrival_rps is None
    assert snap.stages["denoiser"].service_time_s is None
    decision = HybridPolicy().decide(snap, HybridPolicy().initial_state(), local_profile(), Knobs())
    assert not decision.metrics_ok
    assert decision.replicas() == {"encoder": 1, "denoiser": 2, "decoder": 1}


def test_counter_reset_within_one_process_counts_from_zero() -> None:
    a = _obs(0.0, [("g@1", "gateway", True, _gateway_text({BIG: 50}))], encoder=1)
    b = _obs(2.0, [("g@1", "gateway", True, _gateway_text({BIG: 4}))], encoder=1)
    assert build_snapshot(a, b).arrival_rps == pytest.approx(2.0)


def test_hybrid_policy_on_a_local_snapshot_adds_a_denoiser() -> None:
    before, after = _two_scrapes()
    snap = build_snapshot(before, after)
    knobs = local_knobs(max_workers=6, interval_s=5.0)
    decision = HybridPolicy().decide(snap, HybridPolicy().initial_state(), local_profile(), knobs)
    replicas = decision.replicas()
    assert replicas["denoiser"] > 2
    assert sum(replicas.values()) <= 6
    assert min(replicas.values()) >= 1


# ---- applying a decision ---------------------------------------------------------------


class FakeCluster:
    def __init__(self, slots: int = 4, **counts: int) -> None:
        self.workers: dict[str, list[Any]] = {
            s: [f"{s}-{i}" for i in range(n)] for s, n in counts.items()
        }
        self.gateway = None
        self.slots = slots
        self.log: list[str] = []

    def add_worker(self, role: str) -> Any:
        if len(self.workers[role]) >= self.slots:
            raise RuntimeError("no free slot")
        self.workers[role].append(f"{role}-{len(self.workers[role])}")
        self.log.append(f"+{role}")
        return self.workers[role][-1]

    def remove_worker(self, role: str) -> Any:
        assert len(self.workers[role]) > 1, "removed the last worker"
        self.log.append(f"-{role}")
        return self.workers[role].pop()

    def counts(self) -> dict[str, int]:
        return {s: len(w) for s, w in self.workers.items()}


def test_apply_reaches_the_decision_removing_first() -> None:
    c = FakeCluster(encoder=1, denoiser=3, decoder=1)
    changes = apply_decision(c, {"encoder": 1, "denoiser": 2, "decoder": 2}, max_workers=5)
    assert c.counts() == {"encoder": 1, "denoiser": 2, "decoder": 2}
    assert c.log == ["-denoiser", "+decoder"]
    assert changes == [("denoiser", 3, 2), ("decoder", 1, 2)]


def test_apply_never_goes_below_one_nor_above_the_budget() -> None:
    c = FakeCluster(encoder=2, denoiser=1, decoder=1)
    changes = apply_decision(c, {"encoder": 0, "denoiser": 9, "decoder": 0}, max_workers=4)
    assert c.counts() == {"encoder": 1, "denoiser": 2, "decoder": 1}
    assert changes == [("encoder", 2, 1), ("denoiser", 1, 2)]


def test_apply_stops_adding_when_no_slot_is_free() -> None:
    c = FakeCluster(slots=2, encoder=1, denoiser=1, decoder=1)
    changes = apply_decision(c, {"encoder": 1, "denoiser": 4, "decoder": 1}, max_workers=6)
    assert c.counts()["denoiser"] == 2
    assert changes == [("denoiser", 1, 2)]


@dataclass
class WantDenoisers(PolicyBase):
    """A test policy: the denoiser size it is told, everything else held."""

    wanted: int
    name: str = "fixed"

    def initial_state(self) -> int:
        return 0

    def decide(self, snapshot: Snapshot, state: int, profile: Any, knobs: Knobs) -> Decision:
        sizes = {s: o.desired for s, o in snapshot.stages.items()} | {"denoiser": self.wanted}
        return Decision(
            stages={s: StageDecision(n, "cpu", n, f"told {n}") for s, n in sizes.items()},
            state=state + 1,
        )


def test_autoscaler_step_applies_reports_and_holds_on_scrape_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before, after = _two_scrapes()
    scrapes: list[Observation | Exception] = [before, after, elastic.ScrapeError("down"), after]

    def fake_scrape(cluster: Any, now: float) -> Observation:
        item = scrapes.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    monkeypatch.setattr(elastic, "scrape", fake_scrape)
    cluster = FakeCluster(encoder=1, denoiser=1, decoder=1)
    lines: list[str] = []
    scaler = Autoscaler(
        cluster, WantDenoisers(3), local_profile(), local_knobs(4, 1.0), 4, report=lines.append
    )
    assert scaler.step() == []  # first scrape: a baseline, no decision
    assert scaler.state == 0
    assert scaler.step() == [("denoiser", 1, 2)]  # 3 wanted, 4 workers at most
    assert lines == ["autoscale: denoiser 1 -> 2: told 3 (arrivals 5.00/s)"]
    assert scaler.step() == [] and scaler.previous is None  # scrape failed: hold
    assert scaler.step() == [] and scaler.state == 1  # a new baseline first
    assert cluster.counts() == {"encoder": 1, "denoiser": 2, "decoder": 1}


# ---- flags and slots -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-workers", "2"], "--max-workers must be >= 3"),
        (["--max-workers", "4", "--denoisers", "3"], "5 workers to start exceed --max-workers 4"),
        (["--autoscale-interval", "0"], "--autoscale-interval must be > 0"),
    ],
)
def test_serve_rejects_bad_autoscale_flags(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--local", "--autoscale", *flags]) == 2
    assert message in capsys.readouterr().err


def test_serve_rejects_an_unusable_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert main(["serve", "--local", "--autoscale", "--profile", str(missing)]) == 2
    assert f"error: --profile {missing}: cannot read" in capsys.readouterr().err


def test_elastic_plan_names_every_possible_instance_up_front() -> None:
    cluster = LocalCluster(LocalOptions(max_workers=4, denoisers=2))
    cluster.plan()
    assert {s: len(w) for s, w in cluster.workers.items()} == {
        "encoder": 1,
        "denoiser": 2,
        "decoder": 1,
    }
    assert {s: len(w) for s, w in cluster.spare.items()} == {
        "encoder": 1,
        "denoiser": 0,
        "decoder": 1,
    }
    all_addrs = {
        s: [c.address for c in cluster.workers[s] + cluster.spare[s]] for s in cluster.spare
    }
    encoder_argv = cluster.workers["encoder"][0].argv
    assert encoder_argv[encoder_argv.index("--next") + 1] == ",".join(all_addrs["denoiser"])
    assert cluster.gateway is not None
    argv = cluster.gateway.argv
    assert json.loads(argv[argv.index("--topology") + 1]) == all_addrs
    with pytest.raises(ValueError, match="exceed max_workers"):
        LocalCluster(LocalOptions(max_workers=3, denoisers=2))


# ---- real processes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def elastic_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # shared: each test leaves it as it found it, 1 encoder, 1 denoiser, 1 decoder
    cluster = start_cluster(tmp_path_factory.mktemp("elastic"), max_workers=4)
    yield cluster
    cluster.stop()


def _wait_for(what: str, check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_autoscaler_adds_a_denoiser_under_load_and_removes_it_after(
    elastic_cluster: LocalCluster,
) -> None:
    cluster = elastic_cluster
    knobs = replace(local_knobs(4, 1.0), scale_down_window_s=8.0)
    lines: list[str] = []
    scaler = Autoscaler(cluster, HybridPolicy(), local_profile(), knobs, 4, report=lines.append)
    stop_scaling, stop_load = threading.Event(), threading.Event()

    def autoscale() -> None:  # what serve --local's supervision loop does every interval
        while not stop_scaling.wait(knobs.interval_s):
            scaler.safe_step()

    scaling = threading.Thread(target=autoscale, daemon=True)
    scaling.start()

    def client(seed: int) -> list[int]:
        codes = []
        while not stop_load.is_set():
            body = {"prompt": "a fox", "size": "128x128", "seed": seed}
            codes.append(generate(cluster, body)[0])
        return codes

    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, i) for i in range(6)]
            _wait_for("a second denoiser", lambda: len(cluster.workers["denoiser"]) == 2, 45)
            added = cluster.workers["denoiser"][1]
            # keep the load on until the new instance has served part of it
            _wait_for("the new denoiser to serve", lambda: _served(added.http_url) >= 3, 45)
            stop_load.set()
            codes = [c for f in futures for c in f.result()]
        assert codes and set(codes) == {200}, codes
        _wait_for("the scale-down", lambda: len(cluster.workers["denoiser"]) == 1, 45)
        _wait_for("the drained denoiser to exit", lambda: not cluster.draining, 30)
    finally:
        stop_load.set()
        stop_scaling.set()
        scaling.join(10)
    assert added.proc is not None and added.proc.returncode == 0  # drained, not killed
    assert {s: len(w) for s, w in cluster.workers.items()} == {
        "encoder": 1,
        "denoiser": 1,
        "decoder": 1,
    }
    assert any(line.startswith("autoscale: denoiser 1 -> 2: ") for line in lines), lines
    assert any(line.startswith("autoscale: denoiser 2 -> 1: ") for line in lines), lines
    # The size change is said once per line, not repeated from the policy's reason.
    assert not any(re.search(r"(up|down) \d+->\d+", line) for line in lines), lines


def _served(url: str) -> float:
    try:
        return metric_value(scrape(url), "disagfusion_stage_requests_completed_total")
    except OSError:
        return 0.0


@pytest.mark.slow
def test_removing_a_worker_under_load_drains_it_and_frees_its_slot(
    elastic_cluster: LocalCluster,
) -> None:
    cluster = elastic_cluster
    added = cluster.add_worker("denoiser")
    cluster.wait_ready(timeout_s=60)
    bodies = [{"prompt": "a cat", "size": "128x128", "seed": i} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(generate, cluster, b) for b in bodies]
        _wait_for("work on the new denoiser", lambda: _in_flight(added.http_url) >= 1, 30)
        removed = cluster.remove_worker("denoiser")
        replies = [f.result() for f in futures]
    assert removed is added
    assert [code for code, _ in replies] == [200] * len(bodies)
    _wait_for("the drained denoiser to exit", lambda: not cluster.draining, 30)
    assert added.proc is not None and added.proc.returncode == 0
    assert added in cluster.spare["denoiser"]
    with pytest.raises(ValueError, match="last denoiser"):
        cluster.remove_worker("denoiser")
    again = cluster.add_worker("denoiser")  # the freed slot is used again
    assert again is added
    cluster.wait_ready(timeout_s=60)
    cluster.remove_worker("denoiser")
    _wait_for("the second drain", lambda: not cluster.draining, 30)


def _in_flight(url: str) -> float:
    try:
        return metric_value(scrape(url), "disagfusion_stage_in_flight")
    except OSError:
        return 0.0
