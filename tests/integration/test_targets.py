"""One upload, several separations, through the five running services."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient

pytestmark = pytest.mark.integration


async def test_two_targets_of_one_upload_complete_each_with_its_stems(client: StemflowClient, tmp_path: Path) -> None:
    song = demo_song.write(tmp_path / "two.wav", seconds=4.0, seed=101)
    # The running system serves htdemucs only: two stem sets of it are two targets routed to its workers.
    job = await client.submit(song, targets="htdemucs:2,htdemucs:4", quality="fast", output_format="wav")
    assert set(job["progress"]["targets"]) == {"htdemucs-2", "htdemucs-4"}
    frames = await client.follow(job["id"], timeout_s=300)
    events = [e for f in frames if f["type"] == "batch" for e in f["events"]]
    assert [e["type"] for e in events].count("stemflow.job.completed.v1") == 1

    done = await client.job(job["id"])
    assert done["status"] == "completed" and done["partial"] is False
    assert done["progress"]["ingest"]["status"] == "completed" and done["result"]["analysis"] is not None
    targets = done["result"]["targets"]
    assert [s["name"] for s in targets["htdemucs-2"]["stems"]] == ["vocals", "accompaniment"]
    assert sorted(s["name"] for s in targets["htdemucs-4"]["stems"]) == ["bass", "drums", "other", "vocals"]
    assert [s["name"] for s in done["result"]["stems"]] == ["vocals", "accompaniment"]  # the primary target

    # Each target's vocals are its own file, full length.
    frames_expected = sf.info(song).frames
    for name in ("htdemucs-2", "htdemucs-4"):
        url = next(s["url"] for s in targets[name]["stems"] if s["name"] == "vocals")
        answer = await client.http.get(url)
        assert answer.status_code == 200
        path = tmp_path / f"{name}-vocals.wav"
        path.write_bytes(answer.content)
        assert sf.info(path).frames == frames_expected
    archive = await client.http.get(targets["htdemucs-4"]["stems_zip"])
    assert archive.status_code == 200 and archive.content[:2] == b"PK"


async def test_stems_keep_the_inputs_integer_bit_depth(client: StemflowClient, tmp_path: Path) -> None:
    song = tmp_path / "sixteen.wav"
    sf.write(song, demo_song.render(3.0, seed=202), 44100, subtype="PCM_16")
    job = await client.submit(song, stems=2, quality="fast", output_format="flac", analyze=False)
    await client.follow(job["id"], timeout_s=300)
    done = await client.job(job["id"])
    assert done["status"] == "completed"
    for path in await client.download_stems(done, tmp_path / "stems"):
        assert sf.info(path).subtype == "PCM_16", path
