"""One job through all five running services, checked at every output."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import soundfile as sf

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient

pytestmark = pytest.mark.integration
SECONDS = 8.0


@pytest.fixture(scope="module")
def song(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 22.05 kHz mono input: the stems must come back at 44.1 kHz stereo with the same duration.
    path = tmp_path_factory.mktemp("song") / "song.wav"
    audio = demo_song.render(SECONDS, bpm=120.0)
    sf.write(path, audio.mean(axis=1)[::2], 22050, subtype="PCM_16")
    return path


async def test_a_job_goes_through_every_service_and_completes(
    client: StemflowClient, song: Path, tmp_path: Path
) -> None:
    job = await client.submit(song, stems=4, quality="fast", output_format="wav")
    assert job["status"] == "queued"
    frames = await client.follow(job["id"], timeout_s=300)

    # The WebSocket: the current state first, then batches of CloudEvents ending with one completion.
    assert frames[0]["type"] == "subscribed" and frames[0]["state"]["id"] == job["id"]
    events = [e for f in frames if f["type"] == "batch" for e in f["events"]]
    types = [e["type"] for e in events]
    assert types.count("stemflow.job.completed.v1") == 1
    assert types[-1] == "stemflow.job.completed.v1"
    assert "stemflow.job.progress.v1" in types
    assert all(e["specversion"] == "1.0" and e["subject"] == job["id"] for e in events)
    overall = [e["data"]["progress"]["overall"] for e in events if e["type"] == "stemflow.job.progress.v1"]
    assert overall == sorted(overall) and overall[-1] == 100.0

    # The job document.
    done = await client.job(job["id"])
    assert done["status"] == "completed" and done["error"] is None
    assert done["progress"]["overall"] == 100.0
    assert {done["progress"][s]["status"] for s in ("ingest", "separation", "analysis")} == {"completed"}
    assert done["input"]["sample_rate"] == 22050 and done["input"]["channels"] == 1
    assert done["input"]["duration_s"] == pytest.approx(SECONDS, abs=0.01)
    assert done["result"]["separation"]["untrained"] is True
    assert done["result"]["separation"]["model"] == "htdemucs"

    # The stems: the four sources, stereo, 44.1 kHz, exactly as long as the normalised input.
    paths = await client.download_stems(done, tmp_path / "stems")
    assert sorted(p.stem for p in paths) == ["bass", "drums", "other", "vocals"]
    for path in paths:
        info = sf.info(path)
        assert info.channels == 2 and info.samplerate == 44100
        assert info.frames == int(SECONDS * 44100)

    # The analysis: the song is 120 BPM in A minor.
    summary = done["result"]["analysis"]
    full = await client.analysis(job["id"])
    # A job that separates is analysed from its stems and the mix, and says so.
    assert full["source"] == "stems" and set(full["sources"]) == {"rhythm", "key", "chords"}
    assert summary["tempo_bpm"] == pytest.approx(120.0, rel=0.04)
    assert summary["key"] in ("A minor", "C major")
    assert full["beat_count"] == len(full["beats"]) > 8
    assert full["duration_s"] == pytest.approx(SECONDS, abs=0.01)
    assert -40 < full["loudness_lufs"] < 0


async def test_a_bad_file_fails_the_job_with_a_clear_code(client: StemflowClient, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio at all" * 10)
    job = await client.submit(bogus)
    frames = await client.follow(job["id"], timeout_s=120)
    events = [e for f in frames if f["type"] == "batch" for e in f["events"]]
    if events:
        assert events[-1]["type"] == "stemflow.job.failed.v1"
    else:  # it failed before the subscription: the first frame's state says so
        assert frames[0]["state"]["status"] == "failed"
    failed = await client.job(job["id"])
    assert failed["status"] == "failed"
    # A RIFF/WAVE header with no data chunk: ingest recognises a WAV it cannot decode.
    assert failed["error"]["code"] == "corrupt"
    assert "data" in failed["error"]["message"]


async def test_concurrent_jobs_all_complete(client: StemflowClient, song: Path) -> None:
    jobs = await asyncio.gather(*(client.submit(song, stems=2, quality="fast", analyze=False) for _ in range(3)))
    await asyncio.gather(*(client.follow(j["id"], timeout_s=300) for j in jobs))
    for job in jobs:
        done = await client.job(job["id"])
        assert done["status"] == "completed"
        assert sorted(s["name"] for s in done["result"]["stems"]) == ["accompaniment", "vocals"]
        assert done["progress"]["analysis"]["status"] == "skipped"
