"""What tracing costs the gateway: throughput with tracing off, on at 100% sampling, sampled at 10%, and at 0%.

Three gateway processes run side by side on the real local RabbitMQ, MongoDB and
Redis (their own namespace, database and blob directory, removed at the end):

- off:      no OTEL_* variables, so no SDK (the baseline, measured in the same run);
- always_on: OTEL_TRACES_SAMPLER=always_on, every request traced and exported;
- ratio_10: OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1,
            the default sampler of the production deployment
            (deploy/k8s/components/tracing). (The SDK's own default,
            parentbased_always_on, samples every request that arrives without a
            parent, as client requests do: at the gateway it is always_on.)
- always_off: the SDK installed and nothing sampled: what each of the nine in ten
            unsampled requests pays (no goal of its own; it splits ratio_10's cost
            into the part every request pays and the part of the sampled ones).

The traced gateways run as in production: FastAPI's own server spans, the
official PyMongo/Redis/httpx instrumentations, the BatchSpanProcessor with the
OTLP/HTTP exporter (both counting lost spans on /metrics), and HeadSampling (stemflow_shared.telemetry) deciding each
request before any instrumentation runs.

Spans go over OTLP/HTTP to a sink in another process that reads and discards
them, so the export cost is real but no collector is needed. wrk drives each
gateway in turn (interleaved rounds, medians) for four calls: a job's GET served
from the cache (the cheapest and most frequent call: clients poll), the first
page of the job list, and a job's creation (a 0.25 s WAV uploaded; the request
whose trace follows the job through every service), and the same with a
song-sized upload (30 s of WAV, 5.3 MB). The gateway is pinned to one
CPU, wrk and the sink to another, where the machine has two. Prints req/s, the
gateway's CPU time per request and the loss against `off`, and the floor: what
the two spans of a traced cached read cost the SDK with no request around them
(`span_floor`), against the cached read's own CPU time, and what each part of
the pipeline adds to it (the SDK's span objects, the batch processor, the OTLP
encoding, the HTTP send); writes
bench/results/tracing.json. Goals: at most 10% loss at 100% sampling, 3% with
the default sampler.

    .venv/bin/python bench/tracing.py [--duration 5] [--rounds 3] [--connections 10] [--jobs 40]

Needs `wrk` (Debian: `apt-get install -y wrk`).
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
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
# This folder holds a bench named gateway.py: keep it from shadowing the service's package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

CONFIGS: dict[str, dict[str, str]] = {
    "off": {},
    "always_on": {"OTEL_TRACES_SAMPLER": "always_on"},
    "ratio_10": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    "always_off": {"OTEL_TRACES_SAMPLER": "always_off"},
}
GOALS = {"always_on": 0.10, "ratio_10": 0.03}
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
        "-H",
        f"Authorization: Bearer {key}",
        *(["-s", str(script)] if script else []),
        url,
    ]
    result = subprocess.run(pinned(cpu, argv), capture_output=True, text=True, check=True, timeout=duration_s + 60)
    out = result.stdout
    if "Non-2xx or 3xx responses" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "requests": requests}


@contextmanager
def gateways(args: argparse.Namespace, sink_url: str, cpu: int | None) -> Iterator[dict[str, Any]]:
    """The three gateways, each with a database, namespace, API key and seeded jobs of its own.

    Nothing is shared, so one gateway's background work (outbox and retention sweeps over the jobs the
    creation runs make) never lands on another's CPU. Everything is removed at the end.
    """
    import asyncio

    from pymongo import AsyncMongoClient

    from stemflow_dev.fixtures import STATE_DIR, delete_namespace
    from stemflow_dev.procs import ProcessGroup, ServiceSpec
    from stemflow_dev.services import Ports, service_env
    from stemflow_dev.stack import ensure_stack
    from stemflow_shared.auth import ApiKeys

    urls = ensure_stack(STATE_DIR)
    run = uuid.uuid4().hex[:6]
    namespaces = {config: f"bt{run}{config.replace('_', '')}" for config in CONFIGS}
    databases = {config: f"stemflow_{namespaces[config]}" for config in CONFIGS}
    ports = {config: Ports.free().gateway for config in CONFIGS}
    for name in [v for v in os.environ if v.startswith("OTEL_")]:
        del os.environ[name]  # the baseline must run without any SDK configuration
    with tempfile.TemporaryDirectory() as tmp:
        tracing = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            **SDK_METRICS,  # as deployed (deploy/k8s/components/tracing)
        }
        specs = []
        for config, extra in CONFIGS.items():
            env = service_env(
                urls,
                namespace=namespaces[config],
                mongodb_db=databases[config],
                blob_dir=Path(tmp) / config / "blobs",
                model_repo=Path(tmp) / "models",
                ports=Ports(
                    gateway=ports[config],
                    gateway_metrics=Ports.free().gateway_metrics,
                    gateway_internal=Ports.free().gateway_internal,
                ),
                extra={"LOG_LEVEL": "WARNING", "RATE_LIMIT_PER_MINUTE": "0"},
            )
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

            async def create_keys() -> dict[str, str]:
                client: AsyncMongoClient[Any] = AsyncMongoClient(urls.mongodb_url)
                try:
                    return {c: await ApiKeys(client[databases[c]]).create("bench-tracing") for c in CONFIGS}
                finally:
                    await client.close()

            keys = asyncio.run(create_keys())
            job_ids = {c: seed(f"http://127.0.0.1:{ports[c]}", keys[c], args.jobs) for c in CONFIGS}
            yield {
                "scripts": {
                    "create_job": create_script(Path(tmp), "create", 0.25),
                    "create_song": create_script(Path(tmp), "song", SONG_SECONDS),
                },
                "ports": ports,
                "keys": keys,
                "job_ids": job_ids,
                "pids": {c: group.pid(f"gateway-{c}") for c in CONFIGS},
            }
        finally:
            group.stop()

            async def clean() -> None:
                client: AsyncMongoClient[Any] = AsyncMongoClient(urls.mongodb_url)
                for config in CONFIGS:
                    await client.drop_database(databases[config])
                    await delete_namespace(urls.amqp_url, namespaces[config])
                await client.close()

            asyncio.run(clean())


def wav(seconds: float = 0.25) -> bytes:
    """A stereo 44.1 kHz 16-bit WAV of silence (30 s make 5.3 MB: a song-sized upload)."""
    import io

    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((int(44100 * seconds), 2), np.float32), 44100, "PCM_16", format="WAV")
    return buffer.getvalue()


def create_script(folder: Path, name: str, seconds: float) -> Path:
    """A wrk script that POSTs /v1/jobs with a WAV of `seconds` as multipart form data."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + wav(seconds)
        + f"\r\n--{boundary}--\r\n".encode()
    )
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
            response.raise_for_status()
            job_id = response.json()["id"]
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert len(client.get("/v1/jobs").json()["items"]) == min(jobs, 20)
    return job_id


def measure(args: argparse.Namespace, ctx: dict[str, Any], cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    scenarios = {
        "get_cached": "/v1/jobs/{job_id}",
        "list_first_page": "/v1/jobs",
        "create_job": "/v1/jobs",
        "create_song": "/v1/jobs",
    }
    scripts = ctx["scripts"]
    _, load_cpu = cpus
    samples: dict[str, dict[str, list[dict[str, float]]]] = {s: {c: [] for c in CONFIGS} for s in scenarios}

    def url(config: str, path: str) -> str:
        return f"http://127.0.0.1:{ctx['ports'][config]}{path.format(job_id=ctx['job_ids'][config])}"

    for config in CONFIGS:  # warm up every process and path once
        for scenario, path in scenarios.items():
            wrk(url(config, path), ctx["keys"][config], args.connections, 1, load_cpu, scripts.get(scenario))
    for round_index in range(args.rounds):
        order = list(CONFIGS)[round_index % len(CONFIGS) :] + list(CONFIGS)[: round_index % len(CONFIGS)]
        for scenario, path in scenarios.items():
            for config in order:
                pid = ctx["pids"][config]
                cpu_before = process_cpu_s(pid)
                run = wrk(
                    url(config, path),
                    ctx["keys"][config],
                    args.connections,
                    args.duration,
                    load_cpu,
                    scripts.get(scenario),
                )
                run["cpu_ms_per_request"] = 1000 * (process_cpu_s(pid) - cpu_before) / max(run["requests"], 1)
                samples[scenario][config].append(run)
                print(
                    f"  round {round_index + 1} {scenario:>15} {config:>9}: {run['rps']:9.0f} req/s "
                    f"{run['cpu_ms_per_request']:.3f} ms CPU/req",
                    flush=True,
                )
    return samples


def summarise(samples: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scenario, by_config in samples.items():
        row: dict[str, Any] = {}
        for config, runs in by_config.items():
            row[config] = {
                "rps_median": round(statistics.median(r["rps"] for r in runs), 1),
                "rps_runs": [round(r["rps"], 1) for r in runs],
                "cpu_ms_per_request": round(statistics.median(r["cpu_ms_per_request"] for r in runs), 4),
            }
        base = row["off"]
        for config in CONFIGS:
            if config == "off":
                continue
            row[config]["throughput_ratio_vs_off"] = round(row[config]["rps_median"] / base["rps_median"], 4)
            row[config]["throughput_loss"] = round(1 - row[config]["throughput_ratio_vs_off"], 4)
            row[config]["cpu_ratio_vs_off"] = round(row[config]["cpu_ms_per_request"] / base["cpu_ms_per_request"], 4)
            # The loss a CPU-bound gateway would see from CPU time alone: steadier than req/s on a shared machine.
            row[config]["throughput_loss_from_cpu"] = round(1 - 1 / row[config]["cpu_ratio_vs_off"], 4)
            if config in GOALS:
                row[config]["goal_max_loss"] = GOALS[config]
                row[config]["meets_goal"] = row[config]["throughput_loss"] <= GOALS[config]
        results[scenario] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=40, help="jobs seeded for the list")
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        serve_sink(args.sink)
        return
    if args.floor:
        print(json.dumps(span_floor(args.floor)))
        return
    if shutil.which("wrk") is None:
        sys.exit("bench/tracing.py needs wrk: apt-get install -y wrk")

    from stemflow_dev.services import Ports

    available = sorted(os.sched_getaffinity(0))
    cpus = (available[0], available[1]) if len(available) >= 2 and shutil.which("taskset") else (None, None)
    sink_port = Ports.free().gateway
    sink = subprocess.Popen(pinned(cpus[1], [sys.executable, __file__, "--sink", str(sink_port)]))
    sink_url = f"http://127.0.0.1:{sink_port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # another process: its readiness can only be polled
            try:
                httpx.get(f"{sink_url}/stats", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with gateways(args, sink_url, cpus[0]) as ctx:
            samples = measure(args, ctx, cpus)
        floor = json.loads(
            subprocess.run(
                pinned(cpus[0], [sys.executable, __file__, "--floor", sink_url]),
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        exported = httpx.get(f"{sink_url}/stats", timeout=5).json()
    finally:
        sink.terminate()
        sink.wait()

    report = {
        "what": "gateway throughput with tracing off, always_on (100%), parentbased_traceidratio 0.1 and always_off",
        "baseline": "the `off` gateway, same run, same wrk settings, interleaved rounds",
        "default_sampler_measured": "parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "connections": args.connections,
        "pinned_cpus": {"gateway": cpus[0], "wrk_and_sink": cpus[1]},
        "exported_to_sink": exported,
        "scenarios": summarise(samples),
        "floor_two_spans": floor,
    }
    cached_read_ms = report["scenarios"]["get_cached"]["off"]["cpu_ms_per_request"]
    floor["share_of_cached_read_off"] = round(floor["cpu_ms_per_pair"] / cached_read_ms, 4)
    floor["stages_share_of_cached_read_off"] = {
        stage: round(ms / cached_read_ms, 4) for stage, ms in floor["stages_cpu_ms_per_pair"].items()
    }
    print()
    for scenario, row in report["scenarios"].items():
        print(
            f"{scenario}: off {row['off']['rps_median']:.0f} req/s, {row['off']['cpu_ms_per_request']:.3f} ms CPU/req"
        )
        for config in ("always_on", "ratio_10", "always_off"):
            r = row[config]
            goal = (
                f"goal <= {100 * r['goal_max_loss']:.0f}%: {'meets' if r['meets_goal'] else 'MISSES'}"
                if config in GOALS
                else "no goal: the unsampled requests' share"
            )
            print(
                f"  {config:>10}: {r['rps_median']:.0f} req/s, ratio {r['throughput_ratio_vs_off']:.3f} "
                f"(loss {100 * r['throughput_loss']:.1f}%, {goal}), "
                f"CPU/req x{r['cpu_ratio_vs_off']:.2f} (loss from CPU time {100 * r['throughput_loss_from_cpu']:.1f}%)"
            )
    print(
        f"floor: a server span and a Redis span, batched and exported, with no request around them: "
        f"{floor['cpu_ms_per_pair']:.3f} ms CPU, {100 * floor['share_of_cached_read_off']:.0f}% of a cached read's "
        f"CPU time with tracing off (the 100% goal allows 10%)"
    )
    for stage, ms in floor["stages_cpu_ms_per_pair"].items():
        share = floor["stages_share_of_cached_read_off"][stage]
        print(f"  {stage:>10}: {ms:.3f} ms CPU, {100 * share:.0f}% of a cached read")
    print(f"exported to the sink: {exported['exports']} requests, {exported['bytes']} bytes")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tracing.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
