"""What tracing costs: the gateway per request at each sampling setting, and a whole job across the five services.

Jobs are traced at the configured ratio (OTEL_TRACES_SAMPLER, parent-based, decided once
per job at the request that creates it); every other request at its own, much lower
ratio (STEMFLOW_TRACES_REQUEST_RATIO, default 0.01): docs/runbook.md, "Sampling".

Per request: gateway processes run side by side on the real local RabbitMQ, MongoDB and
Redis (each with its own namespace, database, blob directory and seeded jobs, removed at
the end), one per configuration:

- off:       no OTEL_* variables, so no SDK (the baseline);
- default:   as deployed (deploy/k8s/components/tracing): jobs at 10%
             (parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1), other requests at
             the default request ratio (1%);
- jobs_100:  every job traced (parentbased_always_on), other requests at 1%;
- debug_100: everything traced, polls included (STEMFLOW_TRACES_REQUEST_RATIO=1): the
             debug mode;
- previous:  with --baseline-pythonpath, the code found there (the commit before the
             request ratio) at the deployed setting, which then sampled every request at 10%.

The traced gateways run as in production: FastAPI's own server spans, the official
PyMongo/Redis/httpx instrumentations, the BatchSpanProcessor with the OTLP/HTTP exporter
(both counting lost spans on /metrics), and HeadSampling deciding each request before any
instrumentation runs. Spans go over OTLP/HTTP to a sink in another process that reads and
discards them. wrk drives each gateway in turn (interleaved rounds, medians) for: a job's
GET served from the cache (the cheapest and most frequent call: clients poll), the first
page of the job list, the model list, a probe, a job's creation (a 0.25 s WAV; the request
whose trace follows the job through every service) and the same with a song-sized upload
(30 s of WAV, 5.3 MB). The gateways are pinned to one CPU, wrk and the sink to the other,
where the machine has two. Prints, per call, the gateway's CPU time per request (steadier
than req/s on a shared machine) as a ratio against `off` and against `previous`, and the
floor: what the two spans of a traced cached read cost the SDK with no request around them.
Goal: `default` within 3% of `off` on every call.

A whole job (--jobs-per-config N, 0 to skip): the five services, once per configuration
(off; jobs_100; previous at 100% with --baseline-pythonpath), each job (upload -> completed,
followed over the WebSocket) run in turn on each set; the CPU time of the five processes
(from /proc) from the upload until the completion and 5.5 s more, so that the batch
processor's export of its last spans (every 5 s, as deployed) is counted. Goal: jobs_100
within 5% of `off`.

The machine's load (os.getloadavg) is printed and saved with every figure.

    .venv/bin/python bench/tracing.py [--duration 4] [--rounds 3] [--connections 10] [--jobs 40]
        [--jobs-per-config 4] [--baseline-pythonpath DIR-or-PYTHONPATH] [--out bench/results/tracing.json]

Needs `wrk` (Debian: `apt-get install -y wrk`).

In process (--in-process): no server and no client, each configuration's gateway app driven through ASGI in a
worker process of its own, in interleaved batches of each call; the worker's CPU time per request
(bench/results/tracing_in_process.json). With --instructions, each batch's instructions instead, counted by
valgrind's callgrind (stemflow_dev.instructions): the same from process to process and under any load, where
CPU time moves by 3-4% between processes of the same code. Instructions leave out the kernel's work (socket
and file I/O), which tracing barely adds to, so their ratios overstate what tracing costs in CPU time; under
valgrind the gateway's timers are put off and spans are exported only at each batch's end (quiet_timers).
About 50x slower: 3 rounds of 300 requests a call take ~15 minutes.

    .venv/bin/python bench/tracing.py --in-process [--instructions] [--batches 30] [--batch-size 300]
        [--calls get_cached,create_job] [--baseline-pythonpath DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
# This folder holds a bench named gateway.py: keep it from shadowing the service's package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

DEPLOYED = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
JOBS_100 = {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}
CONFIGS: dict[str, dict[str, str]] = {
    "off": {},
    "default": DEPLOYED,
    "jobs_100": JOBS_100,
    "debug_100": {**JOBS_100, "STEMFLOW_TRACES_REQUEST_RATIO": "1"},
}
PREVIOUS = "previous"  # the --baseline-pythonpath code, at the deployed setting (per request) or 100% (whole job)
GOAL_DEFAULT_PER_REQUEST = 0.03  # `default` against `off`, CPU time per request, every call
GOAL_JOB_100 = 0.05  # a whole job traced at 100% against untraced, CPU time of the five services
SONG_SECONDS = 30.0  # the song-sized upload: 5.3 MB of WAV


# --- the OTLP sink (runs as `bench/tracing.py --sink PORT`) ----------------------------------


def serve_sink(port: int) -> None:
    """Accept OTLP/HTTP exports and discard them; GET /stats says how much arrived."""
    received = {"exports": 0, "bytes": 0}
    lock = threading.Lock()

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length", 0))
            self.rfile.read(size)
            with lock:
                received["exports"] += 1
                received["bytes"] += size
            # An empty body is an empty ExportTraceServiceResponse.
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            with lock:
                body = json.dumps(received).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()


# --- measuring --------------------------------------------------------------------------------


# --- the floor: what two spans cost the SDK, with nothing of a request around them ---------------

FLOOR_PAIRS = 20_000
# The SDK counts lost spans on /metrics in the deployment; the traced gateways and the floor do too.
SDK_METRICS = {"OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED": "true"}


FLOOR_STAGES = ("made", "batched", "encoded", "exported")


def span_floor(sink_url: str, pairs: int = FLOOR_PAIRS) -> dict[str, Any]:
    """CPU time of a server span and a Redis client span under it, as a traced cached read records them.

    The SDK's spans with the attributes the instrumentations set, the garbage collector tuned as in the
    gateway; no request, no instrumentation wrapper. Four stages, each a provider of its own, so the floor
    splits into what each part of the pipeline adds:

    - made: the SDK's spans started and ended, no span processor;
    - batched: and the BatchSpanProcessor, handing its batches to an exporter that drops them;
    - encoded: and the OTLP encoding of each batch (the exporter's own encoder), nothing sent;
    - exported: the OTLP/HTTP exporter to the sink, as deployed (the floor).

    Runs in a process of its own (`--floor SINK_URL`), pinned to the gateway's CPU, and counts every
    thread of it (the exporter's too). What a traced request costs can only be more.
    """
    from collections.abc import Sequence

    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from stemflow_shared.runtime import tune_gc
    from stemflow_shared.telemetry import sdk_meter_provider, service_resource

    class Encoding(SpanExporter):
        """Encodes each batch as the OTLP exporter does, and sends nothing (or, with `encode` off, drops it)."""

        def __init__(self, encode: bool) -> None:
            self.encode = encode

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            if self.encode:
                encode_spans(spans).SerializePartialToString()
            return SpanExportResult.SUCCESS

    os.environ.update(SDK_METRICS)
    meters = sdk_meter_provider()
    server_attributes = {
        "url.scheme": "http",
        "http.request.method": "GET",
        "network.protocol.version": "1.1",
        "server.address": "127.0.0.1",
        "server.port": 8000,
        "url.path": "/v1/jobs/0123456789abcdef0123456789abcdef",
    }
    end_attributes = {"http.route": "/v1/jobs/{job_id}", "http.response.status_code": 200}
    client_attributes = {
        "db.system": "redis",
        "db.statement": "EVALSHA ? ? ? ? ? ?",
        "db.redis.args_length": 6,
        "db.redis.database_index": 0,
        "net.peer.name": "127.0.0.1",
        "net.peer.port": 6379,
        "net.transport": "ip_tcp",
    }

    def provider_for(stage: str) -> TracerProvider:
        provider = TracerProvider(resource=service_resource("gateway"))
        if stage == "made":
            return provider
        exporter = (
            OTLPSpanExporter(endpoint=f"{sink_url}/v1/traces", meter_provider=meters)
            if stage == "exported"
            else Encoding(encode=stage == "encoded")
        )
        # A queue that holds every span: the loop makes them faster than requests do, and none may be dropped.
        provider.add_span_processor(
            BatchSpanProcessor(exporter, max_queue_size=2 * (pairs + 2_000), meter_provider=meters)
        )
        return provider

    def cpu_ms_per_pair(stage: str) -> float:
        provider = provider_for(stage)
        tracer = provider.get_tracer("floor")

        def record(n: int) -> None:
            for _ in range(n):
                server = tracer.start_span("GET", kind=trace.SpanKind.SERVER, attributes=server_attributes)
                client = tracer.start_span(
                    "EVALSHA",
                    context=trace.set_span_in_context(server),
                    kind=trace.SpanKind.CLIENT,
                    attributes=client_attributes,
                )
                client.end()
                server.set_attributes(end_attributes)
                server.update_name("GET /v1/jobs/{job_id}")
                server.end()

        record(2_000)
        provider.force_flush()
        started = time.process_time()
        record(pairs)
        provider.force_flush()
        spent = time.process_time() - started
        provider.shutdown()
        return round(1000 * spent / pairs, 4)

    tune_gc()
    stages = {stage: cpu_ms_per_pair(stage) for stage in FLOOR_STAGES}
    return {"pairs": pairs, "cpu_ms_per_pair": stages["exported"], "stages_cpu_ms_per_pair": stages}


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def wrk(
    url: str, key: str, connections: int, duration_s: int, cpu: int | None, script: Path | None = None
) -> dict[str, float]:
    """Requests per second (and count) of one wrk run; any non-2xx answer is an error."""
    argv = [
        shutil.which("wrk") or "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        "60s",  # a song-sized upload on a loaded machine takes longer than wrk's default 2 s
        "-H",
        f"Authorization: Bearer {key}",
        *(["-s", str(script)] if script else []),
        url,
    ]
    result = subprocess.run(pinned(cpu, argv), capture_output=True, text=True, check=True, timeout=duration_s + 60)
    out = result.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    # A run with refused or broken requests (a full disk, a server that fell over) measures something else.
    failed = "Non-2xx or 3xx responses" in out or "Socket errors" in out
    if failed:
        print(f"  wrk saw errors against {url}; the run is left out:\n{out}", flush=True)
    return {"rps": rps, "requests": requests, "failed": failed}


@contextmanager
def gateways(
    args: argparse.Namespace, configs: dict[str, dict[str, str]], sink_url: str, cpu: int | None
) -> Iterator[dict[str, Any]]:
    """One gateway per configuration, each with a database, namespace, API key and seeded jobs of its own.

    Nothing is shared, so one gateway's background work (outbox and retention sweeps over the jobs the
    creation runs make) never lands on another's CPU. Everything is removed at the end.
    """
    import asyncio

    from stemflow_dev.fixtures import STATE_DIR
    from stemflow_dev.procs import ProcessGroup, ServiceSpec
    from stemflow_dev.services import Ports
    from stemflow_dev.stack import ensure_stack

    urls = ensure_stack(STATE_DIR)
    run = uuid.uuid4().hex[:6]
    namespaces = {config: f"bt{run}{config.replace('_', '')}" for config in configs}
    databases = {config: f"stemflow_{namespaces[config]}" for config in configs}
    ports = {config: Ports.free().gateway for config in configs}
    clear_tracing_environment()
    with tempfile.TemporaryDirectory() as tmp:
        tracing = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            **SDK_METRICS,  # as deployed (deploy/k8s/components/tracing)
        }
        specs = []
        for config, extra in configs.items():
            free = Ports.free()
            gateway_ports = Ports(
                gateway=ports[config], gateway_metrics=free.gateway_metrics, gateway_internal=free.gateway_internal
            )
            env = gateway_env(urls, namespaces[config], databases[config], Path(tmp), config, gateway_ports)
            specs.append(
                ServiceSpec(
                    name=f"gateway-{config}",
                    argv=pinned(cpu, [sys.executable, "-m", "gateway.main"]),
                    env={**env, "HTTP_PORT": str(ports[config]), **(tracing if extra else {}), **extra},
                    ready_url=f"http://127.0.0.1:{ports[config]}/readyz",
                )
            )
        group = ProcessGroup()
        try:
            group.start(specs, Path(tmp) / "logs")
            group.wait_ready(timeout=120)

            keys = asyncio.run(create_keys(urls, namespaces, databases))
            job_ids = {c: seed(f"http://127.0.0.1:{ports[c]}", keys[c], args.jobs) for c in configs}
            yield {
                "scripts": {
                    "create_job": create_script(Path(tmp), "create", 0.25),
                    "create_song": create_script(Path(tmp), "song", SONG_SECONDS),
                },
                "ports": ports,
                "keys": keys,
                "job_ids": job_ids,
                "pids": {c: group.pid(f"gateway-{c}") for c in configs},
            }
        finally:
            group.stop()
            asyncio.run(remove_namespaces(urls, namespaces, databases))


def gateway_env(urls: Any, namespace: str, database: str, tmp: Path, config: str, ports: Any) -> dict[str, str]:
    """A configuration's gateway environment: its own namespace, database and blobs, no rate limit."""
    from stemflow_dev.services import service_env

    return service_env(
        urls,
        namespace=namespace,
        mongodb_db=database,
        blob_dir=tmp / config / "blobs",
        model_repo=tmp / "models",
        ports=ports,
        extra={"LOG_LEVEL": "WARNING", "RATE_LIMIT_PER_MINUTE": "0"},
    )


async def create_keys(urls: Any, namespaces: dict[str, str], databases: dict[str, str]) -> dict[str, str]:
    """Each configuration's models announced (the gateway takes uploads only for a served model; these gateways
    run without a separator) and an API key in its database."""
    import redis.asyncio as redis_async
    from pymongo import AsyncMongoClient

    from stemflow_dev.fixtures import announce_models
    from stemflow_shared.auth import ApiKeys

    client: AsyncMongoClient[Any] = AsyncMongoClient(urls.mongodb_url)
    redis_client = redis_async.from_url(urls.redis_url)
    try:
        for config in namespaces:
            await announce_models(redis_client, namespaces[config])
        return {c: await ApiKeys(client[databases[c]]).create("bench-tracing") for c in namespaces}
    finally:
        await client.close()
        await redis_client.aclose()


async def remove_namespaces(urls: Any, namespaces: dict[str, str], databases: dict[str, str]) -> None:
    """What the configurations left: their databases, queues and exchanges, Redis keys."""
    import redis.asyncio as redis_async
    from pymongo import AsyncMongoClient

    from stemflow_dev.fixtures import delete_namespace, delete_namespace_keys

    client: AsyncMongoClient[Any] = AsyncMongoClient(urls.mongodb_url)
    keys = redis_async.from_url(urls.redis_url)
    try:
        for config in namespaces:
            await client.drop_database(databases[config])
            await delete_namespace(urls.amqp_url, namespaces[config])
            await delete_namespace_keys(keys, namespaces[config])
    finally:
        await client.close()
        await keys.aclose()


def wav(seconds: float = 0.25) -> bytes:
    """A stereo 44.1 kHz 16-bit WAV of silence (30 s make 5.3 MB: a song-sized upload)."""
    import io

    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((int(44100 * seconds), 2), np.float32), 44100, "PCM_16", format="WAV")
    return buffer.getvalue()


def multipart_upload(seconds: float) -> tuple[bytes, str]:
    """A multipart form with a WAV of `seconds` as its file, and the form's boundary."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + wav(seconds)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, boundary


def create_script(folder: Path, name: str, seconds: float) -> Path:
    """A wrk script that POSTs /v1/jobs with a WAV of `seconds` as multipart form data."""
    body, boundary = multipart_upload(seconds)
    (folder / f"{name}.body").write_bytes(body)
    script = folder / f"{name}.lua"
    script.write_text(
        f'local f = io.open("{folder / f"{name}.body"}", "rb")\n'
        'wrk.method = "POST"\n'
        'wrk.body = f:read("*a")\n'
        "f:close()\n"
        f'wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"\n'
    )
    return script


def seed(base_url: str, key: str, jobs: int) -> str:
    """Submit `jobs` small uploads (they stay queued: no worker runs); return the last job's id."""
    job_id, song = "", wav()
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(jobs):
            response = client.post("/v1/jobs", files={"file": ("s.wav", song, "audio/wav")})
            if response.is_error:
                raise RuntimeError(f"{base_url} refused a job: {response.status_code} {response.text}")
            job_id = response.json()["id"]
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert len(client.get("/v1/jobs").json()["items"]) == min(jobs, 20)
    return job_id


SCENARIOS = {
    "get_cached": ("/v1/jobs/{job_id}", None),
    "list_first_page": ("/v1/jobs", None),
    "models": ("/v1/models", None),
    "healthz": ("/healthz", None),
    "create_job": ("/v1/jobs", "create_job"),
    "create_song": ("/v1/jobs", "create_song"),
}


def clear_tracing_environment() -> None:
    """No OTEL_* or STEMFLOW_TRACES_* variable of this shell reaches the services: each configuration sets its own."""
    for name in [v for v in os.environ if v.startswith(("OTEL_", "STEMFLOW_TRACES_"))]:
        del os.environ[name]


def load() -> list[float]:
    """The machine's load averages (1, 5, 15 min), saved with every figure: this machine is shared."""
    return [round(v, 2) for v in os.getloadavg()]


def measure(args: argparse.Namespace, ctx: dict[str, Any], cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    configs = list(ctx["pids"])
    scripts = ctx["scripts"]
    _, load_cpu = cpus
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {s: {c: [] for c in configs} for s in SCENARIOS}

    def url(config: str, path: str) -> str:
        return f"http://127.0.0.1:{ctx['ports'][config]}{path.format(job_id=ctx['job_ids'][config])}"

    for config in configs:  # warm up every process and path once
        for path, script in SCENARIOS.values():
            wrk(url(config, path), ctx["keys"][config], args.connections, 1, load_cpu, scripts.get(script))
    for round_index in range(args.rounds):
        order = configs[round_index % len(configs) :] + configs[: round_index % len(configs)]
        for scenario, (path, script) in SCENARIOS.items():
            for config in order:
                pid = ctx["pids"][config]
                cpu_before = process_cpu_s(pid)
                run: dict[str, Any] = wrk(
                    url(config, path),
                    ctx["keys"][config],
                    args.connections,
                    args.duration,
                    load_cpu,
                    scripts.get(script),
                )
                run["cpu_ms_per_request"] = 1000 * (process_cpu_s(pid) - cpu_before) / max(run["requests"], 1)
                run["load"] = load()
                run["round"] = round_index
                if not run["failed"]:
                    samples[scenario][config].append(run)
                print(
                    f"  round {round_index + 1} {scenario:>15} {config:>9}: {run['rps']:9.0f} req/s "
                    f"{run['cpu_ms_per_request']:.3f} ms CPU/req  (load {run['load'][0]:.1f})",
                    flush=True,
                )
    return samples


def ratios(row: dict[str, Any], key: str, against: str) -> None:
    """Each configuration's median `key` as a ratio against configuration `against`, and the per-round spread."""
    if against not in row:
        return
    base = row[against]
    for config, entry in row.items():
        if config != against:
            entry[f"cpu_ratio_vs_{against}"] = round(entry[key] / base[key], 4)
            theirs = dict(zip(base["rounds"], base[f"{key}_runs"], strict=True))
            entry[f"cpu_ratio_vs_{against}_per_round"] = [
                round(mine / theirs[r], 4)
                for r, mine in zip(entry["rounds"], entry[f"{key}_runs"], strict=True)
                if r in theirs
            ]


def summarise(samples: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scenario, by_config in samples.items():
        row: dict[str, Any] = {}
        for config, runs in by_config.items():
            if not runs:
                continue  # every run of it failed
            row[config] = {
                "rps_median": round(statistics.median(r["rps"] for r in runs), 1),
                "rps_runs": [round(r["rps"], 1) for r in runs],
                "cpu_ms_per_request": round(statistics.median(r["cpu_ms_per_request"] for r in runs), 4),
                "cpu_ms_per_request_runs": [round(r["cpu_ms_per_request"], 4) for r in runs],
                "load_1min_runs": [r["load"][0] for r in runs],
                "rounds": [r["round"] for r in runs],
            }
        ratios(row, "cpu_ms_per_request", "off")
        ratios(row, "cpu_ms_per_request", PREVIOUS)
        if "default" in row and "off" in row:
            goal = row["default"]
            goal["goal_max_cpu_increase_vs_off"] = GOAL_DEFAULT_PER_REQUEST
            goal["meets_goal"] = goal["cpu_ratio_vs_off"] <= 1 + GOAL_DEFAULT_PER_REQUEST
        results[scenario] = row
    return results


# --- in process: each call's CPU time with no server or client around it (--in-process) ---------------------


INPROCESS_CONFIGS: dict[str, dict[str, str]] = {
    "off": {},
    "default": DEPLOYED,
    # default's unsampled path alone: no request and no job sampled (a creation is judged at the job ratio)
    "unsampled": {**DEPLOYED, "OTEL_TRACES_SAMPLER_ARG": "0", "STEMFLOW_TRACES_REQUEST_RATIO": "0"},
    "debug_100": CONFIGS["debug_100"],
}
PREVIOUS_OFF = "previous_off"  # the --baseline-pythonpath code, tracing off: `previous`'s own baseline
# A batch of creations waits this long (idle) after its last publish, so that the job.submitted events' return
# through the gateway's own queue is counted in its batch, not in the next call's.
ECHO_SETTLE_S = 0.1
# call: (method, path, share of the batch size: a creation costs 15 reads and leaves a file behind)
INPROCESS_CALLS: dict[str, tuple[str, str, float]] = {
    "get_cached": ("GET", "/v1/jobs/{job_id}", 1.0),
    "list_first_page": ("GET", "/v1/jobs", 1.0),
    "models": ("GET", "/v1/models", 1.0),
    "healthz": ("GET", "/healthz", 1.0),
    "create_job": ("POST", "/v1/jobs", 0.1),
}
WORKER_READY = "@@ready"
WORKER_ANSWER = "@@"


class AsgiDriver:
    """Calls an ASGI app as a server does, one request at a time, with no socket or HTTP parsing around it."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.headers = [(b"host", b"127.0.0.1:8000"), (b"authorization", f"Bearer {key}".encode())]
        self.state: dict[str, Any] = {}

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: bytes = b"", answer: bytearray | None = None
    ) -> int:
        """One request, as wrk sends it; returns the status (the answer's body goes to `answer`, if given)."""
        import asyncio

        headers = self.headers
        if body:
            headers = [*headers, (b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "state": self.state.copy(),
        }
        status = 0
        asked = False
        answered = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()  # what a server says once the answer is out and the client gone
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if answer is not None:
                    answer.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    answered.set()

        await self.app(scope, receive, send)
        return status

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """The app's lifespan, started and shut down as uvicorn runs it."""
        import asyncio

        to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        task = asyncio.create_task(self.app(scope, to_app.get, from_app.put))
        await to_app.put({"type": "lifespan.startup"})
        started = await from_app.get()
        if started["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the gateway did not start: {started}")
        try:
            yield
        finally:
            await to_app.put({"type": "lifespan.shutdown"})
            await from_app.get()
            await task


def run_inprocess_worker() -> None:
    """A worker (`--in-process-worker`): the gateway app of its environment, batches of calls on demand."""
    import uvloop

    uvloop.run(_inprocess_worker())


async def _inprocess_worker() -> None:
    import asyncio
    import gc

    from opentelemetry import trace

    from gateway.main import app_from_environment
    from stemflow_dev.instructions import Counter

    counter = Counter.from_environment()  # --instructions: this worker runs under callgrind
    # Under callgrind the gateway runs ~50x slower: the events' return takes longer (idle time, no instructions).
    settle_s = ECHO_SETTLE_S * (30 if counter is not None else 1)
    app = app_from_environment()  # as a server process builds it: HeadSampling outermost when tracing is on
    gateway = app
    while not hasattr(gateway, "router"):  # the FastAPI app behind HeadSampling
        gateway = gateway.app
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    driver = AsgiDriver(app, os.environ["BENCH_API_KEY"])
    upload, boundary = multipart_upload(0.25)
    upload_type = f"multipart/form-data; boundary={boundary}".encode()
    async with driver.lifespan():
        jobs = gateway.state.jobs
        job_id = ""
        for _ in range(int(os.environ["BENCH_JOBS"])):  # seeded: they stay queued, no worker runs
            answer = bytearray()
            status = await driver.request("POST", "/v1/jobs", upload, upload_type, answer)
            if status >= 300:
                raise RuntimeError(f"the gateway refused a job: {status} {answer.decode()}")
            job_id = json.loads(answer)["id"]
        await jobs.relay.drain(30)
        paths = {call: path.format(job_id=job_id) for call, (_, path, _) in INPROCESS_CALLS.items()}

        async def batch(call: str, n: int) -> dict[str, Any]:
            method = INPROCESS_CALLS[call][0]
            path = paths[call]
            body, content_type = (upload, upload_type) if method == "POST" else (b"", b"")
            statuses: set[int] = set()
            if counter is not None:
                # Every batch from the same collector state: where a full collection lands depends on all the
                # process allocated before, and one in a batch is millions of instructions.
                gc.collect()
                counter.start()
            cpu, loop_thread = time.process_time(), time.thread_time()
            for _ in range(n):
                statuses.add(await driver.request(method, path, body, content_type))
            if method == "POST":
                await jobs.relay.drain(30)  # the job.submitted of each creation, published after the answer
                # ...and come back through the gateway's own queue: its consumption counted in this batch too.
                await asyncio.sleep(settle_s)
            if flush is not None:
                flush()  # the batch's sampled spans exported (the batch processor's thread), inside the batch
            cpu, loop_thread = time.process_time() - cpu, time.thread_time() - loop_thread
            instructions = counter.stop() if counter is not None else 0
            if method == "POST":
                await driver.request("GET", paths["list_first_page"])  # the list's cache, emptied by the creations
            return {
                "cpu_us": 1e6 * cpu / n,
                "loop_thread_us": 1e6 * loop_thread / n,
                "instructions": instructions / n,
                "statuses": sorted(statuses),
            }

        for call in INPROCESS_CALLS:  # warm: every path run, the caches filled
            await batch(call, 20)
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(WORKER_READY, flush=True)
        while line := await reader.readline():
            command = json.loads(line)
            if command["call"] == "quit":
                break
            print(WORKER_ANSWER + json.dumps(await batch(command["call"], command["n"])), flush=True)


def in_process(args: argparse.Namespace, sink_url: str, baseline: str | None, cpu: int | None) -> dict[str, Any]:
    """Each call's CPU time per request in every configuration's worker, in interleaved batches."""
    import asyncio

    from stemflow_dev import instructions
    from stemflow_dev.fixtures import STATE_DIR
    from stemflow_dev.services import Ports
    from stemflow_dev.stack import ensure_stack

    configs = dict(INPROCESS_CONFIGS)
    if baseline:
        configs[PREVIOUS_OFF] = {"PYTHONPATH": baseline}
        configs[PREVIOUS] = {**DEPLOYED, "PYTHONPATH": baseline}
    urls = ensure_stack(STATE_DIR)
    run = uuid.uuid4().hex[:6]
    namespaces = {config: f"bi{run}{config.replace('_', '')}" for config in configs}
    databases = {config: f"stemflow_{namespaces[config]}" for config in configs}
    clear_tracing_environment()
    tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", **SDK_METRICS}

    workers: dict[str, subprocess.Popen[str]] = {}
    calls = {call: INPROCESS_CALLS[call] for call in args.calls}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {c: {k: [] for k in configs} for c in calls}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            keys = asyncio.run(create_keys(urls, namespaces, databases))
            for config, extra in configs.items():
                env = gateway_env(urls, namespaces[config], databases[config], Path(tmp), config, Ports.free())
                env.update({"BENCH_API_KEY": keys[config], "BENCH_JOBS": str(args.jobs)})
                env.update({**(tracing if extra.keys() - {"PYTHONPATH"} else {}), **extra})
                argv = [sys.executable, __file__, "--in-process-worker"]
                if args.instructions:
                    out = (args.keep_dumps or Path(tmp)) / f"callgrind-{config}"
                    argv = instructions.callgrind_argv(argv, out)
                    env.update({**instructions.child_environment(out), **quiet_timers(env["MONGODB_URL"])})
                    if args.keep_dumps:
                        env[instructions.KEEP_ENV] = "1"
                workers[config] = subprocess.Popen(
                    pinned(cpu, argv),
                    env={**os.environ, **env},
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            for config, worker in workers.items():
                _worker_line(config, worker, WORKER_READY)

            def ask(config: str, call: str, n: int) -> dict[str, Any]:
                worker = workers[config]
                assert worker.stdin is not None
                worker.stdin.write(json.dumps({"call": call, "n": n}) + "\n")
                worker.stdin.flush()
                return json.loads(_worker_line(config, worker, WORKER_ANSWER))

            names = list(configs)
            for round_index in range(args.batches):
                order = names[round_index % len(names) :] + names[: round_index % len(names)]
                for call, (_, _, share) in calls.items():
                    for config in order:
                        result = ask(config, call, max(1, round(args.batch_size * share)))
                        if any(status >= 300 for status in result["statuses"]):
                            raise RuntimeError(f"{config} answered {call} with {result['statuses']}")
                        samples[call][config].append({**result, "round": round_index, "load": load()})
                if round_index % 10 == 9 or round_index == args.batches - 1:
                    print(f"  in process: {round_index + 1}/{args.batches} rounds (load {load()[0]:.1f})", flush=True)
        finally:
            for worker in workers.values():
                if worker.poll() is None and worker.stdin is not None:
                    worker.stdin.write(json.dumps({"call": "quit"}) + "\n")
                    worker.stdin.close()
            for worker in workers.values():
                try:
                    worker.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
            asyncio.run(remove_namespaces(urls, namespaces, databases))
    measure = "instructions" if args.instructions else "cpu_us"
    return {
        "batch_size": args.batch_size,
        "batches": args.batches,
        "measure": measure,
        "calls": {call: summarise_in_process(call, by_config, measure) for call, by_config in samples.items()},
    }


def quiet_timers(mongodb_url: str) -> dict[str, str]:
    """Under callgrind: the gateway's work on timers (the outbox sweep, the unfinished-jobs watch, retention,
    PyMongo's heartbeats, the span processor's timed exports) put off for an hour, and no slow-command warnings
    (every command is slow there).

    Timed work runs per second, not per request: at ~50x the wall time a request would carry ~50x its share,
    the same in every configuration, and dilute what tracing adds. The requests' own paths do not change.
    """
    separator = "&" if "?" in mongodb_url else "?"
    return {
        "OUTBOX_SWEEP_INTERVAL_S": "3600",
        "JOB_WATCH_INTERVAL_S": "3600",
        "RETENTION_SWEEP_INTERVAL_S": "3600",
        "SLOW_MONGODB_COMMAND_MS": "3600000",
        "MONGODB_URL": f"{mongodb_url}{separator}heartbeatFrequencyMS=3600000",
        # Spans exported only by the batch's flush: one export a batch, as many spans as the batch made.
        "OTEL_BSP_SCHEDULE_DELAY": "3600000",
        "PYTHONHASHSEED": "0",  # the same dict and set layouts in every worker
    }


def _worker_line(config: str, worker: subprocess.Popen[str], prefix: str) -> str:
    """The worker's next line that starts with `prefix` (without it); anything else it printed is passed on."""
    assert worker.stdout is not None
    for line in worker.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :]
        print(f"  [{config}] {line}", end="", flush=True)
    raise RuntimeError(f"the in-process worker {config} ended (exit status {worker.wait()})")


def median_interval(values: list[float]) -> tuple[float, float]:
    """A distribution-free 95% confidence interval of the median: the order statistics n/2 -+ 0.98 sqrt(n)."""
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * n**0.5
    low, high = max(0, int(n / 2 - half)), min(n - 1, int(-(-(n / 2 + half) // 1)))
    return ordered[low], ordered[high]


def summarise_in_process(
    call: str, by_config: dict[str, list[dict[str, Any]]], measure: str = "cpu_us"
) -> dict[str, Any]:
    """Per configuration, the median `measure` per request (CPU µs, or instructions under --instructions);
    against its baseline, the median of the per-round ratios with its 95% interval and quartiles, and the
    median of the per-round differences.

    `default` flushes its few sampled spans at the end of every batch: one export of 2-10 spans per batch, where
    a deployed gateway exports every 5 s, many requests' spans at a time. So for the reads `default` is also
    composed from the two configurations that bracket it, per round: `unsampled` (its path for the 99% not
    sampled) plus the request ratio times what a sampled request adds (`debug_100`, whose batches export
    hundreds of spans at a time, less `unsampled`): `default_composed`. A creation likewise, at the job ratio
    (OTEL_TRACES_SAMPLER_ARG): its `default` batches of 30 export 0-8 traced creations' spans each.
    """
    from stemflow_shared.telemetry import DEFAULT_REQUEST_RATIO

    values = {config: [r[measure] for r in runs] for config, runs in by_config.items()}
    if "unsampled" in values and "debug_100" in values:
        ratio = (
            DEFAULT_REQUEST_RATIO if INPROCESS_CALLS[call][0] == "GET" else float(DEPLOYED["OTEL_TRACES_SAMPLER_ARG"])
        )
        values["default_composed"] = [
            unsampled + ratio * (debug - unsampled)
            for unsampled, debug in zip(values["unsampled"], values["debug_100"], strict=True)
        ]
    row: dict[str, Any] = {}
    for config, runs in values.items():
        row[config] = {
            f"{measure}_per_request": round(statistics.median(runs), 2),
            f"{measure}_runs": [round(v, 2) for v in runs],
        }
        if config in by_config and measure == "cpu_us":
            row[config]["loop_thread_us_per_request"] = round(
                statistics.median(r["loop_thread_us"] for r in by_config[config]), 2
            )
            row[config]["load_1min_runs"] = [r["load"][0] for r in by_config[config]]
    for config, against in IN_PROCESS_PAIRS:
        if config in values and against in values:
            row[config][f"ratio_vs_{against}"] = paired_ratio(values[config], values[against], UNITS[measure])
    for config in ("default", "default_composed"):
        if config in row and "ratio_vs_off" in row[config]:
            row[config]["goal_max_cpu_increase_vs_off"] = GOAL_DEFAULT_PER_REQUEST
            row[config]["meets_goal"] = row[config]["ratio_vs_off"]["median"] <= 1 + GOAL_DEFAULT_PER_REQUEST
    return row


IN_PROCESS_PAIRS = (
    *((config, "off") for config in INPROCESS_CONFIGS if config != "off"),
    ("default_composed", "off"),
    (PREVIOUS, PREVIOUS_OFF),
    (PREVIOUS_OFF, "off"),
)


UNITS = {"cpu_us": "us", "instructions": "instructions"}  # of each in-process measure, in the ratios' keys


def paired_ratio(mine: list[float], theirs: list[float], unit: str = "us") -> dict[str, Any]:
    """The median of the per-round ratios, its 95% interval and quartiles, and the median per-round difference."""
    per_round = [m / t for m, t in zip(mine, theirs, strict=True)]
    differences = [m - t for m, t in zip(mine, theirs, strict=True)]
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    low, high = median_interval(per_round)
    return {
        "median": round(statistics.median(per_round), 4),
        "ci95": [round(low, 4), round(high, 4)],
        "quartiles": [round(quartiles[0], 4), round(quartiles[2], 4)],
        f"added_{unit}_median": round(statistics.median(differences), 2),
    }


def print_in_process(report: dict[str, Any]) -> None:
    measure = report.get("measure", "cpu_us")
    unit = UNITS[measure]
    what = (
        "instructions of the worker process (callgrind)"
        if measure == "instructions"
        else "CPU time of the worker process"
    )
    print(
        f"\nin process ({report['batches']} interleaved rounds of {report['batch_size']} requests a call, "
        f"{what} per request; ratios: median of the per-round ratios [95% interval of the median], the median "
        f"added {unit} in brackets):"
    )
    for call, row in report["calls"].items():
        print(f"{call}: off {row['off'][f'{measure}_per_request']:,.1f} {unit}/req")
        for config, against in IN_PROCESS_PAIRS:
            if config not in row or f"ratio_vs_{against}" not in row[config]:
                continue
            ratio = row[config][f"ratio_vs_{against}"]
            goal = ""
            if "meets_goal" in row[config]:
                goal = f"  goal <= x{1 + GOAL_DEFAULT_PER_REQUEST:.2f}: {'meets' if row[config]['meets_goal'] else 'MISSES'}"
            print(
                f"  {config:>16}: {row[config][f'{measure}_per_request']:12,.1f} {unit}, x{ratio['median']:.3f} vs "
                f"{against} [{ratio['ci95'][0]:.3f}-{ratio['ci95'][1]:.3f}] "
                f"({ratio[f'added_{unit}_median']:+,.1f} {unit}){goal}"
            )


# --- a whole job through the five services -------------------------------------------------------


def pipeline_configs(baseline: str | None) -> dict[str, dict[str, str]]:
    configs = {"off": {}, "jobs_100": JOBS_100}
    if baseline:
        configs[PREVIOUS] = {**JOBS_100, "PYTHONPATH": baseline}
    return configs


async def whole_jobs(args: argparse.Namespace, sink_url: str, baseline: str | None) -> dict[str, Any]:
    """CPU time of the five services per job (upload -> completed), one set of services per configuration."""
    import asyncio

    from pymongo import AsyncMongoClient

    from stemflow_dev import demo_song
    from stemflow_dev.client import StemflowClient
    from stemflow_dev.fixtures import STATE_DIR, delete_namespace
    from stemflow_dev.models import make_tiny_repo
    from stemflow_dev.procs import ProcessGroup
    from stemflow_dev.services import Ports, service_env, service_specs
    from stemflow_dev.stack import ensure_stack
    from stemflow_shared.auth import ApiKeys

    configs = pipeline_configs(baseline)
    urls = ensure_stack(STATE_DIR)
    run = uuid.uuid4().hex[:6]
    clear_tracing_environment()
    tracing = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        **SDK_METRICS,
    }
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(urls.mongodb_url)
    groups: dict[str, ProcessGroup] = {}
    sets: dict[str, Any] = {}
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_tiny_repo(Path(tmp) / "models")
        try:
            for config, extra in configs.items():
                namespace = f"bp{run}{config.replace('_', '')}"
                ports = Ports.free()
                env = service_env(
                    urls,
                    namespace=namespace,
                    mongodb_db=f"stemflow_{namespace}",
                    blob_dir=Path(tmp) / config / "blobs",
                    model_repo=repo,
                    ports=ports,
                    extra={
                        "MODELS": "htdemucs",
                        "TORCH_THREADS": "1",
                        "LOG_LEVEL": "WARNING",
                        "RATE_LIMIT_PER_MINUTE": "0",
                        "REUSE_RESULTS": "false",  # the same song each time: every job runs every stage
                        **(tracing if extra else {}),
                        **extra,
                    },
                )
                groups[config] = ProcessGroup()
                groups[config].start(service_specs(env, ports), Path(tmp) / config / "logs")
                sets[config] = {"namespace": namespace, "ports": ports}
            for group in groups.values():
                await asyncio.to_thread(group.wait_ready, 300)
            song = demo_song.write(Path(tmp) / "song.wav", seconds=args.job_seconds)
            for config, entry in sets.items():
                key = await ApiKeys(mongo[f"stemflow_{entry['namespace']}"]).create("bench-tracing")
                ports = entry["ports"]
                entry["client"] = StemflowClient(
                    f"http://127.0.0.1:{ports.gateway}", f"ws://127.0.0.1:{ports.notifier}/v1/ws", key
                )
                entry["pids"] = [groups[config].pid(name) for name in SERVICES]

            async def one_job(config: str) -> dict[str, Any]:
                entry = sets[config]
                before = sum(process_cpu_s(pid) for pid in entry["pids"])
                started = time.perf_counter()
                job = await entry["client"].submit(song, stems=2, quality="fast")
                await entry["client"].follow(job["id"], timeout_s=600)
                assert (await entry["client"].job(job["id"]))["status"] == "completed"
                wall = time.perf_counter() - started
                # Settling: the batch processor exports every 5 s (OTEL_BSP_SCHEDULE_DELAY, as deployed), so the
                # job's last spans are exported, and counted, within its window.
                await asyncio.sleep(args.job_settle)
                cpu = sum(process_cpu_s(pid) for pid in entry["pids"]) - before
                return {"cpu_s": cpu, "wall_s": wall, "load": load()}

            for config in configs:  # warm up: models loaded, connections open, code paths run once
                await one_job(config)
            names = list(configs)
            for round_index in range(args.jobs_per_config):
                for config in names[round_index % len(names) :] + names[: round_index % len(names)]:
                    result = await one_job(config)
                    samples[config].append(result)
                    print(
                        f"  job {round_index + 1} {config:>9}: {result['cpu_s']:.3f} s CPU (five services), "
                        f"{result['wall_s']:.2f} s  (load {result['load'][0]:.1f})",
                        flush=True,
                    )
        finally:
            for entry in sets.values():
                if "client" in entry:
                    await entry["client"].aclose()
            for group in groups.values():
                await asyncio.to_thread(group.stop)
            for entry in sets.values():
                await mongo.drop_database(f"stemflow_{entry['namespace']}")
                await delete_namespace(urls.amqp_url, entry["namespace"])
            await mongo.close()
    row: dict[str, Any] = {}
    for config, runs in samples.items():
        row[config] = {
            "cpu_s_per_job": round(statistics.median(r["cpu_s"] for r in runs), 4),
            "cpu_s_per_job_runs": [round(r["cpu_s"], 4) for r in runs],
            "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
            "load_1min_runs": [r["load"][0] for r in runs],
            "rounds": list(range(len(runs))),
        }
    ratios(row, "cpu_s_per_job", "off")
    ratios(row, "cpu_s_per_job", PREVIOUS)
    row["jobs_100"]["goal_max_cpu_increase_vs_off"] = GOAL_JOB_100
    row["jobs_100"]["meets_goal"] = row["jobs_100"]["cpu_ratio_vs_off"] <= 1 + GOAL_JOB_100
    return {"song_seconds": args.job_seconds, "stems": 2, "quality": "fast", "model": "htdemucs (tiny)", **row}


SERVICES = ("gateway", "notifier", "ingest", "separator", "analyzer")


def in_process_calls(value: str) -> list[str]:
    """--calls: a comma-separated list of INPROCESS_CALLS' names, refused before anything starts."""
    calls = [call for call in value.split(",") if call]
    unknown = sorted(set(calls) - set(INPROCESS_CALLS))
    if unknown:
        raise argparse.ArgumentTypeError(f"no such call {unknown}; the calls are {', '.join(INPROCESS_CALLS)}")
    return calls


def baseline_pythonpath(value: str | None) -> str | None:
    """A checkout's root (its shared/src and services/*/src) or a PYTHONPATH as it is."""
    if not value:
        return None
    root = Path(value)
    if (root / "shared" / "src").is_dir():
        return os.pathsep.join(str(root / part) for part in ("shared/src", *(f"services/{s}/src" for s in SERVICES)))
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=40, help="jobs seeded for the list")
    parser.add_argument("--jobs-per-config", type=int, default=4, help="whole jobs per configuration (0: none)")
    parser.add_argument("--job-seconds", type=float, default=5.0, help="length of the whole jobs' song")
    parser.add_argument("--job-settle", type=float, default=5.5, help="seconds counted after each job's completion")
    parser.add_argument("--no-requests", action="store_true", help="only the whole jobs")
    parser.add_argument("--baseline-pythonpath", help="the previous code: a checkout's root or a PYTHONPATH")
    parser.add_argument("--out", type=Path, default=RESULTS / "tracing.json")
    parser.add_argument(
        "--in-process", action="store_true", help="each call driven through ASGI in worker processes, no wrk"
    )
    parser.add_argument("--batches", type=int, default=30, help="--in-process: interleaved rounds")
    parser.add_argument("--batch-size", type=int, default=300, help="--in-process: requests of a call a round")
    parser.add_argument(
        "--calls",
        type=in_process_calls,
        default=list(INPROCESS_CALLS),
        help=f"--in-process: the calls measured, of {','.join(INPROCESS_CALLS)}",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="--in-process: count each batch's instructions under valgrind's callgrind (steady from process to "
        "process and under load; ~50x slower: use small batches), not its CPU time",
    )
    parser.add_argument(
        "--keep-dumps",
        type=Path,
        help="--instructions: keep each batch's callgrind dump in DIR/callgrind-<config>/stretch.N "
        "(callgrind_annotate reads them), in the order of the batches, the warm-up's first",
    )
    parser.add_argument("--in-process-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        serve_sink(args.sink)
        return
    if args.floor:
        print(json.dumps(span_floor(args.floor)))
        return
    if args.in_process_worker:
        run_inprocess_worker()
        return
    if args.instructions and not args.in_process:
        parser.error("--instructions goes with --in-process")
    if args.keep_dumps and not args.instructions:
        parser.error("--keep-dumps goes with --instructions")
    if args.instructions:
        from stemflow_dev.instructions import missing

        if reason := missing():
            parser.error(f"--instructions: {reason}")
    if args.in_process:
        main_in_process(args)
        return
    if shutil.which("wrk") is None:
        sys.exit("bench/tracing.py needs wrk: apt-get install -y wrk")
    import asyncio

    baseline = baseline_pythonpath(args.baseline_pythonpath)
    configs = {**CONFIGS, **({PREVIOUS: {**DEPLOYED, "PYTHONPATH": baseline}} if baseline else {})}
    cpus, sink, sink_url = start_sink()
    report: dict[str, Any] = {
        "what": "CPU time per request of the gateway, and per whole job of the five services, by sampling setting",
        "configs": {name: {k: v for k, v in env.items() if k != "PYTHONPATH"} for name, env in configs.items()},
        "previous": {"pythonpath": baseline} if baseline else None,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "connections": args.connections,
        "pinned_cpus": {"gateway": cpus[0], "wrk_and_sink": cpus[1]},
        "load_at_start": load(),
    }
    try:
        wait_for_sink(sink_url)
        if not args.no_requests:
            with gateways(args, configs, sink_url, cpus[0]) as ctx:
                samples = measure(args, ctx, cpus)
            report["scenarios"] = summarise(samples)
            floor = json.loads(
                subprocess.run(
                    pinned(cpus[0], [sys.executable, __file__, "--floor", sink_url]),
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            cached_read_ms = report["scenarios"]["get_cached"]["off"]["cpu_ms_per_request"]
            floor["share_of_cached_read_off"] = round(floor["cpu_ms_per_pair"] / cached_read_ms, 4)
            floor["stages_share_of_cached_read_off"] = {
                stage: round(ms / cached_read_ms, 4) for stage, ms in floor["stages_cpu_ms_per_pair"].items()
            }
            report["floor_two_spans"] = floor
            save(args.out, report)  # kept should the whole jobs fail
        if args.jobs_per_config:
            report["whole_job"] = asyncio.run(whole_jobs(args, sink_url, baseline))
        report["exported_to_sink"] = httpx.get(f"{sink_url}/stats", timeout=5).json()
    finally:
        sink.terminate()
        sink.wait()
    report["load_at_end"] = load()
    print_report(report)
    save(args.out, report)


def start_sink() -> tuple[tuple[int | None, int | None], subprocess.Popen[bytes], str]:
    """The CPUs to pin the gateways and the client to (where there are two), and the span sink on the second."""
    from stemflow_dev.services import Ports

    available = sorted(os.sched_getaffinity(0))
    cpus = (available[0], available[1]) if len(available) >= 2 and shutil.which("taskset") else (None, None)
    sink_port = Ports.free().gateway
    sink = subprocess.Popen(pinned(cpus[1], [sys.executable, __file__, "--sink", str(sink_port)]))
    return cpus, sink, f"http://127.0.0.1:{sink_port}"


def main_in_process(args: argparse.Namespace) -> None:
    baseline = baseline_pythonpath(args.baseline_pythonpath)
    cpus, sink, sink_url = start_sink()
    report: dict[str, Any] = {
        "what": ("instructions" if args.instructions else "CPU time")
        + " per request of the gateway app driven in process, by sampling setting",
        "configs": {name: env for name, env in INPROCESS_CONFIGS.items()},
        "previous": {"pythonpath": baseline} if baseline else None,
        "pinned_cpus": {"workers": cpus[0], "sink": cpus[1]},
        "load_at_start": load(),
    }
    try:
        wait_for_sink(sink_url)
        report["in_process"] = in_process(args, sink_url, baseline, cpus[0])
        report["exported_to_sink"] = httpx.get(f"{sink_url}/stats", timeout=5).json()
    finally:
        sink.terminate()
        sink.wait()
    report["load_at_end"] = load()
    print(f"\nload (1, 5, 15 min): {report['load_at_start']} at the start, {report['load_at_end']} at the end")
    print_in_process(report["in_process"])
    print(f"exported to the sink: {report['exported_to_sink']}")
    default_out = RESULTS / ("tracing_instructions.json" if args.instructions else "tracing_in_process.json")
    save(default_out if args.out == RESULTS / "tracing.json" else args.out, report)


def wait_for_sink(sink_url: str) -> None:
    deadline = time.monotonic() + 30
    while True:  # another process: its readiness can only be polled
        try:
            httpx.get(f"{sink_url}/stats", timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def save(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def print_report(report: dict[str, Any]) -> None:
    print(f"\nload (1, 5, 15 min): {report['load_at_start']} at the start, {report['load_at_end']} at the end")
    for scenario, row in report.get("scenarios", {}).items():
        if "off" not in row:
            print(f"{scenario}: no run of `off` without errors")
            continue
        off = row["off"]
        print(f"{scenario}: off {off['rps_median']:.0f} req/s, {off['cpu_ms_per_request']:.3f} ms CPU/req")
        for config, r in row.items():
            if config == "off":
                continue
            against_previous = (
                f", x{r['cpu_ratio_vs_previous']:.3f} vs previous" if "cpu_ratio_vs_previous" in r else ""
            )
            goal = ""
            if "meets_goal" in r:
                goal = f"  goal <= x{1 + r['goal_max_cpu_increase_vs_off']:.2f}: {'meets' if r['meets_goal'] else 'MISSES'}"
            print(
                f"  {config:>10}: {r['cpu_ms_per_request']:.3f} ms CPU/req, x{r['cpu_ratio_vs_off']:.3f} vs off "
                f"(rounds {r['cpu_ratio_vs_off_per_round']}){against_previous}, {r['rps_median']:.0f} req/s{goal}"
            )
    if "floor_two_spans" in report:
        floor = report["floor_two_spans"]
        print(
            f"floor: a server span and a Redis span, batched and exported, with no request around them: "
            f"{floor['cpu_ms_per_pair']:.3f} ms CPU, {100 * floor['share_of_cached_read_off']:.0f}% of a cached "
            f"read's CPU time with tracing off"
        )
        for stage, ms in floor["stages_cpu_ms_per_pair"].items():
            print(f"  {stage:>10}: {ms:.3f} ms CPU, {100 * floor['stages_share_of_cached_read_off'][stage]:.0f}%")
    if "whole_job" in report:
        job = report["whole_job"]
        print(f"whole job ({job['song_seconds']} s song, five services): off {job['off']['cpu_s_per_job']:.3f} s CPU")
        for config in ("jobs_100", PREVIOUS):
            if config in job:
                r = job[config]
                goal = (
                    f"  goal <= x{1 + GOAL_JOB_100:.2f}: {'meets' if r['meets_goal'] else 'MISSES'}"
                    if "meets_goal" in r
                    else ""
                )
                print(
                    f"  {config:>10}: {r['cpu_s_per_job']:.3f} s CPU, x{r['cpu_ratio_vs_off']:.3f} vs off "
                    f"(rounds {r['cpu_ratio_vs_off_per_round']}){goal}"
                )
    print(f"exported to the sink: {report['exported_to_sink']}")


if __name__ == "__main__":
    main()
