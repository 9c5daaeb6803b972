"""Workers killed with SIGKILL while they hold a message: the job still completes, exactly once."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from stemflow_dev import demo_song
from stemflow_dev.client import EventWatch, StemflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _in_progress(port: int) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    return any(float(v) > 0 for v in re.findall(r"^stemflow_messages_in_progress\{[^}]*\} (\S+)$", text, re.M))


async def _stop_when_busy(system: Any, name: str, how: str, timeout_s: float = 120) -> None:
    """Stop a worker the moment it holds a message (its in-progress gauge is observed across processes).

    `kill`: SIGKILL, then a new process. `term`: SIGTERM (graceful: finish or requeue within the grace
    period), then a new process.
    """

    async def busy() -> None:
        while not await _in_progress(getattr(system.ports, name)):  # noqa: ASYNC110 - another process: polled
            await asyncio.sleep(0.02)

    await asyncio.wait_for(busy(), timeout_s)
    if how == "kill":
        system.processes.kill(name)
    await asyncio.to_thread(system.processes.restart, name, 60)
    await asyncio.to_thread(system.processes.wait_ready, 240)


def _long_song(path: Path, seconds: float) -> Path:
    """A song no earlier job had: identical audio and options would reuse results and never reach the worker."""
    one = demo_song.render(12.0)
    reps = int(np.ceil(seconds / 12.0))
    audio = np.tile(one, (reps, 1))[: int(seconds * 44100)]
    audio = audio + np.random.default_rng().normal(0, 1e-3, audio.shape)
    sf.write(path, audio, 44100, subtype="PCM_16")
    return path


@pytest.mark.parametrize(
    ("worker", "how", "seconds", "options"),
    [
        ("separator", "kill", 40.0, {"stems": 2, "quality": "fast", "analyze": False}),
        ("analyzer", "kill", 600.0, {"separate": False}),
        ("ingest", "kill", 900.0, {"separate": False}),
        ("separator", "term", 40.0, {"stems": 2, "quality": "fast", "analyze": False}),
    ],
)
async def test_a_worker_stopped_mid_job_loses_nothing_and_the_job_completes_once(
    system: Any,
    client: StemflowClient,
    all_events: EventWatch,
    tmp_path: Path,
    worker: str,
    how: str,
    seconds: float,
    options: dict[str, Any],
) -> None:
    song = _long_song(tmp_path / "long.wav", seconds)
    job = await client.submit(song, **options)
    await _stop_when_busy(system, worker, how)
    await all_events.wait_for(lambda: all_events.count(job["id"], "completed") >= 1, 300)

    # A later job's completion bounds the wait for a (wrong) second completion of the first.
    marker = await client.submit(_long_song(tmp_path / "short.wav", 3.0), separate=False)
    await all_events.wait_for(lambda: all_events.count(marker["id"], "completed") >= 1, 120)
    assert all_events.count(job["id"], "completed") == 1
    assert all_events.count(job["id"], "failed") == 0

    done = await client.job(job["id"])
    assert done["status"] == "completed"
    if options.get("separate", True):
        paths = await client.download_stems(done, tmp_path / "stems")
        assert sorted(p.stem for p in paths) == ["accompaniment", "vocals"]
        assert all(sf.info(p).frames == int(seconds * 44100) for p in paths)
    else:
        analysis = await client.analysis(job["id"])
        assert analysis["duration_s"] == pytest.approx(seconds, abs=0.01)
