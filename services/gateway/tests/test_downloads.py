"""Downloads named for people (`Song \u2013 Vocals.flac`, `Song (stems).zip`) and the stems' sample format options."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from gateway.downloads import attachment, song_title, stem_filename, zip_filename
from stemflow_shared.events import (
    AUDIO_INGESTED,
    SEPARATION_COMPLETED,
    AudioInfo,
    AudioIngested,
    JobOptions,
    SeparationCompleted,
    SourceInfo,
    StemInfo,
    make_event,
)
from stemflow_shared.storage import stem_key

DASH = "\u2013"


def disposition_name(header: str) -> str:
    """The name a browser saves under: `filename*` (RFC 6266, RFC 8187) when there is one."""
    extended = re.search(r"filename\*=UTF-8''([^;\s]+)", header)
    return unquote(extended.group(1)) if extended else ascii_fallback(header)


def ascii_fallback(header: str) -> str:
    return header.split('filename="', 1)[1].split('"', 1)[0]


@pytest.mark.parametrize(
    ("source", "title"),
    [
        ({"filename": "My Song.mp3"}, "My Song"),
        ({"filename": f"Café del Mar {DASH} live.flac"}, f"Café del Mar {DASH} live"),
        ({"filename": 'a/b\\What? "Now": <1>|*.wav'}, "What Now 1"),
        ({"filename": "no extension"}, "no extension"),
        ({"source_url": "https://example.com/music/Ode%20to%20Joy.mp3?sig=1"}, "Ode to Joy"),
        ({"filename": "..."}, "job-1"),
        ({"filename": "x" * 300 + ".wav"}, "x" * 100),
    ],
)
def test_a_song_is_named_by_its_file_or_url_in_safe_characters(source: dict[str, str], title: str) -> None:
    assert song_title({"_id": "job-1", "input": source}) == title


def test_stems_and_zips_are_named_for_people() -> None:
    doc = {"_id": "j", "input": {"filename": "Song.mp3"}}
    assert stem_filename(doc, "vocals", "flac") == f"Song {DASH} Vocals.flac"
    assert stem_filename(doc, "guitar", "wav", "htdemucs_6s-6") == f"Song {DASH} Guitar (htdemucs_6s-6).wav"
    assert zip_filename(doc) == "Song (stems).zip"
    assert zip_filename(doc, "htdemucs-2") == "Song (stems, htdemucs-2).zip"


def test_content_disposition_has_an_ascii_fallback_and_the_utf8_name() -> None:
    header = attachment(f"Café “Noir” {DASH} Vocals.flac")
    assert header.startswith("attachment; ")
    assert ascii_fallback(header) == "Cafe “Noir” - Vocals.flac".replace("“", "").replace("”", "")
    assert "filename*=UTF-8''Caf%C3%A9%20%E2%80%9CNoir%E2%80%9D%20%E2%80%93%20Vocals.flac" in header
    assert disposition_name(header) == f"Café “Noir” {DASH} Vocals.flac"
    assert disposition_name(attachment("plain.wav")) == "plain.wav"
    assert all(ord(c) < 128 for c in header)


async def _completed(app: Any, client: httpx.AsyncClient, headers: dict[str, str], filename: str) -> str:
    """A job of an upload called `filename`, taken to `completed` by real stage events (two FLAC stems)."""
    files = {"file": (filename, b"RIFF" + b"\0" * 2000, "audio/wav")}
    job = (await client.post("/v1/jobs", headers=headers, files=files, data={"analyze": "false"})).json()
    stems = []
    for name in ("vocals", "accompaniment"):
        key = stem_key(job["id"], name, "flac")
        await app.state.jobs.blobs.put_stream(key, _once(name.encode() * 100))
        stems.append(
            StemInfo(
                name=name, format="flac", media_type="audio/flac", blob_key=key, size=len(name) * 100, duration_s=1
            )
        )
    audio = AudioIngested(
        job_id=job["id"],
        owner="x",
        options=JobOptions(analyze=False),
        audio=AudioInfo(blob_key="a", duration_s=1, sample_rate=44100, channels=2, frames=44100, fingerprint="n"),
        source=SourceInfo(format="WAV", sample_rate=44100, channels=2, duration_s=1),
    )
    await app.state.jobs.apply_event(make_event(AUDIO_INGESTED, audio, source="/t"))
    done = SeparationCompleted(job_id=job["id"], model="htdemucs", device="cpu", precision="float32", stems=stems)
    await app.state.jobs.apply_event(make_event(SEPARATION_COMPLETED, done, source="/t"))
    return str(job["id"])


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_stem_and_zip_downloads_are_named_for_the_song(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "names")
    job_id = await _completed(app, client, alice, "Für Elise (live).wav")
    vocals = await client.get(f"/v1/jobs/{job_id}/stems/vocals", headers=alice)
    assert vocals.status_code == 200
    assert disposition_name(vocals.headers["content-disposition"]) == f"Für Elise (live) {DASH} Vocals.flac"
    assert ascii_fallback(vocals.headers["content-disposition"]) == "Fur Elise (live) - Vocals.flac"
    ranged = await client.get(f"/v1/jobs/{job_id}/stems/vocals", headers={**alice, "Range": "bytes=0-9"})
    assert disposition_name(ranged.headers["content-disposition"]) == f"Für Elise (live) {DASH} Vocals.flac"
    archive = await client.get(f"/v1/jobs/{job_id}/stems.zip", headers=alice)
    assert archive.status_code == 200
    assert disposition_name(archive.headers["content-disposition"]) == "Für Elise (live) (stems).zip"


async def test_bit_depth_and_sample_rate_are_options_of_wav_and_flac(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "depths")
    made = await helpers.submit(client, alice, output_format="flac", bit_depth="16", sample_rate="48000")
    assert made.status_code == 202, made.text
    options = made.json()["options"]
    assert (options["bit_depth"], options["sample_rate"]) == (16, 48000)
    floating = await helpers.submit(client, alice, output_format="wav", bit_depth="float")
    assert floating.status_code == 202 and floating.json()["options"]["bit_depth"] == 32
    plain = await helpers.submit(client, alice)
    assert plain.json()["options"]["bit_depth"] is None and plain.json()["options"]["sample_rate"] is None
    for fields in (
        {"output_format": "mp3", "bit_depth": "24"},
        {"output_format": "mp3", "sample_rate": "48000"},
        {"output_format": "flac", "bit_depth": "32"},
        {"bit_depth": "8"},
        {"sample_rate": "22050"},
    ):
        helpers.assert_problem(await helpers.submit(client, alice, **fields), 422, "validation_failed")
