"""Notifier benchmark: many WebSocket clients on loopback, a realistic stream of job events through RabbitMQ,
with batching on (100 ms window, 50 events) and off (window 0, one event a frame), side by side.

    .venv/bin/python bench/notifier.py [--clients 10000] [--owners 12] [--jobs-per-owner 10] [--processes 4]
    .venv/bin/python bench/notifier.py --modes batched --stagger 8 --job-seconds 8 --snapshot-max-jobs 0 \
        --baseline-pythonpath OLD/services/notifier/src:OLD/shared/src

(OLD: `git archive <commit> services/notifier/src shared/src` of the commit to compare with; the notifier of
each variant runs from its own code and shared library, everything else from the checkout. Variants run one
after the other, mode by mode, on fresh processes and namespaces.)

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

Garbage collection: every collection of the notifier process is timed by a gc.callbacks hook the bench
installs before the notifier's own code runs (the same hook for every variant), so the figures are exact
pauses, not histogram buckets: count, max and p99 per generation and overall, while the clients connect,
during the stream and while they all leave at once, with the objects each collection found unreachable and
the objects the collector tracks (frozen and not) before, with the clients and once they left (what they left
behind, by type, and what freezing kept in cycles). A probe in the notifier's event loop (a 5 ms sleep) records
how late it wakes: the stalls clients see, collections or long loop iterations. Diagnosis: --profile-leaving
(cProfile of the loop while the clients leave), --classify-garbage (what the collections then find, by type).
"""

from __future__ import annotations

import argparse
import array
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
# Run as a script, this file's folder comes first on sys.path, where bench/gateway.py shadows the gateway package.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]
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


def connections_gone(port: int, timeout: float = 120.0) -> None:
    """Wait until the notifier's open WebSocket count (its /metrics) is back to zero."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        if "\nstemflow_ws_connections 0.0\n" in text:
            return
        time.sleep(0.5)


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


# --- the notifier's garbage collections, timed inside its process --------------------------------------------

# Run as `python -c` in place of `-m notifier.main`: a gc.callbacks hook times every collection (wall time of the
# stop-the-world pause, its generation, when it ended) into an array of floats that a thread appends to a file
# twice a second; on request (a file `<log>.census` appearing) the thread also counts the objects the collector
# tracks, then times a full collection (what the next one CPython starts on its own would cost; between the phases
# whose pauses are reported). The hook allocates nothing the collector tracks but one tuple per collection.
GC_RECORDER = """
import array, gc, json, os, sys, threading, time
LAG_TICK = 0.005
log = os.environ["BENCH_GC_LOG"]
pauses, started = array.array("d"), [0.0, 0.0]
def timed(phase, info):
    if phase == "start":
        started[0], started[1] = time.perf_counter(), time.thread_time()
    else:
        wall, cpu = time.perf_counter() - started[0], time.thread_time() - started[1]
        pauses.extend((time.time(), info["generation"], wall, cpu, info["collected"]))
gc.callbacks.append(timed)
lags, profiling = array.array("d"), [False]
async def probe_lag():
    import asyncio
    profiler = None
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(LAG_TICK)
        late = time.perf_counter() - asked - LAG_TICK
        if late > 0.002:
            lags.extend((time.time(), late))
        if profiling[0] != (profiler is not None):  # cProfile profiles the thread that enables it: the loop's
            if profiler is None:
                import cProfile
                profiler = cProfile.Profile()
                profiler.enable()
            else:
                profiler.disable()
                profiler.dump_stats(log + ".prof")
                profiler = None
import uvicorn
serve = uvicorn.Server.serve
async def serve_probed(self, *args, **kwargs):
    import asyncio
    probe = asyncio.get_running_loop().create_task(probe_lag())
    try:
        await serve(self, *args, **kwargs)
    finally:
        probe.cancel()
uvicorn.Server.serve = serve_probed
def flush():
    written, lags_written = 0, 0
    while True:
        time.sleep(0.5)
        end = len(pauses) // 5 * 5
        with open(log + ".pauses", "ab") as f:
            f.write(pauses[written:end].tobytes())
        written = end
        end = len(lags) // 2 * 2
        with open(log + ".lags", "ab") as f:
            f.write(lags[lags_written:end].tobytes())
        lags_written = end
        if os.path.exists(log + ".census"):
            with open(log + ".census") as f:
                request = f.read()
            os.remove(log + ".census")
            if request in ("keep", "profile", "unprofile"):
                if request == "keep":  # from now on, what collections find unreachable is kept, to be classified
                    gc.set_debug(gc.DEBUG_SAVEALL)
                profiling[0] = request == "profile"
                time.sleep(0.1)  # the loop takes it up within a tick
                with open(log + ".state.tmp", "w") as f:
                    json.dump({}, f)
                os.replace(log + ".state.tmp", log + ".state")
                continue
            thaw = request in ("thaw", "types")
            kept = {}
            if gc.get_debug() & gc.DEBUG_SAVEALL:
                gc.set_debug(0)
                for obj in gc.garbage:
                    kind = type(obj)
                    name = f"{getattr(kind, '__module__', '?')}.{kind.__qualname__}"
                    kept[name] = kept.get(name, 0) + 1
                gc.garbage.clear()
            state = {"tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count(),
                     "threshold": gc.get_threshold(), "count": gc.get_count(), "blocks": sys.getallocatedblocks()}
            if request == "thaw":  # first what the young collections would find, as they would (freezing the rest)
                state["young_unreachable"] = gc.collect(1)
                state["blocks_after_young_collection"] = sys.getallocatedblocks()
            if thaw:
                gc.unfreeze()
            if request == "thaw":  # then what freezing kept: cycles, by type
                gc.set_debug(gc.DEBUG_SAVEALL)
            wall, cpu = time.perf_counter(), time.thread_time()
            state["unreachable"] = gc.collect()
            state["full_collection_ms"] = round(1000 * (time.perf_counter() - wall), 1)
            state["full_collection_cpu_ms"] = round(1000 * (time.thread_time() - cpu), 1)
            if request == "thaw":
                gc.set_debug(0)
                cycles = {}
                for obj in gc.garbage:
                    kind = type(obj)
                    name = f"{getattr(kind, '__module__', '?')}.{kind.__qualname__}"
                    cycles[name] = cycles.get(name, 0) + 1
                state["unreachable_by_type"] = dict(sorted(cycles.items(), key=lambda kv: -kv[1])[:25])
                gc.garbage.clear()
                gc.collect()
            state["blocks_after_collection"] = sys.getallocatedblocks()
            if thaw:  # every object the collector knows of, by type (the collection froze them all again)
                gc.unfreeze()
                kinds = {}
                for obj in gc.get_objects():
                    kind = type(obj)
                    name = f"{getattr(kind, '__module__', '?')}.{kind.__qualname__}"
                    kinds[name] = kinds.get(name, 0) + 1
                state["types"] = kinds
                gc.freeze()
            if kept:
                state["found_unreachable_by_type"] = dict(sorted(kept.items(), key=lambda kv: -kv[1])[:25])
                state["found_unreachable"] = sum(kept.values())
            with open(log + ".state.tmp", "w") as f:
                json.dump(state, f)
            os.replace(log + ".state.tmp", log + ".state")
threading.Thread(target=flush, daemon=True).start()
sys.argv[0] = "notifier"
from notifier.main import main
main()
"""


Pause = tuple[float, int, float, float, int]


def gc_pauses(log: Path) -> list[Pause]:
    """(ended at, generation, seconds, CPU seconds, objects found unreachable) of every collection the notifier
    has reported so far."""
    path = Path(f"{log}.pauses")
    v = array.array("d", path.read_bytes() if path.exists() else b"")
    return [(v[i], int(v[i + 1]), v[i + 2], v[i + 3], int(v[i + 4])) for i in range(0, len(v) - 4, 5)]


def loop_lags(log: Path) -> list[tuple[float, float]]:
    """(noticed at, seconds) of every time the notifier's event loop woke its 5 ms probe over 2 ms late."""
    path = Path(f"{log}.lags")
    v = array.array("d", path.read_bytes() if path.exists() else b"")
    return [(v[i], v[i + 1]) for i in range(0, len(v) - 1, 2)]


def gc_census(log: Path, timeout: float = 60.0, thaw: bool = False, request: str | None = None) -> dict[str, Any]:
    """The objects the notifier's collector tracks, frozen and not, counted inside its process, and a timed full
    collection with what it found unreachable; with `thaw`, of frozen objects too (gc.unfreeze first: cycles that
    freezing would have kept forever). After a `keep` request, it also classifies by type what the collections
    found unreachable since."""
    state = Path(f"{log}.state")
    state.unlink(missing_ok=True)
    Path(f"{log}.census").write_text(request or ("thaw" if thaw else ""))
    deadline = time.monotonic() + timeout
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return json.loads(state.read_text()) if state.exists() else {}


def pause_figures(pauses: list[Pause], lags: list[tuple[float, float]], start: float, end: float) -> dict[str, Any]:
    """Count, total, max and p99 of the collections that ended in [start, end], overall and by generation, in
    wall time (what clients wait) and in the notifier's CPU time (the same less the time others had the cores),
    with the objects they found unreachable; and the event loop's longest lateness (collections or callbacks)."""
    within = [(g, wall, cpu, found) for t, g, wall, cpu, found in pauses if start <= t <= end]
    late = sorted(lag for t, lag in lags if start <= t <= end)
    figures: dict[str, Any] = {
        "loop_lag": {
            "max_ms": round(1000 * late[-1], 1) if late else 0.0,
            "over_20ms": sum(lag > 0.020 for lag in late),
            "over_50ms": sum(lag > 0.050 for lag in late),
        }
    }
    for name, chosen in (("all", within), *((f"gen{g}", [x for x in within if x[0] == g]) for g in range(3))):
        walls, cpus = sorted(x[1] for x in chosen), sorted(x[2] for x in chosen)
        figures[name] = {
            "count": len(walls),
            "found_unreachable": sum(x[3] for x in chosen),
            "found_in_longest": max(chosen, key=lambda x: x[1])[3] if chosen else 0,
            "total_ms": round(1000 * sum(walls), 1),
            "max_ms": round(1000 * walls[-1], 2) if walls else 0.0,
            "p99_ms": round(1000 * walls[min(len(walls) - 1, int(0.99 * len(walls)))], 2) if walls else 0.0,
            "cpu_total_ms": round(1000 * sum(cpus), 1),
            "cpu_max_ms": round(1000 * cpus[-1], 2) if cpus else 0.0,
            "cpu_p99_ms": round(1000 * cpus[min(len(cpus) - 1, int(0.99 * len(cpus)))], 2) if cpus else 0.0,
        }
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


async def run_mode(mode: str, args: argparse.Namespace, urls: Any, pythonpath: str | None) -> dict[str, Any]:
    from stemflow_dev.procs import ProcessGroup, ServiceSpec
    from stemflow_shared.messaging import Broker
    from stemflow_shared.topology import Names

    namespace, clients_port = f"bn{mode[0]}{uuid.uuid4().hex[:8]}", _free_port()
    database = f"stemflow_{namespace}"
    clients, owners, timeline = plan(args)
    logs = LOGS / f"{mode}-{uuid.uuid4().hex[:6]}"
    logs.mkdir(parents=True, exist_ok=True)
    gc_log = logs / "notifier-gc"
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
        "BLOB_DIR": str(logs / "blobs"),
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
        "BENCH_GC_LOG": str(gc_log),
        **({"SNAPSHOT_MAX_JOBS": str(args.snapshot_max_jobs)} if args.snapshot_max_jobs is not None else {}),
        **(
            {"PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))}
            if pythonpath
            else {}
        ),
    }
    gateway = ServiceSpec(
        "gateway", [sys.executable, "-m", "gateway.main"], gateway_env, f"http://127.0.0.1:{gateway_port}/readyz"
    )
    spec = ServiceSpec("notifier", [sys.executable, "-c", GC_RECORDER], env, f"http://127.0.0.1:{clients_port}/readyz")
    group, context = ProcessGroup(), mp.get_context("spawn")
    reports, stop = context.Queue(), context.Event()
    url = f"ws://127.0.0.1:{clients_port}/v1/ws"
    procs = [context.Process(target=probe_process, args=(urls.amqp_url, namespace, reports, stop))]
    procs += [
        context.Process(target=client_process, args=(url, clients[i :: args.processes], reports, stop))
        for i in range(args.processes)
    ]
    group.start([gateway, spec], logs)
    broker = await Broker(urls.amqp_url, Names(namespace), "bench").connect()
    try:
        group.wait_ready(timeout=120)
        census_before = await asyncio.to_thread(gc_census, gc_log, 60.0, False, "types")
        # After the census: its full collection is the bench's, not a pause of the notifier's own.
        pid, started, wall_started = group.pid("notifier"), time.monotonic(), time.time()
        cpu_started = cpu_seconds(pid)
        for proc in procs:
            proc.start()
        for _ in procs:
            await asyncio.to_thread(reports.get, True, 900)  # the probe and every client process are ready
        connect_s, held = time.monotonic() - started, rss_mb(pid)
        before, cpu_before, wall_before = scrape(clients_port), cpu_seconds(pid), time.time()
        await publish(broker, timeline)
        for _ in range(args.processes):
            assert (await asyncio.to_thread(reports.get, True, args.job_seconds + 300))[0] == "done"
        after, cpu_after, rss_after, wall_after = scrape(clients_port), cpu_seconds(pid), rss_mb(pid), time.time()
        load = os.getloadavg()[0]
        await asyncio.sleep(1.0)  # the recorder's last pauses reach its file
        pauses = gc_pauses(gc_log)
        census = await asyncio.to_thread(gc_census, gc_log)
        if args.classify_garbage:
            await asyncio.to_thread(gc_census, gc_log, 60.0, False, "keep")
        if args.profile_leaving:
            await asyncio.to_thread(gc_census, gc_log, 60.0, False, "profile")
        wall_leaving = time.time()
        stop.set()
        results = [await asyncio.to_thread(reports.get, True, 120) for _ in procs]
        for proc in procs:
            proc.join(60)
        await asyncio.to_thread(connections_gone, clients_port)
        wall_left = time.time()
        if args.profile_leaving:
            await asyncio.to_thread(gc_census, gc_log, 60.0, False, "unprofile")
            await asyncio.sleep(1.0)
            print_profile(
                Path(f"{gc_log}.prof"), f"{mode}, {pythonpath or 'checkout'}: the notifier while clients left"
            )
        census_left = await asyncio.to_thread(gc_census, gc_log, 120.0, True)  # over 0.5 s: the pauses are in
        pauses, lags = gc_pauses(gc_log), loop_lags(gc_log)
        # What the clients left behind, by type: the objects of the heap after they left less those before they came.
        kinds_before, kinds_left = census_before.pop("types", {}), census_left.pop("types", {})
        census_left["objects_before_clients"] = sum(kinds_before.values())
        census_left["objects_once_left"] = sum(kinds_left.values())
        census_left["left_behind_by_type"] = dict(
            sorted(
                ((k, n - kinds_before.get(k, 0)) for k, n in kinds_left.items() if n - kinds_before.get(k, 0) > 50),
                key=lambda kv: -kv[1],
            )[:30]
        )
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
        "connect_cpu_s": round(cpu_before - cpu_started, 2),
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
        # Garbage collections stop every client at once: while they connected, during the stream and while they
        # left (exact pauses from the recorder; the histogram's bucket bounds as the service reports them beside).
        "gc_while_connecting": pause_figures(pauses, lags, wall_started, wall_before),
        "gc_during_stream": pause_figures(pauses, lags, wall_before, wall_after),
        "gc_while_clients_leave": pause_figures(pauses, lags, wall_leaving, wall_left),
        # Objects the collector tracks (and frozen ones) before the clients came, with them all connected after
        # the stream, and once they had left: frozen objects that stay are caches, or cycles never collected
        # (the last census unfreezes everything first: `unreachable` counts them).
        "gc_objects_before_clients": census_before,
        "gc_objects_after_stream": census,
        "gc_objects_after_clients_left": census_left,
        **{f"gc{g}_histogram_during_stream": collections(before, after, g) for g in range(3)},
        # Above the 2 cores, other work shared the machine: latency tails then say little about the notifier.
        "load_1m_after_stream": round(load, 2),
    }


def print_profile(path: Path, title: str) -> None:
    import pstats

    print(f"--- {title} ({path})")
    if path.exists():
        pstats.Stats(str(path)).sort_stats("tottime").print_stats(30)
        pstats.Stats(str(path)).sort_stats("cumulative").print_stats(30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def report(args: argparse.Namespace, results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Results by variant (current, baseline) and mode; batching's ratios, the goals, current over baseline."""
    current = results["current"]
    summary: dict[str, Any] = {"settings": vars(args), **results, "goals": {}}
    if "batched" in current and "unbatched" in current:
        on, off = current["batched"], current["unbatched"]
        summary["batching"] = {
            "frames_ratio": round(on["frames"] / off["frames"], 3),
            "bytes_ratio": round(on["bytes"] / off["bytes"], 3),
            "cpu_ratio": round(on["cpu_s"] / off["cpu_s"], 3),
            "terminal_p99_added_ms": round(on["terminal_ms_p99"] - off["terminal_ms_p99"], 1),
            "terminal_push_p99_added_ms": round(on["terminal_push_ms_p99"] - off["terminal_push_ms_p99"], 1),
        }
        summary["goals"] |= {
            "frames_70pct_fewer": summary["batching"]["frames_ratio"] <= 0.30,
            "bytes_50pct_fewer": summary["batching"]["bytes_ratio"] <= 0.50,
            "terminal_added_le_20ms": summary["batching"]["terminal_push_p99_added_ms"] <= 20,
        }
    if "batched" in current:  # the default settings: issue 23's goals
        on = current["batched"]
        summary["goals"] |= {
            "gc_longest_pause_le_50ms": longest_pause_ms(on) <= 50,
            # Not only collections stop every client: so does one long loop iteration (clients leaving at once).
            "loop_longest_stall_le_50ms": longest_stall_ms(on) <= 50,
            "progress_p99_le_150ms": on["progress_ms_p99"] <= 150,
            "terminal_p99_le_50ms": on["terminal_ms_p99"] <= 50,
            "rss_le_444mb": max(on["rss_held_mb"], on["rss_after_stream_mb"]) <= 444,
        }
    summary["goals"]["no_event_lost"] = all(r["lost"] == 0 for r in current.values())
    if "baseline" in results:
        summary["current_vs_baseline"] = {
            mode: {key: _ratio(figures(current[mode])[key], figures(theirs)[key]) for key in figures(theirs)}
            for mode, theirs in results["baseline"].items()
            if mode in current
        }
    return summary


GC_PHASES = ("gc_while_connecting", "gc_during_stream", "gc_while_clients_leave")


def longest_pause_ms(run: dict[str, Any]) -> float:
    return max(run[phase]["all"]["max_ms"] for phase in GC_PHASES if phase in run)


def longest_stall_ms(run: dict[str, Any]) -> float:
    return max(run[phase]["loop_lag"]["max_ms"] for phase in GC_PHASES if phase in run)


def figures(run: dict[str, Any]) -> dict[str, float]:
    """The figures set against the baseline's."""
    return {
        "gc_longest_pause_ms": longest_pause_ms(run),
        "loop_longest_stall_ms": longest_stall_ms(run),
        "gc_stream_p99_ms": run["gc_during_stream"]["all"]["p99_ms"],
        "gc_total_ms": sum(run[phase]["all"]["total_ms"] for phase in GC_PHASES if phase in run),
        "gc_longest_pause_cpu_ms": max(run[phase]["all"]["cpu_max_ms"] for phase in GC_PHASES if phase in run),
        "gc_cpu_total_ms": sum(run[phase]["all"]["cpu_total_ms"] for phase in GC_PHASES if phase in run),
        "progress_ms_p99": run["progress_ms_p99"],
        "terminal_ms_p99": run["terminal_ms_p99"],
        "rss_held_mb": run["rss_held_mb"],
        "connect_cpu_s": run["connect_cpu_s"],
        "cpu_s": run["cpu_s"],
    }


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return round(ours / theirs, 3) if ours is not None and theirs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--owners", type=int, default=12, help="active users, two clients each")
    parser.add_argument("--jobs-per-owner", type=int, default=10)
    parser.add_argument("--job-seconds", type=float, default=12.0)
    parser.add_argument("--stagger", type=float, default=20.0)
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--modes", default=",".join(MODES), help="batched, unbatched or both")
    parser.add_argument(
        "--snapshot-max-jobs",
        type=int,
        help="the notifier's SNAPSHOT_MAX_JOBS; 0: a subscription to all jobs does not ask the gateway for their "
        "state, so connecting the clients is bound by the notifier rather than by the gateway and MongoDB",
    )
    parser.add_argument(
        "--classify-garbage",
        action="store_true",
        help="keep what the collections find unreachable while the clients leave (gc.DEBUG_SAVEALL) and count it "
        "by type in the last census; a diagnosis: kept garbage is not freed, so those pauses are not the real ones",
    )
    parser.add_argument(
        "--profile-leaving",
        action="store_true",
        help="profile the notifier's event loop (cProfile) while the clients leave, and print the profile",
    )
    parser.add_argument("--baseline-pythonpath", help="also run the notifier from this code (first on PYTHONPATH)")
    parser.add_argument("--current-pythonpath", help="run the current notifier from this code, not the checkout")
    args = parser.parse_args()

    from stemflow_dev.fixtures import STATE_DIR
    from stemflow_dev.stack import ensure_stack

    raise_fd_limit()
    urls = ensure_stack(STATE_DIR)
    modes = [m for m in MODES if m in args.modes.split(",")]
    variants = {"current": args.current_pythonpath}
    variants |= {"baseline": args.baseline_pythonpath} if args.baseline_pythonpath else {}
    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {variant: {} for variant in variants}
    for mode in modes:  # mode by mode, the variants one after the other, so drifting load hits both alike
        for variant, pythonpath in variants.items():
            results[variant][mode] = asyncio.run(run_mode(mode, args, urls, pythonpath))
            RESULTS.mkdir(exist_ok=True)  # so far, in case the run is cut short
            (RESULTS / "notifier.partial.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = report(args, results)
    summary["load_before"] = [round(x, 2) for x in load_before]
    summary["load_after"] = [round(x, 2) for x in os.getloadavg()]

    def shown(value: Any) -> str:
        if isinstance(value, dict) and "all" in value:  # exact pauses
            a = value["all"]
            full = value["gen2"]
            return (
                f"{a['count']}: max {a['max_ms']} p99 {a['p99_ms']} ms, cpu max {a['cpu_max_ms']} total "
                f"{a['cpu_total_ms']} (full {full['count']}, max {full['max_ms']}), found {a['found_unreachable']} "
                f"({a['found_in_longest']} in the longest); loop late max {value['loop_lag']['max_ms']} ms, "
                f"{value['loop_lag']['over_50ms']} times over 50 ms"
            )
        if isinstance(value, dict) and "longest_at_most_s" in value:  # the histogram
            return f"{value['count']}: {value['total_s']} s, each <= {value['longest_at_most_s']} s"
        return str(value)

    columns = [(variant, mode) for variant in variants for mode in modes]
    print(f"{'':>32} " + " ".join(f"{variant + ' ' + mode:>24}" for variant, mode in columns))
    for key in results["current"][modes[0]]:
        print(f"{key:>32} " + " ".join(f"{shown(results[v][m][key]):>24}" for v, m in columns))
    for key, value in summary.get("batching", {}).items():
        print(f"{key:>32} {value}")
    for mode, ratios in summary.get("current_vs_baseline", {}).items():
        print(f"current / baseline, {mode}:")
        for key, value in ratios.items():
            print(f"{key:>32} {value}")
    for goal, met in summary["goals"].items():
        print(f"{goal:>32} {'met' if met else 'NOT MET'}")
    print(f"load average before {summary['load_before']}, after {summary['load_after']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "notifier.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
