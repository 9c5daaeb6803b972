"""Chaos run: many short jobs through the public API while workers are killed and the broker restarts.

Every `--poison-every`th job is a poison or a bad option instead (stemflow_dev.faults: a stage that
fails on every delivery, an invalid stage result, a model nobody serves; a trim past the end, samples
far past full scale; a model nobody serves through the API, which must be refused with 422).

Checks at the end: every job reached exactly one terminal state, every completed job has all its stems
and its analysis, every failed poison failed with its expected code, no job was lost, and a WebSocket
client saw no terminal event twice for a job.

    .venv/bin/python bench/chaos.py [--jobs 1000] [--kill-every 4] [--concurrency 16] [--poison-every 10]

The services run against a private RabbitMQ node (so restarting it disturbs nothing else) and the shared
MongoDB and Redis in a namespace of their own; tiny untrained models keep the jobs short.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import websockets
from websockets.exceptions import WebSocketException

# Run as a script, this folder comes first on sys.path, and bench/separator.py & co. would shadow the
# services' packages of the same names.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

RESULTS = Path(__file__).resolve().parent / "results"
WORKERS = ("ingest", "separator", "analyzer")
TERMINAL = ("stemflow.job.completed.v1", "stemflow.job.failed.v1", "stemflow.job.cancelled.v1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def watch(url: str, key: str, seen: Counter[tuple[str, str]], stop: asyncio.Event) -> None:
    """Count terminal events per job as a client sees them, reconnecting (with resume) if the notifier restarts."""
    last: str | None = None
    while not stop.is_set():
        try:
            async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
                await ws.send(json.dumps({"type": "subscribe", **({"last_event_id": last} if last else {})}))
                async for raw in ws:
                    for event in json.loads(raw).get("events", []):
                        last = event["id"]
                        if event["type"] in TERMINAL:
                            seen[(event["subject"], event["type"])] += 1
        except (OSError, WebSocketException):
            await asyncio.sleep(0.5)


async def chaos(group: Any, restart_broker: Any, every_s: float, stop: asyncio.Event, log: list[str]) -> None:
    rng = random.Random(7)
    broker_done = False
    started = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(every_s)
        if not broker_done and time.monotonic() - started > 3 * every_s:
            log.append(f"{time.monotonic() - started:7.1f}s restart broker")
            await asyncio.to_thread(restart_broker)
            broker_done = True
            continue
        name = rng.choice(WORKERS)
        log.append(f"{time.monotonic() - started:7.1f}s kill -9 {name}")
        group.kill(name)
        await asyncio.to_thread(group.restart, name, 5)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aio_pika
    import httpx
    import numpy as np
    import soundfile as sf
    from pymongo import AsyncMongoClient

    from stemflow_dev import demo_song
    from stemflow_dev.client import StemflowClient
    from stemflow_dev.faults import POISONS, Faults
    from stemflow_dev.fixtures import STATE_DIR
    from stemflow_dev.models import make_tiny_repo
    from stemflow_dev.procs import ProcessGroup
    from stemflow_dev.services import Ports, service_env, service_specs
    from stemflow_dev.stack import LocalPorts, ensure_stack, stop_stack
    from stemflow_shared.auth import ApiKeys
    from stemflow_shared.storage import FilesystemBlobStore
    from stemflow_shared.topology import Names

    shared = ensure_stack(STATE_DIR)
    namespace = f"chaos{uuid.uuid4().hex[:6]}"
    state = STATE_DIR / f"broker-{namespace}"
    local = LocalPorts(amqp=_free_port())
    urls = ensure_stack(state, mongodb_url=shared.mongodb_url, redis_url=shared.redis_url, ports=local)

    def restart_broker() -> None:
        stop_stack(state)
        ensure_stack(state, mongodb_url=shared.mongodb_url, redis_url=shared.redis_url, ports=local)

    tmp = Path(tempfile.mkdtemp(prefix="stemflow-chaos-"))
    ports = Ports.free()
    database = f"stemflow_{namespace}"
    env = service_env(
        urls,
        namespace=namespace,
        mongodb_db=database,
        blob_dir=tmp / "blobs",
        model_repo=make_tiny_repo(tmp / "models"),
        ports=ports,
        # Every job sends the same song: without this, all but the first would reuse its results and the
        # workers, whose crashes this run is about, would hardly see any work.
        extra={"TORCH_THREADS": "1", "LOG_LEVEL": "WARNING", "RATE_LIMIT_PER_MINUTE": "0", "REUSE_RESULTS": "false"},
    )
    group = ProcessGroup()
    group.start(service_specs(env, ports), tmp / "logs")
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(shared.mongodb_url)
    try:
        await asyncio.to_thread(group.wait_ready, 300)
        key = await ApiKeys(mongo[database]).create("chaos")
        client = StemflowClient(f"http://127.0.0.1:{ports.gateway}", f"ws://127.0.0.1:{ports.notifier}/v1/ws", key)
        song = demo_song.write(tmp / "short.wav", seconds=args.seconds)
        seen: Counter[tuple[str, str]] = Counter()
        stop = asyncio.Event()
        chaos_log: list[str] = []
        watcher = asyncio.create_task(watch(client.events_url, key, seen, stop))
        chaos_task = asyncio.create_task(chaos(group, restart_broker, args.kill_every, stop, chaos_log))
        gate = asyncio.Semaphore(args.concurrency)
        submitted: list[str] = []
        expected: dict[str, str] = {}  # poison job -> the code it must fail with
        refused = 0
        refused_as_expected = 0
        faults = Faults(urls.amqp_url, Names(namespace), FilesystemBlobStore(tmp / "blobs"), "chaos")
        loud = tmp / "loud.wav"
        sf.write(loud, (demo_song.render(args.seconds) * 1e30).astype(np.float32), 44100, subtype="FLOAT")
        kinds = [*POISONS, "trim_past_the_end", "samples_far_past_full_scale", "unserved_model_by_api"]

        async def poison(kind: str) -> None:
            nonlocal refused_as_expected
            if kind in POISONS:
                job_id = await getattr(faults, kind)()
                code = POISONS[kind]
            elif kind == "trim_past_the_end":
                job_id = (await client.submit(song, trim_start=args.seconds + 5, separate=False))["id"]
                code = "trim_out_of_range"
            elif kind == "samples_far_past_full_scale":
                job_id = (await client.submit(loud, separate=False))["id"]
                code = "samples_out_of_range"
            else:
                try:
                    await client.submit(song, model="htdemucs_6s", stems=6)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code == 422 and exc.response.json()["code"] == "model_unavailable":
                        refused_as_expected += 1
                        return
                    raise  # e.g. a 503 while the gateway reconnects: tried again
                raise RuntimeError("a model nobody serves was not refused with 422 model_unavailable")
            submitted.append(job_id)
            expected[job_id] = code

        async def submit(number: int) -> None:
            nonlocal refused
            async with gate:
                for _ in range(20):
                    try:
                        if args.poison_every and number % args.poison_every == args.poison_every - 1:
                            await poison(kinds[(number // args.poison_every) % len(kinds)])
                        else:
                            submitted.append((await client.submit(song, stems=2, quality="fast"))["id"])
                        return
                    except (OSError, httpx.HTTPError, aio_pika.exceptions.AMQPError):
                        await asyncio.sleep(0.5)  # the gateway (or broker) may be restarting
                refused += 1

        started = time.perf_counter()
        await asyncio.gather(*(submit(n) for n in range(args.jobs)))
        submit_s = time.perf_counter() - started

        async def listed() -> dict[str, dict[str, Any]]:
            jobs: dict[str, dict[str, Any]] = {}
            cursor = None
            while True:
                query = {"limit": 100, **({"cursor": cursor} if cursor else {})}
                page = (await client.http.get("/v1/jobs", params=query)).json()
                jobs.update({item["id"]: item for item in page["items"]})
                if not (cursor := page["next_cursor"]):
                    return jobs

        async def all_terminal() -> dict[str, dict[str, Any]]:
            while True:
                jobs = await listed()
                if all(jobs.get(j, {}).get("status") in ("completed", "failed", "cancelled") for j in submitted):
                    return jobs
                await asyncio.sleep(2)  # another system's state: polled

        try:
            jobs = await asyncio.wait_for(all_terminal(), args.timeout)
        except TimeoutError:
            jobs = await listed()
        jobs = {job_id: jobs.get(job_id, {"status": "lost"}) for job_id in submitted}
        stop.set()
        chaos_task.cancel()
        total_s = time.perf_counter() - started
        await asyncio.sleep(3)  # late duplicates, if any, would arrive now
        watcher.cancel()
        statuses = Counter(j["status"] for j in jobs.values())
        incomplete = [
            job_id
            for job_id, j in jobs.items()
            if j["status"] == "completed" and (len(j["result"]["stems"]) != 2 or not j["result"]["analysis"])
        ]
        # A poison must fail with its code; an ordinary job must not fail at all.
        wrong_outcome = [
            job_id
            for job_id, j in jobs.items()
            if j["status"] in ("completed", "failed", "cancelled")
            and (j["status"], (j.get("error") or {}).get("code"))
            != (("failed", expected[job_id]) if job_id in expected else ("completed", None))
        ]
        lost = [job_id for job_id, j in jobs.items() if j["status"] == "lost"]
        terminal_counts = Counter(job_id for (job_id, _), n in seen.items() for _ in range(n))
        duplicated = [job_id for job_id, n in terminal_counts.items() if n > 1]
        missing_event = [job_id for job_id in submitted if terminal_counts[job_id] == 0]
        await client.aclose()
        return {
            "jobs": args.jobs,
            "accepted": len(submitted),
            "refused_at_submit": refused,
            "completed": statuses.get("completed", 0),
            "failed": statuses.get("failed", 0),
            "not_terminal": sum(
                n for s, n in statuses.items() if s not in ("completed", "failed", "cancelled", "lost")
            ),
            "lost": len(lost),
            "completed_without_all_results": len(incomplete),
            "poisons": len(expected) + refused_as_expected,
            "poisons_refused_at_submit_as_expected": refused_as_expected,
            "terminal_with_wrong_outcome_or_code": len(wrong_outcome),
            "wrong_outcomes": {job_id: jobs[job_id].get("error") for job_id in wrong_outcome[:20]},
            "duplicated_terminal_events": len(duplicated),
            "jobs_without_terminal_event_seen": len(missing_event),
            "chaos_actions": chaos_log,
            "submit_seconds": round(submit_s, 1),
            "total_seconds": round(total_s, 1),
        }
    finally:
        group.stop()
        await mongo.drop_database(database)
        await mongo.close()
        stop_stack(state)  # the private broker, with this run's queues
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each song")
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--poison-every", type=int, default=10, help="every Nth job is a poison (0: none)")
    report = asyncio.run(run(parser.parse_args()))
    for key, value in report.items():
        if key not in ("chaos_actions", "wrong_outcomes"):
            print(f"{key:>34}: {value}")
    print(f"{'chaos actions':>34}: {len(report['chaos_actions'])}")
    bad = sum(
        report[k]
        for k in (
            "lost",
            "not_terminal",
            "completed_without_all_results",
            "terminal_with_wrong_outcome_or_code",
            "duplicated_terminal_events",
            "jobs_without_terminal_event_seen",
        )
    )
    print(f"{'problems (goal 0)':>34}: {bad}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
