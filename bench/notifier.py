"""Notifier benchmark: many WebSocket clients on loopback, a realistic stream of job events through RabbitMQ,
with batching on (100 ms window, 50 events) and off (window 0, one event a frame), side by side.

    .venv/bin/python bench/notifier.py [--clients 10000] [--owners 12] [--jobs-per-owner 10] [--processes 4]

The stream: `--owners` active users each run a batch of `--jobs-per-owner` songs (started within two
seconds of each other; users start at random over `--stagger` seconds). A job reports progress every
150-350 ms for `--job-seconds` (the separator's 0.25 s throttle), with a burst of two updates at each of
its three stage transitions, then ends: completed (90%: four stems, an analysis with beats and an energy
curve), failed (7%) or cancelled (3%). Each active user has two clients: a page subscribed to all its
jobs and a CLI subscribed to each job. Every other client is held open, subscribed to all the jobs of an
idle user (ten clients a user).

Figures: frames, bytes on the wire and events from the notifier's /metrics; its CPU seconds and RSS (with
all clients connected, and after the stream); latency from the publisher stamping an event to a client
parsing it ("end to end"), and from a bare consumer of a queue bound like the notifier's getting it to a
client parsing it ("push": what the notifier and the WebSocket add; the rest is the broker, the same in
both modes); "lost" counts a client missing the terminal event or the final progress of a job it follows.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import random
import resource
import socket
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LOGS = ROOT / "test-artifacts" / "bench-notifier"
PROGRESS = "stemflow.job.progress.v1"
MODES = {
    "batched": {"BATCH_WINDOW_MS": "100", "BATCH_MAX_EVENTS": "50"},
    "unbatched": {"BATCH_WINDOW_MS": "0", "BATCH_MAX_EVENTS": "1"},
}


def raise_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)


# --- client processes: each holds a share of the connections ---------------------------------------------------


def client_process(url: str, clients: list[dict[str, Any]], reports: Any, stop: Any) -> None:
    import uvloop

    raise_fd_limit()
    uvloop.run(_clients(url, clients, reports, stop))


async def _clients(url: str, clients: list[dict[str, Any]], reports: Any, stop: Any) -> None:
    import websockets

    deliveries: list[tuple[str, bool, float, float]] = []  # event id, terminal, received, stamped
    received: list[set[str]] = [set() for _ in clients]
    gate, connected, done = asyncio.Semaphore(64), asyncio.Event(), asyncio.Event()
    counts = {"ready": 0, "failed": 0, "frames": 0, "missing": sum(len(c["expect"]) for c in clients)}

    async def one(spec: dict[str, Any], got: set[str]) -> None:
        try:
            async with gate:
                ws = await websockets.connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {spec['key']}"},
                    ping_interval=None,
                    max_size=None,
                    open_timeout=300,
                )
                for job in spec["subscribe"]:
                    await ws.send(json.dumps({"type": "subscribe", **({"job_id": job} if job else {})}))
                    assert json.loads(await ws.recv())["type"] == "subscribed"
        except Exception:
            counts["failed"] += 1
            return
        finally:
            counts["ready"] += 1
            if counts["ready"] == len(clients):
                connected.set()
        async with ws:
            async for raw in ws:
                now = time.time()
                counts["frames"] += 1
                for event in json.loads(raw).get("events", ()):
                    stamped = datetime.fromisoformat(event["time"]).timestamp()
                    deliveries.append((event["id"], event["type"] != PROGRESS, now, stamped))
                    if event["id"] in spec["expect"] and event["id"] not in got:
                        counts["missing"] -= 1
                        if counts["missing"] == 0:
                            done.set()
                    got.add(event["id"])

    tasks = [asyncio.create_task(one(spec, got)) for spec, got in zip(clients, received, strict=True)]
    await connected.wait()
    # The harness's own connections are long-lived: keep its full collections (seconds at this size) out of
    # the latencies it measures.
    gc.collect()
    gc.freeze()
    reports.put(("ready", None))
    if counts["missing"] == 0:
        done.set()
    await done.wait()
    reports.put(("done", None))
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    lost = sum(len(set(c["expect"]) - got) for c, got in zip(clients, received, strict=True))
    duplicates = len(deliveries) - sum(len(got) for got in received)
    reports.put(("stats", {"deliveries": deliveries, "lost": lost, "duplicates": duplicates, **counts}))


# --- the probe: a bare consumer of a queue bound like the notifier's -----------------------------------------


def probe_queue() -> Any:
    from stemflow_shared.events import JOB_CANCELLED, JOB_COMPLETED, JOB_FAILED, JOB_PROGRESS
    from stemflow_shared.topology import QueueSpec

    return QueueSpec("bench-probe", (JOB_PROGRESS, JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED), per_replica=True)


def probe_process(amqp_url: str, namespace: str, reports: Any, stop: Any) -> None:
    import uvloop

    uvloop.run(_probe(amqp_url, namespace, reports, stop))


async def _probe(amqp_url: str, namespace: str, reports: Any, stop: Any) -> None:
    from stemflow_shared.messaging import Broker
    from stemflow_shared.topology import Names

    seen: dict[str, float] = {}

    async def record(event: Any) -> None:
        seen[event.id] = time.time()

    spec = probe_queue()
    broker = await Broker(amqp_url, Names(namespace), "bench-probe").connect()
    await broker.consume(spec, dict.fromkeys(spec.events, record), replica="probe", prefetch=256)
    reports.put(("probe", None))
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    await broker.close()
    reports.put(("probe", seen))


# --- the stream -----------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, list[str]], list[tuple]]:
    """Client specs, each active owner's jobs, and the timed events (offset_s, owner, job, kind, id, percent)."""
    rng = random.Random(args.seed)
    owners = {f"active-{i}": [uuid.uuid4().hex for _ in range(args.jobs_per_owner)] for i in range(args.owners)}
    timeline: list[tuple] = []
    expect: dict[str, list[str]] = {}
    bursts = {round(args.job_seconds * f / 4 / 0.25) for f in (1, 2, 3)}
    for owner, jobs in owners.items():
        start = rng.uniform(0, args.stagger)
        for job in jobs:
            t, step, events = start + rng.uniform(0, 2.0), 0, []
            end = t + args.job_seconds
            while t < end:
                percent = round(100 * (t - end + args.job_seconds) / args.job_seconds, 1)
                events.append((t, owner, job, "progress", str(uuid.uuid4()), percent))
                if step in bursts:
                    events.append((t + 0.002, owner, job, "progress", str(uuid.uuid4()), percent))
                t, step = t + rng.uniform(0.15, 0.35), step + 1
            roll = rng.random()
            outcome = "completed" if roll < 0.9 else "failed" if roll < 0.97 else "cancelled"
            events.append((t, owner, job, outcome, str(uuid.uuid4()), 100.0))
            expect[job] = [events[-2][4], events[-1][4]]
            timeline.extend(events)
    timeline.sort()
    clients = []
    for owner, jobs in owners.items():
        wanted = [e for job in jobs for e in expect[job]]
        clients.append({"owner": owner, "subscribe": [None], "expect": wanted})
        clients.append({"owner": owner, "subscribe": jobs, "expect": wanted})
    for i in range(max(0, args.clients - len(clients))):
        clients.append({"owner": f"idle-{i // 10}", "subscribe": [None], "expect": []})
    return clients, owners, timeline


def make(owner: str, job: str, kind: str, event_id: str, percent: float) -> Any:
    """The event as the gateway would publish it."""
    from stemflow_shared import events as ev

    if kind == "progress":
        data: Any = ev.JobProgressed(
            job_id=job,
            owner=owner,
            status="processing",
            progress=ev.Progress(
                overall=round(percent * 0.8, 1),
                ingest=ev.StageProgress(status="completed", percent=100.0),
                separation=ev.StageProgress(status="running", percent=percent),
                analysis=ev.StageProgress(status="running", percent=min(100.0, round(percent * 1.5, 1))),
            ),
        )
        return ev.make_event(ev.JOB_PROGRESS, data, source="/stemflow/gateway", id=event_id)
    if kind == "completed":
        rng = random.Random(job)
        stems = [
            ev.StemInfo(
                name=n, format="wav", media_type="audio/wav", blob_key=f"{job}/{n}.wav", size=37_000_000, duration_s=210
            )
            for n in ("vocals", "drums", "bass", "other")
        ]
        analysis = ev.AnalysisResult(
            tempo_bpm=121.9,
            tempo_confidence=0.83,
            key="A minor",
            key_confidence=0.71,
            loudness_lufs=-9.8,
            true_peak_dbfs=-0.6,
            rms_dbfs=-12.4,
            duration_s=210.0,
            beat_count=426,
            beats=[round(0.49 * i + rng.uniform(-0.01, 0.01), 3) for i in range(426)],
            energy=[round(rng.uniform(0.05, 0.6), 4) for _ in range(2100)],
        )
        data = ev.JobCompleted(job_id=job, owner=owner, stems=stems, analysis=analysis)
        return ev.make_event(ev.JOB_COMPLETED, data, source="/stemflow/gateway", id=event_id)
    if kind == "failed":
        data = ev.JobFailed(
            job_id=job, owner=owner, error=ev.ErrorInfo(code="separation_failed", message="out of memory")
        )
        return ev.make_event(ev.JOB_FAILED, data, source="/stemflow/gateway", id=event_id)
    return ev.make_event(
        ev.JOB_CANCELLED, ev.JobCancelled(job_id=job, owner=owner), source="/stemflow/gateway", id=event_id
    )


async def publish(broker: Any, timeline: list[tuple]) -> None:
    """Each job's events in order at their offsets, jobs side by side; stamped as they are published."""
    by_job: dict[str, list[Any]] = {}
    for offset, owner, job, kind, event_id, percent in timeline:
        by_job.setdefault(job, []).append((offset, make(owner, job, kind, event_id, percent)))
    started = time.monotonic()

    async def job_stream(events: list[Any]) -> None:
        for offset, event in events:
            await asyncio.sleep(max(0.0, started + offset - time.monotonic()))
            event.envelope.time = datetime.now(UTC)
            await broker.publish(event)

    await asyncio.gather(*(job_stream(events) for events in by_job.values()))


# --- measuring ------------------------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    names = {
        "stemflow_ws_frames_sent": "frames",
        "stemflow_ws_bytes_sent": "bytes",
        "stemflow_ws_events_sent": "events",
    }
    totals = dict.fromkeys(names.values(), 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in names:
            totals[names[family.name]] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name == "stemflow_gc_pause_seconds":
            for sample in family.samples:
                generation = sample.labels.get("generation")
                if sample.name.endswith("_bucket"):
                    totals[f"gc{generation}_le_{sample.labels['le']}"] = sample.value
                elif sample.name.endswith("_count"):
                    totals[f"gc{generation}_count"] = sample.value
                elif sample.name.endswith("_sum"):
                    totals[f"gc{generation}_s"] = sample.value
    return totals


def collections(before: dict[str, float], after: dict[str, float], generation: int) -> dict[str, Any]:
    """The notifier's garbage collections of a generation between two scrapes: how many, their total and
    longest pause (full collections, generation 2, walk the whole heap and stop every client at once)."""
    prefix = f"gc{generation}_"
    count = after.get(f"{prefix}count", 0.0) - before.get(f"{prefix}count", 0.0)
    bounds = sorted((float(k[len(prefix) + 3 :]), k) for k in after if k.startswith(f"{prefix}le_"))
    # The longest pause is at most the smallest bucket bound that holds every new collection.
    longest = next((bound for bound, k in bounds if after[k] - before.get(k, 0.0) >= count), None) if count else 0.0
    return {
        "count": int(count),
        "total_s": round(after.get(f"{prefix}s", 0.0) - before.get(f"{prefix}s", 0.0), 3),
        "longest_at_most_s": longest,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:"))


def percentiles(name: str, values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else None  # noqa: E731
    return {f"{name}_ms_p50": pick(0.5), f"{name}_ms_p95": pick(0.95), f"{name}_ms_p99": pick(0.99)}


def latencies(stats: list[dict[str, Any]], probe: dict[str, float]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for kind, terminal in (("progress", False), ("terminal", True)):
        rows = [d for s in stats for d in s["deliveries"] if d[1] is terminal]
        figures |= percentiles(kind, [received - stamped for _, _, received, stamped in rows])
        figures |= percentiles(f"{kind}_push", [received - probe[i] for i, _, received, _ in rows if i in probe])
    return figures


# --- one run: a notifier, the probe, the clients, the stream --------------------------------------------------


async def prepare(urls: Any, database: str, clients: list[dict[str, Any]], owners: dict[str, list[str]]) -> None:
    """Keys and jobs in the database of the gateway the notifier asks (jobs as the gateway makes them)."""
    from pymongo import AsyncMongoClient

    from gateway import lifecycle
    from stemflow_shared.auth import ApiKeys
    from stemflow_shared.events import InputRef, JobOptions

    mongo: AsyncMongoClient = AsyncMongoClient(urls.mongodb_url)
    keys = {owner: await ApiKeys(mongo[database]).create(owner) for owner in {c["owner"] for c in clients}}
    for spec in clients:
        spec["key"] = keys[spec["owner"]]
    now, source = (
        lifecycle.utcnow(),
        InputRef(source_url="https://songs.example.com/a.wav").model_dump(exclude_none=True),
    )
    jobs = [
        {**lifecycle.new_job(j, o, JobOptions(), source, now=now, retention=timedelta(days=1)), "status": "processing"}
        for o, js in owners.items()
        for j in js
    ]
    await mongo[database]["jobs"].insert_many(jobs)
    await mongo.close()


async def clean_up(urls: Any, namespace: str, database: str) -> None:
    import aio_pika
    from pymongo import AsyncMongoClient

    from stemflow_dev.fixtures import delete_namespace
    from stemflow_shared.topology import NOTIFIER_QUEUE, Names

    names = Names(namespace)
    connection = await aio_pika.connect(urls.amqp_url)
    async with connection:
        for queue in (names.queue(NOTIFIER_QUEUE, "bench"), names.queue(probe_queue(), "probe")):
            await (await connection.channel()).queue_delete(queue)
    await delete_namespace(urls.amqp_url, namespace)
    mongo: AsyncMongoClient = AsyncMongoClient(urls.mongodb_url)
    await mongo.drop_database(database)
    await mongo.close()


async def run_mode(mode: str, args: argparse.Namespace, urls: Any) -> dict[str, Any]:
    from stemflow_dev.procs import ProcessGroup, ServiceSpec
    from stemflow_shared.messaging import Broker
    from stemflow_shared.topology import Names

    namespace, clients_port = f"bn{mode[0]}{uuid.uuid4().hex[:8]}", _free_port()
    database = f"stemflow_{namespace}"
    clients, owners, timeline = plan(args)
    await prepare(urls, database, clients, owners)
    # The notifier asks a gateway (which owns keys and job state) through its internal API.
    gateway_port, internal_port, token = _free_port(), _free_port(), uuid.uuid4().hex
    gateway_env = {
        **urls.as_env(),
        "STEMFLOW_NAMESPACE": namespace,
        "MONGODB_DB": database,
        "HTTP_PORT": str(gateway_port),
        "METRICS_PORT": str(_free_port()),
        "INTERNAL_PORT": str(internal_port),
        "INTERNAL_TOKEN": token,
        "BLOB_DIR": str(LOGS / mode / "blobs"),
        "LOG_LEVEL": "WARNING",
    }
    env = {
        **{k: v for k, v in urls.as_env().items() if not k.startswith("MONGODB")},
        **MODES[mode],
        "STEMFLOW_NAMESPACE": namespace,
        "GATEWAY_INTERNAL_URL": f"http://127.0.0.1:{internal_port}",
        "INTERNAL_TOKEN": token,
        "HTTP_PORT": str(clients_port),
        "REPLICA_ID": "bench",
        "LOG_LEVEL": "WARNING",
    }
    gateway = ServiceSpec(
        "gateway", [sys.executable, "-m", "gateway.main"], gateway_env, f"http://127.0.0.1:{gateway_port}/readyz"
    )
    spec = ServiceSpec(
        "notifier", [sys.executable, "-m", "notifier.main"], env, f"http://127.0.0.1:{clients_port}/readyz"
    )
    group, context = ProcessGroup(), mp.get_context("spawn")
    reports, stop = context.Queue(), context.Event()
    url = f"ws://127.0.0.1:{clients_port}/v1/ws"
    procs = [context.Process(target=probe_process, args=(urls.amqp_url, namespace, reports, stop))]
    procs += [
        context.Process(target=client_process, args=(url, clients[i :: args.processes], reports, stop))
        for i in range(args.processes)
    ]
    group.start([gateway, spec], LOGS / mode)
    broker = await Broker(urls.amqp_url, Names(namespace), "bench").connect()
    try:
        group.wait_ready(timeout=120)
        pid, started = group.pid("notifier"), time.monotonic()
        for proc in procs:
            proc.start()
        for _ in procs:
            await asyncio.to_thread(reports.get, True, 900)  # the probe and every client process are ready
        connect_s, held = time.monotonic() - started, rss_mb(pid)
        before, cpu_before = scrape(clients_port), cpu_seconds(pid)
        await publish(broker, timeline)
        for _ in range(args.processes):
            assert (await asyncio.to_thread(reports.get, True, args.job_seconds + 300))[0] == "done"
        after, cpu_after, rss_after = scrape(clients_port), cpu_seconds(pid), rss_mb(pid)
        load = os.getloadavg()[0]
        stop.set()
        results = [await asyncio.to_thread(reports.get, True, 120) for _ in procs]
        for proc in procs:
            proc.join(60)
    finally:
        stop.set()
        await broker.close()
        group.stop()
        await clean_up(urls, namespace, database)
    probe = next(body for kind, body in results if kind == "probe")
    stats = [body for kind, body in results if kind == "stats"]
    return {
        "clients": len(clients),
        "events_published": len(timeline),
        "connect_s": round(connect_s, 1),
        "frames": int(after["frames"] - before["frames"]),
        "bytes": int(after["bytes"] - before["bytes"]),
        "events_delivered": int(after["events"] - before["events"]),
        "cpu_s": round(cpu_after - cpu_before, 2),
        **latencies(stats, probe),
        "lost": sum(s["lost"] for s in stats),
        "duplicates": sum(s["duplicates"] for s in stats),
        "connect_failures": sum(s["failed"] for s in stats),
        "rss_held_mb": round(held, 1),
        "rss_after_stream_mb": round(rss_after, 1),
        # Garbage collections stop every client at once: while they connected, and during the stream.
        **{f"gc{g}_while_connecting": collections({}, before, g) for g in range(3)},
        **{f"gc{g}_during_stream": collections(before, after, g) for g in range(3)},
        # Above the 2 cores, other work shared the machine: latency tails then say little about the notifier.
        "load_1m_after_stream": round(load, 2),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    on, off = results["batched"], results["unbatched"]
    summary: dict[str, Any] = {
        "settings": vars(args),
        **results,
        "frames_ratio": round(on["frames"] / off["frames"], 3),
        "bytes_ratio": round(on["bytes"] / off["bytes"], 3),
        "cpu_ratio": round(on["cpu_s"] / off["cpu_s"], 3),
        "terminal_p99_added_ms": round(on["terminal_ms_p99"] - off["terminal_ms_p99"], 1),
        "terminal_push_p99_added_ms": round(on["terminal_push_ms_p99"] - off["terminal_push_ms_p99"], 1),
    }
    summary["goals"] = {
        "frames_70pct_fewer": summary["frames_ratio"] <= 0.30,
        "bytes_50pct_fewer": summary["bytes_ratio"] <= 0.50,
        "progress_p99_le_150ms": on["progress_ms_p99"] <= 150,
        "progress_push_p99_le_150ms": on["progress_push_ms_p99"] <= 150,
        "terminal_added_le_20ms": summary["terminal_push_p99_added_ms"] <= 20,
        "rss_10k_clients_lt_1GB": max(on["rss_held_mb"], off["rss_held_mb"]) < 1024,
        "no_event_lost": on["lost"] == 0 and off["lost"] == 0,
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--owners", type=int, default=12, help="active users, two clients each")
    parser.add_argument("--jobs-per-owner", type=int, default=10)
    parser.add_argument("--job-seconds", type=float, default=12.0)
    parser.add_argument("--stagger", type=float, default=20.0)
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    from stemflow_dev.fixtures import STATE_DIR
    from stemflow_dev.stack import ensure_stack

    raise_fd_limit()
    urls = ensure_stack(STATE_DIR)
    results = {mode: asyncio.run(run_mode(mode, args, urls)) for mode in MODES}
    summary = report(args, results)

    def shown(value: Any) -> str:
        if isinstance(value, dict):  # full collections
            return f"{value['count']}: {value['total_s']} s, each <= {value['longest_at_most_s']} s"
        return str(value)

    print(f"{'':>26} {'batched':>10} {'unbatched':>10}")
    for key in results["batched"]:
        print(f"{key:>26} {shown(results['batched'][key]):>10} {shown(results['unbatched'][key]):>10}")
    for key in ("frames_ratio", "bytes_ratio", "cpu_ratio", "terminal_p99_added_ms", "terminal_push_p99_added_ms"):
        print(f"{key:>26} {summary[key]}")
    for goal, met in summary["goals"].items():
        print(f"{goal:>26} {'met' if met else 'NOT MET'}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "notifier.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
