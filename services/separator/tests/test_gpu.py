"""The separator on CUDA (marked gpu, skipped without a device), and bench/gpu.py's machinery on CPU.

Self-contained, without the conftest's fixtures: bench/gpu_check.sh runs this file with --noconftest on
a GPU machine that lacks the integration-test stack the repository's conftest loads.
"""

import copy
import dataclasses
import gc
import importlib.util
import json
import math
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from separator.device import CUDA_PRECISION, pick_device, pick_precision
from separator.engine import BatchReport, SegmentEngine
from separator.models import LoadedModel, load_model
from separator.options import SeparationCancelled
from separator.separation import separate
from stemflow_dev.models import make_tiny_repo

BENCH = Path(__file__).resolve().parents[3] / "bench" / "gpu.py"
SAMPLERATE = 44100
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Batched against separate runs: energy of the difference relative to the output's, in dB. A batch
# of one and a batch of eight may get other kernels (cuDNN's choice, TF32 in float32 convolutions),
# so they agree to the precision's rounding. Not yet measured on a GPU: bench/gpu.py's `batching`
# section prints the real figures to tighten these with.
TOLERANCE_DB = {"float32": -50.0, "float16": -40.0, "bfloat16": -30.0}
EXPECTED_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((2, int(seconds * SAMPLERATE)))).astype(np.float32)


def error_db(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    difference = sum(float(np.square(got[k].astype(np.float64) - reference[k]).sum()) for k in reference)
    total = sum(float(np.square(reference[k].astype(np.float64)).sum()) for k in reference)
    return -math.inf if difference == 0 else 10 * math.log10(difference / total)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model("htdemucs", make_tiny_repo(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def tiny_cuda(tiny: LoadedModel) -> LoadedModel:
    return dataclasses.replace(tiny, model=copy.deepcopy(tiny.model).to("cuda"))


def start_jobs(
    engine: SegmentEngine, model: LoadedModel, mixes: list[np.ndarray]
) -> tuple[list[threading.Thread], list[Any]]:
    """Separate each mix on a thread of its own against `engine`: the threads, and the results (or exceptions) in order."""
    results: list[Any] = [None] * len(mixes)

    def run(index: int) -> None:
        try:
            results[index] = separate(model, mixes[index], engine=engine, quality="balanced")
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(mixes))]
    for thread in threads:
        thread.start()
    return threads, results


# ---------------------------------------------------------------- on a CUDA device


@pytest.mark.gpu
@needs_cuda
def test_cuda_is_chosen_with_the_workers_precision() -> None:
    assert pick_device("auto") == "cuda"
    assert pick_precision("auto", "cuda") == CUDA_PRECISION
    assert pick_precision("auto", "cpu") == "float32"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_a_segment_runs_on_the_device_in_the_precision_asked(tiny_cuda: LoadedModel, precision: str) -> None:
    model = tiny_cuda.model.models[0]
    seen: list[tuple[torch.device, torch.dtype]] = []
    hook = model.tencoder[0].conv.register_forward_hook(lambda _m, _i, out: seen.append((out.device, out.dtype)))
    try:
        with SegmentEngine("cuda", precision=precision) as engine:
            out = engine.submit("job", model, torch.from_numpy(noise(2.0, 1))).result()
    finally:
        hook.remove()
    assert [(device.type, dtype) for device, dtype in seen] == [("cuda", EXPECTED_DTYPE[precision])]
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert out.shape == (4, 2, 2 * SAMPLERATE) and torch.isfinite(out).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_jobs_batched_together_equal_separate_runs(tiny_cuda: LoadedModel, precision: str) -> None:
    mixes = [noise(4.0, seed) for seed in range(3)]
    reports: list[BatchReport] = []
    engine = SegmentEngine("cuda", max_batch=8, precision=precision, on_batch=reports.append)
    threads, batched = start_jobs(engine, tiny_cuda, mixes)
    # 4 s at overlap 0.25 is 3 segments a job; all 9 wait before the engine starts, so batches mix jobs.
    assert engine.wait_queued(9, 60.0)
    with engine:
        for thread in threads:
            thread.join()
    with SegmentEngine("cuda", max_batch=1, precision=precision) as alone_engine:
        alone = [separate(tiny_cuda, mix, engine=alone_engine, quality="balanced") for mix in mixes]
    assert max(len(set(report.jobs)) for report in reports) > 1
    for got, expected in zip(batched, alone, strict=True):
        assert not isinstance(got, Exception), got
        assert error_db(got, expected) <= TOLERANCE_DB[precision]


@pytest.mark.gpu
@needs_cuda
def test_out_of_memory_on_the_real_allocator_splits_the_batch_and_every_segment_still_runs(
    tiny_cuda: LoadedModel,
) -> None:
    model = tiny_cuda.model.models[0]
    windows = [torch.from_numpy(noise(2.0, seed)) for seed in range(16)]
    with SegmentEngine("cuda") as engine:
        engine.submit("warm", model, windows[0]).result()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        alone = [engine.submit("alone", model, window).result() for window in windows]
        one_segment = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    # Room for about three segments at once: a batch of 16 cannot fit, one of two can.
    cap = torch.cuda.memory_reserved() + 3 * one_segment
    total = torch.cuda.get_device_properties(0).total_memory
    reports: list[BatchReport] = []
    engine = SegmentEngine("cuda", max_batch=16, on_batch=reports.append)
    futures = [engine.submit(f"job{i}", model, window) for i, window in enumerate(windows)]
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        with engine:
            outputs = [future.result(timeout=120) for future in futures]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert reports[0].out_of_memory and len(reports[0].jobs) == 16
    assert 1 <= engine.batch_cap < 16
    ran = [report for report in reports if not report.out_of_memory]
    assert sum(len(report.jobs) for report in ran) == 16
    for got, expected in zip(outputs, alone, strict=True):
        assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max())


@pytest.mark.gpu
@needs_cuda
def test_cancelling_a_job_while_its_batch_runs_leaves_no_device_memory_behind(tiny_cuda: LoadedModel) -> None:
    reports: list[BatchReport] = []
    with SegmentEngine("cuda", max_batch=4, on_batch=reports.append) as engine:
        separate(tiny_cuda, noise(4.0, 0), engine=engine)  # caches (cuFFT plans, cuDNN) made before the count
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        reports.clear()
        progressed = threading.Event()

        def cancel_once_running() -> bool:
            return progressed.is_set()

        with pytest.raises(SeparationCancelled):
            separate(
                tiny_cuda,
                noise(30.0, 1),
                engine=engine,
                progress=lambda fraction: fraction > 0 and progressed.set(),
                should_cancel=cancel_once_running,
            )
        # The batch in flight when the job gave up finishes first; one more segment runs after it.
        engine.submit("after", tiny_cuda.model.models[0], torch.from_numpy(noise(2.0, 2))).result()
        gc.collect()
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
    cancelled_segments = sum(len(report.jobs) for report in reports) - 1
    # 30 s at overlap 0.1 is 17 segments; the job stopped after its first results and a batch in flight.
    assert cancelled_segments < 17
    # One batch of outputs alone would be 4 x 4 x 2 x 88200 x 4 bytes (11 MB).
    assert after - before <= 2**20


# ---------------------------------------------------------------- bench/gpu.py on CPU, end to end


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stemflow_bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up by name while the file runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """bench/gpu.py on the tiny models on CPU: 3 s songs (2 segments each), 2 and 3 concurrent jobs."""
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    argv = ["--device", "cpu", "--model", "tiny", "--seconds", "3", "--jobs", "2,3", "--batch-wait-ms", "50"]
    results = load_bench().main([*argv, "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["summary"] == json.loads(json.dumps(results["summary"]))
    return written


def test_dry_run_one_job_rtf_and_each_precisions_distance_from_float32(dry_run: dict[str, Any]) -> None:
    single = {**dry_run["single"], **dry_run["bag"]}
    assert set(single) == {"htdemucs", "htdemucs_ft"}
    for per in single.values():
        for precision in ("float32", "bfloat16", "float16"):
            figures = per[precision]
            assert 0 < figures["rtf"] < math.inf and 0 < figures["apply_model_rtf"] < math.inf
            assert figures["over_apply_model"] == pytest.approx(figures["rtf"] / figures["apply_model_rtf"])
        # float32 is the reference; the worker in float32 is apply_model to float32 rounding.
        assert per["float32"]["error_db_vs_float32"] is None
        assert per["float32"]["max_difference_from_apply_model"] < 1e-5
        # Half precisions land where their mantissas put them (bfloat16 8 bits, float16 11), not at 0 or noise.
        assert -90 < per["bfloat16"]["error_db_vs_float32"] < -30
        assert -120 < per["float16"]["error_db_vs_float32"] < -50
        assert per["float16"]["error_db_vs_float32"] < per["bfloat16"]["error_db_vs_float32"]


def test_dry_run_concurrent_jobs_are_batched_across_jobs_and_timed(dry_run: dict[str, Any]) -> None:
    for jobs in (2, 3):
        figures = dry_run["concurrent"][str(jobs)]
        assert figures["errors"] == []
        # Every segment ran once: 3 s at overlap 0.25 is 2 segments a job.
        assert sum(int(size) * count for size, count in figures["batch_sizes"].items()) == 2 * jobs
        assert max(int(size) for size in figures["batch_sizes"]) > 1
        assert 0 < figures["latency_p50_s"] <= figures["latency_p95_s"] <= figures["wall_s"]
        assert figures["aggregate_rtf"] == pytest.approx(jobs * 3 / figures["wall_s"])
        assert 0 < figures["engine_busy"] <= 1
        assert figures["p95_over_single"] > 0
        # No GPU to sample, and no device memory to count, on CPU.
        assert figures["gpu"] == {"source": None, "samples": 0}
        assert figures["peak_allocated_mb_per_batch_size"] is None


def test_dry_run_batched_and_separate_runs_agree(dry_run: dict[str, Any]) -> None:
    for precision, figures in dry_run["batching"].items():
        assert figures["largest_batch"] > 1
        assert figures["error_db"] is None or figures["error_db"] < -60, precision
    assert dry_run["batching"]["float32"]["max_difference"] < 1e-5


def test_dry_run_forward_options_measured_or_skipped_with_a_reason(dry_run: dict[str, Any]) -> None:
    forward = dry_run["forward"]
    assert all(size["segments_per_s"] > 0 for size in forward["batch_sweep"].values())
    capturable = forward["options"]["capturable"]
    # Cached constants and an inverse STFT without its host check: the same output to float32 rounding.
    assert capturable["max_difference"] < 1e-5 and capturable["ratio"] > 0
    for name in ("pinned", "overlap", "overlap_vs_pinned", "cuda_graphs"):
        assert forward["options"][name] == {"skipped": "needs CUDA"}
    assert "skipped" in forward["options"]["compile"] and "skipped" in dry_run["engine_compile"]
    assert set(forward["hooks"]) >= {"pinned", "overlap", "cuda_graphs", "compile", "capturable"}


def test_dry_run_says_where_half_precision_stft_fails_and_what_autocast_gives_it(dry_run: dict[str, Any]) -> None:
    stft = dry_run["stft"]
    # CPU FFTs (MKL, pocketfft) have no half types; under autocast demucs' STFT stays in float32.
    assert stft["float16_n_fft_4096"]["ok"] is False and "Half" in stft["float16_n_fft_4096"]["error"]
    assert stft["bfloat16_n_fft_4096"]["ok"] is False
    for precision in ("float16", "bfloat16"):
        assert stft[f"autocast_{precision}"] == {"stft_input": ["torch.float32"], "istft_input": ["torch.complex64"]}
    rows = {row[0]: row[1] for row in dry_run["summary"]}
    assert rows["stft float16_n_fft_4096"] == "fails" and rows["htdemucs float32: rtf"] > 0
