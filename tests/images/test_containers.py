"""The five images as containers: hygiene, a song end to end, and a worker stopped with SIGTERM mid-job."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from stemflow_dev import demo_song
from stemflow_dev.client import StemflowClient
from stemflow_dev.images import SERVICES, tag

pytestmark = [pytest.mark.images, pytest.mark.slow]
SECONDS = 12.0


def test_every_service_runs_as_the_app_user_on_a_read_only_root(containers: Any) -> None:
    for service in SERVICES:
        container = containers.running[service]
        assert container.exec_run(["id", "-u"]).output.decode().strip() == "10001", service
        # Nothing outside the mounted paths can be written; /tmp and the blob volume can.
        assert container.exec_run(["touch", "/usr/local/written"]).exit_code != 0, service
        assert container.exec_run(["touch", "/tmp/written"]).exit_code == 0, service
        if service != "notifier":
            assert container.exec_run(["touch", "/var/lib/stemflow/blobs/.written"]).exit_code == 0, service


async def test_a_song_goes_through_the_images_to_stems_and_analysis(
    containers: Any, image_client: StemflowClient, tmp_path: Path
) -> None:
    # The input of tests/integration/test_pipeline.py (22.05 kHz mono, 120 BPM), so the expectations are the same.
    song = tmp_path / "song.wav"
    sf.write(song, demo_song.render(SECONDS, bpm=120.0).mean(axis=1)[::2], 22050, subtype="PCM_16")
    job = await image_client.submit(song, stems=4, quality="fast", output_format="wav")
    frames = await image_client.follow(job["id"], timeout_s=300)

    events = [e for f in frames if f["type"] == "batch" for e in f["events"]]
    assert [e["type"] for e in events][-1] == "stemflow.job.completed.v1"
    done = await image_client.job(job["id"])
    assert done["status"] == "completed" and done["error"] is None
    assert {done["progress"][s]["status"] for s in ("ingest", "separation", "analysis")} == {"completed"}

    paths = await image_client.download_stems(done, tmp_path / "stems")
    assert sorted(p.stem for p in paths) == ["bass", "drums", "other", "vocals"]
    for path in paths:
        info = sf.info(path)
        assert info.channels == 2 and info.samplerate == 44100 and info.frames == int(SECONDS * 44100)

    analysis = await image_client.analysis(job["id"])
    assert done["result"]["analysis"]["tempo_bpm"] == pytest.approx(120.0, rel=0.04)
    assert analysis["beat_count"] == len(analysis["beats"]) > 8
    assert -40 < analysis["loudness_lufs"] < 0


async def test_a_separator_stopped_with_sigterm_mid_job_exits_cleanly_and_the_job_completes(
    containers: Any, image_client: StemflowClient, tmp_path: Path
) -> None:
    song = _unique_song(tmp_path / "long.wav", 40.0)
    job = await image_client.submit(song, stems=2, quality="fast", analyze=False)
    follow = asyncio.create_task(image_client.follow(job["id"], timeout_s=600))

    await asyncio.wait_for(_busy(containers.ports.separator), 180)
    separator = containers.running["separator"]
    stopped = time.monotonic()
    separator.kill(signal="SIGTERM")  # what `docker stop` and the kubelet send to PID 1
    result = await asyncio.to_thread(separator.wait, timeout=130)
    took = time.monotonic() - stopped
    containers.save_logs("separator", separator)
    separator.remove()
    # PID 1 handles SIGTERM itself: a clean exit within the grace period, not the engine's SIGKILL (137).
    assert result["StatusCode"] == 0, separator.logs(tail=30).decode(errors="replace")
    assert took < 120

    started = time.monotonic()
    containers.start("separator")
    containers.ready_s["separator (restart)"] = await asyncio.to_thread(containers.wait_ready, "separator", started)
    frames = await follow
    events = [e for f in frames if f["type"] == "batch" for e in f["events"]]
    assert [e["type"] for e in events].count("stemflow.job.completed.v1") == 1
    done = await image_client.job(job["id"])
    assert done["status"] == "completed"
    assert sorted(s["name"] for s in done["result"]["stems"]) == ["accompaniment", "vocals"]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the host's ffmpeg makes the samples")
def test_the_ingest_image_decodes_every_container_it_sends_ffmpeg(containers: Any, tmp_path: Path) -> None:
    """The ingest image's own ffmpeg (built for these formats only), with ingest's own command line."""
    from ingest.audio import _ffmpeg_command

    samples = {
        "m4a-aac": ("MP4", ["-c:a", "aac", "-f", "mp4"]),
        "m4a-alac": ("MP4", ["-c:a", "alac", "-f", "mp4"]),
        "adts": ("AAC", ["-c:a", "aac", "-f", "adts"]),
        "mka-opus": ("MATROSKA", ["-c:a", "libopus", "-f", "matroska"]),
        "webm-vorbis": ("MATROSKA", ["-c:a", "libvorbis", "-f", "webm"]),
        "wma": ("ASF", ["-c:a", "wmav2", "-f", "asf"]),
        "wav-adpcm": ("WAV", ["-c:a", "adpcm_ima_wav", "-f", "wav"]),
        "ogg-speex": ("OGG", ["-c:a", "libspeex", "-ar", "16000", "-ac", "1", "-f", "ogg"]),
        "ogg-flac": ("OGG", ["-c:a", "flac", "-f", "ogg"]),
        "flac": ("FLAC", ["-c:a", "flac", "-f", "flac"]),
    }
    tmp_path.chmod(0o755)
    made = {}
    for name, (container, codec) in samples.items():
        path = tmp_path / name
        source = ["-f", "lavfi", "-i", "sine=frequency=440:duration=2:sample_rate=44100"]
        result = subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", *source, "-ac", "2", *codec, "-y", str(path)],
            capture_output=True,
            check=False,
        )
        if result.returncode == 0:  # the host's ffmpeg may lack an encoder: that sample is left out
            path.chmod(0o644)
            made[name] = container
    assert {"m4a-aac", "adts", "mka-opus", "wma", "flac"} <= set(made)
    script = " && ".join(
        " ".join(_ffmpeg_command("ffmpeg", Path("/samples") / name, container)) + f" > /tmp/{name}.wav"
        for name, container in made.items()
    )
    script += " && for f in /tmp/*.wav; do wc -c < $f; done"
    output = containers.client.containers.run(
        tag("ingest"),
        entrypoint=["sh", "-c", script],
        user="10001:10001",
        read_only=True,
        tmpfs={"/tmp": ""},
        network_mode="none",
        volumes={str(tmp_path): {"bind": "/samples", "mode": "ro"}},
        remove=True,
    )
    sizes = [int(n) for n in output.decode().split()]
    assert len(sizes) == len(made) and min(sizes) > 16_000 * 4 * 1.5  # at least 1.5 s of float audio


async def _busy(port: int) -> None:
    """Until the worker holds a message (its in-progress gauge), polled over HTTP: it is another process."""
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            gauges = re.findall(r"^stemflow_messages_in_progress\{[^}]*\} (\S+)$", text, re.M)
            if any(float(v) > 0 for v in gauges):
                return
            await asyncio.sleep(0.05)


def _unique_song(path: Path, seconds: float) -> Path:
    """A song no earlier job had: identical audio and options would reuse results and never reach the worker."""
    one = demo_song.render(12.0)
    audio = np.tile(one, (int(np.ceil(seconds / 12.0)), 1))[: int(seconds * 44100)]
    audio = audio + np.random.default_rng().normal(0, 1e-3, audio.shape)
    sf.write(path, audio, 44100, subtype="PCM_16")
    return path
