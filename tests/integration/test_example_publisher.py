"""examples/publish_job.py, run as another service would: `job.submitted` straight onto the broker, followed to the end.

Ingest refuses source URLs on private addresses unless ALLOW_PRIVATE_URLS is set, and the suite's shared
system leaves it unset (as production does). So this module starts a system of its own in its own
namespace, with ALLOW_PRIVATE_URLS=true, and serves the song from a local HTTP server. The notifier is
not started: the example follows the job through a queue of its own bound to the topic exchange.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import soundfile as sf
from pymongo import AsyncMongoClient

from stemflow_dev import demo_song
from stemflow_dev.fixtures import Isolation, delete_namespace
from stemflow_dev.models import make_tiny_repo
from stemflow_dev.procs import ProcessGroup
from stemflow_dev.services import Ports, service_env, service_specs
from stemflow_dev.stack import StackUrls
from stemflow_shared.auth import ApiKeys
from stemflow_shared.topology import Names

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "publish_job.py"
ARTIFACTS = REPO / "test-artifacts" / "integration" / "example-publisher"
OWNER = "radio-team"
SERVICES = ("gateway", "ingest", "separator", "analyzer")


class OwnSystem:
    """Gateway, ingest, separator and analyzer in a namespace of their own, private source URLs allowed."""

    def __init__(self, stack: StackUrls, namespace: str, tmp: Path) -> None:
        self.namespace = namespace
        self.database = f"stemflow_{namespace}"
        self.ports = Ports.free()
        self.env = service_env(
            stack,
            namespace=namespace,
            mongodb_db=self.database,
            blob_dir=tmp / "blobs",
            model_repo=make_tiny_repo(tmp / "models"),
            ports=self.ports,
            extra={"ALLOW_PRIVATE_URLS": "true", "MODELS": "htdemucs", "TORCH_THREADS": "1", "LOG_LEVEL": "INFO"},
        )
        self.group = ProcessGroup()

    def start(self) -> None:
        specs = [spec for spec in service_specs(self.env, self.ports) if spec.name in SERVICES]
        self.group.start(specs, ARTIFACTS)
        self.group.wait_ready(timeout=240)


@pytest.fixture(scope="module")
def song_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A short song served over HTTP on the loopback address."""
    folder = tmp_path_factory.mktemp("served")
    sf.write(folder / "song.wav", demo_song.render(8.0, bpm=120.0), 44100, subtype="PCM_16")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/song.wav"
    finally:
        server.shutdown()
        server.server_close()


@pytest_asyncio.fixture(scope="module")
async def own_system(
    stack: StackUrls, isolation: Isolation, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnSystem]:
    system = OwnSystem(stack, f"{isolation.namespace}-pub", tmp_path_factory.mktemp("publisher"))
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_url)
    try:
        await asyncio.to_thread(system.start)
        yield system
    finally:
        system.group.stop()
        await mongo.drop_database(system.database)
        await mongo.close()
        await delete_namespace(stack.amqp_url, system.namespace)
        await _delete_queue(stack.amqp_url, Names(system.namespace).dead_letter_watch_queue)


async def _delete_queue(amqp_url: str, name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


async def run_example(*args: str, timeout_s: float = 420.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        raise
    return process.returncode or 0, out.decode(), err.decode()


async def test_another_service_submits_a_job_by_event_and_follows_it(
    stack: StackUrls, own_system: OwnSystem, song_url: str
) -> None:
    code, out, err = await run_example(
        "--amqp-url",
        stack.amqp_url,
        "--namespace",
        own_system.namespace,
        "--source-url",
        song_url,
        "--owner",
        OWNER,
        "--stems",
        "4",
        "--timeout",
        "360",
    )
    assert code == 0, f"the example exited {code}:\n{err[-3000:]}"
    ended = json.loads(out.strip().splitlines()[-1])
    assert ended["type"] == "stemflow.job.completed.v1"
    assert ended["source"] == "/stemflow/gateway"
    data = ended["data"]
    job_id = data["job_id"]
    assert ended["subject"] == job_id
    assert sorted(stem["name"] for stem in data["stems"]) == ["bass", "drums", "other", "vocals"]
    assert data["analysis"]["duration_s"] == pytest.approx(8.0, abs=0.1)
    assert "processing" in err  # it printed the job's progress on the way

    # The gateway adopted the job for the owner the event named: that owner's API keys see it.
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_url)
    try:
        key = await ApiKeys(mongo[own_system.database]).create(OWNER)
        other = await ApiKeys(mongo[own_system.database]).create("someone-else")
    finally:
        await mongo.close()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{own_system.ports.gateway}") as http_client:
        job = await http_client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
        hidden = await http_client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other}"})
        stem = await http_client.get(f"/v1/jobs/{job_id}/stems/vocals", headers={"Authorization": f"Bearer {key}"})
    assert job.status_code == 200, job.text
    assert job.json()["status"] == "completed"
    assert job.json()["input"]["source_url"] == song_url
    assert hidden.status_code == 404
    assert stem.status_code == 200 and stem.content[:4] == b"RIFF"


async def test_the_example_fails_where_stemflow_does_not_run(stack: StackUrls, isolation: Isolation) -> None:
    """A namespace where Stemflow never ran: the exchange does not exist, and the example fails at once."""
    code, _, err = await run_example(
        "--amqp-url",
        stack.amqp_url,
        "--namespace",
        f"{isolation.namespace}-absent",
        "--source-url",
        "https://example.com/song.flac",
        "--timeout",
        "5",
        timeout_s=60,
    )
    assert code != 0
    assert "NOT_FOUND" in err or "not found" in err.lower()
