"""The OpenTelemetry SDK's own metrics on the Prometheus registry: spans a trace lost are counted."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import generate_latest

from stemflow_shared import telemetry
from stemflow_shared.metrics import REGISTRY


def unreachable_collector() -> str:
    """An OTLP/HTTP endpoint on a port nothing listens on (a collector that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/traces"


def total(name: str, **labels: str) -> float:
    """The sum of a family's samples named `name` whose labels include `labels` (any component)."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.fixture
def sdk_metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    telemetry.sdk_meter_provider.cache_clear()
    meters = telemetry.sdk_meter_provider()
    try:
        yield meters
    finally:
        meters.shutdown()  # takes its collector off the registry
        telemetry.sdk_meter_provider.cache_clear()


def test_without_the_standard_variable_the_sdk_counts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", raising=False)
    telemetry.sdk_meter_provider.cache_clear()
    assert telemetry.sdk_meter_provider() is None
    telemetry.sdk_meter_provider.cache_clear()


class HeldExporter(OTLPSpanExporter):
    """The OTLP exporter, held at the start of each export until `release`: while it holds a batch, the
    processor's queue fills up whatever the machine's load (no race with the exporter's thread)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.exporting = threading.Event()
        self.release = threading.Event()

    def export(self, spans: object) -> object:
        self.exporting.set()
        self.release.wait(30)
        return super().export(spans)


def test_spans_dropped_from_a_full_queue_and_failed_exports_are_counted(sdk_metrics: object) -> None:
    assert telemetry.sdk_meter_provider() is sdk_metrics  # one per process: its collector is registered once
    # The exporter retries until its timeout, then gives the batch up.
    exporter = HeldExporter(endpoint=unreachable_collector(), timeout=1, meter_provider=sdk_metrics)
    processor = BatchSpanProcessor(
        exporter, max_queue_size=4, max_export_batch_size=4, schedule_delay_millis=60_000, meter_provider=sdk_metrics
    )
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    try:
        for _ in range(4):  # a full batch wakes the exporter's thread, which takes all four
            tracer.start_span("exported").end()
        assert exporter.exporting.wait(30)
        for _ in range(6):  # four wait in the queue, two find it full
            tracer.start_span("lost?").end()
    finally:
        exporter.release.set()
    provider.force_flush()
    provider.shutdown()
    dropped = total("otel_sdk_processor_span_processed_total", error_type="queue_full")
    passed_on = total("otel_sdk_processor_span_processed_total", error_type="")
    assert (dropped, passed_on) == (2, 8)
    assert total("otel_sdk_exporter_span_exported_total") == 8
    assert total("otel_sdk_exporter_span_exported_total", error_type="ConnectionError") == 8
    assert total("otel_sdk_processor_span_queue_capacity") == 4
    assert b"otel_sdk_exporter_operation_duration_seconds_bucket" in generate_latest(REGISTRY)
