"""Logging: one JSON line per record, credentials never written. Head sampling: one decision per request, jobs at
the configured ratio, other requests at their own."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
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
        lines = capsys.readouterr().err.strip().splitlines()
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    # Only this logger's line: threads left by other tests (an exporter retrying, say) may log meanwhile.
    (entry,) = [
        e for e in map(json.loads, (line for line in lines if "WebSocket" in line)) if e["logger"] == "uvicorn.error"
    ]
    assert entry["service"] == "unit" and entry["job_id"] == "job-42" and entry["level"] == "INFO"
    assert entry["msg"] == "127.0.0.1 - WebSocket /v1/ws?token=[redacted]"
    assert "sfk_secret" not in json.dumps(entry)


def test_log_lines_of_a_server_configured_before_are_json_too(capsys: pytest.CaptureFixture[str]) -> None:
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.config.dictConfig(LOGGING_CONFIG)  # what uvicorn.Config does when it is given its default config
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # ... and log_level="warning"
        telemetry.setup_logging("unit", "INFO", "json")
        logging.getLogger("uvicorn.error").info("Application startup complete.")
        lines = capsys.readouterr().err.strip().splitlines()
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    (line,) = [line for line in lines if "Application startup complete." in line]
    assert json.loads(line)["msg"] == "Application startup complete."  # a JSON line, not uvicorn's plain text


# --- head sampling ------------------------------------------------------------------------------

CREATE = ("POST", "/v1/jobs")


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
        if self.requests[-1]["excluded_from_fastapi"]:  # FastAPI opens no span: the request's is the current one
            self.requests[-1]["span"] = current
        else:
            # The server span FastAPI would open, from the same provider: a child of the caller's span, if it
            # sent one; else a root (sampled: HeadSampling judged its trace id).
            headers = {name.decode(): value.decode() for name, value in scope["headers"]}
            caller = propagate.extract(headers, otel_context.get_current())
            with self.tracer.start_as_current_span("GET /v1/jobs", caller, kind=trace.SpanKind.SERVER) as span:
                self.requests[-1]["span"] = span.get_span_context()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def provider_of(pipelines: Any, requests: Any = sampling.ALWAYS_OFF, **options: Any) -> TracerProvider:
    return TracerProvider(
        sampler=telemetry.JobSampling(pipelines, requests), id_generator=telemetry._PresetTraceIds(), **options
    )


def gate(
    pipelines: Any, requests: Any = sampling.ALWAYS_OFF
) -> tuple[telemetry.HeadSampling, Seen, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = provider_of(pipelines, requests)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen = Seen(provider.get_tracer("test"))
    return telemetry.HeadSampling(seen, provider, [CREATE]), seen, exporter


async def call(
    app: Any,
    request: tuple[str, str] = CREATE,
    headers: list[tuple[bytes, bytes]] | None = None,
    kind: str = "http",
) -> None:
    method, path = request
    scope = {"type": kind, "path": path, "headers": headers or []}
    if kind == "http":
        scope["method"] = method

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    await app(scope, receive, send)


def sampled(request: dict[str, Any]) -> bool:
    return bool(request["span"].trace_flags.sampled)


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


@pytest.mark.parametrize(
    "request_",
    [("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs/x/cancel")],
)
async def test_only_job_creating_routes_are_traced_at_the_job_ratio(request_: tuple[str, str]) -> None:
    """Jobs at 100% and other requests at 0%, then the other way round: each route follows its own ratio."""
    on, off = sampling.ParentBased(sampling.ALWAYS_ON), sampling.ParentBased(sampling.ALWAYS_OFF)
    app, seen, exporter = gate(on, off)
    await call(app, CREATE)
    await call(app, request_)
    await call(app, ("GET", "/v1/ws"), kind="websocket")
    assert [sampled(r) for r in seen.requests] == [True, False, False]
    assert [r["instrumented"] for r in seen.requests] == [True, False, False]
    assert len(exporter.get_finished_spans()) == 1

    app, seen, exporter = gate(off, on)
    await call(app, CREATE)
    await call(app, request_)
    await call(app, ("GET", "/v1/ws"), kind="websocket")
    assert [sampled(r) for r in seen.requests] == [False, True, True]
    assert [r["instrumented"] for r in seen.requests] == [False, True, True]
    assert all(s.parent is None for s in exporter.get_finished_spans())


@pytest.mark.parametrize("request_", [CREATE, ("GET", "/v1/jobs")])
async def test_the_ratio_is_applied_once_not_twice(request_: tuple[str, str]) -> None:
    """The request's own sampler decides its whole trace: 50% stays 50%, not 25%, whichever the ratio."""
    half = sampling.ParentBased(sampling.TraceIdRatioBased(0.5))
    app, seen, exporter = gate(half, half) if request_ == CREATE else gate(sampling.ALWAYS_OFF, half)
    for _ in range(600):
        await call(app, request_)
    traced = [r for r in seen.requests if sampled(r)]
    assert all(r["instrumented"] for r in traced)
    assert all(not r["instrumented"] for r in seen.requests if not sampled(r))
    assert 220 <= len(traced) <= 380, len(traced)  # binomial(600, 0.5): beyond 6 sigma otherwise
    assert len(exporter.get_finished_spans()) == len(traced)


async def test_the_request_ratios_decision_is_trace_id_ratio_based_s_own() -> None:
    """Deployed, requests are judged by a plain TraceIdRatioBased, whose decision HeadSampling takes itself (no
    SamplingResult made): for every request it must be the one the SDK's sampler gives for its trace id (a
    request that may write: an unsampled read keeps no trace id to check)."""
    ratio = sampling.TraceIdRatioBased(0.3)
    app, seen, exporter = gate(sampling.ALWAYS_OFF, ratio)
    for _ in range(400):
        await call(app, ("POST", "/v1/jobs/x/cancel"))
    decisions = []
    for r in seen.requests:
        trace_id = r["span"].trace_id if sampled(r) else r["current"].trace_id
        judged = ratio.should_sample(None, trace_id, "GET", trace.SpanKind.SERVER).decision.is_sampled()
        decisions.append(judged)
        assert sampled(r) is judged
    assert 60 <= sum(decisions) <= 180  # binomial(400, 0.3): beyond 6 sigma otherwise
    assert len(exporter.get_finished_spans()) == sum(decisions)


async def test_an_unsampled_read_runs_under_no_span_and_a_write_under_its_unsampled_trace() -> None:
    """A read (GET, HEAD) that is not sampled and brings no trace context runs suppressed under no span at all;
    one that may write (any other method, a WebSocket) under a non-recording span of its own trace, which a job
    or event it makes passes on; a read with a caller's unsampled traceparent keeps the caller's trace."""
    app, seen, exporter = gate(sampling.ALWAYS_OFF, sampling.ALWAYS_OFF)
    caller = "0af7651916cd43dd8448eb211c80319c"
    await call(app, ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"))
    await call(app, ("HEAD", "/v1/jobs/0123456789abcdef0123456789abcdef/stems/vocals"))
    await call(app, ("POST", "/v1/jobs/x/cancel"))
    await call(app, ("DELETE", "/v1/jobs/x"))
    await call(app, ("GET", "/v1/ws"), kind="websocket")
    await call(app, ("GET", "/v1/jobs"), headers=[(b"traceparent", f"00-{caller}-b7ad6b7169203331-00".encode())])
    get, head, post, delete, websocket, followed = seen.requests
    assert all(not r["instrumented"] and r["excluded_from_fastapi"] for r in seen.requests)
    for read in (get, head):
        assert not read["current"].is_valid and read["traceparent"] is None
    for write in (post, delete, websocket):
        assert write["current"].is_valid and not write["current"].trace_flags.sampled
        assert write["traceparent"].endswith("-00")
    assert format(followed["current"].trace_id, "032x") == caller and followed["traceparent"].endswith("-00")
    assert exporter.get_finished_spans() == ()


def test_the_unsampled_span_context_is_the_one_the_api_makes() -> None:
    ids = telemetry._PresetTraceIds()
    for _ in range(50):
        trace_id, span_id = ids.generate_trace_id(), ids.generate_span_id()
        fast = telemetry.unsampled_span_context(trace_id, span_id)
        made = trace.SpanContext(trace_id, span_id, is_remote=False, trace_flags=trace.TraceFlags(0))
        assert type(fast) is trace.SpanContext and fast == made
        assert (fast.trace_id, fast.span_id, fast.is_remote, fast.trace_flags, fast.trace_state, fast.is_valid) == (
            made.trace_id,
            made.span_id,
            made.is_remote,
            made.trace_flags,
            made.trace_state,
            made.is_valid,
        )
        assert fast.is_valid and not fast.trace_flags.sampled


async def test_a_callers_traceparent_decides_and_probes_are_never_traced() -> None:
    app, seen, exporter = gate(sampling.ParentBased(sampling.ALWAYS_OFF), sampling.ALWAYS_OFF)
    poll = ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef")
    caller = "0af7651916cd43dd8448eb211c80319c"
    await call(app, poll, headers=[(b"traceparent", f"00-{caller}-b7ad6b7169203331-01".encode())])
    await call(app, CREATE, headers=[(b"traceparent", f"00-{caller}-b7ad6b7169203331-00".encode())])
    await call(app, ("GET", "/healthz"))
    await call(app, poll, headers=[(b"traceparent", b"00-garbage-01")])  # unreadable: as if absent
    sampled_poll, unsampled_create, probe, garbage = seen.requests
    assert sampled_poll["instrumented"] and not sampled_poll["excluded_from_fastapi"]
    (span,) = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == caller and span.parent.span_id == 0xB7AD6B7169203331
    # Not sampled by its caller: nothing instrumented, no server span, and a job it creates carries the
    # caller's trace and decision to the other services.
    assert not unsampled_create["instrumented"] and unsampled_create["excluded_from_fastapi"]
    assert unsampled_create["traceparent"].startswith(f"00-{caller}-b7ad6b7169203331-")
    assert unsampled_create["traceparent"].endswith("-00")
    assert not probe["instrumented"] and probe["excluded_from_fastapi"]
    assert not garbage["instrumented"]  # judged at the request ratio, 0 here
    assert telemetry.fastapi_telemetry()["exclude"]({"path": "/healthz"}) is True


def test_roots_no_head_judged_are_requests_unless_they_are_messages() -> None:
    """The gateway's internal API (no HeadSampling) and background work's commands get the request ratio; the
    consumer of a job.submitted published without a trace context starts a job's trace at the job ratio."""
    sampler = telemetry.JobSampling(sampling.ParentBased(sampling.ALWAYS_ON), sampling.ALWAYS_OFF)
    decide = functools.partial(sampler.should_sample, None, 0x0AF7651916CD43DD8448EB211C80319C, "span")
    assert not decide(trace.SpanKind.SERVER).decision.is_sampled()
    assert not decide(trace.SpanKind.CLIENT).decision.is_sampled()
    assert not decide(trace.SpanKind.INTERNAL).decision.is_sampled()
    assert decide(trace.SpanKind.CONSUMER).decision.is_sampled()
    assert decide(trace.SpanKind.PRODUCER).decision.is_sampled()
    assert "requests:AlwaysOffSampler" in sampler.get_description()


def test_the_request_ratio_comes_from_the_environment_and_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert telemetry.request_ratio({}) == 0.01
    assert telemetry.request_ratio({"STEMFLOW_TRACES_REQUEST_RATIO": "0"}) == 0.0
    assert telemetry.request_ratio({"STEMFLOW_TRACES_REQUEST_RATIO": " 1 "}) == 1.0
    for bad in ("1.5", "-0.1", "one", "nan"):
        with pytest.raises(ValueError, match="STEMFLOW_TRACES_REQUEST_RATIO must be a number from 0 to 1"):
            telemetry.request_ratio({"STEMFLOW_TRACES_REQUEST_RATIO": bad})
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setenv("STEMFLOW_TRACES_REQUEST_RATIO", "0.001")
    provider = telemetry.tracer_provider("unit", exporter=InMemorySpanExporter())
    assert isinstance(provider.sampler, telemetry.JobSampling)
    assert provider.sampler.pipelines.get_description() == sampling.ParentBasedTraceIdRatio(0.25).get_description()
    assert provider.sampler.requests.rate == 0.001


def test_head_sampling_refuses_a_job_creating_route_the_app_does_not_serve() -> None:
    api = FastAPI()

    @api.post("/v1/jobs")
    async def create() -> None:
        return None

    with pytest.raises(ValueError, match=r"no route of the app serves \[\('POST', '/v1/job'\)\]"):
        telemetry.head_sampling(api, starts_pipeline=[("post", "/v1/job")])
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        assert telemetry.head_sampling(api, starts_pipeline=[("post", "/v1/jobs")]) is api


def spans_started(reader: InMemoryMetricReader) -> int:
    """The SDK's count of every span started, recorded or not (otel.sdk.span.started)."""
    data = reader.get_metrics_data()
    return sum(
        int(point.value)
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "otel.sdk.span.started"
        for point in metric.data.data_points
    )


async def test_fastapi_opens_a_server_span_for_sampled_requests_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")  # the SDK counts spans started
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    provider = provider_of(
        sampling.ALWAYS_OFF,
        sampling.ParentBased(sampling.TraceIdRatioBased(0.5)),
        meter_provider=MeterProvider(metric_readers=[reader]),
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
    traced = [t for t in carried if t and int(t[-2:], 16) & 1]  # the flags' sampled bit
    assert 60 <= len(spans) <= 140, len(spans)  # binomial(200, 0.5): beyond 5.6 sigma otherwise
    assert len(traced) == len(spans) and len(carried) == 200
    # The unsampled requests made no span object at all, not even a non-recording one.
    assert spans_started(reader) == len(spans)
    assert {s.name for s in spans} == {"GET /v1/jobs/{job_id}"}
    assert {s.attributes["http.route"] for s in spans} == {"/v1/jobs/{job_id}"}
    # What a sampled read passes on is its own trace; an unsampled read, under no span, passes nothing on.
    assert {format(s.context.trace_id, "032x") for s in spans} == {t.split("-")[1] for t in traced}
    assert all(t is None for t in carried if t not in traced)


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


def test_the_spans_of_an_unsampled_job_run_uninstrumented() -> None:
    """A service consuming an event of an unsampled job (its traceparent says so) builds no instrumentation spans."""
    exporter = InMemorySpanExporter()
    provider = provider_of(sampling.ParentBased(sampling.ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = telemetry._UnsampledUninstrumented(provider.get_tracer("test"))
    seen = {}
    for flags in ("00", "01"):
        parent = telemetry.extract_context(
            {"traceparent": f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}"}
        )
        with tracer.start_as_current_span("process job.submitted", parent, kind=trace.SpanKind.CONSUMER) as span:
            seen[flags] = (span.is_recording(), is_instrumentation_enabled())
        assert is_instrumentation_enabled()
    assert seen == {"00": (False, False), "01": (True, True)}
    assert [s.name for s in exporter.get_finished_spans()] == ["process job.submitted"]


def test_no_client_spans_suppresses_instrumentation_under_a_recording_span_and_leaves_the_rest_alone() -> None:
    """A traced request's side calls make no client spans; where nothing records, the context is not even switched."""
    provider = provider_of(sampling.ALWAYS_ON, sampling.ALWAYS_ON)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("POST /v1/jobs") as span:
        assert span.is_recording()
        with telemetry.no_client_spans():
            assert not is_instrumentation_enabled()
        assert is_instrumentation_enabled()
    unsampled = trace.NonRecordingSpan(telemetry.unsampled_span_context(1, 1))
    token = otel_context.attach(trace.set_span_in_context(unsampled))
    try:
        before = otel_context.get_current()
        with telemetry.no_client_spans():
            assert otel_context.get_current() is before
    finally:
        otel_context.detach(token)


async def test_a_client_without_redis_spans_skips_the_instrumentation_and_shares_the_pool(
    redis_client: Any, isolation: Any
) -> None:
    """Commands through `without_redis_spans` make no span (not even a dropped one) under a recording span, where
    the instrumented client's make theirs; both use the same connections; `recording` says which to use."""
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    exporter = InMemorySpanExporter()
    provider = provider_of(sampling.ParentBased(sampling.ALWAYS_ON), sampling.ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    key = f"{isolation.redis_prefix}plain-client"
    plain_before = telemetry.without_redis_spans(redis_client)  # made before the class is instrumented
    instrumentor = RedisInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        plain = telemetry.without_redis_spans(redis_client)
        assert plain.connection_pool is redis_client.connection_pool
        assert not telemetry.recording()
        with provider.get_tracer("test").start_as_current_span("GET /v1/jobs/{job_id}"):
            assert telemetry.recording()
            await redis_client.set(key, b"1")
            script = redis_client.register_script("return redis.call('INCR', KEYS[1])")
            assert await script(keys=[key], client=plain) == 2
            assert await plain_before.get(key) == b"2"
        names = [s.name for s in exporter.get_finished_spans()]
        assert names == ["SET", "GET /v1/jobs/{job_id}"]  # the instrumented client's command and the parent only
    finally:
        instrumentor.uninstrument()
        await redis_client.delete(key)
    assert isinstance(plain, type(redis_client))


async def test_a_client_skipping_suppressed_makes_the_instrumentations_spans_and_skips_its_wrapper_otherwise(
    redis_client: Any, isolation: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`redis_skipping_suppressed`: spans where the instrumentation makes them (under a recording span, and a
    background command's root judged by the sampler); under suppressed instrumentation the wrapper is not even
    entered; `without_redis_spans` of it still skips the wrapper."""
    import copy

    from opentelemetry.instrumentation import redis as redis_instrumentation
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    entered: list[bool] = []

    def counted() -> bool:
        entered.append(True)
        return is_instrumentation_enabled()

    monkeypatch.setattr(redis_instrumentation, "is_instrumentation_enabled", counted)  # the wrapper's first step
    exporter = InMemorySpanExporter()
    provider = provider_of(sampling.ParentBased(sampling.ALWAYS_ON), sampling.ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    key = f"{isolation.redis_prefix}skipping-client"
    client = telemetry.redis_skipping_suppressed(copy.copy(redis_client))  # made before the class is instrumented
    instrumentor = RedisInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        assert client.connection_pool is redis_client.connection_pool
        with suppress_instrumentation():
            assert await client.set(key, b"1")
            assert await client.incr(key) == 2
        assert entered == [] and exporter.get_finished_spans() == ()
        with provider.get_tracer("test").start_as_current_span("GET /v1/models"):
            assert await client.get(key) == b"2"
        assert await client.incr(key) == 3  # background work: a root span, judged at the request ratio
        assert await telemetry.without_redis_spans(client).get(key) == b"3"
        assert len(entered) == 2
        assert [s.name for s in exporter.get_finished_spans()] == ["GET", "GET /v1/models", "INCRBY"]
    finally:
        instrumentor.uninstrument()
        await redis_client.delete(key)
    assert isinstance(client, type(redis_client))


async def test_head_sampling_switches_the_current_context_as_attach_does_and_restores_it() -> None:
    assert telemetry._current_context_variable() is not None  # the API's default runtime context: the fast path
    app, seen, _ = gate(sampling.ALWAYS_OFF)
    before = otel_context.get_current()
    await call(app, ("GET", "/v1/jobs/0123"))
    (request,) = seen.requests
    assert request["instrumented"] is False and not request["current"].is_valid
    assert otel_context.get_current() is before and is_instrumentation_enabled()


def test_each_ratios_root_decision_is_its_samplers_own() -> None:
    """HeadSampling compares a trace id with a bound where the sampler is the SDK's ratio or static sampler (alone or
    a parent-based sampler's root): the same decision the sampler takes, for every trace id."""
    ids = telemetry._PresetTraceIds()
    trace_ids = [ids.generate_trace_id() for _ in range(3000)]
    for sampler in (
        sampling.ParentBased(sampling.TraceIdRatioBased(0.3)),
        sampling.TraceIdRatioBased(0.05),
        sampling.ParentBased(sampling.ALWAYS_ON),
        sampling.ParentBased(sampling.ALWAYS_OFF),
        sampling.ALWAYS_ON,
        sampling.ALWAYS_OFF,
    ):
        bound = telemetry._root_bound(sampler)
        assert bound is not None, sampler.get_description()
        decided = [t & sampling.TraceIdRatioBased.TRACE_ID_LIMIT < bound for t in trace_ids]
        asked = [sampler.should_sample(None, t, "POST").decision.is_sampled() for t in trace_ids]
        assert decided == asked, sampler.get_description()
    assert telemetry._root_bound(telemetry.JobSampling(sampling.ALWAYS_ON, sampling.ALWAYS_ON)) is None  # asked


class CountingIds(telemetry._PresetTraceIds):
    """The SDK draws a span id for every span it starts, sampled or not."""

    def __init__(self) -> None:
        self.span_ids = 0

    def generate_span_id(self) -> int:
        self.span_ids += 1
        return super().generate_span_id()


UNSAMPLED_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def test_a_span_of_an_unsampled_trace_is_not_built_where_the_sampler_would_drop_it() -> None:
    """Parent-based job sampling drops a child of an unsampled parent: the SDK is not asked (no span id drawn), the
    parent's span stays current with instrumentation suppressed, and what the block publishes says "not sampled"
    under the parent's ids. A sampler that could sample such a child (not parent-based) is asked."""
    for pipelines, built in (
        (sampling.ParentBased(sampling.TraceIdRatioBased(0.5)), False),
        (sampling.ALWAYS_ON, True),
    ):
        ids = CountingIds()
        exporter = InMemorySpanExporter()
        provider = TracerProvider(sampler=telemetry.JobSampling(pipelines, sampling.ALWAYS_OFF), id_generator=ids)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = telemetry._UnsampledUninstrumented(provider.get_tracer("test"))
        parent = telemetry.extract_context({"traceparent": UNSAMPLED_PARENT})
        for context in (parent, None):  # a consumer's parent from the message; a publisher's, current
            token = otel_context.attach(parent) if context is None else None
            try:
                with tracer.start_as_current_span(
                    "publish job.submitted", context=context, kind=trace.SpanKind.PRODUCER
                ):
                    headers: dict[str, Any] = {}
                    telemetry.inject_headers(headers)
                    instrumented = is_instrumentation_enabled()
            finally:
                if token is not None:
                    otel_context.detach(token)
            assert is_instrumentation_enabled()
            if built:
                assert instrumented and headers["traceparent"].endswith("-01")
            else:
                assert not instrumented and headers == {"traceparent": UNSAMPLED_PARENT}
        assert (ids.span_ids, len(exporter.get_finished_spans())) == ((2, 2) if built else (0, 0))


def test_a_span_of_an_unsampled_trace_made_before_the_provider_follows_the_providers_sampler() -> None:
    """`telemetry.tracer` made before a provider is installed wraps the API's proxy tracer: the sampler judged is the
    installed provider's."""
    tracer = telemetry._UnsampledUninstrumented(trace.ProxyTracer("test"))
    parent = telemetry.extract_context({"traceparent": UNSAMPLED_PARENT})
    assert not tracer._drops_unsampled_children()  # no SDK yet: the API's no-op tracer
    ids = CountingIds()
    provider = TracerProvider(
        sampler=telemetry.JobSampling(sampling.ParentBased(sampling.ALWAYS_ON), sampling.ALWAYS_OFF), id_generator=ids
    )
    tracer._tracer._real_tracer = provider.get_tracer("test")  # what the proxy does once a provider is installed
    with tracer.start_as_current_span("process job.submitted", parent, kind=trace.SpanKind.CONSUMER) as span:
        assert span.get_span_context() == trace.get_current_span(parent).get_span_context()
    assert tracer._drops_unsampled_children() and ids.span_ids == 0


class Stamp:
    """A propagator that writes its own header (not W3C's)."""

    fields = {"x-stamp"}

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        carrier["x-stamp"] = format(trace.get_current_span(context).get_span_context().trace_id, "x")

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        return context


def test_published_headers_are_what_the_configured_propagators_write() -> None:
    """inject_headers writes the W3C headers itself where the propagators are the default and no baggage is set: the
    same as propagate.inject, sampled or not, with a trace state; with baggage or other propagators, theirs."""
    from opentelemetry import baggage
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    assert telemetry._default_propagators()
    contexts = {
        "sampled": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "unsampled": UNSAMPLED_PARENT,
    }
    for name, traceparent in contexts.items():
        for carrier in ({"traceparent": traceparent}, {"traceparent": traceparent, "tracestate": "vendor=a,other=b"}):
            context = TraceContextTextMapPropagator().extract(carrier)
            for with_baggage in (False, True):
                if with_baggage:
                    context = baggage.set_baggage("tenant", "acme", context)
                token = otel_context.attach(context)
                try:
                    ours: dict[str, Any] = {}
                    telemetry.inject_headers(ours)
                    theirs: dict[str, str] = {}
                    propagate.inject(theirs)
                finally:
                    otel_context.detach(token)
                assert ours == theirs, (name, carrier, with_baggage)
                assert ours["traceparent"] == traceparent and ("baggage" in ours) == with_baggage
    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(Stamp())
    try:
        assert not telemetry._default_propagators()
        token = otel_context.attach(TraceContextTextMapPropagator().extract({"traceparent": UNSAMPLED_PARENT}))
        try:
            headers: dict[str, Any] = {}
            telemetry.inject_headers(headers)
        finally:
            otel_context.detach(token)
        assert headers == {"x-stamp": "af7651916cd43dd8448eb211c80319c"}
    finally:
        propagate.set_global_textmap(saved)
