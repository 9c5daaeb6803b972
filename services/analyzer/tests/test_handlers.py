"""The analyzer's handler on the real Redis of the test run, a filesystem blob store and a warm worker process."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as redis
import soundfile as sf
import soxr
import synth
from synth import RATE

from analyzer.handlers import Analyzer, start_worker
from analyzer.settings import Settings
from stemflow_shared.cancellation import cancel_flag_key
from stemflow_shared.events import (
    ANALYSIS_COMPLETED,
    ANALYSIS_FAILED,
    ANALYSIS_REQUESTED,
    AUDIO_INGESTED,
    AnalysisRequested,
    AudioInfo,
    AudioIngested,
    Event,
    JobOptions,
    SourceInfo,
    StemInfo,
    make_event,
)
from stemflow_shared.storage import FilesystemBlobStore, normalised_key, stem_key


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolExecutor]:
    """One warm worker, started the way `main` starts them."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=start_worker) as workers:
        yield workers


@pytest_asyncio.fixture
async def rig(stack: Any, pool: ProcessPoolExecutor, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    namespace = f"a{uuid.uuid4().hex[:8]}"
    settings = Settings(
        amqp_url=stack.amqp_url, redis_url=stack.redis_url, stemflow_namespace=namespace, blob_dir=tmp_path / "blobs"
    )
    client = redis.from_url(stack.redis_url)
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    try:
        yield {
            "settings": settings,
            "redis": client,
            "blobs": blobs,
            "analyzer": Analyzer(pool, blobs, client, settings),
        }
    finally:
        await client.aclose()


async def ingested(
    rig: dict[str, Any],
    tmp_path: Path,
    *,
    store: bool = True,
    reused: bool = False,
    primary: bool = True,
    separate: bool = False,
) -> Event[Any]:
    """An `audio.ingested` for 12 s of a 100 BPM song in E minor (of a job that does not separate, by default)."""
    job_id = f"j{uuid.uuid4().hex[:10]}"
    samples = synth.song(100, 4, "minor", seconds=12.0, seed=13)
    if store:
        path = tmp_path / f"{job_id}.wav"
        sf.write(path, samples.T, RATE, subtype="FLOAT")
        await rig["blobs"].put_file(normalised_key(job_id), path)
    seconds = samples.shape[1] / RATE
    data = AudioIngested(
        job_id=job_id,
        owner="o",
        options=JobOptions(separate=separate),
        audio=AudioInfo(
            blob_key=normalised_key(job_id),
            duration_s=seconds,
            sample_rate=RATE,
            channels=2,
            frames=samples.shape[1],
            fingerprint="f",
        ),
        source=SourceInfo(format="WAV", sample_rate=RATE, channels=2, duration_s=seconds),
        reused=reused,
        target=None if primary else "htdemucs_6s-6",
        primary=primary,
    )
    return make_event(AUDIO_INGESTED, data, source="/stemflow/test")


async def test_a_song_is_analysed_from_the_blob_store(rig: dict[str, Any], tmp_path: Path) -> None:
    [completed] = await rig["analyzer"].on_ingested(await ingested(rig, tmp_path))

    assert completed.spec is ANALYSIS_COMPLETED
    result = completed.data.analysis
    assert result.source == "mix"
    assert result.tempo_bpm == pytest.approx(100, rel=0.04)
    assert result.key == "E minor"
    assert result.beat_count == len(result.beats) > 0
    # Stated doubt travels in the event: octave tempi and the runner-up key, each less sure than the pick.
    assert {round(a.bpm / result.tempo_bpm, 3) for a in result.tempo_alternatives} <= {0.5, 2.0}
    assert all(a.confidence <= result.tempo_confidence for a in result.tempo_alternatives)
    [runner_up] = result.key_alternatives
    assert runner_up.key != result.key and runner_up.confidence <= result.key_confidence
    assert (result.meter is None) == (result.downbeats == [])
    # The chord timeline and the DJs' key codes travel too.
    assert result.key_camelot == "9A" and result.key_open_key == "2m"
    assert result.chords and result.chords[0].start == 0.0 and all(c.label for c in result.chords)


async def test_a_reused_job_is_left_to_ingest(rig: dict[str, Any], tmp_path: Path) -> None:
    # The blob is not even there: the handler must not look for it.
    assert await rig["analyzer"].on_ingested(await ingested(rig, tmp_path, store=False, reused=True)) == []


async def test_only_the_primary_copy_of_a_multi_target_job_is_analysed(rig: dict[str, Any], tmp_path: Path) -> None:
    # One audio.ingested per separation target arrives; the others are the same audio.
    assert await rig["analyzer"].on_ingested(await ingested(rig, tmp_path, store=False, primary=False)) == []


async def test_a_missing_blob_fails_the_analysis(rig: dict[str, Any], tmp_path: Path) -> None:
    from stemflow_shared.metrics import REGISTRY

    def counted() -> float:
        return (
            REGISTRY.get_sample_value("stemflow_stage_failures_total", {"stage": "analysis", "code": "audio_missing"})
            or 0.0
        )

    before = counted()
    [failed] = await rig["analyzer"].on_ingested(await ingested(rig, tmp_path, store=False))

    assert failed.spec is ANALYSIS_FAILED
    assert failed.data.error.code == "audio_missing"
    assert counted() == before + 1  # counted like every other stage failure


async def test_a_cancelled_job_is_not_analysed(rig: dict[str, Any], tmp_path: Path) -> None:
    event = await ingested(rig, tmp_path)
    key = cancel_flag_key(rig["settings"].redis_prefix, event.data.job_id)
    await rig["redis"].set(key, "1", ex=60)
    try:
        assert await rig["analyzer"].on_ingested(event) == []
    finally:
        await rig["redis"].delete(key)


async def test_a_job_that_separates_waits_for_its_stems(rig: dict[str, Any], tmp_path: Path) -> None:
    # The gateway asks with analysis.requested once the stems exist; the blob is not even looked for.
    assert await rig["analyzer"].on_ingested(await ingested(rig, tmp_path, store=False, separate=True)) == []


async def test_a_requested_analysis_reads_the_stems_too(rig: dict[str, Any], tmp_path: Path) -> None:
    event = await ingested(rig, tmp_path, separate=True)
    job_id, audio = event.data.job_id, event.data.audio
    # Stand-in stems: the song itself as "other", and a click track at its tempo as "drums" (a FLAC at 48 kHz,
    # as a job's format and rate options can write them).
    drums, other = tmp_path / "drums.flac", tmp_path / "other.wav"
    sf.write(drums, soxr.resample(synth.click_track(100, seconds=12.0).T, RATE, 48000), 48000)
    sf.write(other, synth.song(100, 4, "minor", seconds=12.0, seed=13).T, RATE, subtype="FLOAT")
    stems = []
    for name, path in (("drums", drums), ("other", other)):
        key = stem_key(job_id, name, path.suffix.lstrip("."))
        stored = await rig["blobs"].put_file(key, path)
        media = "audio/flac" if path.suffix == ".flac" else "audio/wav"
        fmt = path.suffix.lstrip(".")
        stems.append(StemInfo(name=name, format=fmt, media_type=media, blob_key=key, size=stored.size, duration_s=12.0))
    request = make_event(ANALYSIS_REQUESTED, AnalysisRequested(job_id=job_id, audio=audio, stems=stems), source="/t")

    [completed] = await rig["analyzer"].on_requested(request)

    assert completed.spec is ANALYSIS_COMPLETED
    result = completed.data.analysis
    assert result.source == "stems"
    assert result.sources["key"] == "mix+stems" and result.sources["chords"] == "stems"
    assert result.sources["rhythm"] == "mix+stems"
    assert result.tempo_bpm == pytest.approx(100, rel=0.04)
    assert result.key == "E minor"


async def test_a_missing_stem_fails_the_requested_analysis(rig: dict[str, Any], tmp_path: Path) -> None:
    event = await ingested(rig, tmp_path, separate=True)
    gone = StemInfo(name="drums", format="wav", media_type="audio/wav", blob_key="jobs/x/stems/drums.wav", size=1,
                    duration_s=12.0)  # fmt: skip
    data = AnalysisRequested(job_id=event.data.job_id, audio=event.data.audio, stems=[gone])

    [failed] = await rig["analyzer"].on_requested(make_event(ANALYSIS_REQUESTED, data, source="/t"))

    assert failed.spec is ANALYSIS_FAILED and failed.data.error.code == "audio_missing"
