"""What SREs see of the running system: a real Prometheus scraping every service, and one job's trace.

The Prometheus tests scrape the services of the `system` fixture (and RabbitMQ's
own exporter where its plugin is on), with the project's recording and alert
rules loaded. The trace tests start a second set of the five services that
export spans over OTLP/HTTP to a receiver run here, and check the tree of one
job: the gateway's HTTP span at the root, a CONSUMER span under the PRODUCER
span of every event, all five services in one trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
import yaml

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient
from stemflow_dev.fixtures import delete_namespace
from stemflow_dev.models import make_tiny_repo
from stemflow_dev.procs import ProcessGroup
from stemflow_dev.services import Ports, service_env, service_specs
from stemflow_dev.stack import StackUrls
from stemflow_shared.auth import ApiKeys

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((REPO / "deploy" / "observability" / "prometheus").glob("*.rules.yml"))
ARTIFACTS = REPO / "test-artifacts" / "integration"
SERVICES = ("gateway", "notifier", "ingest", "separator", "analyzer")
SECONDS = 4.0
POLL_S = 0.2  # Prometheus and the span receiver are other threads or processes: their state is polled


@pytest.fixture(scope="module")
def song(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A song no other test sent: the same audio and options would reuse results, and no worker would run.
    seed = int.from_bytes(os.urandom(4), "big")
    return demo_song.write(tmp_path_factory.mktemp("song") / "song.wav", seconds=SECONDS, seed=seed)


async def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll an async `check` until it returns something truthy; fail naming `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(POLL_S)


# --- Prometheus -------------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    http: httpx.AsyncClient
    rabbitmq: bool

    async def query(self, promql: str) -> list[dict[str, Any]]:
        response = await self.http.get(f"{self.url}/api/v1/query", params={"query": promql})
        response.raise_for_status()
        return response.json()["data"]["result"]

    async def value(self, promql: str) -> float | None:
        """The value of a query that gives one series (None when it gives none)."""
        result = await self.query(promql)
        assert len(result) <= 1, f"{promql} gave {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    async def scraped_after(self, moment: float, jobs: tuple[str, ...]) -> bool:
        """Whether every job has been scraped since `moment` (a Unix time)."""
        result = await self.query(f'timestamp(up{{job=~"{"|".join(jobs)}"}})')
        return len(result) == len(jobs) and all(float(r["value"][1]) > moment for r in result)


def rabbitmq_metrics_url(amqp_url: str) -> str:
    """Where RabbitMQ's Prometheus plugin answers: RABBITMQ_PROMETHEUS_URL, else port 15692 of the broker's host."""
    return os.environ.get("RABBITMQ_PROMETHEUS_URL") or f"http://{urlsplit(amqp_url).hostname}:15692"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def prometheus_config(system: Any, rabbitmq_url: str | None) -> dict[str, Any]:
    jobs = [
        {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{system.ports.metrics(name)}"]}]}
        for name in SERVICES
    ]
    if rabbitmq_url is not None:
        target = urlsplit(rabbitmq_url)
        jobs.append(
            {
                "job_name": "rabbitmq",
                "metrics_path": "/metrics/per-object",
                "scheme": target.scheme,
                "scrape_interval": "2s",
                "scrape_timeout": "2s",
                "static_configs": [{"targets": [target.netloc]}],
            }
        )
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULE_FILES],
        "scrape_configs": jobs,
    }


def start_prometheus(binary: str, home: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    argv = [
        binary,
        f"--config.file={home / 'prometheus.yml'}",
        f"--storage.tsdb.path={home / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def prometheus(system: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus server is not installed: it comes with the Debian package `prometheus`")
    home = tmp_path_factory.mktemp("prometheus")
    rabbitmq_url: str | None = rabbitmq_metrics_url(system.env["AMQP_URL"])
    if not _answers(f"{rabbitmq_url}/metrics/per-object"):
        rabbitmq_url = None
    (home / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(system, rabbitmq_url)))
    port = free_port()
    log_path = ARTIFACTS / "logs" / "prometheus.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = start_prometheus(binary, home, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=10) as http:

            async def ready() -> bool:
                assert process.poll() is None, f"prometheus exited; see {log_path}"
                try:
                    return (await http.get(f"{url}/-/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, 60, "Prometheus to be ready")
            yield Prometheus(url, http, rabbitmq=rabbitmq_url is not None)
    finally:
        stop(process)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def scraped_job(prometheus: Prometheus, system: Any, api_key: str, song: Path) -> dict[str, Any]:
    """One job through the system, and Prometheus having scraped every service since it completed."""

    async def all_up() -> bool:
        result = await prometheus.query(f'up{{job=~"{"|".join(SERVICES)}"}} == 1')
        return len(result) == len(SERVICES)

    await wait_for(all_up, 60, "Prometheus to scrape all five services")
    client = StemflowClient(system.gateway_url, system.events_url, api_key)
    try:
        job = await client.submit(song, stems=2, quality="fast")
        await client.follow(job["id"], timeout_s=300)
        done = await client.job(job["id"])
    finally:
        await client.aclose()
    assert done["status"] == "completed", done
    completed_at = time.time()
    await wait_for(lambda: prometheus.scraped_after(completed_at, SERVICES), 60, "a scrape after the job")
    return done


async def test_prometheus_sees_the_job_in_the_key_series(
    prometheus: Prometheus, scraped_job: dict[str, Any], system: Any
) -> None:
    value = prometheus.value

    # Jobs: accepted, finished, and timed end to end.
    assert await value('sum(stemflow_jobs_submitted_total{job="gateway", source="upload"})') >= 1
    assert await value('sum(stemflow_jobs_finished_total{job="gateway", outcome="completed"})') >= 1
    count = await value('sum(stemflow_job_duration_seconds_count{job="gateway", outcome="completed"})')
    total = await value('sum(stemflow_job_duration_seconds_sum{job="gateway", outcome="completed"})')
    assert count >= 1 and 0 < total / count < 300

    # HTTP: the upload and the reads of the job, by route template.
    post = 'job="gateway", http_request_method="POST", http_route="/v1/jobs", http_response_status_code="202"'
    assert await value(f"sum(http_server_request_duration_seconds_count{{{post}}})") >= 1
    get = 'job="gateway", http_request_method="GET", http_route="/v1/jobs/{job_id}", http_response_status_code="200"'
    assert await value(f"sum(http_server_request_duration_seconds_count{{{get}}})") >= 1
    median = await value(
        f"histogram_quantile(0.5, sum by (le) (http_server_request_duration_seconds_bucket{{{post}}}))"
    )
    assert 0 < median < 10

    # Audio seconds, by the stage that processed them.
    for job, stage in (("ingest", "ingest"), ("separator", "separation"), ("analyzer", "analysis")):
        seconds = await value(f'sum(stemflow_audio_seconds_processed_total{{job="{job}", stage="{stage}"}})')
        assert seconds is not None and seconds >= SECONDS - 0.01, (stage, seconds)
        stage_count = await value(
            f'sum(stemflow_stage_duration_seconds_count{{job="{job}", stage="{stage}", outcome="completed"}})'
        )
        assert stage_count >= 1, stage

    # Each service's input queue: consumed, acked (never more than consumed), handler durations.
    namespace = system.env["STEMFLOW_NAMESPACE"]
    queues = {
        "ingest": f"{namespace}.ingest",
        "separator": f"{namespace}.separator.htdemucs",
        "analyzer": f"{namespace}.analyzer",
        "gateway": f"{namespace}.gateway",
        "notifier": f"{namespace}.notifier.{system.env['REPLICA_ID']}",
    }
    for job, queue in queues.items():
        where = f'job="{job}", queue="{queue}"'
        consumed = await value(f"sum(stemflow_messages_consumed_total{{{where}}})")
        acked = await value(f"sum(stemflow_messages_acked_total{{{where}}})")
        assert consumed is not None and acked is not None and 1 <= acked <= consumed, (queue, consumed, acked)
        handled = await value(f"sum(stemflow_message_handler_duration_seconds_count{{{where}}})")
        every = await value(f'sum(stemflow_message_handler_duration_seconds_bucket{{{where}, le="+Inf"}})')
        assert handled >= 1 and every == handled, queue
        assert await value(f"sum(stemflow_message_handler_duration_seconds_sum{{{where}}})") > 0, queue

    # Publisher confirms of the events on the job's path.
    for job, event in (("gateway", "job.submitted"), ("ingest", "audio.ingested"), ("gateway", "job.completed")):
        confirmed = f'job="{job}", event="{event}", outcome="confirmed"'
        assert await value(f"sum(stemflow_messages_published_total{{{confirmed}}})") >= 1, event


async def test_the_recording_and_alert_rules_evaluate_on_the_real_series(
    prometheus: Prometheus, scraped_job: dict[str, Any], system: Any, api_key: str
) -> None:
    async def evaluated() -> list[dict[str, Any]] | None:
        response = await prometheus.http.get(f"{prometheus.url}/api/v1/rules")
        groups = response.json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules) else None

    rules = await wait_for(evaluated, 30, "every rule to be evaluated once")
    assert {rule["health"] for rule in rules} == {"ok"}, [(r["name"], r.get("lastError")) for r in rules]
    loaded = {rule["name"] for rule in rules}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            assert {rule.get("record") or rule["alert"] for rule in group["rules"]} <= loaded

    # rate() sees a series' increments only between two of its scrapes: the job alone may have made each of its
    # request series once (one upload, one read), so the job is read again while the rule is awaited.
    async with httpx.AsyncClient(
        base_url=system.gateway_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10
    ) as http:

        async def recorded() -> float | None:
            assert (await http.get(f"/v1/jobs/{scraped_job['id']}")).status_code == 200
            return await prometheus.value('job:http_server_requests:rate5m{job="gateway"}')

        assert await wait_for(recorded, 30, "the gateway's request rate to be recorded") > 0

    async def audio_rate() -> list[dict[str, Any]]:
        return await prometheus.query('stage:stemflow_audio_seconds_processed:rate5m{stage="separation"}')

    # A counter child created by its first increment makes that increment invisible to rate();
    # the series exists all the same (non-negative) once two scrapes have seen it.
    (series,) = await wait_for(audio_rate, 30, "the separation audio rate to be recorded")
    assert float(series["value"][1]) >= 0


async def test_prometheus_sees_queue_depth_from_rabbitmq(
    prometheus: Prometheus, scraped_job: dict[str, Any], system: Any
) -> None:
    if not prometheus.rabbitmq:
        pytest.skip(
            f"RabbitMQ's Prometheus plugin does not answer at {rabbitmq_metrics_url(system.env['AMQP_URL'])} "
            "(enable it with `rabbitmq-plugins enable rabbitmq_prometheus`, or set RABBITMQ_PROMETHEUS_URL)"
        )
    namespace = system.env["STEMFLOW_NAMESPACE"]

    async def seen() -> float | None:
        return await prometheus.value(f'queue:rabbitmq_queue_consumers:max{{queue="{namespace}.ingest"}}')

    assert await wait_for(seen, 30, "RabbitMQ's per-queue series to be recorded") >= 1
    for queue in ("ingest", "analyzer", "gateway", "separator.htdemucs"):
        ready = await prometheus.value(f'rabbitmq_queue_messages_ready{{queue="{namespace}.{queue}"}}')
        consumers = await prometheus.value(f'rabbitmq_queue_consumers{{queue="{namespace}.{queue}"}}')
        assert ready is not None and ready >= 0, queue
        assert consumers is not None and consumers >= 1, queue
    assert await prometheus.value(f'rabbitmq_queue_messages{{queue="{namespace}.dead-letter"}}') is not None


# --- traces -----------------------------------------------------------------------------------

SERVER, PRODUCER, CONSUMER = 2, 4, 5  # opentelemetry.proto.trace.v1.Span.SpanKind


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    status_code: int

    @property
    def routing_key(self) -> str:
        return str(self.attributes.get("messaging.rabbitmq.destination.routing_key", ""))


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


class SpanReceiver:
    """An OTLP/HTTP trace receiver (POST /v1/traces, protobuf) that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> SpanReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, condition: Callable[[list[Span]], bool], timeout_s: float) -> list[Span]:
        """The spans received once `condition` holds for them; AssertionError after the timeout."""
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self.spans), timeout_s):
                raise AssertionError(f"the spans received in {timeout_s:.0f} s do not make the expected trace")
            return list(self.spans)

    def _add(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _any_value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        Span(
                            service=str(resource.get("service.name", "")),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            attributes={kv.key: _any_value(kv.value) for kv in span.attributes},
                            status_code=span.status.code,
                        )
                    )
        with self._changed:
            self.spans.extend(spans)
            self._changed.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver._add(body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler


@dataclass
class TracedSystem:
    receiver: SpanReceiver
    namespace: str
    processes: ProcessGroup
    client: StemflowClient
    ports: Ports


@contextlib.asynccontextmanager
async def traced_system(
    stack: StackUrls, tmp_path_factory: pytest.TempPathFactory, name: str, extra: dict[str, str]
) -> AsyncIterator[TracedSystem]:
    """The five services in a namespace of their own, exporting spans to a receiver run here."""
    from pymongo import AsyncMongoClient

    receiver = SpanReceiver().start()
    namespace = f"o{uuid.uuid4().hex[:10]}"
    database = f"stemflow_{namespace}"
    ports = Ports.free()
    env = service_env(
        stack,
        namespace=namespace,
        mongodb_db=database,
        blob_dir=tmp_path_factory.mktemp(f"{name}-blobs"),
        model_repo=make_tiny_repo(tmp_path_factory.mktemp(f"{name}-models")),
        ports=ports,
        extra={
            "MODELS": "htdemucs",
            "TORCH_THREADS": "1",
            "LOG_LEVEL": "DEBUG",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            # Export every 50 ms, so the test waits for spans only as long as the job takes.
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            # As deployed: the SDK counts the spans it exported or lost on each service's /metrics.
            "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED": "true",
            **extra,
        },
    )
    group = ProcessGroup()
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_url, tz_aware=True)
    client = None
    try:
        group.start(service_specs(env, ports), ARTIFACTS / f"logs-{name}")
        await asyncio.to_thread(group.wait_ready, 240)
        key = await ApiKeys(mongo[database]).create("traces")
        client = StemflowClient(f"http://127.0.0.1:{ports.gateway}", f"ws://127.0.0.1:{ports.notifier}/v1/ws", key)
        yield TracedSystem(receiver, namespace, group, client, ports)
    finally:
        if client is not None:
            await client.aclose()
        await asyncio.to_thread(group.stop)
        receiver.stop()
        await mongo.drop_database(database)
        await mongo.close()
        await delete_namespace(stack.amqp_url, namespace)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def traced(stack: StackUrls, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TracedSystem]:
    """Every request traced (the SDK's default sampler)."""
    async with traced_system(
        stack, tmp_path_factory, "traced", {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    ) as system:
        yield system


def whole_trace(spans: list[Span], job_id: str) -> list[Span] | None:
    """The job's trace once the notifier has taken its completion and no span's parent is missing."""
    ids = {s.trace_id for s in spans if s.attributes.get("cloudevents.event_subject") == job_id}
    if len(ids) != 1:
        return None
    (trace_id,) = ids
    trace = [s for s in spans if s.trace_id == trace_id]
    present = {s.span_id for s in trace}
    completed = any(s.service == "notifier" and s.kind == CONSUMER and s.routing_key == "job.completed" for s in trace)
    dangling = any(s.parent_span_id and s.parent_span_id not in present for s in trace)
    return trace if completed and not dangling else None


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def job_trace(traced: TracedSystem, song: Path) -> tuple[str, list[Span]]:
    """One job through the traced services: its id and every span of its trace."""
    job = await traced.client.submit(song, stems=2, quality="fast")
    await traced.client.follow(job["id"], timeout_s=300)
    assert (await traced.client.job(job["id"]))["status"] == "completed"

    def spans_of_the_job(spans: list[Span]) -> bool:
        ids = {s.trace_id for s in spans if s.attributes.get("cloudevents.event_subject") == job["id"]}
        return len(ids) > 1 or whole_trace(spans, job["id"]) is not None

    spans = await asyncio.to_thread(traced.receiver.wait_for, spans_of_the_job, 60)
    ids = {s.trace_id for s in spans if s.attributes.get("cloudevents.event_subject") == job["id"]}
    assert len(ids) == 1, f"the job's spans are in {len(ids)} traces, not one"
    trace = whole_trace(spans, job["id"])
    assert trace is not None
    return job["id"], trace


async def test_every_service_counts_the_spans_it_exported_and_lost_none(
    job_trace: tuple[str, list[Span]], traced: TracedSystem
) -> None:
    def family_total(text: str, name: str, selector: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and selector in line
        )

    async with httpx.AsyncClient(timeout=10) as http:
        for service in ("gateway", "ingest", "separator", "analyzer", "notifier"):
            text = (await http.get(f"http://127.0.0.1:{traced.ports.metrics(service)}/metrics")).text
            exported = family_total(text, "otel_sdk_exporter_span_exported_total", 'otel_component_type="otlp_http')
            lost = family_total(text, "otel_sdk_exporter_span_exported_total", "error_type=")
            dropped = family_total(text, "otel_sdk_processor_span_processed_total", 'error_type="queue_full"')
            assert exported > 0, f"{service} exported no span it counted"
            assert (lost, dropped) == (0, 0), service


def ancestors(span: Span, by_id: dict[str, Span]) -> Iterator[Span]:
    while span.parent_span_id:
        span = by_id[span.parent_span_id]
        yield span


async def test_one_job_is_one_trace_rooted_at_the_gateways_http_span(job_trace: tuple[str, list[Span]]) -> None:
    _, trace = job_trace
    roots = [s for s in trace if not s.parent_span_id]
    assert len(roots) == 1, [(s.service, s.name) for s in roots]
    (root,) = roots
    assert (root.service, root.kind) == ("gateway", SERVER), (
        f"the root is {root.service}'s {root.name!r} (kind {root.kind}), not the gateway's HTTP server span: "
        "the gateway must build its FastAPI app with telemetry=telemetry.fastapi_telemetry()"
    )
    assert root.attributes.get("http.route") == "/v1/jobs"
    assert root.attributes.get("http.request.method", root.attributes.get("http.method")) == "POST"
    assert {s.service for s in trace} >= set(SERVICES)


async def test_every_consume_is_a_child_of_its_publish(job_trace: tuple[str, list[Span]], traced: TracedSystem) -> None:
    job_id, trace = job_trace
    by_id = {s.span_id: s for s in trace}
    exchange = f"{traced.namespace}.events"
    producers = [s for s in trace if s.kind == PRODUCER]
    consumers = [s for s in trace if s.kind == CONSUMER]
    assert producers and consumers

    for span in producers:
        assert span.name == f"publish {span.routing_key}", span.name
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.operation.type"] == "publish"
        assert span.attributes["messaging.destination.name"] == exchange
        assert span.attributes["messaging.message.id"]
        assert span.attributes["cloudevents.event_subject"] == job_id

    edges = set()
    for span in consumers:
        parent = by_id[span.parent_span_id]
        assert parent.kind == PRODUCER, f"{span.service}'s {span.name!r} is a child of {parent.name!r}"
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["messaging.destination.name"] == exchange
        assert span.attributes["messaging.consumer.group.name"].startswith(f"{traced.namespace}.")
        assert span.attributes["messaging.message.id"] == parent.attributes["messaging.message.id"]
        assert span.routing_key == parent.routing_key
        edges.add((span.routing_key, parent.service, span.service))

    path = {
        ("job.submitted", "gateway", "ingest"),
        ("audio.ingested", "ingest", "separator"),
        ("audio.ingested", "ingest", "analyzer"),
        ("separation.completed", "separator", "gateway"),
        ("analysis.completed", "analyzer", "gateway"),
        ("job.completed", "gateway", "notifier"),
    }
    assert path - edges == set(), f"hops missing from the trace; it has {sorted(edges)}"
    # The gateway publishes job.submitted on behalf of the HTTP request that accepted the job.
    (submitted,) = [s for s in producers if s.routing_key == "job.submitted"]
    assert [a.kind for a in ancestors(submitted, by_id)][-1:] == [SERVER]


async def test_domain_spans_show_decode_separation_batches_and_analysis_steps(
    job_trace: tuple[str, list[Span]],
) -> None:
    _, trace = job_trace
    by_id = {s.span_id: s for s in trace}

    def under_consumer(span: Span, routing_key: str) -> bool:
        return any(a.kind == CONSUMER and a.routing_key == routing_key for a in ancestors(span, by_id))

    decode = [s for s in trace if s.service == "ingest" and s.name == "ingest.decode"]
    assert len(decode) == 1, "ingest has no `ingest.decode` span"
    assert under_consumer(decode[0], "job.submitted")
    assert decode[0].attributes["stemflow.audio.duration_s"] == pytest.approx(SECONDS, abs=0.01)

    batches = [s for s in trace if s.service == "separator" and s.name == "separator.batch"]
    assert batches, "the separator has no `separator.batch` spans"
    for batch in batches:
        assert under_consumer(batch, "audio.ingested")
        assert batch.attributes["stemflow.model"] == "htdemucs"
        assert batch.attributes["stemflow.device"] in ("cpu", "cuda")
        assert batch.attributes["stemflow.batch.size"] >= 1
        assert batch.attributes["stemflow.audio.seconds"] > 0
    assert sum(b.attributes["stemflow.audio.seconds"] for b in batches) >= SECONDS - 0.01

    steps = {s.name for s in trace if s.service == "analyzer" and s.name.startswith("analysis.")}
    assert {"analysis.rhythm", "analysis.key", "analysis.loudness"} <= steps, steps
    for span in (s for s in trace if s.service == "analyzer" and s.name in steps):
        assert under_consumer(span, "audio.ingested")


async def test_service_logs_carry_the_jobs_trace(job_trace: tuple[str, list[Span]], traced: TracedSystem) -> None:
    job_id, trace = job_trace
    trace_id = trace[0].trace_id
    span_ids = {s.span_id for s in trace}
    for service in ("ingest", "separator", "analyzer", "gateway", "notifier"):
        lines = []
        for raw in traced.processes.log_path(service).read_text().splitlines():
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("job_id") == job_id:
                lines.append(entry)
        assert lines, f"{service} logged no line with the job's job_id"
        for entry in lines:
            assert entry["service"] == service
            assert entry["trace_id"] == trace_id, entry
            assert entry["span_id"] in span_ids, entry


async def test_sampling_keeps_or_drops_whole_jobs(
    stack: StackUrls, tmp_path_factory: pytest.TempPathFactory, song: Path
) -> None:
    """At 50% the gateway decides per job, and every service follows: each job's trace is whole or absent.

    A decision that did not travel with the job's events would let ingest, the separator or the
    analyzer start traces of their own for unsampled jobs: partial traces without the gateway's root.
    """
    sampler = {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
        "REUSE_RESULTS": "false",  # the same song each time: every job must run every stage
    }
    async with traced_system(stack, tmp_path_factory, "half-traced", sampler) as system:
        jobs = [await system.client.submit(song, stems=2, quality="fast") for _ in range(8)]
        for job in jobs:
            await system.client.follow(job["id"], timeout_s=300)
            assert (await system.client.job(job["id"]))["status"] == "completed"
        job_ids = [job["id"] for job in jobs]

        def settled(spans: list[Span]) -> bool:
            return all(
                whole_trace(spans, job_id) is not None
                for job_id in job_ids
                if any(s.attributes.get("cloudevents.event_subject") == job_id for s in spans)
            )

        await asyncio.to_thread(system.receiver.wait_for, settled, 60)
        await asyncio.sleep(1.0)  # three export intervals more: a late partial trace would show now
        spans = list(system.receiver.spans)
    for job_id in job_ids:
        mine = {s.trace_id for s in spans if s.attributes.get("cloudevents.event_subject") == job_id}
        if not mine:
            continue  # not sampled: no service traced it
        assert len(mine) == 1, f"job {job_id} is in {len(mine)} traces"
        trace = whole_trace(spans, job_id)
        assert trace is not None, f"job {job_id} has a partial trace"
        roots = [s for s in trace if not s.parent_span_id]
        assert [(r.service, r.kind) for r in roots] == [("gateway", SERVER)]
        assert {s.service for s in trace} >= set(SERVICES)
    # Nothing else was traced either: every span belongs to a sampled job's trace or to the
    # services' own background work (sweeps), which is never a child of a job's spans.
    sampled_traces = {s.trace_id for s in spans if s.attributes.get("cloudevents.event_subject") in job_ids}
    for span in spans:
        if span.trace_id not in sampled_traces:
            assert "cloudevents.event_subject" not in span.attributes, span
