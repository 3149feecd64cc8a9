"""observe.py: the autoscaler's PromQL and the Snapshot it builds from canned answers."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from disagfusion.operator.autoscale.observe import (
    build_snapshot,
    metrics_age,
    mix,
    queries,
    samples,
    selector,
)
from disagfusion.scheduling.profile import RequestShape

T = 1_800_000_000.0  # the queries' evaluation time


def vector(*items: tuple[dict[str, str], str], at: float = T) -> dict[str, Any]:
    """A Prometheus instant-vector `data` object, as the HTTP API returns it."""
    return {
        "resultType": "vector",
        "result": [{"metric": labels, "value": [at, value]} for labels, value in items],
    }


def sts(replicas: int, ready: int) -> dict[str, Any]:
    return {"spec": {"replicas": replicas}, "status": {"readyReplicas": ready}}


STATEFULSETS = {"encoder": sts(1, 1), "denoiser": sts(3, 2), "decoder": sts(1, 1)}


def busy_pipeline() -> dict[str, dict[str, Any]]:
    shape = {"width": "64", "height": "64", "frames": "1"}
    return {
        "arrivals": vector(({}, "2.5")),
        "mix": vector(({**shape, "steps": "4"}, "0.5"), ({**shape, "steps": "20"}, "2")),
        "gateway": vector(({}, "1")),
        "waiting": vector(({}, "3")),
        "queue": vector(({"stage": "encoder"}, "0"), ({"stage": "denoiser"}, "7")),
        "in_flight": vector(({"stage": "encoder"}, "1"), ({"stage": "denoiser"}, "9")),
        "busy": vector(({"stage": "encoder"}, "0.2"), ({"stage": "denoiser"}, "1.9")),
        # The encoder finished nothing in the window: sum/count is 0/0.
        "service_time": vector(({"stage": "encoder"}, "NaN"), ({"stage": "denoiser"}, "0.8")),
        "throughput": vector(({"stage": "encoder"}, "0"), ({"stage": "denoiser"}, "2.4")),
        "newest": vector(({}, str(T - 3))),
    }


def test_queries_select_one_pipeline() -> None:
    qs = queries("sd", "ml", window="30s")
    assert set(qs) == {
        "arrivals",
        "mix",
        "gateway",
        "waiting",
        "queue",
        "in_flight",
        "busy",
        "service_time",
        "throughput",
        "newest",
    }
    for key, q in qs.items():
        assert 'pipeline="sd",namespace="ml"' in q, key
    assert qs["arrivals"] == (
        'sum(rate(disagfusion_gateway_arrivals_total{pipeline="sd",namespace="ml"}[30s]))'
    )
    assert "sum by (width,height,frames,steps)" in qs["mix"]
    assert "_service_time_seconds_sum" in qs["service_time"]
    assert "_service_time_seconds_count" in qs["service_time"]
    assert "avg_over_time(disagfusion_stage_busy" in qs["busy"]


def test_selector_escapes_and_namespace_is_optional() -> None:
    assert selector('a"b\\c', None) == 'pipeline="a\\"b\\\\c"'
    assert selector("sd", "ml") == 'pipeline="sd",namespace="ml"'


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule)."""
    rules = {
        "groups": [
            {
                "name": "observe",
                "rules": [
                    {"record": f"disagfusion:observe_{key}", "expr": q}
                    for key, q in queries("sd", "ml").items()
                ],
            }
        ]
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        ["/usr/bin/promtool", "check", "rules", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_snapshot_of_a_busy_pipeline() -> None:
    snap = build_snapshot(busy_pipeline(), STATEFULSETS, now=42.0, accelerators={"denoiser": "A"})
    assert snap.now == 42.0 and snap.arrival_rps == 2.5 and snap.waiting == 3.0
    assert snap.metrics_age_s == pytest.approx(3.0)
    # Largest share first.
    assert snap.mix == (
        (RequestShape(64, 64, 1, 20), 2.0),
        (RequestShape(64, 64, 1, 4), 0.5),
    )
    den = snap.stages["denoiser"]
    assert (den.desired, den.ready, den.starting, den.accelerator) == (3, 2, 1, "A")
    assert (den.queue_depth, den.in_flight, den.busy) == (7.0, 9.0, 1.9)
    assert (den.service_time_s, den.throughput_rps) == (0.8, 2.4)
    enc = snap.stages["encoder"]
    assert enc.service_time_s is None  # NaN: nothing completed, not "zero seconds"
    assert enc.throughput_rps == 0.0 and enc.queue_depth == 0.0
    # The decoder exports nothing (not scraped): unknown, not zero.
    dec = snap.stages["decoder"]
    assert dec.queue_depth is None and dec.busy is None and dec.throughput_rps is None
    assert (dec.desired, dec.ready) == (1, 1)


def test_idle_gateway_means_zero_demand_but_no_gateway_means_unknown() -> None:
    idle = {"gateway": vector(({}, "1")), "arrivals": vector(), "newest": vector(({}, str(T)))}
    assert build_snapshot(idle, STATEFULSETS, now=1.0).arrival_rps == 0.0
    gone = {"gateway": vector(), "arrivals": vector(), "newest": vector(({}, str(T)))}
    assert build_snapshot(gone, STATEFULSETS, now=1.0).arrival_rps is None


def test_no_prometheus_answer_keeps_sizes_and_says_no_metrics() -> None:
    snap = build_snapshot(None, {"denoiser": sts(4, 4)}, now=1.0, fallback_replicas={"encoder": 2})
    assert snap.metrics_age_s is None and snap.arrival_rps is None
    assert snap.stages["denoiser"].desired == 4
    # A StatefulSet that does not exist yet: the size the operator will render.
    assert (snap.stages["encoder"].desired, snap.stages["encoder"].ready) == (2, 0)
    assert snap.stages["decoder"].desired == 0


def test_no_samples_for_the_pipeline_is_no_metrics() -> None:
    empty = {key: vector() for key in queries("sd", "ml")}
    snap = build_snapshot(empty, STATEFULSETS, now=1.0)
    assert snap.metrics_age_s is None and snap.arrival_rps is None
    assert all(snap.stages[s].queue_depth is None for s in snap.stages)


def test_metrics_age_and_odd_values() -> None:
    assert metrics_age(vector(({}, str(T - 200)))) == pytest.approx(200.0)
    assert metrics_age(vector(({}, str(T + 1)))) == 0.0  # clock skew is not negative age
    assert metrics_age(vector()) is None
    values = [v for _, v, _ in samples(vector(({}, "+Inf"), ({}, "NaN"), ({}, "x"), ({}, "1")))]
    assert values == [None, None, None, 1.0]
    assert samples({"resultType": "scalar", "result": [T, "5"]})[0][1] == 5.0
    assert samples({"resultType": "matrix", "result": []}) == []


def test_mix_skips_zero_and_unlabelled_shapes() -> None:
    shape = {"width": "64", "height": "64", "frames": "1", "steps": "4"}
    data = vector((shape, "0"), ({"width": "64"}, "1"), ({**shape, "steps": "x"}, "1"))
    assert mix(data) == ()
