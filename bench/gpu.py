"""The separator on a GPU: real-time factors, batching, memory, precision error and forward-pass options.

Every speed figure is a ratio against a baseline measured in the same run, on the same device:
- single: one job per model (htdemucs; htdemucs_ft, a bag of four) and precision: the worker's
  real-time factor (SegmentEngine, max batch as on CUDA) against demucs.apply.apply_model with the
  same quality settings and the same autocast, the largest difference between the two, and each
  precision's distance from float32 in dB (energy of the difference over the reference's);
- concurrent: N jobs at once through one engine (cross-job batching): aggregate real-time factor,
  per-job latency p50/p95 (and p95 over the single job's time), batch sizes formed, the engine's busy
  share (device seconds over wall time), GPU utilisation and memory sampled with NVML (pynvml, else
  nvidia-smi), and the peak allocated memory per batch size;
- batching: the same songs batched together and each alone, per precision: max difference and dB;
- forward: segments per second and peak memory per batch size, and each option on and off in
  alternating rounds (ratios > 1 mean the option wins): demucs' STFT window and positional embedding
  kept on the device (they are made on the CPU and copied over on every forward), pinned host
  memory, host-device copies overlapped with compute on two side streams, CUDA graphs for the
  fixed segment shape, torch.compile; the options the engine lacks are built here (see HOOKS);
- stft: whether demucs' STFT and inverse STFT run in float16/bfloat16 on this device, what autocast
  gives them, and a model converted to half precision as a whole.

Weights are random (speed does not depend on them). `--model tiny` uses the tests' tiny untrained
models, for a dry run on CPU:

    .venv/bin/python bench/gpu.py --device cpu --model tiny            # < 1 min, no GPU needed
    python3 bench/gpu.py --device cuda --budget-s 170 --out $OUT/gpu.json   # bench/gpu_check.sh
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

# Run as a script, this file's folder comes first on sys.path and bench/separator.py would shadow
# the separator package measured here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from demucs.apply import BagOfModels, apply_model  # noqa: E402
from demucs.htdemucs import HTDemucs  # noqa: E402

from separator.engine import BatchReport, SegmentEngine  # noqa: E402
from separator.mix import ArraySource, normalisation  # noqa: E402
from separator.models import LoadedModel, load_model  # noqa: E402
from separator.options import output_names, quality_preset  # noqa: E402
from separator.separation import ArraySink  # noqa: E402
from separator.stream import separate_stream  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLERATE = 44100
PRECISIONS = ("float32", "bfloat16", "float16")
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Issue 19's goals, same run, same GPU.
GOALS = {
    "htdemucs_rtf": 100.0,
    "htdemucs_over_apply_model": 1.5,
    "chosen_precision_error_db": -60.0,
    "aggregate_rtf_32_jobs": 300.0,
    "p95_over_single_32_jobs": 3.0,
    "gpu_busy_while_queued": 0.85,
    "htdemucs_ft_rtf": 25.0,
}
# What the engine would need for the forward options measured here, written once for the JSON.
HOOKS = {
    "capturable": "demucs makes its STFT window (spec.py) and 2-D positional embedding (transformer.py) on the "
    "CPU and copies them to the device on every forward, and torch.istft reads a value back (its NOLA check): "
    "host waits per forward that also forbid CUDA graphs; the bench swaps in cached device copies and an "
    "inverse STFT without the check (bench/gpu.py: capturable)",
    "pinned": "the engine stacks windows in pageable memory and copies results back with .cpu(); a pinned "
    "staging buffer per batch shape would make both copies asynchronous",
    "overlap": "the engine waits for each batch's results before taking the next; overlapping needs a copy "
    "stream each way and futures resolved on a completion event instead of inside the forward loop",
    "cuda_graphs": "needs capturable, one captured graph per (model, batch size), partial batches padded "
    "to a captured size, and autocast without its weight cache",
    "compile": "SegmentEngine(compile_models=True) compiles with dynamic=False: one recompilation per batch "
    "size met, within torch._dynamo's recompile limit",
}


# ---------------------------------------------------------------- models and songs


def production_models() -> dict[str, LoadedModel]:
    """htdemucs (the release's architecture) and htdemucs_ft's shape: four of them, one source each."""
    from stemflow_dev.models import PRODUCTION_HTDEMUCS_KWARGS, make_production_htdemucs

    single = make_production_htdemucs()
    members = []
    for seed in range(4):
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            members.append(HTDemucs(**PRODUCTION_HTDEMUCS_KWARGS).eval())
    weights = [[1.0 if source == model else 0.0 for source in range(4)] for model in range(4)]
    bag = BagOfModels(members, weights)
    return {"htdemucs": _loaded("htdemucs", single), "htdemucs_ft": _loaded("htdemucs_ft", bag)}


def _loaded(name: str, model: torch.nn.Module) -> LoadedModel:
    return LoadedModel(name, model, tuple(model.sources), int(model.samplerate), int(model.audio_channels), True)


def tiny_models(repo: Path) -> dict[str, LoadedModel]:
    """The tests' tiny untrained htdemucs and htdemucs_ft, loaded the separator's way."""
    from stemflow_dev.models import make_tiny_repo

    make_tiny_repo(repo)
    return {name: load_model(name, repo) for name in ("htdemucs", "htdemucs_ft")}


def make_song(seconds: float, seed: int = 0) -> np.ndarray:
    """A synthetic stereo song (chords, a beat, hiss), float32 (2, samples)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLERATE), dtype=np.float64) / SAMPLERATE
    notes = 110 * 2 ** (rng.integers(0, 24, size=4) / 12)
    tone = sum(0.08 * np.sin(2 * np.pi * f * t + i) for i, f in enumerate(notes))
    beat = 0.3 * np.exp(-20 * (t % 0.5)) * np.sin(2 * np.pi * 60 * t)
    hiss = 0.02 * rng.standard_normal((2, t.size))
    return (np.stack([tone + beat, 0.8 * tone + beat]) + hiss).astype(np.float32)


def songs(seconds: float, count: int) -> list[np.ndarray]:
    """`count` different songs, made from one by rotating it and changing its level."""
    base = make_song(seconds)
    step = base.shape[1] // max(count, 1)
    return [np.roll(base, i * step, axis=1) * np.float32(1 - 0.02 * i) for i in range(count)]


def submodels(model: LoadedModel) -> list[torch.nn.Module]:
    return list(model.model.models) if isinstance(model.model, BagOfModels) else [model.model]


# ---------------------------------------------------------------- measuring helpers


@dataclass
class Budget:
    """A soft deadline: work predicted not to fit is skipped and says so."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return math.inf if self.seconds <= 0 else self.seconds - (time.monotonic() - self.started)

    def allows(self, estimate_s: float = 0.0) -> bool:
        return self.left() > estimate_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str, cache: bool = True) -> Iterator[None]:
    """The engine's precision setting: autocast to a half type, or nothing for float32."""
    if precision == "float32":
        yield
        return
    with torch.autocast(device.type, dtype=HALF[precision], cache_enabled=cache):
        yield


def error_db(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """Energy of the difference over the reference's, in dB (-inf when equal)."""
    difference = sum(float(np.square(got[k].astype(np.float64) - reference[k]).sum()) for k in reference)
    total = sum(float(np.square(reference[k].astype(np.float64)).sum()) for k in reference)
    return -math.inf if difference == 0 else 10 * math.log10(difference / total)


def max_difference(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(got[k] - reference[k]).max()) for k in reference)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def finite(value: float | None) -> float | None:
    """JSON has no infinities: -inf dB (identical outputs) is written as None."""
    return None if value is None or not math.isfinite(value) else value


class BatchLog:
    """The engine's on_batch reports, with the peak device memory of each batch (CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reports: list[tuple[int, float, bool, int | None]] = []
        self._lock = threading.Lock()

    def __call__(self, report: BatchReport) -> None:
        peak = None
        if self.device.type == "cuda":
            # The engine calls this right after the batch's forward, before taking the next one.
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        with self._lock:
            self.reports.append((len(report.jobs), report.seconds, report.out_of_memory, peak))

    def figures(self, wall_s: float) -> dict[str, Any]:
        done = [r for r in self.reports if not r[2]]
        sizes = Counter(size for size, *_ in done)
        peaks: dict[int, int] = {}
        for size, _, _, peak in done:
            if peak is not None:
                peaks[size] = max(peaks.get(size, 0), peak)
        return {
            "batches": len(done),
            "batch_sizes": {str(size): sizes[size] for size in sorted(sizes)},
            "mean_batch_size": statistics.fmean(size for size, *_ in done) if done else 0.0,
            "out_of_memory_splits": sum(1 for r in self.reports if r[2]),
            "engine_busy": min(1.0, sum(seconds for _, seconds, _, _ in self.reports) / wall_s),
            "peak_allocated_mb_per_batch_size": {str(s): peaks[s] / 2**20 for s in sorted(peaks)} or None,
        }


class GpuSampler:
    """GPU utilisation and memory in use, sampled every `interval_s` by NVML, else nvidia-smi."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device = device
        self.interval_s = interval_s
        self.source: str | None = None
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory used MiB)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuSampler:
        if self.device.type != "cuda":
            return self
        reader = self._nvml_reader()
        if reader is not None:
            self.source = "nvml"
            self._thread = threading.Thread(target=self._poll, args=(reader,), daemon=True)
        elif shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            query = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            interval = ["-lms", str(max(int(self.interval_s * 1000), 20))]
            self._process = subprocess.Popen(["nvidia-smi", *query, *interval], stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _nvml_reader(self) -> Callable[[], tuple[float, float]] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
        except Exception:
            return None

        def read() -> tuple[float, float]:
            used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), used

        return read

    def _poll(self, read: Callable[[], tuple[float, float]]) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self.samples.append(read())

    def _read_smi(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                utilisation, used = (float(part) for part in line.split(","))
                self.samples.append((utilisation, used))

    def figures(self) -> dict[str, Any]:
        if not self.samples:
            return {"source": self.source, "samples": 0}
        utilisation = [u for u, _ in self.samples]
        return {
            "source": self.source,
            "samples": len(self.samples),
            "utilisation_mean": statistics.fmean(utilisation) / 100,
            "utilisation_p10": percentile(utilisation, 10) / 100,
            "memory_used_peak_mb": max(m for _, m in self.samples),
        }


# ---------------------------------------------------------------- whole jobs


class _Discard:
    def write(self, block: np.ndarray) -> np.ndarray:
        return block


def worker_job(
    engine: SegmentEngine, model: LoadedModel, mix: np.ndarray, quality: str, keep: bool = True
) -> tuple[dict[str, np.ndarray] | None, float]:
    """One job through the engine (as the worker runs it, stems kept in memory or dropped); its seconds."""
    names = output_names(model.sources, 4, False)
    sinks = {name: ArraySink() if keep else _Discard() for name in names}
    started = time.perf_counter()
    separate_stream(engine, model, ArraySource(mix, model.samplerate), sinks, quality=quality)
    taken = time.perf_counter() - started
    return ({name: sink.array() for name, sink in sinks.items()} if keep else None), taken  # type: ignore[union-attr]


def apply_model_job(
    model: LoadedModel, mix: np.ndarray, quality: str, device: torch.device, precision: str
) -> tuple[dict[str, np.ndarray], float]:
    """demucs' apply_model, mix and result on the CPU and the model on `device` as demucs' own API runs it."""
    preset = quality_preset(quality)
    mean, std = normalisation(ArraySource(mix, model.samplerate))
    wav = (torch.from_numpy(mix) - mean) / std
    random.seed(0)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        out = apply_model(
            model.model, wav[None], shifts=int(preset["shifts"]), overlap=preset["overlap"], split=True, device=device
        )
    sync(device)
    taken = time.perf_counter() - started
    stems = {name: (source * std + mean).float().numpy() for name, source in zip(model.sources, out[0], strict=True)}
    return stems, taken


def concurrent_jobs(
    engine: SegmentEngine, model: LoadedModel, mixes: list[np.ndarray], quality: str, keep: bool
) -> tuple[list[float | None], list[dict[str, np.ndarray] | None], list[str], float]:
    """Each mix a job on a thread of its own, all let go at once: latencies, stems (if kept), errors, wall seconds."""
    latencies: list[float | None] = [None] * len(mixes)
    outputs: list[dict[str, np.ndarray] | None] = [None] * len(mixes)
    errors: list[str] = []
    start = threading.Barrier(len(mixes) + 1)

    def run(index: int) -> None:
        start.wait()
        try:
            outputs[index], latencies[index] = worker_job(engine, model, mixes[index], quality, keep)
        except Exception as exc:
            errors.append(repr(exc)[:300])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(mixes))]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    return latencies, outputs, errors, time.perf_counter() - started


def engine_for(device: torch.device, precision: str, args: argparse.Namespace, **options: Any) -> SegmentEngine:
    options.setdefault("max_batch", args.max_batch)
    return SegmentEngine(str(device), batch_wait_s=args.batch_wait_ms / 1000, precision=precision, **options)


def warm(engine: SegmentEngine, model: LoadedModel) -> None:
    """One segment per model first, so CUDA's lazy start (kernels, cuDNN, cuFFT plans) is not timed."""
    if engine.device.type == "cuda":
        for sub in submodels(model):
            engine.warm_up(sub)


def bench_single(
    models: dict[str, LoadedModel], device: torch.device, args: argparse.Namespace, budget: Budget
) -> dict[str, Any]:
    """One job per model and precision: worker and apply_model real-time factors, errors."""
    mix = make_song(args.seconds, seed=7)
    results: dict[str, Any] = {}
    for name, model in models.items():
        first = submodels(model)[0]
        short = mix[:, : int(first.samplerate * first.segment)]
        per: dict[str, Any] = {}
        reference: dict[str, np.ndarray] | None = None
        last_s = 0.0
        for precision in args.precisions:
            if not budget.allows(3 * last_s):
                per[precision] = {"skipped": "time budget"}
                continue
            try:
                with engine_for(device, precision, args) as engine:
                    warm(engine, model)
                    stems, taken = worker_job(engine, model, mix, args.quality)
                if device.type == "cuda":
                    apply_model_job(model, short, args.quality, device, precision)  # warm-up
                expected, apply_s = apply_model_job(model, mix, args.quality, device, precision)
            except Exception as exc:
                per[precision] = {"error": repr(exc)[:300]}
                print(f"single {name} {precision}: {exc!r}", flush=True)
                continue
            last_s = taken + apply_s
            assert stems is not None
            reference = stems if precision == "float32" else reference
            figures = {
                "rtf": args.seconds / taken,
                "apply_model_rtf": args.seconds / apply_s,
                "over_apply_model": apply_s / taken,
                "max_difference_from_apply_model": max_difference(stems, expected),
                "error_db_vs_float32": finite(error_db(stems, reference)) if reference is not None else None,
            }
            per[precision] = figures
            print(
                f"single {name} {precision}: {figures['rtf']:.1f}x real time, apply_model "
                f"{figures['apply_model_rtf']:.1f}x ({figures['over_apply_model']:.2f}x), error vs float32 "
                f"{_db(figures['error_db_vs_float32'])}, max difference from apply_model "
                f"{figures['max_difference_from_apply_model']:.2e}",
                flush=True,
            )
            del stems, expected
        results[name] = per
    return results


def _db(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f} dB"


def bench_concurrent(
    model: LoadedModel,
    device: torch.device,
    args: argparse.Namespace,
    budget: Budget,
    single_s: float | None,
) -> dict[str, Any]:
    """N jobs at once through one engine: aggregate real-time factor, latencies, batches, GPU use."""
    results: dict[str, Any] = {}
    mixes = songs(args.seconds, max(args.jobs))
    for jobs in args.jobs:
        if single_s is not None and not budget.allows(jobs * single_s / 4):
            results[str(jobs)] = {"skipped": "time budget"}
            continue
        log = BatchLog(device)
        with engine_for(device, args.precision, args, on_batch=log) as engine:
            warm(engine, model)
            log.reports.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with GpuSampler(device) as sampler:
                jobs_mixes = [mixes[i % len(mixes)] for i in range(jobs)]
                latencies, _, errors, wall = concurrent_jobs(engine, model, jobs_mixes, args.quality, keep=False)
        done = [latency for latency in latencies if latency is not None]
        figures: dict[str, Any] = {
            "jobs": jobs,
            "errors": errors,
            "wall_s": wall,
            "aggregate_rtf": len(done) * args.seconds / wall,
            "latency_p50_s": percentile(done, 50) if done else None,
            "latency_p95_s": percentile(done, 95) if done else None,
            **log.figures(wall),
            "gpu": sampler.figures(),
        }
        if single_s is not None and done:
            figures["p95_over_single"] = figures["latency_p95_s"] / single_s
        results[str(jobs)] = figures
        print(
            f"{jobs} jobs ({args.precision}): {figures['aggregate_rtf']:.1f}x real time in all, latency p50 "
            f"{figures['latency_p50_s']:.2f} s p95 {figures['latency_p95_s']:.2f} s, batch sizes "
            f"{figures['batch_sizes']}, engine busy {figures['engine_busy']:.0%}, gpu {figures['gpu']}",
            flush=True,
        )
    return results


def bench_batching(
    model: LoadedModel, device: torch.device, args: argparse.Namespace, budget: Budget
) -> dict[str, Any]:
    """The same songs batched across jobs and each alone, per precision: how far apart the outputs are."""
    count = 4 if device.type == "cuda" else 3
    mixes = songs(min(args.seconds, 30.0), count)
    results: dict[str, Any] = {}
    for precision in args.precisions:
        if not budget.allows():
            results[precision] = {"skipped": "time budget"}
            continue
        log = BatchLog(device)
        with engine_for(device, precision, args, on_batch=log) as engine:
            warm(engine, model)
            log.reports.clear()
            _, batched, errors, _ = concurrent_jobs(engine, model, mixes, args.quality, keep=True)
        if errors:
            results[precision] = {"error": errors[0]}
            continue
        with engine_for(device, precision, args, max_batch=1) as engine:
            alone = [worker_job(engine, model, mix, args.quality)[0] for mix in mixes]
        pairs = list(zip(batched, alone, strict=True))
        results[precision] = {
            "max_difference": max(max_difference(got, expected) for got, expected in pairs),  # type: ignore[arg-type]
            "error_db": finite(max(error_db(got, expected) for got, expected in pairs)),  # type: ignore[arg-type]
            "largest_batch": max(size for size, *_ in log.reports),
        }
        print(f"batched vs alone ({precision}): {results[precision]}", flush=True)
    return results


def bench_engine_compile(
    model: LoadedModel, device: torch.device, args: argparse.Namespace, budget: Budget, single_s: float | None
) -> dict[str, Any]:
    """torch.compile through the engine (its compile_models flag): one job's time, after a first compiling job."""
    if not budget.allows(max(180, 20 * (single_s or 0))):
        return {"skipped": "time budget"}
    mix = make_song(args.seconds, seed=7)
    times: dict[str, float] = {}
    with engine_for(device, args.precision, args, compile_models=True) as engine:
        started = time.perf_counter()
        worker_job(engine, model, mix, args.quality, keep=False)
        first = time.perf_counter() - started
        times["on"] = worker_job(engine, model, mix, args.quality, keep=False)[1]
    with engine_for(device, args.precision, args) as engine:
        warm(engine, model)
        times["off"] = worker_job(engine, model, mix, args.quality, keep=False)[1]
    return {
        "first_job_s": first,
        "job_s_on": times["on"],
        "job_s_off": times["off"],
        "ratio": times["off"] / times["on"],
    }


# ---------------------------------------------------------------- the forward pass alone

Forward = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def istft_without_host_check(
    z: torch.Tensor,
    n_fft: int,
    hop_length: int,
    window: torch.Tensor,
    win_length: int,
    normalized: bool,
    length: int,
    center: bool,
) -> torch.Tensor:
    """torch.istft for demucs' arguments, less its window-overlap (NOLA) check, whose .item() waits for the
    device on every call and cannot be captured in a CUDA graph; a Hann window at a quarter hop passes it."""
    assert center and win_length == n_fft
    frames = torch.fft.irfft(z.transpose(-1, -2), n=n_fft, dim=-1, norm="ortho" if normalized else "backward")
    count = frames.shape[-2]
    total = n_fft + hop_length * (count - 1)
    fold = {"output_size": (1, total), "kernel_size": (1, n_fft), "stride": (1, hop_length)}
    signal = F.fold((frames * window).transpose(-1, -2), **fold).flatten(-3)
    envelope = F.fold(window.square().expand(1, count, n_fft).transpose(-1, -2), **fold).flatten(-3)
    start = n_fft // 2
    if start + length > total:
        signal, envelope = (
            F.pad(signal, (0, start + length - total)),
            F.pad(envelope, (0, start + length - total), value=1.0),
        )
    return signal[..., start : start + length] / envelope[..., start : start + length]


@contextlib.contextmanager
def capturable(cache: dict[tuple, torch.Tensor] | None = None) -> Iterator[None]:
    """demucs' forward without host work per call, as a CUDA graph needs: its STFT window and 2-D positional
    embedding made on the CPU and copied over each time are kept on the device, and its inverse STFT skips
    torch.istft's host-side check.

    A CUDA graph reads the cached tensors at their addresses: whoever captures one keeps `cache`.
    """
    import demucs.spec
    import demucs.transformer

    cache = {} if cache is None else cache
    hann, embedding = torch.hann_window, demucs.transformer.create_2d_sin_embedding

    class _Torch:
        """demucs.spec's `th`: hann_window(n).to(x) is a cached tensor already like x, istft checks nothing."""

        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

        @staticmethod
        def hann_window(n: int) -> Any:
            return _Window(n)

        @staticmethod
        def istft(z: torch.Tensor, n_fft: int, hop_length: int, **options: Any) -> torch.Tensor:
            return istft_without_host_check(z, n_fft, hop_length, **options)

    class _Window:
        def __init__(self, n: int) -> None:
            self.n = n

        def to(self, like: torch.Tensor) -> torch.Tensor:
            key = ("hann", self.n, like.device, like.dtype)
            if key not in cache:
                cache[key] = hann(self.n).to(like)
            return cache[key]

    def cached_embedding(d_model: int, height: int, width: int, device: Any = "cpu", max_period: int = 10000):
        key = ("pos2d", d_model, height, width, torch.device(device), max_period)
        if key not in cache:
            cache[key] = embedding(d_model, height, width, device, max_period)
        return cache[key]

    demucs.spec.th = _Torch()  # type: ignore[assignment]
    demucs.transformer.create_2d_sin_embedding = cached_embedding
    try:
        yield
    finally:
        demucs.spec.th = torch
        demucs.transformer.create_2d_sin_embedding = embedding


def eager(model: torch.nn.Module, device: torch.device, precision: str) -> Forward:
    """The engine's way: a batch to the device, forward under autocast, the result back with .cpu()."""

    def run(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode(), autocast(device, precision):
            return [model(batch.to(device, non_blocking=True)).float().cpu() for batch in batches]

    return run


def made_capturable(forward: Forward) -> Forward:
    def run(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        with capturable():
            return forward(batches)

    return run


def pinned(model: torch.nn.Module, device: torch.device, precision: str) -> Forward:
    """Batches staged in pinned memory, copied both ways asynchronously; one wait per batch."""

    def run(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        with torch.inference_mode(), autocast(device, precision):
            for batch in batches:
                staged = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True).copy_(batch)
                out = model(staged.to(device, non_blocking=True)).float()
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                torch.cuda.current_stream(device).synchronize()
                outputs.append(host)
        return outputs

    return run


def overlapped(model: torch.nn.Module, device: torch.device, precision: str) -> Forward:
    """Pinned copies on their own streams: batch i+1 goes up and batch i-1 comes down while batch i computes."""
    upload, download = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def run(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        compute = torch.cuda.current_stream(device)
        outputs = []
        with torch.inference_mode(), autocast(device, precision):
            for batch in batches:
                staged = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True).copy_(batch)
                with torch.cuda.stream(upload):
                    on_device = staged.to(device, non_blocking=True)
                compute.wait_stream(upload)
                on_device.record_stream(compute)
                out = model(on_device).float()
                download.wait_stream(compute)
                with torch.cuda.stream(download):
                    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                    host.copy_(out, non_blocking=True)
                out.record_stream(download)
                outputs.append(host)
        download.synchronize()
        return outputs

    return run


def graphed(model: torch.nn.Module, device: torch.device, precision: str, example: torch.Tensor) -> Forward:
    """One CUDA graph for the fixed batch shape of `example`, replayed per batch (needs `capturable`)."""
    static_in = example.to(device)
    constants: dict[tuple, torch.Tensor] = {}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with capturable(constants), torch.inference_mode():
        with torch.cuda.stream(side), autocast(device, precision, cache=False):
            for _ in range(2):
                model(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast(device, precision, cache=False):
            static_out = model(static_in).float()

    def run(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        assert constants, "the captured graph reads these"
        with torch.inference_mode():
            for batch in batches:
                static_in.copy_(batch)
                graph.replay()
                outputs.append(static_out.cpu())
        return outputs

    return run


def compiled(model: torch.nn.Module, device: torch.device, precision: str) -> Forward:
    return eager(torch.compile(model, dynamic=False), device, precision)  # type: ignore[arg-type]


def timed(forward: Forward, batches: list[torch.Tensor], device: torch.device) -> tuple[float, list[torch.Tensor]]:
    sync(device)
    started = time.perf_counter()
    outputs = forward(batches)
    sync(device)
    return time.perf_counter() - started, outputs


def on_and_off(
    off: Forward, on: Forward, batches: list[torch.Tensor], device: torch.device, rounds: int
) -> dict[str, Any]:
    """Alternating rounds after one warm-up of each; ratio = off time / on time (> 1: the option wins)."""
    started = time.perf_counter()
    _, reference = timed(off, batches, device)
    warm_on, outputs = timed(on, batches, device)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        times["off"].append(timed(off, batches, device)[0])
        times["on"].append(timed(on, batches, device)[0])
    off_s, on_s = statistics.median(times["off"]), statistics.median(times["on"])
    difference = max(float((a - b).abs().max()) for a, b in zip(outputs, reference, strict=True))
    spread = max((max(t) - min(t)) / statistics.median(t) for t in times.values())
    return {
        "off_s": off_s,
        "on_s": on_s,
        "ratio": off_s / on_s,
        # A win smaller than the rounds' own spread is noise.
        "wins": off_s / on_s > 1 + spread,
        "spread": spread,
        "first_on_s": warm_on,
        "max_difference": difference,
        "measured_in_s": time.perf_counter() - started,
    }


def windows(model: torch.nn.Module, count: int, seed: int = 3) -> torch.Tensor:
    """`count` normalised windows of the model's segment length from a synthetic song."""
    length = int(model.samplerate * model.segment)
    mix = make_song(length * (count + 1) / SAMPLERATE, seed)
    mean, std = normalisation(ArraySource(mix, SAMPLERATE))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, mix.shape[1] - length, size=count)
    return torch.stack([(torch.from_numpy(mix[:, s : s + length]) - mean) / std for s in starts])


def batch_sweep(
    model: torch.nn.Module, device: torch.device, precision: str, sizes: list[int], repeats: int, budget: Budget
) -> dict[str, Any]:
    """Segments per second and peak allocated memory for one forward of each batch size (eager)."""
    results: dict[str, Any] = {}
    pool = windows(model, max(sizes))
    forward = eager(model, device, precision)
    for size in sizes:
        if not budget.allows():
            results[str(size)] = {"skipped": "time budget"}
            continue
        batch = [pool[:size]]
        try:
            timed(forward, batch, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = statistics.median(timed(forward, batch, device)[0] for _ in range(repeats))
        except torch.cuda.OutOfMemoryError:
            results[str(size)] = {"out_of_memory": True}
            torch.cuda.empty_cache()
            break
        figures: dict[str, Any] = {"segments_per_s": size / seconds, "seconds": seconds}
        if device.type == "cuda":
            figures["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        results[str(size)] = figures
    return results


def bench_forward(model: torch.nn.Module, device: torch.device, args: argparse.Namespace, budget: Budget) -> dict:
    """Batch-size sweep, then each forward option on and off at the engine's max batch."""
    cuda = device.type == "cuda"
    # On CPU the figures only show the machinery works: batches of 2 cost a quarter of 8's.
    batch = args.max_batch if cuda else min(2, args.max_batch)
    sizes = [size for size in (1, 2, 4, 8, 16, 32, 64) if size <= (4 * batch if cuda else batch)]
    results: dict[str, Any] = {"batch": batch, "precision": args.precision}
    results["batch_sweep"] = batch_sweep(model, device, args.precision, sizes, args.rounds, budget)
    batches = list(windows(model, batch * args.forward_batches).split(batch))
    base = eager(model, device, args.precision)
    options: dict[str, tuple[Callable[[], tuple[Forward, Forward]], str | None]] = {
        "capturable": (lambda: (base, made_capturable(base)), None),
        "pinned": (lambda: (base, pinned(model, device, args.precision)), None if cuda else "needs CUDA"),
        "overlap": (lambda: (base, overlapped(model, device, args.precision)), None if cuda else "needs CUDA"),
        "overlap_vs_pinned": (
            lambda: (pinned(model, device, args.precision), overlapped(model, device, args.precision)),
            None if cuda else "needs CUDA",
        ),
        "cuda_graphs": (
            lambda: (made_capturable(base), graphed(model, device, args.precision, batches[0])),
            None if cuda else "needs CUDA",
        ),
        "compile": (
            lambda: (base, compiled(model, device, args.precision)),
            None if args.compile_on else "off (--compile on to measure it here)",
        ),
    }
    toggles: dict[str, Any] = {}
    for name, (make, skip) in options.items():
        # Compiling the production model takes minutes: only with that much budget left.
        if skip is not None or not budget.allows(120 if name == "compile" else 0):
            toggles[name] = {"skipped": skip or "time budget"}
            continue
        try:
            off, on = make()
            toggles[name] = on_and_off(off, on, batches, device, args.rounds)
        except Exception as exc:
            toggles[name] = {"error": repr(exc)[:300]}
            with contextlib.suppress(Exception):
                sync(device)
        print(f"forward {name}: {toggles[name]}", flush=True)
    results["options"] = toggles
    results["hooks"] = HOOKS
    return results


# ---------------------------------------------------------------- half precision in demucs' STFT


def probe_stft(model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Does demucs' STFT run in half precision here, what does autocast hand it, and a model made half."""
    import demucs.htdemucs
    from demucs.spec import ispectro, spectro

    results: dict[str, Any] = {}
    signal = torch.randn(2, 2 * 44100, device=device)
    for name, dtype in HALF.items():
        for n_fft in (4096, 3000):  # htdemucs' size, a power of two, and one that is not
            key = f"{name}_n_fft_{n_fft}"
            try:
                z = spectro(signal.to(dtype), n_fft, n_fft // 4)
                back = ispectro(z, n_fft // 4, length=signal.shape[-1])
                results[key] = {"ok": True, "spectrum_dtype": str(z.dtype), "round_trip_dtype": str(back.dtype)}
            except Exception as exc:
                results[key] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    seen: dict[str, set[str]] = {"stft_input": set(), "istft_input": set()}
    forward_spectro, forward_ispectro = demucs.htdemucs.spectro, demucs.htdemucs.ispectro

    def spy_spectro(x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        seen["stft_input"].add(str(x.dtype))
        return forward_spectro(x, *a, **k)

    def spy_ispectro(z: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        seen["istft_input"].add(str(z.dtype))
        return forward_ispectro(z, *a, **k)

    window = windows(model, 1).to(device)
    with torch.inference_mode():
        reference = model(window).float()
    for name, dtype in HALF.items():
        demucs.htdemucs.spectro, demucs.htdemucs.ispectro = spy_spectro, spy_ispectro
        try:
            for key in seen:
                seen[key] = set()
            with torch.inference_mode(), autocast(device, name):
                model(window)
            results[f"autocast_{name}"] = {key: sorted(value) for key, value in seen.items()}
        except Exception as exc:
            results[f"autocast_{name}"] = {"error": repr(exc)[:300]}
        finally:
            demucs.htdemucs.spectro, demucs.htdemucs.ispectro = forward_spectro, forward_ispectro
        try:
            half = copy.deepcopy(model).to(dtype)
            with torch.inference_mode():
                out = half(window.to(dtype)).float()
            err = float(((out - reference) ** 2).sum() / (reference**2).sum())
            results[f"whole_model_{name}"] = {"ok": True, "error_db": finite(10 * math.log10(max(err, 1e-30)))}
        except Exception as exc:
            results[f"whole_model_{name}"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return results


# ---------------------------------------------------------------- running it all


def environment(device: torch.device) -> dict[str, Any]:
    figures: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": sys.version.split()[0]}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        figures |= {
            "card": properties.name,
            "memory_gb": properties.total_memory / 1e9,
            "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        }
    else:
        figures["threads"] = torch.get_num_threads()
    figures["commit"] = _commit()
    return figures


def _commit() -> str | None:
    """The commit measured: git where there is a repository, else what bench/gpu_wheels.sh recorded."""
    root = Path(__file__).resolve().parent.parent
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    recorded = root / ".whl" / "COMMIT"
    return recorded.read_text().strip() if recorded.is_file() else None


# In order of what the issue's goals need most, since a time budget may cut the tail.
SECTIONS = ("stft", "single", "concurrent", "batching", "forward", "bag", "engine_compile")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("production", "tiny"), default="production")
    parser.add_argument("--seconds", type=float, help="song length (default 180 on cuda, 1.5 on cpu)")
    parser.add_argument("--jobs", help="concurrent job counts (default 8,32 on cuda, 4,8 on cpu)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--precision", help="for concurrent and forward (default: the worker's on that device)")
    parser.add_argument("--max-batch", type=int, default=8, help="segments per forward pass (CUDA default: 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--quality", default="balanced")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for cuda")
    parser.add_argument("--rounds", type=int, help="on/off rounds per forward option (default 3 on cuda, 1 on cpu)")
    parser.add_argument("--forward-batches", type=int, help="batches per timed forward round (4 on cuda, 1 on cpu)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip what would not fit; 0 = no limit")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's on cuda, 1 on cpu)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    # On CPU the defaults only exercise the machinery: one segment per song, one round per option.
    args.seconds = args.seconds or (180.0 if cuda else 1.5)
    args.rounds = args.rounds or (3 if cuda else 1)
    args.forward_batches = args.forward_batches or (4 if cuda else 1)
    # The tiny models gain nothing from intra-op threads; on a busy machine their barriers cost.
    args.threads = args.threads if args.threads is not None else (0 if cuda else 1)
    args.jobs = [int(j) for j in (args.jobs or ("8,32" if cuda else "4,8")).split(",")]
    args.precisions = [p for p in args.precisions.split(",") if p]
    if args.precision is None:
        from separator.device import pick_precision

        args.precision = pick_precision("auto", args.device)
    args.sections = args.sections.split(",")
    args.compile_on = args.compile == "on" or (args.compile == "auto" and cuda)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    budget = Budget(args.budget_s)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results: dict[str, Any] = {"environment": environment(device), "settings": settings, "goals": GOALS}
    print(f"{results['environment']}", flush=True)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        models = production_models() if args.model == "production" else tiny_models(Path(tmp) / "repo")
        for model in models.values():
            model.model.to(device).eval()
        htdemucs = models["htdemucs"]
        for section in SECTIONS:
            if section not in args.sections:
                continue
            if not budget.allows():
                results[section] = {"skipped": "time budget"}
                continue
            started = time.perf_counter()
            results[section] = _run_section(section, models, htdemucs, device, args, budget, results)
            results[section + "_seconds"] = time.perf_counter() - started
            save()
    results["summary"] = summary(results, args)
    save()
    print("\n".join(table(results["summary"])))
    print(f"wrote {args.out}")
    return results


def _run_section(
    section: str,
    models: dict[str, LoadedModel],
    htdemucs: LoadedModel,
    device: torch.device,
    args: argparse.Namespace,
    budget: Budget,
    results: dict[str, Any],
) -> dict[str, Any]:
    single_rtf = results.get("single", {}).get("htdemucs", {}).get(args.precision, {}).get("rtf")
    single_s = args.seconds / single_rtf if single_rtf else None
    if section == "stft":
        return probe_stft(submodels(htdemucs)[0], device)
    if section == "single":
        return bench_single({"htdemucs": htdemucs}, device, args, budget)
    if section == "bag":
        return bench_single({"htdemucs_ft": models["htdemucs_ft"]}, device, args, budget)
    if section == "concurrent":
        return bench_concurrent(htdemucs, device, args, budget, single_s)
    if section == "batching":
        return bench_batching(htdemucs, device, args, budget)
    if section == "forward":
        return bench_forward(submodels(htdemucs)[0], device, args, budget)
    if not args.compile_on:
        return {"skipped": "off (--compile on to measure it here)"}
    return bench_engine_compile(htdemucs, device, args, budget, single_s)


def summary(results: dict[str, Any], args: argparse.Namespace) -> list[list[Any]]:
    """Rows of (figure, value, goal) for the table; None where not measured."""
    rows: list[list[Any]] = []
    for name, figures in results.get("stft", {}).items():
        if "ok" in figures:
            rows.append([f"stft {name}", "runs" if figures["ok"] else "fails", figures.get("error", "")[:60]])
    single = {**results.get("single", {}), **results.get("bag", {})}
    for name in ("htdemucs", "htdemucs_ft"):
        for precision in args.precisions:
            figures = single.get(name, {}).get(precision, {})
            goal = GOALS["htdemucs_rtf"] if name == "htdemucs" else GOALS["htdemucs_ft_rtf"]
            rows.append([f"{name} {precision}: rtf", figures.get("rtf"), f">= {goal:g}"])
            if name == "htdemucs":
                rows.append([f"{name} {precision}: x apply_model", figures.get("over_apply_model"), ">= 1.5"])
                rows.append([f"{name} {precision}: dB vs float32", figures.get("error_db_vs_float32"), "<= -60"])
    for jobs, figures in results.get("concurrent", {}).items():
        rows.append([f"{jobs} jobs {args.precision}: aggregate rtf", figures.get("aggregate_rtf"), ">= 300"])
        rows.append([f"{jobs} jobs: latency p50 s", figures.get("latency_p50_s"), ""])
        rows.append([f"{jobs} jobs: p95 / single", figures.get("p95_over_single"), "<= 3"])
        rows.append([f"{jobs} jobs: mean batch", figures.get("mean_batch_size"), f"max {args.max_batch}"])
        rows.append([f"{jobs} jobs: engine busy", figures.get("engine_busy"), ""])
        rows.append([f"{jobs} jobs: gpu utilisation", figures.get("gpu", {}).get("utilisation_mean"), ">= 0.85"])
    for precision, figures in results.get("batching", {}).items():
        rows.append([f"batched vs alone {precision}: max diff", figures.get("max_difference"), ""])
    for name, figures in results.get("forward", {}).get("options", {}).items():
        rows.append([f"forward {name}: on/off speed", figures.get("ratio"), figures.get("skipped", "> 1 wins")])
    compiled_job = results.get("engine_compile", {})
    if compiled_job:
        rows.append(["engine compile: on/off speed", compiled_job.get("ratio"), compiled_job.get("skipped", "")])
    return rows


def table(rows: list[list[Any]]) -> list[str]:
    def show(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    width = max(len(row[0]) for row in rows) if rows else 10
    return [f"{'figure':<{width}}  {'value':>10}  goal"] + [
        f"{name:<{width}}  {show(value):>10}  {goal}" for name, value, goal in rows
    ]


if __name__ == "__main__":
    main()
    os._exit(0)  # an NVML or compile worker thread must not keep a timed run alive
