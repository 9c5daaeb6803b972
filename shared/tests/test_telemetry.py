"""Logging: one JSON line per record, credentials never written. Head sampling: one decision per request."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from stemflow_shared import telemetry


def test_credentials_in_url_queries_are_redacted() -> None:
    line = 'connection open: "GET /v1/ws?job=abc&token=sfk_live_123 HTTP/1.1" 101'
    assert telemetry.redact(line) == 'connection open: "GET /v1/ws?job=abc&token=[redacted] HTTP/1.1" 101'
    assert telemetry.redact("/v1/ws?TOKEN=x&api_key=y") == "/v1/ws?TOKEN=[redacted]&api_key=[redacted]"
    assert telemetry.redact("/v1/jobs?tokens=ok") == "/v1/jobs?tokens=ok"


def test_log_lines_are_json_with_the_job_id_and_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        telemetry.setup_logging("unit", "INFO", "json")
        with telemetry.job_context("job-42"):
            logging.getLogger("uvicorn.error").info("%s - WebSocket %s", "127.0.0.1", "/v1/ws?token=sfk_secret")
        entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    assert entry["service"] == "unit" and entry["job_id"] == "job-42" and entry["level"] == "INFO"
    assert entry["msg"] == "127.0.0.1 - WebSocket /v1/ws?token=[redacted]"
    assert "sfk_secret" not in json.dumps(entry)


# --- head sampling ------------------------------------------------------------------------------


class Seen:
    """What the app behind HeadSampling saw of its request's trace."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        current = trace.get_current_span().get_span_context()
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # what a job started by this request would carry to the other services
        self.requests.append(
            {
                "current": current,
                "traceparent": carrier.get("traceparent"),
                "instrumented": is_instrumentation_enabled(),
                "excluded_from_fastapi": "fastapi.telemetry" in scope
                or telemetry.fastapi_telemetry()["exclude"](scope),
            }
        )
        # The server span FastAPI would open, from the same provider (root: no parent in the context
        # when sampled; a child of the unsampled span otherwise).
        with self.tracer.start_as_current_span("GET /v1/jobs", kind=trace.SpanKind.SERVER) as span:
            self.requests[-1]["span"] = span.get_span_context()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def gate(sampler: Any) -> tuple[telemetry.HeadSampling, Seen, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, id_generator=telemetry._PresetTraceIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen = Seen(provider.get_tracer("test"))
    return telemetry.HeadSampling(seen, provider), seen, exporter


async def call(app: Any, path: str = "/v1/jobs", headers: list[tuple[bytes, bytes]] | None = None) -> None:
    scope = {"type": "http", "method": "GET", "path": path, "headers": headers or []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    await app(scope, receive, send)


async def test_an_unsampled_request_runs_uninstrumented_but_passes_its_decision_on() -> None:
    app, seen, exporter = gate(sampling.ALWAYS_OFF)
    await call(app)
    (request,) = seen.requests
    assert request["instrumented"] is False
    assert request["excluded_from_fastapi"] is True
    assert request["current"].is_valid and not request["current"].trace_flags.sampled
    # A job submitted here carries "not sampled", so ingest, separator and analyzer follow the decision.
    trace_id = format(request["current"].trace_id, "032x")
    assert request["traceparent"].startswith(f"00-{trace_id}-") and request["traceparent"].endswith("-00")
    assert not request["span"].trace_flags.sampled
    assert exporter.get_finished_spans() == ()


async def test_a_sampled_request_is_traced_with_the_trace_id_the_sampler_judged() -> None:
    app, seen, exporter = gate(sampling.ALWAYS_ON)
    await call(app)
    (request,) = seen.requests
    assert request["instrumented"] is True and request["excluded_from_fastapi"] is False
    assert not request["current"].is_valid  # the server span is the root
    (span,) = exporter.get_finished_spans()
    assert span.context.trace_flags.sampled and span.parent is None
    assert request["traceparent"] is None


async def test_the_ratio_is_applied_once_not_twice() -> None:
    """The sampler answers the same for the request and for its server span: 50% stays 50%, not 25%."""
    app, seen, exporter = gate(sampling.ParentBased(sampling.TraceIdRatioBased(0.5)))
    for _ in range(600):
        await call(app)
    sampled = [r for r in seen.requests if r["span"].trace_flags.sampled]
    assert all(r["instrumented"] for r in sampled)
    assert all(not r["instrumented"] for r in seen.requests if not r["span"].trace_flags.sampled)
    assert 220 <= len(sampled) <= 380, len(sampled)  # binomial(600, 0.5): beyond 6 sigma otherwise
    assert len(exporter.get_finished_spans()) == len(sampled)


async def test_requests_with_a_parent_and_probes_are_left_to_the_sdk() -> None:
    app, seen, _ = gate(sampling.ALWAYS_OFF)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await call(app, headers=[(b"traceparent", parent.encode())])
    await call(app, path="/healthz")
    assert [r["instrumented"] for r in seen.requests] == [True, True]
    assert telemetry.fastapi_telemetry()["exclude"]({"path": "/healthz"}) is True


async def test_fastapi_opens_a_server_span_for_sampled_requests_only() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        sampler=sampling.ParentBased(sampling.TraceIdRatioBased(0.5)), id_generator=telemetry._PresetTraceIds()
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    api = FastAPI(telemetry={**telemetry.fastapi_telemetry(), "tracer_provider": provider})
    carried: list[str | None] = []

    @api.get("/v1/jobs/{job_id}")
    async def read(job_id: str) -> dict[str, str]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        carried.append(carrier.get("traceparent"))
        return {"id": job_id}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(telemetry.HeadSampling(api, provider))) as client:
        for _ in range(200):
            assert (await client.get("http://t/v1/jobs/abc")).status_code == 200
    spans = exporter.get_finished_spans()
    sampled = [t for t in carried if t and int(t[-2:], 16) & 1]  # the flags' sampled bit
    assert 60 <= len(spans) <= 140, len(spans)  # binomial(200, 0.5): beyond 5.6 sigma otherwise
    assert len(sampled) == len(spans) and len(carried) == 200
    assert {s.name for s in spans} == {"GET /v1/jobs/{job_id}"}
    assert {s.attributes["http.route"] for s in spans} == {"/v1/jobs/{job_id}"}
    # Each request's job would carry its own trace id, sampled or not: a span of the request's trace.
    assert {format(s.context.trace_id, "032x") for s in spans} == {t.split("-")[1] for t in sampled}
    assert all(t and not int(t[-2:], 16) & 1 for t in carried if t not in sampled)


def test_without_tracing_the_app_is_served_as_it_is() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        assert telemetry.head_sampling(app) is app


def test_the_service_resource_is_the_sdks_hashed_once_and_groups_a_batch_under_one_resource(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk import resources

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=prod,service.namespace=stemflow")
    resource = telemetry.service_resource("gateway")
    plain = resources.Resource.create({resources.SERVICE_NAME: "gateway"})
    assert resource == plain and hash(resource) == hash(plain)
    assert resource.attributes["service.name"] == "gateway"
    assert resource.attributes["deployment.environment.name"] == "prod"
    assert resource.attributes["telemetry.sdk.language"] == "python"

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("GET /v1/jobs/{job_id}"), tracer.start_as_current_span("EVALSHA"):
        pass

    # The SDK's Resource serialises its attributes to hash itself; this one did so once, when made.
    def no_serialising(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("the resource was serialised to be hashed again")

    monkeypatch.setattr(resources, "dumps", no_serialising)
    with pytest.raises(AssertionError):
        hash(plain)
    request = encode_spans(exporter.get_finished_spans())
    assert len(request.resource_spans) == 1
    (resource_spans,) = request.resource_spans
    attributes = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert attributes["service.name"] == "gateway" and attributes["service.namespace"] == "stemflow"
    assert [span.name for scope in resource_spans.scope_spans for span in scope.spans] == [
        "EVALSHA",
        "GET /v1/jobs/{job_id}",
    ]
