"""Tracing and logging, configured once per process from the standard environment.

Tracing is on only when an ``OTEL_*`` variable asks for an exporter; otherwise
the no-op tracer of the API is used and spans cost nothing.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, Context
from opentelemetry.instrumentation.utils import (
    _SUPPRESS_INSTRUMENTATION_KEY_PLAIN,
    is_instrumentation_enabled,
    suppress_instrumentation,
)
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_service_name: str = "stemflow"
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("stemflow_job_id", default=None)


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """True when the standard OTEL_* variables ask for span export."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return bool(endpoint) or exporter in {"otlp", "console"}


def setup_tracing(service: str, *, exporter: Any | None = None) -> Any | None:
    """Install an SDK tracer provider if asked to (env or an explicit exporter); return it."""
    global _service_name
    _service_name = os.environ.get("OTEL_SERVICE_NAME", service)
    if exporter is None and not tracing_requested():
        return None
    provider = tracer_provider(_service_name, exporter=exporter)
    trace.set_tracer_provider(provider)
    _instrument_clients()
    return provider


def tracer_provider(service: str, *, exporter: Any | None = None, meter_provider: Any | None = None) -> Any:
    """The SDK tracer provider of a service, its sampling as `JobSampling` reads it from the environment.

    With `exporter`, spans go to it synchronously (tests); otherwise as OTEL_TRACES_EXPORTER asks
    (console) or over OTLP/HTTP, through the BatchSpanProcessor.
    """
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(
        sampler=JobSampling.from_environment(),
        resource=service_resource(service),
        id_generator=_PresetTraceIds(),
        meter_provider=meter_provider,
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        meters = sdk_meter_provider()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(meter_provider=meters), meter_provider=meters))
    return provider


class _HashedOnce(Resource):
    """A Resource whose hash is computed once: it is immutable, and the export path hashes it per span.

    The OTLP encoders group each batch's spans by resource, a dict lookup per span, and the SDK's
    Resource hashes itself by serialising all its attributes to JSON on every call: ~4 µs a span,
    about 5% of an untraced cached read's CPU time for its two spans (bench/tracing.py, the floor).
    Equal to, and hashed like, the plain Resource with the same attributes and schema URL.
    """

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def service_resource(service: str) -> Resource:
    """This process's resource: `service.name`, OTEL_RESOURCE_ATTRIBUTES and the SDK's detectors, as
    `Resource.create` merges them, hashed once."""
    return _HashedOnce(Resource.create({SERVICE_NAME: service}))


@functools.cache
def sdk_meter_provider() -> Any | None:
    """The OpenTelemetry SDK's own metrics on this process's Prometheus registry, when asked for.

    With `OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED=true` (a standard SDK variable) the
    span processor and the OTLP exporter count what they do: spans queued, dropped
    from a full queue (`otel_sdk_processor_span_processed_total{error_type="queue_full"}`),
    exported or failed (`otel_sdk_exporter_span_exported_total{error_type=...}`), the
    queue's size and capacity, the duration of each export. A dropped or unexported
    span leaves a job's trace incomplete: SREs see it here (StemflowTraceSpansLost).
    These count per batch, not per span, and only the processor and the exporter get
    this provider; it is never the global one, so no other instrumentation starts
    recording OpenTelemetry metrics.
    """
    if os.environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "").strip().lower() != "true":
        return None
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider

    from .metrics import REGISTRY

    reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=REGISTRY)
    return MeterProvider(metric_readers=[reader])


def _instrument_clients() -> None:
    """The official instrumentations of the clients every service uses (spans per command/request)."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    for instrumentor in (PymongoInstrumentor(), RedisInstrumentor(), HTTPXClientInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


# Probes and scrapes: frequent, and nothing an SRE wants in a trace.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# The share of requests outside a job's pipeline (polls, list pages, downloads, the WebSocket) traced.
REQUEST_RATIO_VARIABLE = "STEMFLOW_TRACES_REQUEST_RATIO"
DEFAULT_REQUEST_RATIO = 0.01

# Set in the scope by HeadSampling on requests it leaves untraced: FastAPI then opens no span.
_FASTAPI_TELEMETRY = "fastapi.telemetry"
_NOT_SAMPLED = trace.TraceFlags(trace.TraceFlags.DEFAULT)
_NO_TRACE_STATE = trace.DEFAULT_TRACE_STATE
_W3C = TraceContextTextMapPropagator()
# Requests that only read: an unsampled one without a caller's trace context runs under no span (HeadSampling).
_READS = frozenset({"GET", "HEAD"})


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS


def fastapi_telemetry() -> dict[str, Any]:
    """Settings for FastAPI's own OpenTelemetry support: `FastAPI(telemetry=fastapi_telemetry())`.

    FastAPI (0.162 on) opens the HTTP server span of every request itself, named by
    its route template with the stable HTTP semantic conventions, whenever a tracer
    provider is installed (`setup_tracing`), and costs nothing otherwise. It replaces
    opentelemetry-instrumentation-fastapi, which matched every route a second time per
    request to name its span. Off here: FastAPI's internal spans per dependency
    resolution, endpoint and serialisation (three more spans per request, which the
    HTTP span's duration already covers), its OpenTelemetry metrics (the services
    export Prometheus metrics: stemflow_shared.metrics) and its log records (the
    services log JSON lines with the trace ids: setup_logging).
    """
    return {
        "tracing": True,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
        "auto_configure": False,
        "exclude": _untraced,
    }


_preset_trace_id: contextvars.ContextVar[int] = contextvars.ContextVar("stemflow_preset_trace_id", default=0)
# The trace HeadSampling judged sampled for the request at hand: JobSampling samples its spans.
_head_sampled: contextvars.ContextVar[int] = contextvars.ContextVar("stemflow_head_sampled", default=0)


class _PresetTraceIds(RandomIdGenerator):
    """Random ids, except the trace id `HeadSampling` drew and judged for the request at hand (used once)."""

    def generate_trace_id(self) -> int:
        preset = _preset_trace_id.get()
        if preset:
            _preset_trace_id.set(0)
            return preset
        return super().generate_trace_id()


def request_ratio(environ: Mapping[str, str] = os.environ) -> float:
    """STEMFLOW_TRACES_REQUEST_RATIO, from 0 to 1 (default 0.01); anything else refuses to start."""
    raw = environ.get(REQUEST_RATIO_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_REQUEST_RATIO
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{REQUEST_RATIO_VARIABLE} must be a number from 0 to 1, not {raw!r}")
    return ratio


_MESSAGES = frozenset({trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER})


class JobSampling(Sampler):
    """One trace per job at the configured ratio; requests outside a job's pipeline at a ratio of their own.

    - `pipelines`, the sampler OTEL_TRACES_SAMPLER names (read as the SDK reads it; deployed:
      parentbased_traceidratio at OTEL_TRACES_SAMPLER_ARG), judges every span with a parent
      (a job's events carry its decision to every service), the requests that create jobs
      (HeadSampling asks it) and messages without a trace context (a `job.submitted` another
      service published: its `process` span is the root of the job's trace).
    - `requests`, TraceIdRatioBased at STEMFLOW_TRACES_REQUEST_RATIO, judges the other requests
      (HeadSampling asks it before any span exists) and the other roots: a server span no
      HeadSampling judged (the gateway's internal API), the MongoDB and Redis commands of
      background work (sweeps, watches, the separators' announcements).
    - The spans of a trace HeadSampling judged sampled, at either ratio, are sampled.
    """

    def __init__(self, pipelines: Sampler, requests: Sampler) -> None:
        self.pipelines = pipelines
        self.requests = requests

    @classmethod
    def from_environment(cls) -> JobSampling:
        return cls(sampling._get_from_env_or_default(), sampling.TraceIdRatioBased(request_ratio()))

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> sampling.SamplingResult:
        if trace_id == _head_sampled.get():
            parent = trace.get_current_span(parent_context).get_span_context()
            return sampling.SamplingResult(
                sampling.Decision.RECORD_AND_SAMPLE, attributes, parent.trace_state if parent.is_valid else None
            )
        if kind not in _MESSAGES and not trace.get_current_span(parent_context).get_span_context().is_valid:
            return self.requests.should_sample(parent_context, trace_id, name, kind, attributes, links)
        return self.pipelines.should_sample(parent_context, trace_id, name, kind, attributes, links)

    def get_description(self) -> str:
        return f"JobSampling{{pipelines:{self.pipelines.get_description()},requests:{self.requests.get_description()}}}"


class HeadSampling:
    """Takes the sampling decision of every request before any instrumentation runs.

    Instrumentations do their work (attributes, span objects, context switches) for
    unsampled requests too, only to drop it. This middleware, outermost, decides first:
    - a request that creates a job (`starts_pipeline`, e.g. `POST /v1/jobs`) and brings no
      trace context is judged by the configured sampler (`JobSampling.pipelines`): the job's
      trace starts here, and every service follows its decision;
    - any other request without a trace context (polls, list pages, downloads, the WebSocket)
      is judged at the request ratio (`JobSampling.requests`, STEMFLOW_TRACES_REQUEST_RATIO);
    - a request whose `traceparent` says sampled is traced as its caller asks; one whose
      `traceparent` says not sampled, and probes (UNTRACED_PATHS), are not traced.
    Sampled: the drawn trace id is handed to the SDK for the server span, and the whole
    trace is sampled (JobSampling). Not sampled: the request runs with instrumentation
    suppressed, FastAPI opens no span, and no span object is made; a request that may
    write runs under a non-recording span of its trace (so a job or event it creates
    carries "not sampled" in its traceparent, and its log lines a trace id), a read
    (GET, HEAD) without a caller's trace context under none (its log lines have no
    trace_id): it publishes nothing, and a fresh span and context per poll cost more
    than the poll's whole unsampled path.
    """

    def __init__(self, app: Any, provider: Any, starts_pipeline: Iterable[tuple[str, str]] = ()) -> None:
        self.app = app
        self._pipelines = provider.sampler.pipelines
        self._requests = provider.sampler.requests
        self._starts_pipeline = frozenset((method.upper(), path) for method, path in starts_pipeline)
        self._ids = provider.id_generator
        # Each ratio's decision of a root as its sampler takes it, without its SamplingResult (3 µs a request).
        self._requests_bound = _root_bound(self._requests)
        self._pipelines_bound = _root_bound(self._pipelines)
        with suppress_instrumentation():
            self._suppressed = otel_context.get_current()  # one context switch per request, not two
        self._current = _current_context_variable()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" and scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in UNTRACED_PATHS:
            await self._untraced(self._suppressed, scope, receive, send)
            return
        parent = _remote_parent(scope["headers"])
        if parent is not None:
            if parent.trace_flags.sampled:
                await self.app(scope, receive, send)  # the server span follows it (parent-based)
            else:
                context = trace.set_span_in_context(trace.NonRecordingSpan(parent), self._suppressed)
                await self._untraced(context, scope, receive, send)
            return
        method = scope.get("method", "GET")  # a WebSocket's scope has none
        trace_id = RandomIdGenerator.generate_trace_id(self._ids)  # a fresh draw, never a preset one
        pipeline = (method, path) in self._starts_pipeline
        bound = self._pipelines_bound if pipeline else self._requests_bound
        if bound is None:
            sampler = self._pipelines if pipeline else self._requests
            sampled = sampler.should_sample(
                None, trace_id, method, trace.SpanKind.SERVER, {"http.request.method": method, "url.path": path}
            ).decision.is_sampled()
        else:
            sampled = trace_id & sampling.TraceIdRatioBased.TRACE_ID_LIMIT < bound
        if sampled:
            preset, judged = _preset_trace_id.set(trace_id), _head_sampled.set(trace_id)
            try:
                await self.app(scope, receive, send)
            finally:
                _head_sampled.reset(judged)
                _preset_trace_id.reset(preset)
            return
        if method in _READS and scope["type"] == "http":
            # A read, not sampled and without a caller's trace context: it starts no job and publishes nothing,
            # so it runs under no span at all (its log lines carry no trace_id), in the one suppressed context
            # made at start-up. A fresh span and context per request cost a cached read 4-6 µs (bench/tracing.py).
            await self._untraced(self._suppressed, scope, receive, send)
            return
        unsampled = trace.NonRecordingSpan(unsampled_span_context(trace_id, self._ids.generate_span_id()))
        await self._untraced(trace.set_span_in_context(unsampled, self._suppressed), scope, receive, send)

    async def _untraced(self, context: Context, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        # FastAPI leaves a request alone whose scope already holds this key (as it does for excluded ones).
        scope[_FASTAPI_TELEMETRY] = None
        if self._current is None:
            token = otel_context.attach(context)
            try:
                await self.app(scope, receive, send)
            finally:
                otel_context.detach(token)
            return
        # What attach and detach do, without their two layers of calls and the detach's guard (1-2 µs a request).
        reset = self._current.set(context)
        try:
            await self.app(scope, receive, send)
        finally:
            self._current.reset(reset)


def _root_bound(sampler: Sampler) -> int | None:
    """What `sampler` decides for a root span, as a bound on the trace id's low 64 bits (sampled when below it),
    where the sampler is the SDK's own ratio or static sampler, alone or as a parent-based sampler's root;
    None for any other sampler (it is asked)."""
    if type(sampler) is sampling.ParentBased:
        sampler = sampler._root
    if type(sampler) is sampling.TraceIdRatioBased:
        return int(sampler.bound)
    if type(sampler) is sampling.StaticSampler:
        return sampling.TraceIdRatioBased.TRACE_ID_LIMIT + 1 if sampler._decision.is_sampled() else 0
    return None


@functools.cache
def _current_context_variable() -> contextvars.ContextVar[Context] | None:
    """The context variable that holds OpenTelemetry's current context, when the runtime context is the API's
    default (contextvars); None otherwise (OTEL_PYTHON_CONTEXT names another), and `attach` is used. Found once:
    the API picks its runtime context when it is imported, and `_current_context` asks on every switch."""
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is ContextVarsRuntimeContext:
        variable = getattr(runtime, "_current_context", None)
        if isinstance(variable, contextvars.ContextVar):
            return variable
    return None


def head_sampling(app: Any, *, starts_pipeline: Iterable[tuple[str, str]] = ()) -> Any:
    """`app` behind `HeadSampling` when tracing is on; `app` itself otherwise.

    `starts_pipeline`: the (method, path) of each route of `app` that creates jobs, the only
    requests traced at the job ratio; a pair that no route of `app` serves is refused.
    """
    declared = frozenset((method.upper(), path) for method, path in starts_pipeline)
    if missing := sorted(request for request in declared if not _served(app, *request)):
        raise ValueError(f"head_sampling: no route of the app serves {missing}")
    provider = trace.get_tracer_provider()
    if isinstance(getattr(provider, "sampler", None), JobSampling):
        return HeadSampling(app, provider, declared)
    return app


def _served(app: Any, method: str, path: str) -> bool:
    """Whether a route of `app` (a Starlette/FastAPI app) takes `method path`, as its router would match it."""
    from starlette.routing import Match

    probe = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    return any(route.matches(probe)[0] is Match.FULL for route in app.router.routes)


def unsampled_span_context(trace_id: int, span_id: int) -> trace.SpanContext:
    """`SpanContext(trace_id, span_id, is_remote=False, trace_flags=not sampled)` for ids the SDK's generator
    drew (valid by construction), made as the API's constructor makes it, without its checks (1.3 µs of a
    request's 2 µs unsampled path). A test compares it with the constructor's on every field."""
    return tuple.__new__(trace.SpanContext, (trace_id, span_id, False, _NOT_SAMPLED, _NO_TRACE_STATE, True))


def _remote_parent(headers: Any) -> trace.SpanContext | None:
    """The caller's span context from its `traceparent` (and `tracestate`) headers, if valid."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name == b"traceparent" or name == b"tracestate":
            carrier[name.decode()] = value.decode("latin-1")
    if "traceparent" not in carrier:
        return None
    span_context = trace.get_current_span(_W3C.extract(carrier)).get_span_context()
    return span_context if span_context.is_valid else None


def name_server_span(method: str, route: str) -> None:
    """Name the current HTTP server span after a route a middleware answered before FastAPI's routing."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("http.route", route)
        span.update_name(f"{method} {route}")


def recording() -> bool:
    """Whether the current span records: the request or job at hand is traced (sampled)."""
    return trace.get_current_span().is_recording()


@contextmanager
def no_client_spans() -> Iterator[None]:
    """A block whose client calls (Redis, MongoDB, httpx) make no spans, on a traced request or job too.

    For the side reads and writes of a traced request that say nothing about its job and cost as much
    as the spans that do: a job's creation checks the separators' announcements (a Redis HGETALL) and
    caches the new job (a Redis EVALSHA), and the outbox marks its event published (a MongoDB update).
    With the rate limit's count (never a span: gateway.ratelimit) and the gateway's own consumption of
    the event (acked unread: Broker.consume's own_events), those were five of a traced creation's eight
    spans (bench/tracing.py --in-process; docs/runbook.md, "Sampling"). The spans of the job's insert
    and of its event's publish stay. Where the trace is not sampled, nothing is done (no context
    switch). The trace, not the current span: a request's background work (the outbox's publish after the
    answer) still makes spans in its sampled trace after the request's span has ended and stopped recording.
    """
    if not trace.get_current_span().get_span_context().trace_flags.sampled:
        yield
        return
    with _current_context(suppressed()):
        yield


def suppressed(context: Context | None = None) -> Context:
    """`context` (the current one by default) with instrumentation suppressed, as `suppress_instrumentation()`
    sets it, in one copy of the context rather than two."""
    base = otel_context.get_current() if context is None else context
    return Context({**base, _SUPPRESS_INSTRUMENTATION_KEY: True, _SUPPRESS_INSTRUMENTATION_KEY_PLAIN: True})


def without_redis_spans(client: Any) -> Any:
    """A `redis.asyncio.Redis` that shares `client`'s connection pool and settings but whose commands never pass
    through the Redis instrumentation (for hot paths, used where `recording()` is false).

    opentelemetry-instrumentation-redis wraps `Redis.execute_command` for the whole class, and its
    wrapper runs for every command, under `suppress_instrumentation` too, only to find that it is
    suppressed: 3-5 µs a command, 2-3% of a cached read (bench/tracing.py). This client's class
    calls the library's own `execute_command`, whether the instrumentation was installed before or
    after. Closing it is `client`'s business (the pool is `client`'s).
    """
    plain = copy.copy(client)
    plain.__class__ = _uninstrumented_class(type(client))
    return plain


@functools.cache
def _uninstrumented_class(cls: type) -> type:
    execute = _library_execute_command(cls)
    return type(f"Uninstrumented{cls.__name__}", (cls,), {"execute_command": execute, "__module__": __name__})


def _library_execute_command(cls: type) -> Any:
    """redis-py's own `execute_command` of `cls`, under any wrapper the instrumentation put on it."""
    execute = next(vars(c)["execute_command"] for c in cls.__mro__ if "execute_command" in vars(c))
    while hasattr(execute, "__wrapped__"):  # the instrumentation's wrapt wrapper, or ours
        execute = execute.__wrapped__
    return execute


def redis_skipping_suppressed(client: Any) -> Any:
    """`client` (a `redis.asyncio.Redis`), made to call redis-py's own `execute_command` while instrumentation
    is suppressed, and the Redis instrumentation's wrapper otherwise; returns it.

    The wrapper, installed on the whole class, runs for every command only to find, on a request that was
    not sampled (HeadSampling suppresses instrumentation there), that it must make no span: a wrapt call, a
    coroutine of its own and two context lookups, a few µs a command. This takes the same decision as its
    first line (`is_instrumentation_enabled`), before any of that. Spans are made exactly where they were:
    sampled requests, a sampled job's work, background commands (judged at the request ratio).
    """
    client.__class__ = _skipping_suppressed_class(type(client))
    return client


@functools.cache
def _skipping_suppressed_class(cls: type) -> type:
    plain = _library_execute_command(cls)

    def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        if is_instrumentation_enabled():
            return super(skipping, self).execute_command(*args, **options)  # the instrumentation's, if installed
        return plain(self, *args, **options)

    execute_command.__wrapped__ = plain  # type: ignore[attr-defined]  # without_redis_spans goes to the library's
    skipping = type(f"SkippingSuppressed{cls.__name__}", (cls,), {"execute_command": execute_command})
    skipping.__module__ = __name__
    return skipping


def _drops_unsampled_children(sampler: Any) -> bool:
    """Whether `sampler` drops every span whose parent is valid and not sampled: JobSampling over a parent-based
    sampler (every OTEL_TRACES_SAMPLER parentbased_*) whose not-sampled delegates are the default, ALWAYS_OFF
    (JobSampling sends a span with a valid parent to `pipelines`, its head-judged trace aside, which is sampled)."""
    pipelines = sampler.pipelines if isinstance(sampler, JobSampling) else None
    return type(pipelines) is sampling.ParentBased and all(
        type(delegate) is sampling.StaticSampler and not delegate._decision.is_sampled()
        for delegate in (pipelines._local_parent_not_sampled, pipelines._remote_parent_not_sampled)
    )


@contextmanager
def _current_context(context: Context) -> Iterator[None]:
    """`context` current in the block: OpenTelemetry's attach and detach, or (with the API's default runtime
    context) the same on its context variable, without their layers of calls and the detach's guard."""
    variable = _current_context_variable()
    if variable is None:
        token = otel_context.attach(context)
        try:
            yield
        finally:
            otel_context.detach(token)
        return
    reset = variable.set(context)
    try:
        yield
    finally:
        variable.reset(reset)


@functools.cache
def tracer(name: str = "stemflow") -> trace.Tracer:
    """The tracer of `name`, made once: the SDK's get_tracer costs tens of microseconds a call.

    Before a provider is installed this wraps the API's proxy tracer, which switches
    to the installed provider's tracer by itself.
    """
    return _UnsampledUninstrumented(trace.get_tracer(name))


class _UnsampledUninstrumented(trace.Tracer):
    """A tracer whose current spans, when their trace is not sampled, run with instrumentation suppressed.

    A job that was not sampled reaches every service in events whose traceparent says
    so, and its `process` span is a non-recording one; without this, the PyMongo, Redis
    and httpx instrumentations would still build a (dropped) span for every command of
    its handlers. HeadSampling spares an unsampled request the same way.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._judged: tuple[Any, bool] = (None, False)  # (the SDK tracer's sampler, _drops_unsampled_children)

    def _drops_unsampled_children(self) -> bool:
        tracer = self._tracer
        if isinstance(tracer, trace.ProxyTracer):  # made before a provider was installed: the one it now uses
            tracer = tracer._tracer
        sampler = getattr(tracer, "sampler", None)
        if self._judged[0] is not sampler:
            self._judged = (sampler, _drops_unsampled_children(sampler))
        return self._judged[1]

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._tracer.start_span(*args, **kwargs)

    @contextmanager  # type: ignore[override]
    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[trace.Span]:
        context = kwargs["context"] if "context" in kwargs else args[1] if len(args) > 1 else None
        parent = trace.get_current_span(context)
        known = parent.get_span_context()
        if not known.trace_flags.sampled and known.is_valid and self._drops_unsampled_children():
            # The sampler would drop this span (parent-based, its parent not sampled): the SDK's work for it
            # (sampler, ids, a span and its context) is skipped. The parent's span stays current, so what this
            # block publishes carries the parent's traceparent, "not sampled" as the SDK's span would have.
            if context is None and not is_instrumentation_enabled():
                yield parent  # its span current and instrumentation suppressed already (an unsampled request)
                return
            with _current_context(suppressed(context)):
                yield parent
            return
        with self._tracer.start_as_current_span(*args, **kwargs) as span:
            if span.is_recording() or not span.get_span_context().is_valid:
                yield span
                return
            with _current_context(suppressed()):
                yield span


def inject_headers(headers: MutableMapping[str, Any]) -> None:
    """Write the current W3C trace context (traceparent, tracestate) into AMQP headers.

    With the default propagators (W3C trace context and baggage) and no baggage, the headers are written here
    as the trace-context propagator writes them, without the propagators' layers (half the cost of an
    unsampled job's publish headers); anything else goes through the configured propagators."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid and _default_propagators() and not baggage.get_all():
        headers["traceparent"] = (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
        )
        if span_context.trace_state:
            headers["tracestate"] = span_context.trace_state.to_header()
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    headers.update(carrier)


_default_propagation: tuple[Any, bool] = (None, False)


def _default_propagators() -> bool:
    """Whether the global propagator is the SDK's default: W3C trace context, then W3C baggage (OTEL_PROPAGATORS
    unset or "tracecontext,baggage")."""
    global _default_propagation
    propagator = propagate.get_global_textmap()
    if _default_propagation[0] is not propagator:
        kinds = [type(p) for p in getattr(propagator, "_propagators", ())]
        default = type(propagator) is CompositePropagator and kinds == [
            TraceContextTextMapPropagator,
            W3CBaggagePropagator,
        ]
        _default_propagation = (propagator, default)
    return _default_propagation[1]


def extract_context(headers: Mapping[str, Any] | None) -> Context:
    """Read a W3C trace context from AMQP headers (values may arrive as bytes)."""
    carrier = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in (headers or {}).items()}
    return propagate.extract(carrier)


@contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Tag logs written inside the block with a job id."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|api_key|access_token)=)[^&\s\"']+")


def redact(text: str) -> str:
    """Credentials in URL queries (`?token=` of browser WebSockets) replaced by `[redacted]`."""
    return _SECRET_QUERY.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    """Rewrites every record's message with `redact`, whichever library logged it (uvicorn logs WS URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the trace, span and job ids of the moment."""

    _SKIP = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": _service_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        job_id = job_id_var.get()
        if job_id:
            entry["job_id"] = job_id
        for key, value in record.__dict__.items():
            if key not in self._SKIP and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger to stderr, as JSON lines by default."""
    global _service_name
    _service_name = os.environ.get("OTEL_SERVICE_NAME", service)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # A server configured before this (uvicorn's own dictConfig gives "uvicorn" a plain-text handler and stops
    # its propagation; its log_level sets "uvicorn.error"'s level) would keep writing its lines in its own
    # format, at its own level: every logger goes through the root's, at the level asked here.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.disabled = False
        logger.setLevel(logging.NOTSET)
    # Connection chatter from these libraries drowns the service's own lines.
    for noisy in ("aiormq", "aio_pika", "pymongo", "httpx", "httpcore", "uvicorn.access", "numba"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
