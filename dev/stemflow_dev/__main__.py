"""`python -m stemflow_dev up|down|demo|status`: the local stack and the demo (see `make up`, `make demo`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from .procs import ProcessGroup, stop_saved
from .services import Ports, service_env, service_specs
from .stack import StackUrls, ensure_stack, stop_stack

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("STEMFLOW_STATE_DIR", REPO / ".stemflow"))
REAL_MODELS = REPO / ".models"


def model_repo() -> tuple[Path, bool]:
    """The model repository to serve, and whether its weights are untrained test weights."""
    configured = os.environ.get("MODEL_REPO")
    if configured:
        return Path(configured), False
    if any(REAL_MODELS.glob("*.th")) and not (REAL_MODELS / "UNTRAINED").exists():
        return REAL_MODELS, False
    from .models import make_tiny_repo

    return make_tiny_repo(STATE / "tiny-models"), True


def up() -> tuple[StackUrls, Ports]:
    urls = ensure_stack(STATE)
    repo, untrained = model_repo()
    ports = Ports()
    env = service_env(
        urls,
        namespace=os.environ.get("STEMFLOW_NAMESPACE", "stemflow"),
        mongodb_db=os.environ.get("MONGODB_DB", "stemflow"),
        blob_dir=STATE / "blobs",
        model_repo=repo,
        ports=ports,
        extra={"MODELS": os.environ.get("MODELS", "htdemucs")},
    )
    stop_saved(STATE)
    group = ProcessGroup()
    group.start(service_specs(env, ports), STATE / "logs")
    group.save(STATE)
    try:
        group.wait_ready(timeout=300)
    except Exception:
        group.stop()
        raise
    print("Stemflow is up:")
    print(f"  gateway   http://127.0.0.1:{ports.gateway}  (API docs: /docs)")
    print(f"  notifier  ws://127.0.0.1:{ports.notifier}/v1/ws")
    metrics_ports = ",".join(
        str(ports.metrics(name)) for name in ("gateway", "notifier", "ingest", "separator", "analyzer")
    )
    print(f"  metrics   http://127.0.0.1:{{{metrics_ports}}}/metrics")
    print(f"  logs      {STATE / 'logs'}")
    if untrained:
        print("  NOTE: no real model weights here (run `make models` where internet exists);")
        print("        the separator runs tiny UNTRAINED models: stems are not musically meaningful.")
    print("Stop it with `make down`.")
    return urls, ports


def down() -> None:
    stop_saved(STATE)
    stop_stack(STATE)
    print("Stemflow is down.")


async def demo(urls: StackUrls, ports: Ports) -> int:
    from pymongo import AsyncMongoClient

    from stemflow_shared.auth import ApiKeys

    mongo: AsyncMongoClient = AsyncMongoClient(urls.mongodb_url)
    try:
        key = await ApiKeys(mongo[os.environ.get("MONGODB_DB", "stemflow")]).create("demo", "make demo")
    finally:
        await mongo.close()
    return await run_demo(f"http://127.0.0.1:{ports.gateway}", f"ws://127.0.0.1:{ports.notifier}/v1/ws", key)


async def run_demo(gateway_url: str, events_url: str, key: str) -> int:
    """Submit the demo song through the public API, follow it live, fetch and print the results."""
    from . import demo_song
    from .client import StemflowClient

    STATE.mkdir(parents=True, exist_ok=True)
    song = demo_song.write(STATE / "demo-song.wav", seconds=20.0, bpm=120.0)
    client = StemflowClient(gateway_url, events_url, key)
    try:
        job = await client.submit(song, stems=4, quality="fast", output_format="wav")
        print(f"\nsubmitted {song.name} as job {job['id']}")

        def show(event: dict) -> None:
            data = event["data"]
            if event["type"].endswith("job.progress.v1"):
                p = data["progress"]
                bar = "#" * int(p["overall"] / 4)
                print(f"\r  [{bar:<25}] {p['overall']:5.1f}%  {data['status']:<10}", end="", flush=True)
            else:
                print(f"\n  {event['type']}")

        await client.follow(job["id"], on_event=show)
        done = await client.job(job["id"])
        if done["status"] != "completed":
            print(f"job ended {done['status']}: {json.dumps(done['error'])}")
            return 1
        paths = await client.download_stems(done, STATE / "demo-output" / job["id"])
        print("stems:")
        for path in paths:
            print(f"  {path}")
        a = done["result"]["analysis"]
        print("analysis:")
        print(f"  tempo     {a['tempo_bpm']:.1f} BPM (confidence {a['tempo_confidence']:.2f})")
        print(f"  key       {a['key']} (confidence {a['key_confidence']:.2f})")
        print(f"  loudness  {a['loudness_lufs']:.1f} LUFS, true peak {a['true_peak_dbfs']:.1f} dBFS")
        print(f"  beats     {a['beat_count']} over {a['duration_s']:.1f} s")
        if done["result"]["separation"]["untrained"]:
            print("NOTE: these stems come from UNTRAINED test weights (no internet here for the real ones).")
        print(f"API key for trying it yourself: {key}")
        return 0
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemflow_dev")
    parser.add_argument("command", choices=["up", "down", "demo", "submit"])
    args = parser.parse_args(argv)
    if args.command == "down":
        down()
        return 0
    if args.command == "submit":
        # Against a stack that runs elsewhere (Tilt's port forwards, a cluster): URLs and key from the env.
        return asyncio.run(
            run_demo(
                os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000"),
                os.environ.get("EVENTS_URL", "ws://127.0.0.1:8001/v1/ws"),
                os.environ["STEMFLOW_API_KEY"],
            )
        )
    urls, ports = up()
    if args.command == "demo":
        return asyncio.run(demo(urls, ports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
