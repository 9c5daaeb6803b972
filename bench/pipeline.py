"""End-to-end job latency through the five services, against the same work done in one process.

The baseline is the pipeline's own domain code called directly (normalise, separate,
analyze) on the same song with the same model; the ratio shows what the distributed
system adds (HTTP, broker hops, MongoDB, Redis, WebSocket) on top of the work itself.

    .venv/bin/python bench/pipeline.py [--jobs 10] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and bench/separator.py & co. would shadow the
# services' packages of the same names.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

RESULTS = Path(__file__).resolve().parent / "results"


def baseline(song: Path, repo: Path, runs: int) -> list[float]:
    import dataclasses

    import soundfile as sf

    from analyzer.features import analyze, warm_up
    from ingest.audio import normalise
    from separator.models import ModelCache
    from separator.separation import separate

    models = ModelCache(repo, "cpu")
    model = models.get("htdemucs")
    warm_up()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            started = time.perf_counter()
            out = Path(tmp) / "n.wav"
            normalise(song, out)
            mix, sr = sf.read(out, dtype="float32", always_2d=True)
            separate(model, mix.T.copy(), quality="fast", stems=4)
            dataclasses.asdict(analyze(mix.T.copy(), sr))
            times.append(time.perf_counter() - started)
    return times


async def through_services(song: Path, repo: Path, jobs: int, concurrency: int) -> tuple[list[float], float]:
    from pymongo import AsyncMongoClient

    from stemflow_dev.client import StemflowClient
    from stemflow_dev.fixtures import STATE_DIR, delete_namespace
    from stemflow_dev.procs import ProcessGroup
    from stemflow_dev.services import Ports, service_env, service_specs
    from stemflow_dev.stack import ensure_stack
    from stemflow_shared.auth import ApiKeys

    urls = ensure_stack(STATE_DIR)
    namespace = f"b{uuid.uuid4().hex[:8]}"
    ports = Ports.free()
    with tempfile.TemporaryDirectory() as tmp:
        env = service_env(
            urls,
            namespace=namespace,
            mongodb_db=f"stemflow_{namespace}",
            blob_dir=Path(tmp) / "blobs",
            model_repo=repo,
            ports=ports,
            extra={"TORCH_THREADS": "1", "LOG_LEVEL": "WARNING"},
        )
        group = ProcessGroup()
        group.start(service_specs(env, ports), Path(tmp) / "logs")
        mongo: AsyncMongoClient = AsyncMongoClient(urls.mongodb_url)
        try:
            group.wait_ready(timeout=300)
            key = await ApiKeys(mongo[f"stemflow_{namespace}"]).create("bench")
            client = StemflowClient(f"http://127.0.0.1:{ports.gateway}", f"ws://127.0.0.1:{ports.notifier}/v1/ws", key)
            gate = asyncio.Semaphore(concurrency)

            async def one() -> float:
                async with gate:
                    started = time.perf_counter()
                    job = await client.submit(song, stems=4, quality="fast")
                    await client.follow(job["id"], timeout_s=600)
                    elapsed = time.perf_counter() - started
                    assert (await client.job(job["id"]))["status"] == "completed"
                    return elapsed

            await one()  # first job warms the connections
            started = time.perf_counter()
            latencies = await asyncio.gather(*(one() for _ in range(jobs)))
            wall = time.perf_counter() - started
            await client.aclose()
            return list(latencies), wall
        finally:
            group.stop()
            await mongo.drop_database(f"stemflow_{namespace}")
            await mongo.close()
            await delete_namespace(urls.amqp_url, namespace)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()

    from stemflow_dev import demo_song
    from stemflow_dev.models import make_tiny_repo

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_tiny_repo(Path(tmp) / "models")
        song = demo_song.write(Path(tmp) / "song.wav", seconds=args.seconds)
        base = baseline(song, repo, max(3, args.jobs // 2))
        latencies, wall = asyncio.run(through_services(song, repo, args.jobs, args.concurrency))
    base_p50 = statistics.median(base)
    report = {
        "song_seconds": args.seconds,
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "model": "htdemucs (tiny, untrained)",
        "baseline_in_process_p50_s": round(base_p50, 3),
        "pipeline_p50_s": round(statistics.median(latencies), 3),
        "pipeline_p95_s": round(pct(latencies, 0.95), 3),
        "pipeline_jobs_per_minute": round(60 * args.jobs / wall, 1),
        "overhead_ratio_p50": round(statistics.median(latencies) / base_p50, 2),
        "overhead_s_p50": round(statistics.median(latencies) - base_p50, 3),
    }
    for key, value in report.items():
        print(f"{key:>28}: {value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
