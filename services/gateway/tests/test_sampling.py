"""Sampling in the gateway as app_from_environment wires it: a job's creation is traced at the configured ratio,
polls (the cached reads included), list pages and the model list at the request ratio, decided before any span
object exists; a caller's traceparent decides for its request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.main import JOB_CREATING_ROUTES
from stemflow_shared import telemetry
from stemflow_shared.metrics import REGISTRY

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


class Recorder(SpanProcessor):
    """The SDK's span-processor view: every recording span started and ended; waits for one by its name."""

    def __init__(self) -> None:
        self.started = 0
        self.ended: list[ReadableSpan] = []
        self._waiting: list[tuple[Callable[[ReadableSpan], bool], asyncio.Future[ReadableSpan]]] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)
        for wanted, future in self._waiting:
            if wanted(span) and not future.done():
                future.get_loop().call_soon_threadsafe(future.set_result, span)

    async def wait_for(self, wanted: Callable[[ReadableSpan], bool], timeout_s: float = 10) -> ReadableSpan:
        for span in self.ended:
            if wanted(span):
                return span
        future: asyncio.Future[ReadableSpan] = asyncio.get_running_loop().create_future()
        self._waiting.append((wanted, future))
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.remove((wanted, future))


def own_events_acked() -> float:
    """The gateway's own job.submitted events acked unread on their return through its queue (this process)."""
    return REGISTRY.get_sample_value("stemflow_dedup_hits_total", {"kind": "own_event"}) or 0.0


class Traced:
    def __init__(self, app: Any, client: Any, recorder: Recorder, exporter: InMemorySpanExporter, reader: Any):
        self.app, self.client, self.recorder, self.exporter, self.reader = app, client, recorder, exporter, reader
        self._own_events = own_events_acked()

    def spans_started(self) -> int:
        """The SDK's own count of every span started, recording or not (otel.sdk.span.started)."""
        data = self.reader.get_metrics_data()
        return sum(
            int(point.value)
            for resource in (data.resource_metrics if data else [])
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "otel.sdk.span.started"
            for point in metric.data.data_points
        )

    async def job_settled(self) -> None:
        """The last job's creation is over in the gateway: its job.submitted published, come back and acked."""
        self._own_events += 1
        async with asyncio.timeout(10):
            while own_events_acked() < self._own_events:  # noqa: ASYNC110 - a Prometheus counter: polled
                await asyncio.sleep(0.01)
        await self.app.state.jobs.relay.drain(10)


@pytest.fixture
def traced_gateway(
    base_env: dict[str, str], helpers: Any, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., contextlib.AbstractAsyncContextManager[Traced]]:
    """The gateway app behind head_sampling as app_from_environment builds it, with the SDK as setup_tracing
    installs it (sampling from the environment, the PyMongo and Redis instrumentations), spans kept in memory."""

    @contextlib.asynccontextmanager
    async def start(job_ratio: float, request_ratio: float) -> AsyncIterator[Traced]:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", str(job_ratio))
        monkeypatch.setenv("STEMFLOW_TRACES_REQUEST_RATIO", str(request_ratio))
        monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")  # the SDK counts spans started
        reader, exporter, recorder = InMemoryMetricReader(), InMemorySpanExporter(), Recorder()
        provider = telemetry.tracer_provider(
            "gateway", exporter=exporter, meter_provider=MeterProvider(metric_readers=[reader])
        )
        provider.add_span_processor(recorder)
        # The global provider, for this test only (the API sets it once per process).
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
        telemetry.tracer.cache_clear()
        instrumentors = [PymongoInstrumentor(), RedisInstrumentor()]
        assert not any(i.is_instrumented_by_opentelemetry for i in instrumentors)
        for instrumentor in instrumentors:
            instrumentor.instrument(tracer_provider=provider)
        # PyMongo's instrumentation makes its command listener, with its tracer, once a process and later only
        # enables it again: its spans go to the first test's provider (shut down) in every later test. Here they
        # come to this one where the request ratio is 0; above it, the MongoDB commands of every client of the
        # process (other apps' background rounds too) would be roots sampled in the middle of a test's count.
        listener = PymongoInstrumentor()._commandtracer_instance
        assert listener is not None
        if request_ratio == 0:
            monkeypatch.setattr(listener, "_tracer", provider.get_tracer("opentelemetry.instrumentation.pymongo"))
        try:
            async with helpers.running_app(base_env) as app:
                sampled = telemetry.head_sampling(app, starts_pipeline=JOB_CREATING_ROUTES)
                assert isinstance(sampled, telemetry.HeadSampling)
                async with helpers.http_client(sampled) as client:
                    yield Traced(app, client, recorder, exporter, reader)
        finally:
            for instrumentor in instrumentors:
                instrumentor.uninstrument()
            telemetry.tracer.cache_clear()
            provider.shutdown()

    return start


def trace_of(spans: Any, trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.context.trace_id == trace_id]


async def test_a_job_created_at_ratio_1_is_one_trace_and_its_polls_at_ratio_0_make_no_span(
    traced_gateway: Any, helpers: Any
) -> None:
    async with traced_gateway(job_ratio=1, request_ratio=0) as gw:
        headers = await helpers.new_key(gw.app, "sampling")
        created = await helpers.submit(gw.client, headers)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        await gw.job_settled()

        spans = gw.exporter.get_finished_spans()
        (root,) = [s for s in spans if s.name == "POST /v1/jobs"]
        assert root.parent is None and root.context.trace_flags.sampled
        job_trace = trace_of(spans, root.context.trace_id)
        names = {s.name for s in job_trace}
        # The request, its MongoDB insert and the publish of job.submitted: one trace, which ingest, the separator
        # and the analyzer follow from the event's traceparent. The event's return to the gateway's own queue is
        # acked unread, under no span.
        assert "publish job.submitted" in names and "process job.submitted" not in names
        assert any(s.attributes.get("db.system") == "mongodb" for s in job_trace)
        assert all(s.parent is not None for s in job_trace if s is not root)

        started, recorded, exported = gw.spans_started(), gw.recorder.started, len(gw.exporter.get_finished_spans())
        for _ in range(10):
            assert (await gw.client.get(f"/v1/jobs/{job_id}", headers=headers)).status_code == 200  # cached read
            assert (await gw.client.get("/v1/jobs", headers=headers)).status_code == 200
            assert (await gw.client.get("/v1/models", headers=headers)).status_code == 200
            assert (await gw.client.get("/healthz")).status_code == 200
        # No span exported or recorded, and no span object made at all (not even a non-recording one).
        assert len(gw.exporter.get_finished_spans()) == exported
        assert gw.recorder.started == recorded
        assert gw.spans_started() == started


async def test_a_traced_creation_makes_the_spans_of_its_job_and_no_side_reads_or_writes(
    traced_gateway: Any, helpers: Any
) -> None:
    """A traced creation costs about a quarter more CPU than an untraced one, most of it per span: its trace holds the
    spans that follow the job (the request, the job's insert, the publish of job.submitted), not the commands
    around them: the rate limit's count, the check of the separators' announcements and the cache's copy of the
    new job (Redis), the outbox's mark of the published event (MongoDB), nor the gateway's own consumption of
    the event it published (five of eight spans before)."""
    async with traced_gateway(job_ratio=1, request_ratio=0) as gw:
        headers = await helpers.new_key(gw.app, "sampling")
        for _ in range(2):  # the first also reads the new key from MongoDB (a span of its own), then cached
            gw.exporter.clear()
            created = await helpers.submit(gw.client, headers)
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]
            await gw.job_settled()
        assert (await gw.app.state.jobs.cache.get(job_id))[0] is not None  # cached all the same
        stored = await gw.app.state.jobs.repo.jobs.find_one({"_id": job_id})
        assert stored["outbox"] == [] and "outbox_at" not in stored  # marked published all the same

        spans = gw.exporter.get_finished_spans()
        (root,) = [s for s in spans if s.name == "POST /v1/jobs"]
        job_trace = trace_of(spans, root.context.trace_id)
        database = gw.app.state.settings.mongodb_db
        assert sorted(s.name for s in job_trace) == sorted(
            ["POST /v1/jobs", f"{database}.insert", "publish job.submitted"]
        )
        assert not [s for s in spans if s.attributes.get("db.system") == "redis"]


async def test_a_poll_follows_its_callers_traceparent(traced_gateway: Any, helpers: Any) -> None:
    async with traced_gateway(job_ratio=0, request_ratio=0) as gw:
        headers = await helpers.new_key(gw.app, "sampling")
        job_id = (await helpers.submit(gw.client, headers)).json()["id"]
        await gw.app.state.jobs.relay.drain(10)
        assert gw.exporter.get_finished_spans() == ()  # the job was not sampled: nothing recorded
        await gw.client.get(f"/v1/jobs/{job_id}", headers=headers)  # the cache is filled

        sampled = {**headers, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        assert (await gw.client.get(f"/v1/jobs/{job_id}", headers=sampled)).status_code == 200
        spans = trace_of(gw.exporter.get_finished_spans(), int(CALLER_TRACE, 16))
        (server,) = [s for s in spans if s.kind is trace.SpanKind.SERVER]
        assert server.name == "GET /v1/jobs/{job_id}"  # answered from the cache, in front of the routing
        assert server.parent is not None and server.parent.span_id == int(CALLER_SPAN, 16)
        # Its Redis read is a span of its own: a traced poll's reads go through the instrumented client.
        redis_spans = [s for s in spans if s.attributes.get("db.system") == "redis"]
        assert redis_spans and all(s.parent.span_id == server.context.span_id for s in redis_spans)

        # So are a traced list page's, its first read (a miss) and the cached page answered in front of the routing.
        for trace_id in ("1" * 32, "2" * 32):
            caller = {**headers, "traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"}
            assert (await gw.client.get("/v1/jobs", headers=caller)).status_code == 200
            page = trace_of(gw.exporter.get_finished_spans(), int(trace_id, 16))
            (list_server,) = [s for s in page if s.kind is trace.SpanKind.SERVER]
            assert list_server.name == "GET /v1/jobs"
            assert any(s.attributes.get("db.system") == "redis" for s in page)


async def test_an_unsampled_traceparent_suppresses_instrumentation(traced_gateway: Any, helpers: Any) -> None:
    async with traced_gateway(job_ratio=1, request_ratio=1) as gw:
        headers = await helpers.new_key(gw.app, "sampling")
        job_id = (await helpers.submit(gw.client, headers)).json()["id"]
        await gw.job_settled()

        started, recorded, exported = gw.spans_started(), gw.recorder.started, len(gw.exporter.get_finished_spans())
        unsampled = {**headers, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"}
        for _ in range(5):
            assert (await gw.client.get(f"/v1/jobs/{job_id}", headers=unsampled)).status_code == 200
            assert (await gw.client.get("/v1/jobs", headers=unsampled)).status_code == 200
        assert len(gw.exporter.get_finished_spans()) == exported
        assert gw.recorder.started == recorded
        assert gw.spans_started() == started


async def test_untraced_requests_redis_commands_skip_the_instrumentation_and_traced_ones_keep_their_spans(
    traced_gateway: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model list's Redis commands (the rate limit's script, the separators' announcements): not sampled, they
    never enter the Redis instrumentation's wrapper (the gateway's client skips it where instrumentation is
    suppressed); traced by its caller, the announcements' read is a span under the request's (the rate limit's
    count never is: it rides along with the cache read of a poll or a list page, and is noise elsewhere)."""
    from opentelemetry.instrumentation import redis as redis_instrumentation

    entered: list[bool] = []
    wrapper_check = redis_instrumentation.is_instrumentation_enabled

    def counted() -> bool:
        entered.append(True)
        return wrapper_check()

    async with traced_gateway(job_ratio=0, request_ratio=0) as gw:
        headers = await helpers.new_key(gw.app, "sampling")
        monkeypatch.setattr(redis_instrumentation, "is_instrumentation_enabled", counted)  # the wrapper's first step
        for _ in range(3):
            assert (await gw.client.get("/v1/models", headers=headers)).status_code == 200
        assert entered == []
        assert gw.exporter.get_finished_spans() == ()

        sampled = {**headers, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        assert (await gw.client.get("/v1/models", headers=sampled)).status_code == 200
        assert entered
        spans = trace_of(gw.exporter.get_finished_spans(), int(CALLER_TRACE, 16))
        (server,) = [s for s in spans if s.kind is trace.SpanKind.SERVER]
        assert server.name == "GET /v1/models"
        redis_spans = [s for s in spans if s.attributes.get("db.system") == "redis"]
        assert sorted(s.name for s in redis_spans) == ["HGETALL"]
        assert all(s.parent.span_id == server.context.span_id for s in redis_spans)
