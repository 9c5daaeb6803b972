"""The mix handler: `mix.requested` in, a file in the blob store and `mix.completed` (or `.failed`) out,
rendered in a worker process that reports its progress on the pool's queue, as `main` starts them."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from analyzer.mixer import Mixer, ProgressRelay, start_mix_worker
from stemflow_shared.events import (
    MIX_COMPLETED,
    MIX_FAILED,
    MIX_PROGRESS,
    MIX_REQUESTED,
    Event,
    MixOptions,
    MixRequested,
    MixStem,
    make_event,
)
from stemflow_shared.storage import FilesystemBlobStore, normalised_key, stem_key

SR = 44100


@pytest.fixture(scope="module")
def relay() -> Iterator[ProgressRelay]:
    progress = ProgressRelay(multiprocessing.get_context("spawn").Queue())
    yield progress
    progress.close()


@pytest.fixture(scope="module")
def pool(relay: ProgressRelay) -> Iterator[ProcessPoolExecutor]:
    context = multiprocessing.get_context("spawn")
    # No initialiser of its own: a builtin, which the spawned worker unpickles by name (this test module's
    # functions it cannot import under pytest's importlib mode).
    initargs = (relay.queue, object)
    with ProcessPoolExecutor(1, mp_context=context, initializer=start_mix_worker, initargs=initargs) as workers:
        yield workers


class Published:
    """Records what the handler publishes on its own (progress); the terminal event is its return value."""

    def __init__(self) -> None:
        self.events: list[Event[Any]] = []

    async def publish(self, event: Event[Any]) -> None:
        self.events.append(event)


async def _job(
    blobs: FilesystemBlobStore, tmp_path: Path, seconds: float = 20.0, stem_rate: int = SR
) -> tuple[str, list[MixStem]]:
    """A job's stems (at `stem_rate`, as the separator resamples them) and its normalised audio (at 44.1 kHz)."""
    job_id = f"j{uuid.uuid4().hex[:10]}"
    t = np.arange(round(seconds * SR)) / SR
    stems = {
        "vocals": np.stack([0.2 * np.sin(2 * np.pi * 440 * t)] * 2),
        "bass": np.stack([0.2 * np.sin(2 * np.pi * 55 * t)] * 2),
    }
    refs = []
    for name, samples in stems.items():
        at_rate = samples.T if stem_rate == SR else soxr.resample(samples.T, SR, stem_rate, quality="HQ")
        sf.write(tmp_path / f"{name}.flac", at_rate, stem_rate, subtype="PCM_24")
        await blobs.put_file(stem_key(job_id, name, "flac"), tmp_path / f"{name}.flac")
        refs.append(MixStem(name=name, blob_key=stem_key(job_id, name, "flac"), gain=0.0 if name == "vocals" else 1.0))
    sf.write(tmp_path / "audio.wav", sum(stems.values()).T, SR, subtype="FLOAT")
    await blobs.put_file(normalised_key(job_id), tmp_path / "audio.wav")
    return job_id, refs


def _requested(job_id: str, stems: list[MixStem], **options: Any) -> Event[MixRequested]:
    mix_id = uuid.uuid4().hex[:24]
    data = MixRequested(
        job_id=job_id,
        mix_id=mix_id,
        owner="o",
        options=MixOptions(**options),
        stems=stems,
        audio_key=normalised_key(job_id),
        beats=[0.5, 1.0, 1.5],
        output_key=f"jobs/{job_id}/mixes/{mix_id}/mix.{options.get('format', 'wav')}",
    )
    return make_event(MIX_REQUESTED, data, source="/test")


async def test_a_mix_is_rendered_stored_and_reported(pool, relay, tmp_path):
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    job_id, stems = await _job(blobs, tmp_path)
    published = Published()
    mixer = Mixer(pool, blobs, published, relay=relay, progress_interval_s=0.0)
    event = _requested(job_id, stems, tempo=0.8, semitones=-2, click=True, format="flac", bit_depth=16)
    (completed,) = await mixer.on_requested(event)
    assert completed.spec is MIX_COMPLETED
    file = completed.data.file
    assert file.blob_key == event.data.output_key and file.media_type == "audio/flac"
    assert file.duration_s == pytest.approx(25.0, abs=0.01) and file.bit_depth == 16
    assert file.size == await blobs.size(file.blob_key)
    async with blobs.local_path(file.blob_key) as path:
        assert sf.info(path).frames == round(20 * SR / 0.8)
    percents = [e.data.percent for e in published.events if e.spec is MIX_PROGRESS]
    assert percents[0] == 0.0 and len(percents) >= 3 and percents == sorted(percents)
    # A redelivery republishes the same terminal event.
    (again,) = await mixer.on_requested(event)
    assert again.id == completed.id


async def test_a_mix_of_48_khz_stems_is_rendered_at_48_khz(pool, tmp_path):
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    job_id, stems = await _job(blobs, tmp_path, seconds=4.0, stem_rate=48000)
    event = _requested(job_id, stems, tempo=0.8, start=1.0, end=3.0, format="flac")
    (completed,) = await Mixer(pool, blobs, Published()).on_requested(event)
    assert completed.spec is MIX_COMPLETED
    file = completed.data.file
    assert file.sample_rate == 48000 and file.duration_s == pytest.approx(2.5, abs=0.001)
    async with blobs.local_path(file.blob_key) as path:
        info = sf.info(path)
        assert info.samplerate == 48000 and info.frames == round(2.0 * 48000 / 0.8)


async def test_a_missing_stem_fails_the_mix(pool, tmp_path):
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    job_id, stems = await _job(blobs, tmp_path, seconds=2.0)
    await blobs.delete_prefix(stems[1].blob_key)
    (failed,) = await Mixer(pool, blobs, Published()).on_requested(_requested(job_id, stems))
    assert failed.spec is MIX_FAILED and failed.data.error.code == "stem_missing"


async def test_a_section_past_the_end_fails_the_mix(pool, tmp_path):
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    job_id, stems = await _job(blobs, tmp_path, seconds=2.0)
    (failed,) = await Mixer(pool, blobs, Published()).on_requested(_requested(job_id, stems, start=5.0))
    assert failed.spec is MIX_FAILED and failed.data.error.code == "section_out_of_range"
    assert not await blobs.exists(failed_key(failed))


def failed_key(event: Event[Any]) -> str:
    return f"jobs/{event.data.job_id}/mixes/{event.data.mix_id}/mix.wav"
