import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from separator.engine import BatchReport, EngineClosed, SegmentEngine
from separator.models import LoadedModel, load_model
from separator.separation import SeparationError, separate

SAMPLERATE = 44100
# One tiny-model segment: 2 s of stereo in, four sources out, float32.
SEGMENT_BYTES = 2 * SAMPLERATE * 2 * (1 + 4) * 4
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def htdemucs(tiny_repo: Path) -> LoadedModel:
    return load_model("htdemucs", tiny_repo)


@pytest.fixture(scope="module")
def htdemucs_ft(tiny_repo: Path) -> LoadedModel:
    return load_model("htdemucs_ft", tiny_repo)


def noise(seconds: float, seed: int) -> np.ndarray:
    samples = int(seconds * SAMPLERATE)
    return (0.1 * np.random.default_rng(seed).standard_normal((2, samples))).astype(np.float32)


class Jobs:
    """Runs separations on threads against one engine and keeps what each returned or raised."""

    def __init__(self, engine: SegmentEngine) -> None:
        self.engine = engine
        self.results: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []

    def start(self, name: str, model: LoadedModel, mix: np.ndarray, **options: Any) -> None:
        def run() -> None:
            try:
                self.results[name] = separate(model, mix, engine=self.engine, **options)
            except Exception as exc:
                self.results[name] = exc

        thread = threading.Thread(target=run, name=name)
        self.threads.append(thread)
        thread.start()

    def join(self) -> dict[str, Any]:
        for thread in self.threads:
            thread.join(TIMEOUT_S)
            assert not thread.is_alive()
        return self.results


def assert_same(batched: dict[str, np.ndarray], alone: dict[str, np.ndarray]) -> None:
    assert batched.keys() == alone.keys()
    for name in alone:
        # Batched convolutions may pick other kernels than single ones: equal to float32 rounding.
        np.testing.assert_allclose(batched[name], alone[name], rtol=0, atol=2e-6)


def test_segments_of_several_jobs_share_forward_passes_and_match_separate_runs(
    htdemucs: LoadedModel, htdemucs_ft: LoadedModel
) -> None:
    requests = {"a": (4.0, "balanced"), "b": (2.5, "best"), "c": (1.2, "fast")}
    mixes = {name: noise(seconds, seed) for seed, (name, (seconds, _)) in enumerate(requests.items())}
    reports: list[BatchReport] = []
    engine = SegmentEngine(max_batch=4, batch_wait_s=0.0, on_batch=reports.append)
    jobs = Jobs(engine)
    for name, (_, quality) in requests.items():
        jobs.start(name, htdemucs, mixes[name], quality=quality, seed=5)
    jobs.start("bag", htdemucs_ft, mixes["c"], quality="fast")
    # Each job queues up to a batch of windows (3 of a's 3, 4 of b's 6, c's 1, the bag's 4) before any runs.
    assert engine.wait_queued(3 + 4 + 1 + 4, TIMEOUT_S)
    with engine:
        results = jobs.join()

    for name, (_, quality) in requests.items():
        assert_same(results[name], separate(htdemucs, mixes[name], quality=quality, seed=5))
    assert_same(results["bag"], separate(htdemucs_ft, mixes["c"], quality="fast"))
    assert max(len(set(report.jobs)) for report in reports) >= 3
    assert max(len(report.jobs) for report in reports) == 4


def test_a_short_job_is_not_starved_by_a_long_one(htdemucs: LoadedModel) -> None:
    reports: list[BatchReport] = []
    with SegmentEngine(max_batch=1, on_batch=reports.append) as engine:
        jobs = Jobs(engine)
        started = threading.Event()

        def start_short(fraction: float) -> None:
            if fraction > 0 and not started.is_set():
                started.set()
                jobs.start("short", htdemucs, noise(5.0, 2))

        long_stems = separate(htdemucs, noise(20.0, 1), engine=engine, progress=start_short)
        jobs.join()

    assert isinstance(jobs.results["short"], dict) and "vocals" in long_stems
    long_job = reports[0].jobs[0]
    owners = ["long" if report.jobs == (long_job,) else "short" for report in reports]
    first, last = owners.index("short"), len(owners) - 1 - owners[::-1].index("short")
    # The short job's three segments take turns with the long job's twelve.
    assert (owners.count("short"), owners.count("long")) == (3, 12)
    assert last - first + 1 <= 6
    assert owners[last + 1 :].count("long") >= 3


def test_out_of_memory_halves_the_batch_and_loses_nothing(htdemucs: LoadedModel) -> None:
    reports: list[BatchReport] = []
    # Room for one segment and a half: batches of 4 and 2 fail, single segments fit.
    engine = SegmentEngine(max_batch=4, memory_budget_bytes=SEGMENT_BYTES * 3 // 2, on_batch=reports.append)
    mixes = {"a": noise(6.0, 1), "b": noise(6.0, 2)}
    jobs = Jobs(engine)
    for name, mix in mixes.items():
        jobs.start(name, htdemucs, mix)
    assert engine.wait_queued(8, TIMEOUT_S)
    with engine:
        results = jobs.join()

    for name, mix in mixes.items():
        assert_same(results[name], separate(htdemucs, mix))
    failed = [len(report.jobs) for report in reports if report.out_of_memory]
    assert failed[:3] == [4, 2, 2]
    assert all(len(report.jobs) == 1 for report in reports if not report.out_of_memory)
    # Once split, the engine stays at the size that fits.
    assert engine.batch_cap == 1
    assert len(failed) == 3


def test_a_segment_too_big_alone_fails_its_job_with_a_code(htdemucs: LoadedModel) -> None:
    with SegmentEngine(memory_budget_bytes=SEGMENT_BYTES // 2) as engine, pytest.raises(SeparationError) as raised:
        separate(htdemucs, noise(1.0, 1), engine=engine)
    assert raised.value.code == "out_of_memory"


def test_closing_fails_queued_segments(htdemucs: LoadedModel) -> None:
    engine = SegmentEngine()
    future = engine.submit("job", htdemucs.model.models[0], torch.zeros(2, 2 * SAMPLERATE))
    engine.close()

    with pytest.raises(EngineClosed):
        future.result(TIMEOUT_S)
    with pytest.raises(EngineClosed):
        engine.submit("job", htdemucs.model.models[0], torch.zeros(2, 2 * SAMPLERATE))


def test_cancelled_segments_are_skipped(htdemucs: LoadedModel) -> None:
    reports: list[BatchReport] = []
    engine = SegmentEngine(max_batch=4, on_batch=reports.append)
    model = htdemucs.model.models[0]
    dropped = engine.submit("dropped", model, torch.zeros(2, 2 * SAMPLERATE))
    kept = engine.submit("kept", model, torch.zeros(2, 2 * SAMPLERATE))
    assert dropped.cancel()
    with engine:
        assert kept.result(TIMEOUT_S).shape == (4, 2, 2 * SAMPLERATE)

    assert [report.jobs for report in reports] == [("kept",)]


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_half_precision_stays_close_to_float32(htdemucs: LoadedModel, precision: str) -> None:
    mix = noise(2.5, 4)
    exact = separate(htdemucs, mix)
    with SegmentEngine(precision=precision) as engine:
        half = separate(htdemucs, mix, engine=engine)

    for name in exact:
        error = np.sum((half[name] - exact[name]) ** 2) / np.sum(exact[name] ** 2)
        assert 10 * np.log10(error) < -30
