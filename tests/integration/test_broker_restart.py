"""RabbitMQ restarted while jobs are in flight: publishers retry, consumers reconnect, no job is lost.

The five services run against a private RabbitMQ node started for this test (MongoDB and Redis are the
shared ones, in this run's namespace), so restarting it disturbs nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
from websockets.exceptions import WebSocketException

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient
from stemflow_dev.fixtures import STATE_DIR, Isolation
from stemflow_dev.models import make_tiny_repo
from stemflow_dev.procs import ProcessGroup
from stemflow_dev.services import Ports, service_env, service_specs
from stemflow_dev.stack import LocalPorts, StackUrls, ensure_stack, stop_stack
from stemflow_shared.auth import ApiKeys

from .conftest import ARTIFACTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOBS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def private_broker(isolation: Isolation, stack: StackUrls) -> Iterator[tuple[Path, LocalPorts, StackUrls]]:
    # Under the project's state folder: the rabbitmq user must reach it (pytest's tmp dirs are private).
    state = STATE_DIR / f"broker-{isolation.namespace}"
    ports = LocalPorts(amqp=_free_port())
    urls = ensure_stack(state, mongodb_url=stack.mongodb_url, redis_url=stack.redis_url, ports=ports)
    yield state, ports, urls
    stop_stack(state)
    shutil.rmtree(state, ignore_errors=True)


async def test_jobs_in_flight_survive_a_broker_restart(
    private_broker: Any, isolation: Isolation, mongo_db: Any, tmp_path: Path
) -> None:
    state, ports, urls = private_broker
    assert urls.amqp_url.endswith(f":{ports.amqp}/") or f":{ports.amqp}" in urls.amqp_url
    service_ports = Ports.free()
    # A database of its own: the session's system shares the MongoDB server, and its gateway's outbox
    # sweeper would otherwise publish this system's pending jobs on the other broker.
    database = f"{isolation.mongodb_db}_restart"
    own_db = mongo_db.client[database]
    env = service_env(
        urls,
        namespace=f"{isolation.namespace}-restart",
        mongodb_db=database,
        blob_dir=tmp_path / "blobs",
        model_repo=make_tiny_repo(tmp_path / "models"),
        ports=service_ports,
        extra={"TORCH_THREADS": "1"},
    )
    group = ProcessGroup()
    group.start(service_specs(env, service_ports), ARTIFACTS / "logs-broker-restart")
    try:
        await asyncio.to_thread(group.wait_ready, 240)
        key = await ApiKeys(own_db).create("restart")
        client = StemflowClient(
            f"http://127.0.0.1:{service_ports.gateway}", f"ws://127.0.0.1:{service_ports.notifier}/v1/ws", key
        )
        song = tmp_path / "song.wav"
        sf.write(song, demo_song.render(20.0), 44100)
        jobs = [await client.submit(song, stems=2, quality="fast") for _ in range(JOBS)]

        await asyncio.to_thread(stop_stack, state)
        # Accepted while the broker is down: the outbox keeps it until the broker is back.
        late = await client.submit(song, stems=2, quality="fast")
        await asyncio.to_thread(
            ensure_stack, state, mongodb_url=urls.mongodb_url, redis_url=urls.redis_url, ports=ports
        )

        async def finished(job_id: str) -> dict[str, Any]:
            while (job := await client.job(job_id))["status"] not in ("completed", "failed", "cancelled"):
                # A quiet minute (the services reconnecting, a slow machine) is not a failure: look again.
                with contextlib.suppress(TimeoutError, OSError, WebSocketException):
                    await client.follow(job_id, timeout_s=60)
            return job

        results = await asyncio.wait_for(asyncio.gather(*(finished(j["id"]) for j in [*jobs, late])), 400)
        assert [r["status"] for r in results] == ["completed"] * (JOBS + 1), [
            (r["id"], r["status"], r.get("error"), r["stages"]) for r in results if r["status"] != "completed"
        ]
        assert all(sorted(s["name"] for s in r["result"]["stems"]) == ["accompaniment", "vocals"] for r in results)
        await client.aclose()
    finally:
        group.stop()
        await mongo_db.client.drop_database(database)
