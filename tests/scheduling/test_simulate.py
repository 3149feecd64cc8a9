"""The discrete-event simulator and `disagfusion simulate` (small traces, seconds in all)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from disagfusion.cli import main
from disagfusion.cli.simulate import AcceleratorLog, plot_context
from disagfusion.scheduling.baselines import Load, make_policy, static_disagg
from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.profile import STAGES, Profile, RequestShape, parse_profile
from disagfusion.scheduling.scaling import Decision, Knobs, PolicyBase, Snapshot, StageDecision
from disagfusion.scheduling.sim.simulate import SimConfig, SimResult, simulate, timeline_of
from disagfusion.scheduling.traces import TraceRequest, builtin_trace

QWEN = builtin_profile("qwen-image-h100")
SHAPE = RequestShape(64, 64, 1, 1)


def toy(startup: float = 60.0) -> Profile:
    """Encoder 1 s, denoiser 10 s, decoder 1 s whatever the shape; 0.5 s per hand-off."""
    cost = {"memory_gb": 10}
    return parse_profile(
        {
            "name": "toy",
            "accelerators": [{"name": "G", "cost_per_hour": 1.0, "memory_gb": 80}],
            "startup_seconds": startup,
            "handoff_seconds": 0.5,
            "default_request": {"width": 64, "height": 64, "frames": 1, "steps": 1},
            "defaults": {"gpus": 16, "slo": "2x"},
            "stages": {
                "encoder": {"G": {"a": 1.0, **cost}},
                "denoiser": {"G": {"a": 10.0, **cost}},
                "decoder": {"G": {"a": 1.0, **cost}},
            },
        }
    )


@dataclass
class Script(PolicyBase):
    """A test policy: sizes by time (the last step whose start <= now), recording snapshots."""

    steps: list[tuple[float, dict[str, int]]]
    interval_s: float = 10.0
    name: str = "script"

    def __post_init__(self) -> None:
        self.seen: list[Snapshot] = []

    def initial_state(self) -> None:
        return None

    def decide(self, snapshot: Snapshot, state: Any, profile: Profile, knobs: Knobs) -> Decision:
        self.seen.append(snapshot)
        sizes = [s for t, s in self.steps if t <= snapshot.now][-1]
        return Decision(
            stages={
                s: StageDecision(replicas=n, accelerator="", predicted=n, reason="script")
                for s, n in sizes.items()
            },
            state=state,
        )


def at(times: list[float], shape: RequestShape = SHAPE) -> list[TraceRequest]:
    return [TraceRequest(t, shape) for t in times]


def run(
    profile: Profile,
    requests: list[TraceRequest],
    policy: Any,
    gpus: int = 16,
    max_queue: int = 1000,
    noise: float = 0.0,
    seed: int = 0,
    slo: str = "2x",
) -> SimResult:
    cfg = SimConfig(gpus=gpus, slo=slo, max_queue=max_queue, seed=seed, noise_sigma=noise)
    cfg = SimConfig(**{**cfg.__dict__, "record": True})
    return simulate(profile, requests, policy, cfg)


ONE = {"encoder": 1, "denoiser": 1, "decoder": 1}


def test_one_request_on_an_idle_pipeline_takes_its_unloaded_latency() -> None:
    profile = toy()
    r = run(profile, at([5.0]), Script([(0, ONE)]))
    unloaded = profile.unloaded_latency(SHAPE, dict.fromkeys(STAGES, "G"))
    assert unloaded == 13.0
    assert r.latencies == [pytest.approx(13.0)]
    assert r.met == 1


def test_conservation_and_latency_floor_under_overload_with_noise() -> None:
    profile = toy()
    requests = at([i * 2.0 for i in range(200)])  # 0.5 req/s on a pool that serves 0.1
    r = run(profile, requests, Script([(0, ONE)]), max_queue=20, noise=0.1)
    assert r.completed + r.rejected == len(requests)
    assert r.unfinished == 0
    assert r.rejected > 100  # the queue limit turns most of the overload away
    assert max(r.latencies) > 20 * 10  # the rest queue behind a single denoiser
    # noise is lognormal(0, 0.1): a request is never more than 3 sigma faster
    assert min(r.latencies) >= 12 * math.exp(-0.3) + 1.0
    summary = r.summary()
    assert summary["slo_attainment"] < 0.1
    assert summary["latency_p50_s"] <= summary["latency_p95_s"] <= summary["latency_p99_s"]


def test_a_scale_up_serves_only_after_the_start_up_delay() -> None:
    requests = at([11.0] * 10)
    steps = [(0.0, ONE), (10.0, {"encoder": 1, "denoiser": 5, "decoder": 1})]
    slow = run(toy(startup=60.0), requests, Script(steps))
    fast = run(toy(startup=0.0), requests, Script(steps))
    # one denoiser until t = 70: requests leave at 24, 34, 44, 54, 64
    assert sum(t < 70 for t in slow.done_times) == 5
    assert sum(t < 70 for t in fast.done_times) == 10
    assert slow.completed == fast.completed == 10


def test_a_scale_down_drains_busy_instances_and_loses_nothing() -> None:
    steps = [(0.0, {"encoder": 1, "denoiser": 4, "decoder": 1}), (10.0, ONE)]
    r = run(toy(), at([0.0] * 4), Script(steps))
    assert r.completed == 4 and r.unfinished == 0
    # denoisers finish at 11.5, 12.5, 13.5, 14.5; three leave as they finish,
    # the decoder's last request ends at 16
    assert r.duration_s == pytest.approx(16.0)
    gpu_seconds = 16 + 16 + 16 + (11.5 + 12.5 + 13.5)
    assert r.gpu_hours == pytest.approx(gpu_seconds / 3600)
    assert timeline_of(r)["denoiser"][-1] == (10.0, 4)  # draining pods still hold GPUs


def test_static_gpu_hours_are_replicas_times_duration() -> None:
    requests = builtin_trace("steady", QWEN, gpus=8)[:300]
    policy = static_disagg(QWEN, Load.of(requests, QWEN), 8, "2x")
    r = run(QWEN, requests, policy, gpus=8, noise=0.1)
    gpus = sum(n * QWEN.gpus_per_instance(s, acc) for s, (n, acc) in policy.sizes.items())
    assert gpus <= 8
    assert r.gpu_hours == pytest.approx(gpus * r.duration_s / 3600)
    assert r.cost_usd == pytest.approx(r.gpu_hours * 2.5)


def test_the_budget_holds_whatever_the_policy_asks() -> None:
    greedy = Script([(0.0, dict.fromkeys(STAGES, 100))])
    r = run(toy(), at([i * 0.1 for i in range(300)]), greedy, gpus=7)
    assert max(sum(counts) for _, counts in r.timeline) == 7  # one GPU per instance
    assert r.completed == 300


def test_monolithic_replicas_run_every_stage_without_hand_offs() -> None:
    profile = builtin_profile("qwen-image-h100-l40s")
    requests = at([0.0], profile.default_request)
    policy = make_policy("static-monolithic", profile, requests, 64, "2x")
    r = run(profile, requests, policy, gpus=64)
    shape = profile.default_request
    compute = sum(profile.service_time(s, "H100", shape) for s in STAGES)
    assert r.pools == ("monolithic",)
    assert r.latencies == [pytest.approx(compute)]


def test_the_policy_sees_windowed_metrics_like_the_operator() -> None:
    profile = toy()
    policy = Script([(0.0, {"encoder": 1, "denoiser": 4, "decoder": 1})])
    run(profile, at([i * 5.0 for i in range(60)]), policy)  # 0.2 req/s for 300 s
    snap = next(s for s in policy.seen if s.now == 200.0)
    den = snap.stages["denoiser"]
    assert snap.arrival_rps == pytest.approx(0.2, rel=0.1)
    assert den.service_time_s == pytest.approx(10.0)
    assert den.busy == pytest.approx(2.0, rel=0.1)  # 0.2 req/s x 10 s
    assert den.throughput_rps == pytest.approx(0.2, rel=0.1)
    assert (den.ready, den.desired, den.starting) == (4, 4, 0)
    assert snap.mix == ((SHAPE, 1.0),)
    assert snap.slo_attainment == 1.0
    first = policy.seen[0]  # the warm start: the planner's pool at steady state
    assert first.now == 0.0 and first.arrival_rps == pytest.approx(0.2, rel=0.2)


def test_a_seed_makes_runs_repeatable() -> None:
    requests = builtin_trace("burst", QWEN, gpus=8)[:400]
    policy = make_policy("hpa", QWEN, requests, 8, "2x")
    a = run(QWEN, requests, policy, gpus=8, noise=0.1, seed=3).summary()
    b = run(QWEN, requests, policy, gpus=8, noise=0.1, seed=3).summary()
    c = run(QWEN, requests, policy, gpus=8, noise=0.1, seed=4).summary()
    assert a == b
    assert a["latency_p50_s"] != c["latency_p50_s"]


def test_the_oracle_needs_no_more_gpu_hours_than_a_static_pool_on_diurnal() -> None:
    requests = builtin_trace("diurnal", QWEN, gpus=8)
    results = {}
    for name in ("static-disagg", "oracle"):
        policy = make_policy(name, QWEN, requests, 8, "2x")
        results[name] = run(QWEN, requests, policy, gpus=8, noise=0.1, max_queue=80)
    oracle, static = results["oracle"], results["static-disagg"]
    assert oracle.gpu_hours <= static.gpu_hours
    assert oracle.met >= static.met


# -- the command line ---------------------------------------------------------------


def write_trace(path: Path, n: int = 40) -> Path:
    path.write_text("".join(json.dumps({"t": i * 3.0}) + "\n" for i in range(n)))
    return path


def test_simulate_prints_one_json_row_per_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    argv = ["simulate", "--trace", str(trace), "--profile", "builtin:qwen-image-h100"]
    argv += ["--gpus", "8", "--slo", "60s", "--policy", "static-disagg,hpa,hybrid", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == {"static-disagg", "hpa", "hybrid"}
    assert (out["gpus"], out["slo"], out["requests"]) == (8, "60s", 40)
    keys = {"completed", "rejected", "throughput_rps", "latency_p50_s", "latency_p95_s"}
    keys |= {"latency_p99_s", "slo_attainment", "gpu_hours", "scale_events"}
    for row in out["policies"].values():
        assert keys <= set(row)
        assert row["completed"] + row["rejected"] == 40


def test_simulate_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [t["name"] for t in out["traces"]]
    assert names == [
        "builtin:steady",
        "builtin:burst",
        "builtin:diurnal",
        "builtin:mix-shift",
        "builtin:mixed-light-heavy",
    ]
    assert all("relative" in t["description"] for t in out["traces"])
    assert "builtin:qwen-image-h100" in [p["name"] for p in out["profiles"]]
    assert "hybrid" in out["policies"] and "oracle" in out["policies"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trace", "BAD"], "line 2"),
        (["--trace", "builtin:nope"], "unknown trace"),
        (["--trace", "MISSING"], "cannot read"),
        (["--trace", "GOOD", "--policy", "magic"], "unknown policy"),
        (["--trace", "GOOD", "--slo", "fast"], "SLO"),
        (["--trace", "GOOD", "--profile", "builtin:nope"], "unknown profile"),
        (["--trace", "GOOD", "--gpus", "0"], "--gpus must be >= 1"),
        (["--trace", "GOOD", "--gpus", "2000000"], "<= 1,000,000"),
        (["--dump-trace", "builtin:steady", "--profile", "nope.yaml"], "cannot read nope.yaml"),
    ],
)
def test_simulate_errors_exit_2_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    good = write_trace(tmp_path / "good.jsonl", 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 0}\n{"t": "soon"}\n')
    paths = {"GOOD": str(good), "BAD": str(bad), "MISSING": str(tmp_path / "none.jsonl")}
    argv = ["simulate", "--profile", "builtin:qwen-image-h100", "--gpus", "8"]
    argv += [paths.get(a, a) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trace", "builtin:steady", "--gpus", "many"], "argument --gpus: invalid int value"),
        (["--seed"], "expected one argument"),
    ],
)
def test_simulate_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("disagfusion simulate: error: ") and message in err
    assert err.count("\n") == 1, err  # no usage block before the message


def test_dump_trace_without_a_profile_uses_the_documented_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare, explicit = tmp_path / "bare.jsonl", tmp_path / "explicit.jsonl"
    argv = ["simulate", "--dump-trace", "builtin:burst", "--requests", "40"]
    assert main([*argv, "-o", str(bare)]) == 0
    assert "qwen-image-h100 on 64 GPUs" in capsys.readouterr().err  # says what it used
    assert main([*argv, "--profile", "builtin:qwen-image-h100", "-o", str(explicit)]) == 0
    assert bare.read_text() == explicit.read_text()
    rows = [json.loads(line) for line in bare.read_text().splitlines()]
    assert rows and all((r["width"], r["steps"]) == (1328, 50) for r in rows)


def test_dump_trace_writes_a_file_simulate_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "steady.jsonl"
    base = ["--profile", "builtin:qwen-image-h100", "--gpus", "4", "--requests", "50"]
    assert main(["simulate", "--dump-trace", "builtin:steady", *base, "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert 30 < len(lines) < 80
    assert set(json.loads(lines[0])) == {"t", "width", "height", "frames", "steps"}
    capsys.readouterr()
    argv = ["simulate", "--trace", str(out), *base[:4], "--policy", "oracle", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == len(lines)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    trace = write_trace(tmp_path / "t.jsonl", 20)
    png = tmp_path / "out.png"
    argv = ["simulate", "--trace", str(trace), "--profile", "builtin:qwen-image-h100"]
    argv += ["--gpus", "8", "--policy", "static-disagg,threshold", "--plot", str(png)]
    assert main(argv) == 0
    width, height = png_size(png)
    assert height >= 2 * 250 and width <= 2.5 * height  # two rows, not a strip
    assert "static-disagg" in capsys.readouterr().out


def test_plot_gives_every_policy_a_readable_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "six.png"
    argv = ["simulate", "--trace", "builtin:mix-shift", "--profile", "builtin:qwen-image-h100-l40s"]
    argv += ["--requests", "30", "--plot", str(png)]  # all six policies
    assert main(argv) == 0
    width, height = png_size(png)
    assert height >= 6 * 250  # a one-row strip was 2772 x 715
    assert 0.5 <= width / height <= 1.5 and width >= 1000
    assert png.stat().st_size > 50_000  # something is drawn


def mixed_pool_results() -> tuple[Profile, list[TraceRequest], list[SimResult], dict[str, Any]]:
    profile = builtin_profile("qwen-image-h100-l40s")
    requests = builtin_trace("steady", profile, 64, requests=60)
    cfg = SimConfig(gpus=64, slo="60s", max_queue=640, record=True)
    results, used = [], {}
    for name in ("static-disagg", "static-monolithic"):
        policy = AcceleratorLog(make_policy(name, profile, requests, 64, "60s"))
        results.append(simulate(profile, requests, policy, cfg))
        used[name] = policy.used
    return profile, requests, results, used


def test_the_accelerator_log_records_each_pools_type() -> None:
    _, _, results, used = mixed_pool_results()
    assert used["static-disagg"] == {"encoder": ["L40S"], "denoiser": ["H100"], "decoder": ["L40S"]}
    assert used["static-monolithic"] == {"monolithic": ["H100"]}
    assert [r.policy for r in results] == ["static-disagg", "static-monolithic"]


def legend_texts(ax: Any) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [str(x.get_text()) for x in legend.get_texts()]


def test_the_figure_names_types_draws_the_slo_and_the_arrival_rate() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.lines import Line2D

    from disagfusion.cli.plot import build_figure

    profile, requests, results, used = mixed_pool_results()
    fig = build_figure(results, plot_context("t", profile, requests, "60s", used))
    FigureCanvasAgg(fig).draw()
    instances, latency, twin = fig.axes[0], fig.axes[1], fig.axes[4]  # twins come last
    labels = legend_texts(instances)
    assert labels == ["encoder (L40S)", "denoiser (H100)", "decoder (L40S)", "arrivals (req/s)"]
    assert legend_texts(fig.axes[2])[0] == "monolithic (H100)"
    legend = instances.get_legend()
    assert legend is not None
    pools = [h for h in legend.legend_handles if isinstance(h, Line2D)]  # not the arrivals
    styles = {(h.get_color(), h.get_linestyle(), h.get_marker()) for h in pools}
    assert len(styles) == 3  # equal counts of two stages stay distinguishable
    markers = [ln.get_xdata() for ln in instances.lines if ln.get_linestyle() == "None"]
    assert len(markers) == 3 and len({float(np.asarray(m)[0]) for m in markers}) == 3  # apart
    slo = [ln for ln in latency.lines if ln.get_label() == "SLO 60s"]
    assert slo and set(np.asarray(slo[0].get_ydata(), dtype=float).tolist()) == {60.0}
    assert twin.get_ylabel() == "arrivals (req/s)" and twin.collections
    for ax in fig.axes:
        ticks = [x.get_text() for x in ax.get_xticklabels() + ax.get_yticklabels()]
        assert not any("e" in x or "\\times" in x for x in ticks), ticks  # no 1e4, no 10^x
        assert ax.yaxis.get_offset_text().get_text() == ""


def test_plot_context_for_a_slowdown_slo_and_one_accelerator_type() -> None:
    pytest.importorskip("matplotlib")
    requests = at([0.0, 1.0])
    ctx = plot_context("t", QWEN, requests, "2x", {"hybrid": {"denoiser": ["H100"]}})
    unloaded = QWEN.unloaded_latency(QWEN.default_request, dict.fromkeys(STAGES, "H100"))
    assert ctx.slo_s == pytest.approx(2 * unloaded)
    assert "2x" in ctx.slo_label
    assert ctx.accelerators == {}  # one type: the legend says just "denoiser"
    assert list(ctx.arrivals) == [0.0, 1.0]


def test_an_accelerator_move_replaces_the_pool_and_keeps_counts() -> None:
    mixed = builtin_profile("qwen-image-h100-l40s")  # 32 H100, 32 L40S
    requests = at([i * 2.0 for i in range(100)], mixed.default_request)

    class Move(Script):
        def decide(
            self, snapshot: Snapshot, state: Any, profile: Profile, knobs: Knobs
        ) -> Decision:
            d = super().decide(snapshot, state, profile, knobs)
            acc = "L40S" if snapshot.now >= 50 else "H100"
            stages = dict(d.stages)
            stages["denoiser"] = StageDecision(
                replicas=30, accelerator=acc, predicted=30, reason=""
            )
            return Decision(stages=stages, state=state)

    r = run(mixed, requests, Move([(0.0, ONE)]), gpus=64)
    assert r.completed == 100 and r.unfinished == 0
    # 30 H100 denoisers at first; from t = 50 the pool moves to L40S (41 GB fits one
    # 48 GB card): new pods start while the H100 ones finish their requests
    held = [sum(counts) for _, counts in r.timeline]
    assert held[0] == 32 and max(held) <= 64
    assert r.latencies[-1] > 25.3 * 2.7  # the last requests ran on the slower L40S
