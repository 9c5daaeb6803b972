"""The separator's handler on the real RabbitMQ and Redis of the test run, with a filesystem blob store."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as redis
import soundfile as sf

from separator.device import make_engine
from separator.engine import SegmentEngine
from separator.handlers import Separator, Throttle, job_seed
from separator.models import ModelCache
from separator.settings import Settings
from stemflow_dev.fixtures import delete_namespace
from stemflow_shared.events import (
    AUDIO_INGESTED,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    AudioInfo,
    AudioIngested,
    Event,
    JobOptions,
    SourceInfo,
    make_event,
)
from stemflow_shared.idempotency import cancel_flag_key
from stemflow_shared.messaging import Broker
from stemflow_shared.storage import FilesystemBlobStore, normalised_key
from stemflow_shared.topology import Names

SAMPLERATE = 44100
TIMEOUT_S = 60.0


@pytest_asyncio.fixture
async def rig(stack: Any, tiny_repo: Path, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """A separator on its own namespace, and what a test needs to look at its effects."""
    namespace = f"s{uuid.uuid4().hex[:8]}"
    (tmp_path / "work").mkdir()
    settings = Settings(
        amqp_url=stack.amqp_url,
        redis_url=stack.redis_url,
        stemflow_namespace=namespace,
        blob_dir=tmp_path / "blobs",
        work_dir=str(tmp_path / "work"),
        cancel_poll_s=0.02,
        progress_interval_s=0.01,
    )
    broker = await Broker(stack.amqp_url, Names(namespace), "separator").connect()
    client = redis.from_url(stack.redis_url)
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    engine = make_engine(settings, "cpu").start()
    parts = {"settings": settings, "broker": broker, "redis": client, "blobs": blobs, "engine": engine}
    parts["separator"] = Separator(ModelCache(tiny_repo, "cpu"), engine, blobs, client, broker, settings)
    try:
        yield parts
    finally:
        engine.close()
        await client.aclose()
        await broker.close()
        await delete_namespace(stack.amqp_url, namespace)


async def ingested(blobs: FilesystemBlobStore, tmp_path: Path, seconds: float, **options: Any) -> Event[AudioIngested]:
    job_id = f"j{uuid.uuid4().hex[:10]}"
    frames = int(seconds * SAMPLERATE)
    t = np.arange(frames) / SAMPLERATE
    mix = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)]).astype(np.float32)
    path = tmp_path / f"{job_id}.wav"
    sf.write(path, mix.T, SAMPLERATE, subtype="FLOAT")
    await blobs.put_file(normalised_key(job_id), path)
    data = AudioIngested(
        job_id=job_id,
        owner="o",
        options=JobOptions(analyze=False, **options),
        audio=AudioInfo(
            blob_key=normalised_key(job_id),
            duration_s=seconds,
            sample_rate=SAMPLERATE,
            channels=2,
            frames=frames,
            fingerprint="f",
        ),
        source=SourceInfo(format="wav", sample_rate=SAMPLERATE, channels=2, duration_s=seconds),
    )
    return make_event(AUDIO_INGESTED, data, source="/stemflow/test")


def stem_files(blob_dir: Path, job_id: str) -> list[Path]:
    return sorted((blob_dir / "jobs" / job_id).glob("stems/**/*"))


@pytest.mark.parametrize(("fmt", "stems"), [("flac", 2), ("mp3", 4), ("wav", 4)])
async def test_stems_and_residual_land_in_the_blob_store(
    rig: dict[str, Any], tmp_path: Path, fmt: str, stems: int
) -> None:
    event = await ingested(rig["blobs"], tmp_path, 2.3, stems=stems, output_format=fmt, residual=True, quality="fast")

    [completed] = await rig["separator"].on_ingested(event)

    assert completed.spec is SEPARATION_COMPLETED
    result = completed.data
    expected = ("vocals", "accompaniment") if stems == 2 else ("drums", "bass", "other", "vocals")
    assert [stem.name for stem in result.stems] == [*expected, "residual"]
    assert (result.model, result.device, result.precision, result.untrained) == ("htdemucs", "cpu", "float32", True)
    # Untrained stems miss the mix by about as much as the mix itself: near 0 dB, but measured.
    assert result.reconstruction_error_db is not None and math.isfinite(result.reconstruction_error_db)
    for stem in result.stems:
        async with rig["blobs"].local_path(stem.blob_key) as path:
            info = sf.info(str(path))
            assert (info.frames, info.samplerate, info.channels) == (event.data.audio.frames, SAMPLERATE, 2)
            assert stem.size == path.stat().st_size
        assert stem.format == fmt
        assert stem.duration_s == event.data.audio.frames / SAMPLERATE
    assert list((tmp_path / "work").iterdir()) == []


async def test_cancelling_mid_job_leaves_no_files(rig: dict[str, Any], tmp_path: Path) -> None:
    event = await ingested(rig["blobs"], tmp_path, 60.0, stems=4, output_format="wav", quality="fast")
    job_id = event.data.job_id
    connection = await aio_pika.connect(rig["broker"].url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(rig["broker"].names.exchange, "separation.progress")
        task = asyncio.create_task(rig["separator"].on_ingested(event))
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if json.loads(message.body)["data"]["percent"] > 10:
                    break
        # Stems are being written now; the gateway's flag stops the job at the next segment.
        assert list((tmp_path / "work").glob("*/*.wav"))
        await rig["redis"].set(cancel_flag_key(rig["settings"].redis_prefix, job_id), b"1")
        outcome = await asyncio.wait_for(task, TIMEOUT_S)

    assert outcome == []
    assert stem_files(tmp_path / "blobs", job_id) == []
    assert list((tmp_path / "work").iterdir()) == []


async def test_an_unknown_model_fails_with_a_code(rig: dict[str, Any], tiny_repo: Path, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    (repo / "htdemucs_6s.yaml").unlink()
    separator = Separator(
        ModelCache(repo, "cpu"), rig["engine"], rig["blobs"], rig["redis"], rig["broker"], rig["settings"]
    )
    event = await ingested(rig["blobs"], tmp_path, 1.0, model="htdemucs_6s", stems=6)

    [failed] = await separator.on_ingested(event)

    assert failed.spec is SEPARATION_FAILED
    assert failed.data.error.code == "model_unknown"


async def test_running_out_of_memory_fails_with_a_code_and_no_files(rig: dict[str, Any], tmp_path: Path) -> None:
    with SegmentEngine(memory_budget_bytes=1) as engine:
        separator = Separator(
            ModelCache(rig["separator"]._models.repo, "cpu"),
            engine,
            rig["blobs"],
            rig["redis"],
            rig["broker"],
            rig["settings"],
        )
        event = await ingested(rig["blobs"], tmp_path, 3.0, output_format="mp3")
        [failed] = await separator.on_ingested(event)

    assert failed.spec is SEPARATION_FAILED
    assert failed.data.error.code == "out_of_memory"
    assert stem_files(tmp_path / "blobs", event.data.job_id) == []
    assert list((tmp_path / "work").iterdir()) == []


def test_progress_is_let_through_at_most_once_per_interval() -> None:
    now = [0.0]
    throttle = Throttle(0.25, clock=lambda: now[0])
    passed = []
    for step in range(100):
        now[0] = step * 0.01
        passed.append(throttle.ready())

    # One second of reports every 10 ms: the first, then one per quarter second.
    assert [index for index, ok in enumerate(passed) if ok] == [0, 25, 50, 75]


def test_a_job_seed_is_stable_and_its_own() -> None:
    assert job_seed("j1") == job_seed("j1") != job_seed("j2")
