"""Every Prometheus metric of the project, declared once, on one registry per process."""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

REGISTRY = CollectorRegistry(auto_describe=True)
process_collector.ProcessCollector(registry=REGISTRY)
platform_collector.PlatformCollector(registry=REGISTRY)
gc_collector.GCCollector(registry=REGISTRY)

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# --- the Python runtime ------------------------------------------------------------
# prometheus_client counts collections (python_gc_collections_total); how long each one stopped the
# process is what shows on latency: a full collection over millions of objects (a notifier holding
# thousands of WebSockets) takes far longer than a young one.
GC_PAUSE = Histogram(
    "stemflow_gc_pause_seconds",
    "Time the process stood still in a garbage collection, by generation.",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
_GC_PAUSE_BY_GENERATION = [GC_PAUSE.labels(str(generation)) for generation in range(3)]
_gc_started = 0.0


def _time_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    elif _gc_started:
        _GC_PAUSE_BY_GENERATION[info["generation"]].observe(time.perf_counter() - _gc_started)
        _gc_started = 0.0


gc.callbacks.append(_time_gc)

# --- HTTP (OpenTelemetry semantic-convention names) -------------------------------
HTTP_REQUEST_DURATION = Histogram(
    "http_server_request_duration_seconds",
    "Duration of HTTP server requests.",
    ["http_request_method", "http_route", "http_response_status_code"],
    buckets=_FAST,
    registry=REGISTRY,
)
HTTP_IN_FLIGHT = Gauge("http_server_active_requests", "HTTP requests in flight.", registry=REGISTRY)

MONGODB_SLOW_COMMANDS = Counter(
    "stemflow_mongodb_slow_commands_total",
    "MongoDB commands slower than the threshold.",
    ["command"],
    registry=REGISTRY,
)

# --- messaging ------------------------------------------------------------------
MESSAGES_CONSUMED = Counter(
    "stemflow_messages_consumed_total", "Messages delivered to a handler.", ["queue", "event"], registry=REGISTRY
)
MESSAGES_ACKED = Counter(
    "stemflow_messages_acked_total",
    "Messages delivered to a handler and acknowledged (an own event acked unread: stemflow_dedup_hits_total).",
    ["queue"],
    registry=REGISTRY,
)
MESSAGES_REDELIVERED = Counter(
    "stemflow_messages_redelivered_total", "Messages seen again after a failure.", ["queue"], registry=REGISTRY
)
MESSAGES_REQUEUED = Counter(
    "stemflow_messages_requeued_total",
    "Messages returned to the queue after a handler error.",
    ["queue"],
    registry=REGISTRY,
)
MESSAGES_DEAD_LETTERED = Counter(
    "stemflow_messages_dead_lettered_total",
    "Messages sent to the dead-letter exchange.",
    ["queue", "reason"],
    registry=REGISTRY,
)
DEAD_LETTERS_SETTLED = Counter(
    "stemflow_dead_letters_settled_total",
    "Dead-lettered messages read by the gateway, by the queue they left and what became of their job "
    "(job_failed, job_ended, webhook_failed, no_job, unattributed, not_a_job_stage).",
    ["queue", "outcome"],
    registry=REGISTRY,
)
HANDLER_DURATION = Histogram(
    "stemflow_message_handler_duration_seconds",
    "Time spent handling one message.",
    ["queue", "event"],
    buckets=(*_FAST, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
    registry=REGISTRY,
)
MESSAGES_IN_PROGRESS = Gauge(
    "stemflow_messages_in_progress", "Messages being handled now.", ["queue"], registry=REGISTRY
)
QUEUE_WAIT = Histogram(
    "stemflow_queue_wait_seconds",
    "Time from an event's publication (its CloudEvents `time`) to the start of its handler.",
    ["queue"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0),
    registry=REGISTRY,
)
MESSAGES_PUBLISHED = Counter(
    "stemflow_messages_published_total",
    "Events published, by outcome of the publisher confirm.",
    ["event", "outcome"],
    registry=REGISTRY,
)

# --- pipeline -------------------------------------------------------------------
JOBS_SUBMITTED = Counter("stemflow_jobs_submitted_total", "Jobs accepted.", ["source"], registry=REGISTRY)
JOBS_FINISHED = Counter(
    "stemflow_jobs_finished_total", "Jobs that reached a terminal state.", ["outcome"], registry=REGISTRY
)
JOB_DURATION = Histogram(
    "stemflow_job_duration_seconds",
    "Job time from acceptance to a terminal state.",
    ["outcome"],
    buckets=_SLOW,
    registry=REGISTRY,
)
STAGE_DURATION = Histogram(
    "stemflow_stage_duration_seconds",
    "Time a worker spends on one job's stage.",
    ["stage", "model", "outcome"],
    buckets=_SLOW,
    registry=REGISTRY,
)
AUDIO_SECONDS = Counter(
    "stemflow_audio_seconds_processed_total", "Seconds of audio processed.", ["stage"], registry=REGISTRY
)
REALTIME_FACTOR = Histogram(
    "stemflow_realtime_factor",
    "Audio seconds per processing second.",
    ["stage"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
    registry=REGISTRY,
)
STAGE_FAILURES = Counter(
    "stemflow_stage_failures_total", "Stage failures by code.", ["stage", "code"], registry=REGISTRY
)


class StageRun:
    """One job's run of a worker stage, timed from its creation: the stage metrics, recorded one way everywhere.

    A completed run records its duration, the audio seconds and the real-time factor; a failed one its
    duration and the failure's code. Every worker handler (ingest, separation, analysis, mixes) uses it.
    """

    __slots__ = ("_model", "_stage", "_started")

    def __init__(self, stage: str, model: str = "") -> None:
        self._stage = stage
        self._model = model
        self._started = time.perf_counter()

    def completed(self, audio_seconds: float) -> float:
        """Record a completed run; its seconds."""
        elapsed = time.perf_counter() - self._started
        STAGE_DURATION.labels(self._stage, self._model, "completed").observe(elapsed)
        AUDIO_SECONDS.labels(self._stage).inc(audio_seconds)
        REALTIME_FACTOR.labels(self._stage).observe(audio_seconds / max(elapsed, 1e-6))
        return elapsed

    def failed(self, code: str) -> float:
        """Record a failed run with its stable code; its seconds."""
        elapsed = time.perf_counter() - self._started
        STAGE_FAILURES.labels(self._stage, code).inc()
        STAGE_DURATION.labels(self._stage, self._model, "failed").observe(elapsed)
        return elapsed


JOBS_ACTIVE = Gauge(
    "stemflow_jobs_active", "Unfinished jobs by status (sampled by the gateway).", ["status"], registry=REGISTRY
)
JOBS_OLDEST_UNCHANGED = Gauge(
    "stemflow_jobs_oldest_unchanged_seconds",
    "Age of the last change of the unfinished job that has gone longest without one, by status.",
    ["status"],
    registry=REGISTRY,
)
JOBS_TIMED_OUT = Counter(
    "stemflow_jobs_timed_out_total",
    "Jobs the stuck-job sweeper failed because their stage made no progress in time.",
    ["stage"],
    registry=REGISTRY,
)
CACHE_REQUESTS = Counter("stemflow_cache_requests_total", "Cache lookups.", ["cache", "result"], registry=REGISTRY)
DEDUP_HITS = Counter(
    "stemflow_dedup_hits_total",
    "Work not done twice: a submission replayed with its Idempotency-Key (kind=idempotency_key), "
    "an event delivered again after it was handled, acked without rework (kind=event), "
    "an event come back to the service that published it, acked unread (kind=own_event).",
    ["kind"],
    registry=REGISTRY,
)

# --- separator ------------------------------------------------------------------
MODEL_INFO = Gauge(
    "stemflow_separator_model_loaded",
    "Models resident on this worker's device.",
    ["model", "device", "precision"],
    registry=REGISTRY,
)

SEPARATOR_BATCH_SIZE = Histogram(
    "stemflow_separator_batch_size",
    "Segments per forward pass (from one or several jobs).",
    ["device"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
    registry=REGISTRY,
)
SEPARATOR_DEVICE_BUSY = Counter(
    "stemflow_separator_device_busy_seconds_total",
    "Time the device spent running forward passes.",
    ["device"],
    registry=REGISTRY,
)
SEPARATOR_OOM_SPLITS = Counter(
    "stemflow_separator_oom_splits_total",
    "Batches that ran out of device memory and were split in two.",
    ["device"],
    registry=REGISTRY,
)
GPU_MEMORY_USED = Gauge(
    "stemflow_separator_gpu_memory_used_bytes",
    "GPU memory held by tensors after the last batch.",
    ["device"],
    registry=REGISTRY,
)
GPU_MEMORY_PEAK = Gauge(
    "stemflow_separator_gpu_memory_peak_bytes",
    "Peak GPU memory held by tensors since the worker started.",
    ["device"],
    registry=REGISTRY,
)
GPU_MEMORY_TOTAL = Gauge(
    "stemflow_separator_gpu_memory_total_bytes", "The GPU's memory.", ["device"], registry=REGISTRY
)

# --- notifier -------------------------------------------------------------------
WS_CONNECTIONS = Gauge("stemflow_ws_connections", "Open WebSocket connections.", registry=REGISTRY)
WS_SUBSCRIPTIONS = Gauge("stemflow_ws_subscriptions", "Active subscriptions.", registry=REGISTRY)
WS_FRAMES_SENT = Counter("stemflow_ws_frames_sent_total", "WebSocket frames sent.", registry=REGISTRY)
WS_BYTES_SENT = Counter("stemflow_ws_bytes_sent_total", "WebSocket payload bytes sent.", registry=REGISTRY)
WS_EVENTS_SENT = Counter("stemflow_ws_events_sent_total", "Events delivered to clients.", ["event"], registry=REGISTRY)
WS_EVENTS_COALESCED = Counter(
    "stemflow_ws_events_coalesced_total", "Progress events replaced by a newer one.", registry=REGISTRY
)
WS_BATCH_SIZE = Histogram(
    "stemflow_ws_batch_size",
    "Events per batch frame.",
    buckets=(1, 2, 3, 5, 10, 20, 50, 100),
    registry=REGISTRY,
)
WS_RESUME_REQUESTS = Counter(
    "stemflow_ws_resume_requests_total",
    "Subscriptions with last_event_id, by result (resumed, gap: the id was no longer kept).",
    ["result"],
    registry=REGISTRY,
)
WS_CLOSED = Counter(
    "stemflow_ws_closed_total", "Connections the notifier closed, by reason.", ["reason"], registry=REGISTRY
)
WEBHOOK_DELIVERIES = Counter(
    "stemflow_webhook_deliveries_total",
    "Webhook attempts by outcome (delivered, retried, rejected, given_up, disabled).",
    ["outcome"],
    registry=REGISTRY,
)
WEBHOOK_DURATION = Histogram(
    "stemflow_webhook_request_duration_seconds",
    "Duration of one webhook request.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)


def render() -> tuple[bytes, str]:
    """The registry in the Prometheus text format, with its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
