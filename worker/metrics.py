"""Prometheus metrics exported by every process (names prefixed `disagfusion_`).

Each process owns one registry so several runtimes can live in one test
process without clashing; /metrics serves that registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from a few ms (tiny CPU models) to minutes (video denoising).
SECONDS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class StageMetrics:
    """Metrics of one stage worker (encoder, denoiser, decoder or monolithic)."""

    def __init__(self, stage: str, pipeline: str, model: str, queue_order: str = "fifo") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = {"stage": stage, "pipeline": pipeline}
        names = list(labels)

        Gauge(
            "disagfusion_worker_info",
            "Static facts about this worker.",
            [*names, "model", "queue_order"],
            registry=r,
        ).labels(stage=stage, pipeline=pipeline, model=model, queue_order=queue_order).set(1)
        self.max_batch = Gauge(
            "disagfusion_stage_max_batch",
            "Requests one pipeline call of this worker may take (1: no batching).",
            names,
            registry=r,
        ).labels(**labels)
        self.batch_size = Histogram(
            "disagfusion_stage_batch_size",
            "Requests per pipeline call.",
            names,
            buckets=BATCH_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.batch_wait = Histogram(
            "disagfusion_stage_batch_wait_seconds",
            "Time the head of a batch waited for the batch to fill (--batch-wait-ms).",
            names,
            buckets=SECONDS_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.ready = Gauge(
            "disagfusion_stage_ready",
            "1 when the worker has loaded its model and accepts work.",
            names,
            registry=r,
        ).labels(**labels)
        self.queue_depth = Gauge(
            "disagfusion_stage_queue_depth",
            "Payloads received and waiting for compute.",
            names,
            registry=r,
        ).labels(**labels)
        self.queue_capacity = Gauge(
            "disagfusion_stage_queue_capacity",
            "Payloads the input queue holds before the worker rejects new work.",
            names,
            registry=r,
        ).labels(**labels)
        self.in_flight = Gauge(
            "disagfusion_stage_in_flight",
            "Payloads held by this worker: queued, computing or handing off.",
            names,
            registry=r,
        ).labels(**labels)
        self.outbox_depth = Gauge(
            "disagfusion_stage_outbox_depth",
            "Computed outputs waiting to be accepted downstream.",
            names,
            registry=r,
        ).labels(**labels)
        self.busy = Gauge(
            "disagfusion_stage_busy",
            "1 while the model computes.",
            names,
            registry=r,
        ).labels(**labels)
        self.service_time = Histogram(
            "disagfusion_stage_service_time_seconds",
            "Compute time per request in this stage (a batch's time shared by its requests).",
            names,
            buckets=SECONDS_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.queue_wait = Histogram(
            "disagfusion_stage_queue_wait_seconds",
            "Time a payload waited in the input queue before compute.",
            names,
            buckets=SECONDS_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.completed = Counter(
            "disagfusion_stage_requests_completed_total",
            "Requests this stage computed and handed on.",
            names,
            registry=r,
        ).labels(**labels)
        self.failed = Counter(
            "disagfusion_stage_requests_failed_total",
            "Requests this stage ended with an error, by reason.",
            [*names, "reason"],
            registry=r,
        )
        self.rejected = Counter(
            "disagfusion_stage_requests_rejected_total",
            "Submissions refused, by reason (busy, draining, invalid, sender, transport,"
            " transfer).",
            [*names, "reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "disagfusion_stage_duplicates_total",
            "Submissions for a request this worker already held or finished.",
            names,
            registry=r,
        ).labels(**labels)
        self.handoff = HandoffMetrics(r, stage, pipeline)
        self._labels = labels

    def fail(self, reason: str) -> None:
        self.failed.labels(**self._labels, reason=reason).inc()

    def reject(self, reason: str) -> None:
        self.rejected.labels(**self._labels, reason=reason).inc()


class HandoffMetrics:
    """Bytes and seconds moved between hops, shared by stages and the gateway."""

    def __init__(self, registry: CollectorRegistry, stage: str, pipeline: str) -> None:
        names = ["stage", "pipeline", "direction", "transport"]
        self._labels = {"stage": stage, "pipeline": pipeline}
        self.bytes = Counter(
            "disagfusion_handoff_bytes_total",
            "Tensor bytes handed between hops (direction: sent or received).",
            names,
            registry=registry,
        )
        self.seconds = Histogram(
            "disagfusion_handoff_seconds",
            "Time to hand one payload over, from first byte to the receiver's ack.",
            names,
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "disagfusion_handoff_retries_total",
            "Hand-offs tried again on another instance, by reason.",
            ["stage", "pipeline", "reason"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "disagfusion_handoff_fallbacks_total",
            "Hand-offs sent with grpc because the receiver does not accept (not_accepted) "
            "or cannot be reached with (unreachable) the configured transport.",
            ["stage", "pipeline", "transport", "reason"],
            registry=registry,
        )

    def sent(self, nbytes: int, seconds: float, transport: str = "grpc") -> None:
        labels = {**self._labels, "direction": "sent", "transport": transport}
        self.bytes.labels(**labels).inc(nbytes)
        self.seconds.labels(**labels).observe(seconds)

    def received(self, nbytes: int, seconds: float, transport: str = "grpc") -> None:
        labels = {**self._labels, "direction": "received", "transport": transport}
        self.bytes.labels(**labels).inc(nbytes)
        self.seconds.labels(**labels).observe(seconds)

    def fallback(self, transport: str, reason: str) -> None:
        self.fallbacks.labels(**self._labels, transport=transport, reason=reason).inc()

    def retry(self, reason: str) -> None:
        self.retries.labels(**self._labels, reason=reason).inc()


class GatewayMetrics:
    def __init__(self, pipeline: str, model: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pipeline = pipeline
        Gauge(
            "disagfusion_gateway_info",
            "Static facts about this gateway.",
            ["pipeline", "model"],
            registry=r,
        ).labels(pipeline=pipeline, model=model).set(1)
        self.slo_outcomes = Counter(
            "disagfusion_gateway_slo_total",
            "Requests answered with an SLO deadline (--slo), by whether they met it.",
            ["pipeline", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "disagfusion_gateway_request_duration_seconds",
            "End-to-end latency of image requests, by outcome status code.",
            ["pipeline", "code"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "disagfusion_gateway_requests_total",
            "Image requests answered, by HTTP status code.",
            ["pipeline", "code"],
            registry=r,
        )
        self.pending = Gauge(
            "disagfusion_gateway_pending_requests",
            "Requests accepted and not yet answered.",
            ["pipeline"],
            registry=r,
        ).labels(pipeline=pipeline)
        self.waiting = Gauge(
            "disagfusion_gateway_waiting_requests",
            "Accepted requests not yet taken by the first stage.",
            ["pipeline"],
            registry=r,
        ).labels(pipeline=pipeline)
        self.arrivals = Counter(
            "disagfusion_gateway_arrivals_total",
            "Images requested, accepted or not, by request shape: the demand autoscaling sizes"
            " the stages for.",
            ["pipeline", "width", "height", "frames", "steps"],
            registry=r,
        )
        self.results_refused = Counter(
            "disagfusion_gateway_results_refused_total",
            "Results delivered to the result port and ignored, by reason: unknown (no such"
            " request here), answered (a late or duplicate result) or sender (not the"
            " stage that may deliver it).",
            ["pipeline", "reason"],
            registry=r,
        )
        self.cancels = Counter(
            "disagfusion_gateway_cancels_total",
            "Requests given up (timeout, client gone, job deleted) and cancelled in the stages.",
            ["pipeline"],
            registry=r,
        )
        self.cancels_held = Counter(
            "disagfusion_gateway_cancels_held_total",
            "Stage instances that held a cancelled request when the cancel arrived.",
            ["pipeline"],
            registry=r,
        )
        self.handoff = HandoffMetrics(r, "gateway", pipeline)

    def cancelled(self, instances_held: int) -> None:
        self.cancels.labels(pipeline=self.pipeline).inc()
        self.cancels_held.labels(pipeline=self.pipeline).inc(instances_held)

    def refused_result(self, reason: str) -> None:
        self.results_refused.labels(pipeline=self.pipeline, reason=reason).inc()

    def arrived(self, width: int, height: int, frames: int, steps: int, images: int) -> None:
        self.arrivals.labels(
            pipeline=self.pipeline,
            width=str(width),
            height=str(height),
            frames=str(frames),
            steps=str(steps),
        ).inc(images)

    def observe(self, code: int, seconds: float) -> None:
        self.requests.labels(pipeline=self.pipeline, code=str(code)).inc()
        self.latency.labels(pipeline=self.pipeline, code=str(code)).observe(seconds)

    def slo(self, met: bool) -> None:
        self.slo_outcomes.labels(pipeline=self.pipeline, outcome="met" if met else "missed").inc()
