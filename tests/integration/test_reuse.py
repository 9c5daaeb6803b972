"""An identical upload reuses a finished job's results: same stems and analysis, no recomputation."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient

pytestmark = pytest.mark.integration


def cache_hits(metrics_url: str) -> float:
    text = httpx.get(metrics_url).text
    found = re.search(r'^stemflow_cache_requests_total\{cache="results",result="hit"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_second_identical_upload_reuses_the_results(
    client: StemflowClient, system: object, tmp_path: Path
) -> None:
    song = tmp_path / "twice.wav"
    sf.write(song, demo_song.render(4.0, bpm=100.0), 44100, subtype="PCM_16")
    ingest_metrics = f"http://127.0.0.1:{system.ports.ingest}/metrics"  # type: ignore[attr-defined]
    options = {"stems": 2, "quality": "fast", "output_format": "flac"}

    first = await client.submit(song, **options)
    await client.follow(first["id"], timeout_s=300)
    first_done = await client.job(first["id"])
    assert first_done["status"] == "completed"
    hits = cache_hits(ingest_metrics)

    second = await client.submit(song, **options)
    frames = await client.follow(second["id"], timeout_s=120)
    events = [e for f in frames if f["type"] == "batch" for e in f["events"]]
    assert [e["type"] for e in events].count("stemflow.job.completed.v1") <= 1
    second_done = await client.job(second["id"])
    assert second_done["status"] == "completed"
    assert cache_hits(ingest_metrics) == hits + 1

    # The same results and provenance (untrained models included).
    assert second_done["result"]["analysis"] == first_done["result"]["analysis"]
    assert second_done["result"]["separation"] == first_done["result"]["separation"]
    first_stems = await client.download_stems(first_done, tmp_path / "first")
    second_stems = await client.download_stems(second_done, tmp_path / "second")
    assert [p.read_bytes() for p in first_stems] == [p.read_bytes() for p in second_stems]

    # The reusing job has its own normalised audio (a practice mix of it reads it).
    blobs = Path(system.env["BLOB_DIR"])  # type: ignore[attr-defined]
    assert (blobs / "jobs" / second["id"] / "audio.wav").stat().st_size > 4 * 44100 * 2 * 4

    # Deleting the first job leaves the second whole.
    assert (await client.http.delete(f"/v1/jobs/{first['id']}")).status_code == 204
    again = await client.download_stems(second_done, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in second_stems]

    # Other options are other results: no reuse.
    other = await client.submit(song, stems=4, quality="fast", output_format="flac")
    await client.follow(other["id"], timeout_s=300)
    assert (await client.job(other["id"]))["status"] == "completed"
    assert cache_hits(ingest_metrics) == hits + 1
