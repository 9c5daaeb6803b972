"""Every accepted job ends, promptly, with a stable code: the fault matrix.

Each case injects one fault into the running system the way it happens in production — a stage's
message its worker cannot handle, an invalid stage result, an event another service publishes for a
model nobody serves, options that only the audio can refute — and checks that the job reaches its
terminal state with the expected code within seconds, that the WebSocket pushes that terminal event
exactly once, and that the next ordinary job still completes. Work is published straight onto the
queue of the stage under test (through the broker's default exchange), as a real producer would.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from stemflow_dev import demo_song
from stemflow_dev.client import EventWatch, StemflowClient
from stemflow_dev.faults import POISONS, Faults
from stemflow_dev.fixtures import Isolation
from stemflow_dev.stack import StackUrls
from stemflow_shared.storage import FilesystemBlobStore
from stemflow_shared.topology import Names

pytestmark = pytest.mark.integration
TERMINAL_WITHIN_S = 60.0
TIMES: dict[str, float] = {}


@pytest.fixture
def faults(system: Any, stack: StackUrls, isolation: Isolation) -> Faults:
    blobs = FilesystemBlobStore(Path(system.env["BLOB_DIR"]))
    return Faults(stack.amqp_url, Names(isolation.namespace), blobs, "integration")


def _poison(name: str) -> Callable[[Faults, StemflowClient, Path], Awaitable[str]]:
    return lambda faults, client, tmp: getattr(faults, name)()


async def _trim_past_the_end(f: Faults, client: StemflowClient, tmp: Path) -> str:
    song = tmp / "short.wav"
    sf.write(song, demo_song.render(3.0), 44100)
    return (await client.submit(song, trim_start=10, separate=False))["id"]


async def _samples_far_past_full_scale(f: Faults, client: StemflowClient, tmp: Path) -> str:
    song = tmp / "loud.wav"
    sf.write(song, (demo_song.render(3.0) * 1e30).astype(np.float32), 44100, subtype="FLOAT")
    return (await client.submit(song, separate=False))["id"]


CASES: list[tuple[str, Callable[[Faults, StemflowClient, Path], Awaitable[str]], str]] = [
    *((name.replace("_", " "), _poison(name), code) for name, code in POISONS.items()),
    ("trim_start past the end of the audio", _trim_past_the_end, "trim_out_of_range"),
    ("float samples around 1e30", _samples_far_past_full_scale, "samples_out_of_range"),
]


@pytest.mark.parametrize(("cause", "inject", "code"), CASES, ids=[c[2] for c in CASES])
async def test_every_fault_ends_the_job_once_with_its_code(
    system: Any,
    client: StemflowClient,
    all_events: EventWatch,
    faults: Faults,
    tmp_path: Path,
    cause: str,
    inject: Callable[[Faults, StemflowClient, Path], Awaitable[str]],
    code: str,
) -> None:
    started = time.monotonic()
    job_id = await inject(faults, client, tmp_path)
    await all_events.wait_for(lambda: bool(all_events.terminal(job_id)), TERMINAL_WITHIN_S)
    TIMES[cause] = time.monotonic() - started

    job = await client.job(job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == code, job["error"]
    assert job["error"]["message"]

    # The next ordinary job completes, and bounds the wait for a (wrong) second terminal event.
    song = tmp_path / "next.wav"
    sf.write(song, demo_song.render(3.0) + np.random.default_rng().normal(0, 1e-3, (3 * 44100, 2)), 44100)
    marker = await client.submit(song, separate=False)
    await all_events.wait_for(lambda: all_events.count(marker["id"], "completed") == 1, 120)
    assert [e["type"] for e in all_events.terminal(job_id)] == ["stemflow.job.failed.v1"]
    assert all_events.terminal(job_id)[0]["data"]["error"]["code"] == code


def teardown_module() -> None:
    """The matrix as measured (cause → seconds to the terminal event), for the closing note."""
    if TIMES and os.environ.get("STEMFLOW_FAULT_TIMES"):
        Path(os.environ["STEMFLOW_FAULT_TIMES"]).write_text(json.dumps(TIMES, indent=2))
