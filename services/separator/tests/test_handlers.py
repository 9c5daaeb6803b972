"""The separator's handler on the real RabbitMQ and Redis of the test run, with a filesystem blob store."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import pytest
import pytest_asyncio
import redis.asyncio as redis
import soundfile as sf

from separator.device import make_engine
from separator.engine import BatchReport, SegmentEngine
from separator.handlers import Separator, Throttle, job_seed
from separator.models import ModelCache, load_model
from separator.separation import separate
from separator.settings import Settings
from stemflow_dev.fixtures import delete_namespace
from stemflow_shared.cancellation import cancel_flag_key
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
from stemflow_shared.messaging import Broker
from stemflow_shared.settings import HarnessKnobs
from stemflow_shared.storage import FilesystemBlobStore, normalised_key
from stemflow_shared.topology import MODEL_HEADER, PRIORITY_HEADER, QUEUE_HEADER, REASON_HEADER, Names, separator_queue

SAMPLERATE = 44100
TIMEOUT_S = 60.0
FOUR = ("drums", "bass", "other", "vocals")
STEM_NAMES = {2: ("vocals", "accompaniment"), 4: FOUR, 6: (*FOUR, "guitar", "piano")}
# One tiny-model segment: 2 s of stereo in, four sources out, float32 (the simulated budget's measure).
SEGMENT_BYTES = 2 * SAMPLERATE * 2 * (1 + 4) * 4


@pytest_asyncio.fixture
async def rig(stack: Any, tiny_repo: Path, tmp_path: Path, export_dir: Path) -> AsyncIterator[dict[str, Any]]:
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
        export_cache_dir=export_dir,
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


@contextlib.asynccontextmanager
async def progress_queue(rig: dict[str, Any]) -> AsyncIterator[Any]:
    """A queue of its own that receives every `separation.progress` the separator publishes."""
    async with await aio_pika.connect(rig["broker"].url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(rig["broker"].names.exchange, "separation.progress")
        yield queue


async def separating(rig: dict[str, Any], event: Event[AudioIngested], queue: Any) -> asyncio.Task[Any]:
    """The separator's handler on `event`, running, once it has reported more than 10 % done."""
    task = asyncio.create_task(rig["separator"].on_ingested(event))
    async with queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            if json.loads(message.body)["data"]["percent"] > 10:
                break
    return task


def read_audio(path: Path) -> np.ndarray:
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    return data.T


def stem_files(blob_dir: Path, job_id: str) -> list[Path]:
    return sorted((blob_dir / "jobs" / job_id).glob("stems/**/*"))


@pytest.mark.parametrize(
    ("model", "fmt", "stems"),
    [
        ("htdemucs", "flac", 2),
        ("htdemucs", "mp3", 4),
        ("htdemucs", "wav", 4),
        ("htdemucs_ft", "wav", 2),
        ("htdemucs_6s", "flac", 6),
    ],
)
async def test_stems_and_residual_land_in_the_blob_store(
    rig: dict[str, Any], tmp_path: Path, model: str, fmt: str, stems: int
) -> None:
    event = await ingested(
        rig["blobs"], tmp_path, 2.3, model=model, stems=stems, output_format=fmt, residual=True, quality="fast"
    )

    [completed] = await rig["separator"].on_ingested(event)

    assert completed.spec is SEPARATION_COMPLETED
    result = completed.data
    assert [stem.name for stem in result.stems] == [*STEM_NAMES[stems], "residual"]
    assert (result.model, result.device, result.precision, result.untrained) == (model, "cpu", "float32", True)
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
    async with progress_queue(rig) as queue:
        task = await separating(rig, event, queue)
        # Stems are being written now; the gateway's flag stops the job at the next segment.
        assert list((tmp_path / "work").glob("*/*.wav"))
        await rig["redis"].set(cancel_flag_key(rig["settings"].redis_prefix, job_id), b"1")
        outcome = await asyncio.wait_for(task, TIMEOUT_S)

    assert outcome == []
    assert stem_files(tmp_path / "blobs", job_id) == []
    assert list((tmp_path / "work").iterdir()) == []


async def test_a_handler_cancelled_mid_job_stops_separating(rig: dict[str, Any], tmp_path: Path) -> None:
    """A lost broker connection cancels the handler: the job's thread stops too, not only the await."""
    first = await ingested(rig["blobs"], tmp_path, 60.0, stems=4, output_format="wav", quality="fast")
    second = await ingested(rig["blobs"], tmp_path, 4.0, stems=4, output_format="wav", quality="fast")
    async with progress_queue(rig) as queue:
        task = await separating(rig, first, queue)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # By now the first job's thread has ended: its stems folder is gone and nothing of it is queued.
        assert list((tmp_path / "work").iterdir()) == []
        seen = await _drain_progress(queue)
        # The engine serves jobs in turn: a thread left running would have its segments run beside the
        # second job's, and report progress while they do.
        [completed] = await rig["separator"].on_ingested(second)
        assert completed.spec is SEPARATION_COMPLETED
        after = await _drain_progress(queue)

    assert first.data.job_id not in {job for job, _ in after}, (seen, after)
    assert {job for job, _ in after} == {second.data.job_id}
    assert stem_files(tmp_path / "blobs", first.data.job_id) == []


async def test_a_duplicate_delivery_cancelled_mid_job_leaves_the_published_stems(
    rig: dict[str, Any], tmp_path: Path
) -> None:
    """At-least-once: the same job delivered twice, the first completed and published its stems; the second
    is cancelled (its connection lost) while it works. The published stems stay for the job to serve."""
    event = await ingested(rig["blobs"], tmp_path, 30.0, stems=2, output_format="wav", quality="fast")
    [completed] = await rig["separator"].on_ingested(event)
    published = {stem.blob_key: stem.size for stem in completed.data.stems}
    async with progress_queue(rig) as queue:
        duplicate = await separating(rig, event, queue)
        duplicate.cancel()
        with pytest.raises(asyncio.CancelledError):
            await duplicate

    for key, size in published.items():
        async with rig["blobs"].local_path(key) as path:
            assert path.stat().st_size == size
    assert list((tmp_path / "work").iterdir()) == []


async def _drain_progress(queue: Any) -> list[tuple[str, float]]:
    """The progress events waiting in `queue` now, after the publisher's confirmed ones have landed."""
    seen: list[tuple[str, float]] = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        data = json.loads(message.body)["data"]
        seen.append((data["job_id"], data["percent"]))
    return seen


def _drop_the_bag(repo: Path) -> None:
    (repo / "htdemucs_6s.yaml").unlink()


def _truncate_the_weights(repo: Path) -> None:
    signature = (repo / "htdemucs_6s.yaml").read_text().split()[-1]
    package = next(repo.glob(f"{signature}-*.th"))
    package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "code"), [(_drop_the_bag, "model_unknown"), (_truncate_the_weights, "model_load_failed")]
)
async def test_an_unknown_or_broken_model_fails_with_a_code_every_time(
    rig: dict[str, Any], tiny_repo: Path, tmp_path: Path, damage: Callable[[Path], None], code: str
) -> None:
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    damage(repo)
    separator = Separator(
        ModelCache(repo, "cpu"), rig["engine"], rig["blobs"], rig["redis"], rig["broker"], rig["settings"]
    )
    event = await ingested(rig["blobs"], tmp_path, 1.0, model="htdemucs_6s", stems=6)

    # A redelivery meets the same clear failure, not a crash.
    for _ in range(2):
        [failed] = await separator.on_ingested(event)
        assert failed.spec is SEPARATION_FAILED
        assert failed.data.error.code == code
    assert stem_files(tmp_path / "blobs", event.data.job_id) == []


async def test_a_reused_result_is_left_to_ingest(rig: dict[str, Any], tmp_path: Path) -> None:
    event = await ingested(rig["blobs"], tmp_path, 1.0)
    reused = make_event(AUDIO_INGESTED, event.data.model_copy(update={"reused": True}), source="/stemflow/test")

    assert await rig["separator"].on_ingested(reused) == []
    assert stem_files(tmp_path / "blobs", event.data.job_id) == []


async def test_each_target_of_a_job_has_its_own_stems_and_events(rig: dict[str, Any], tmp_path: Path) -> None:
    # Ingest sends one audio.ingested per target, with the options narrowed to it.
    event = await ingested(rig["blobs"], tmp_path, 1.5, quality="fast")
    job_id = event.data.job_id
    copies = [
        make_event(
            AUDIO_INGESTED,
            event.data.model_copy(
                update={"options": event.data.options.model_copy(update=update), "target": name, "primary": i == 0}
            ),
            source="/stemflow/test",
        )
        for i, (name, update) in enumerate(
            [("htdemucs-2", {"model": "htdemucs", "stems": 2}), ("htdemucs_6s-6", {"model": "htdemucs_6s", "stems": 6})]
        )
    ]
    [two] = await rig["separator"].on_ingested(copies[0])
    [six] = await rig["separator"].on_ingested(copies[1])
    assert (two.data.target, six.data.target) == ("htdemucs-2", "htdemucs_6s-6")
    assert [s.name for s in two.data.stems] == [*STEM_NAMES[2]]
    assert [s.name for s in six.data.stems] == [*STEM_NAMES[6]]
    assert {s.blob_key.split("/")[3] for s in two.data.stems} == {"htdemucs-2"}
    assert {s.blob_key.split("/")[3] for s in six.data.stems} == {"htdemucs_6s-6"}
    assert two.id != six.id  # each target's completion is its own event
    files = {
        p.relative_to(tmp_path / "blobs" / "jobs" / job_id).parts[1] for p in stem_files(tmp_path / "blobs", job_id)
    }
    assert files == {"htdemucs-2", "htdemucs_6s-6"}


async def test_a_simulated_memory_budget_splits_batches_and_every_job_completes(
    rig: dict[str, Any], tmp_path: Path, tiny_repo: Path
) -> None:
    # Room for a segment and a half: batches of 4 and 2 run out of memory, single segments fit.
    settings = rig["settings"].model_copy(update={"max_batch": 4})
    reports: list[BatchReport] = []
    knobs = HarnessKnobs(simulated_device_memory_mb=1.5 * SEGMENT_BYTES / 2**20)
    engine = make_engine(settings, "cpu", reports.append, knobs=knobs)
    models = rig["separator"]._models
    separator = Separator(models, engine, rig["blobs"], rig["redis"], rig["broker"], settings)
    events = [await ingested(rig["blobs"], tmp_path, 6.0, output_format="wav", quality="fast") for _ in range(2)]
    tasks = [asyncio.create_task(separator.on_ingested(event)) for event in events]
    # Both jobs queue a batch's worth of segments before the engine runs any.
    assert await asyncio.to_thread(engine.wait_queued, 8, TIMEOUT_S)
    engine.start()
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
    finally:
        engine.close()

    assert [len(report.jobs) for report in reports if report.out_of_memory][:3] == [4, 2, 2]
    assert all(len(report.jobs) == 1 for report in reports if not report.out_of_memory)
    for event, [completed] in zip(events, outcomes, strict=True):
        assert completed.spec is SEPARATION_COMPLETED
        mix = read_audio(tmp_path / f"{event.data.job_id}.wav")
        # A model of its own: the worker's engine released its copy's torch weights to the runtime.
        alone = separate(load_model("htdemucs", tiny_repo), mix, quality="fast", seed=job_seed(event.data.job_id))
        for stem in completed.data.stems:
            async with rig["blobs"].local_path(stem.blob_key) as path:
                np.testing.assert_allclose(read_audio(path), alone[stem.name], rtol=0, atol=2e-6)


async def test_a_malformed_request_is_dead_lettered_and_the_next_job_completes(
    rig: dict[str, Any], tmp_path: Path
) -> None:
    broker = rig["broker"]
    good = await ingested(rig["blobs"], tmp_path, 1.0, quality="fast")
    body = json.loads(good.envelope.to_json())
    body["data"]["options"]["stems"] = 7
    connection = await aio_pika.connect(broker.url)
    async with connection:
        channel = await connection.channel()
        completions = await channel.declare_queue(exclusive=True)
        await completions.bind(broker.names.exchange, "separation.completed")
        await broker.consume(separator_queue("htdemucs"), rig["separator"].handlers())
        work = await channel.get_exchange(broker.names.work_exchange)
        headers = {MODEL_HEADER: "htdemucs", PRIORITY_HEADER: "normal"}
        await work.publish(aio_pika.Message(json.dumps(body).encode(), headers=headers, message_id="bad"), "")
        dead_letters = await channel.get_queue(broker.names.dead_letter_queue, ensure=False)
        async with dead_letters.iterator() as messages:
            dead = await asyncio.wait_for(anext(messages), TIMEOUT_S)
            await dead.ack()
        await broker.publish(good)
        async with completions.iterator() as messages:
            completed = await asyncio.wait_for(anext(messages), TIMEOUT_S)
            await completed.ack()

    assert dead.headers[REASON_HEADER] == "invalid_data"
    assert dead.headers[QUEUE_HEADER] == broker.names.queue(separator_queue("htdemucs"))
    assert json.loads(completed.body)["subject"] == good.data.job_id


async def test_progress_reaches_the_broker_at_most_four_times_a_second_per_job(
    rig: dict[str, Any], tmp_path: Path
) -> None:
    interval = Settings.model_fields["progress_interval_s"].default
    settings = rig["settings"].model_copy(update={"progress_interval_s": interval})
    separator = Separator(rig["separator"]._models, rig["engine"], rig["blobs"], rig["redis"], rig["broker"], settings)
    events = [await ingested(rig["blobs"], tmp_path, 20.0, quality="fast") for _ in range(2)]
    connection = await aio_pika.connect(rig["broker"].url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(rig["broker"].names.exchange, "separation.progress")
        outcomes = await asyncio.gather(*(separator.on_ingested(event) for event in events))
        # Publishing was confirmed before the handlers returned: every progress event is queued.
        progress: dict[str, list[tuple[datetime, float]]] = {}
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            envelope = json.loads(message.body)
            when = datetime.fromisoformat(envelope["time"])
            progress.setdefault(envelope["subject"], []).append((when, envelope["data"]["percent"]))

    assert interval == 0.25
    assert all(outcome[0].spec is SEPARATION_COMPLETED for outcome in outcomes)
    assert set(progress) == {event.data.job_id for event in events}
    for reports in progress.values():
        times = sorted(when for when, _ in reports)
        percents = [percent for _, percent in sorted(reports)]
        assert len(reports) >= 2
        assert percents == sorted(set(percents)) and percents[-1] < 100
        # Only the two clocks' reading jitter may bring a gap under the interval.
        assert min((b - a).total_seconds() for a, b in itertools.pairwise(times)) >= interval - 0.01


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
