"""Separator speed and memory on the production htdemucs architecture with random weights.

Speed does not depend on weight values. Every figure is a ratio against plain demucs measured in
the same run, on this machine's cores:
- engines: the worker's CPU engines side by side on one 60 s song, `fast` preset, against the torch
  eager worker in alternating rounds: torch eager, channels-last, dynamic int8 linears, bfloat16
  autocast, torch.compile (inductor), ONNX Runtime and OpenVINO (the network exported to ONNX, the
  STFT/iSTFT in torch); speed ratio and, per stem, max and RMS error against float32 torch in dB
  (goal: >= 1.5x at <= -60 dB), on htdemucs and on a 4-model htdemucs_ft bag (torch, onnx, openvino
  unless --bag-engines says otherwise); export and session start-up times, cold and cached;
- rtf: the worker's real-time factor on 60 s per quality preset against demucs.apply.apply_model
  (shifts 1, overlap 0.25), and the largest difference from apply_model with the preset's settings;
- throughput: the worker (jobs in flight = its prefetch) on 10 songs of 30 s against the demucs
  command line run once per song, same model from a local repository, same settings, start-up paid,
  in alternating rounds (worker, then CLI, on the same songs); the worker also with the opt-in
  bfloat16 precision, and that precision's distance from float32;
- rss: peak RSS of the worker for 1, 10 and 60 minutes of audio and of apply_model on 60 s, each
  in a process of its own; besides the process's peak, the peak while separating (the kernel's
  count restarted once the model is loaded). `--rss-model production` (default) uses the production
  architecture, which separates `fast` at 2-2.5x real time on 2 quiet cores: 60 minutes cost about
  half an hour. `--rss-model tiny` runs the same streaming path (FileSource -> WindowReader ->
  SegmentEngine -> Joiner -> FLAC StemWriter, the `fast` preset) with the tests' tiny htdemucs
  (2 s segments, 4 channels), about 6x faster; its smaller fixed memory makes any growth with song
  length show more, not less. Results are kept per model and per length, so runs merge.

    .venv/bin/python bench/separator.py [--threads 2] [--only engines,rtf,throughput,rss] [--minutes 1,10,60]
        [--rss-model production|tiny] [--engine openvino] [--engines torch,onnx,...] [--bag-engines ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch
import yaml

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# separator package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

if TYPE_CHECKING:
    from separator.engine import SegmentEngine
    from separator.models import LoadedModel
    from separator.stream import Separated

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLERATE = 44100
MODEL = "htdemucs"
BASELINE = {"shifts": 1, "overlap": 0.25}
GOALS = {
    "fast_rtf": 1.0,
    "peak_rss_mb": 1536,
    "throughput_ratio": 1.5,
    "long_rss_ratio": 1.2,
    "engine_speed_ratio": 1.5,
    "engine_error_db": -60.0,
}
BAG = "htdemucs_ft"
BAG_SIZE = 4
# name -> how the worker runs it; torch variants other than the engine's own settings transform a copy.
ENGINE_VARIANTS = {
    "torch": "torch eager (the worker today), float32",
    "channels_last": "torch eager, weights and activations channels-last",
    "int8": "torch eager, transformer linears dynamically quantised to int8",
    "bfloat16": "torch eager, bfloat16 autocast (PRECISION=bfloat16)",
    "compile": "torch.compile, inductor CPU backend (TORCH_COMPILE=true), after its compiling warm-up",
    "onnx": "ONNX Runtime CPU, all graph optimisations (ENGINE=onnx)",
    "openvino": "OpenVINO CPU, float32 precision hint (ENGINE=openvino)",
}
RSS_MODELS = {
    "production": "htdemucs (production architecture, random weights)",
    "tiny": "tiny untrained htdemucs of the tests (stemflow_dev.models.make_tiny_repo)",
}


def write_repo(repo: Path) -> Path:
    """A demucs model repository: the production htdemucs architecture as `htdemucs`, and a bag of
    four such models (other random weights, each the only source of one stem) as `htdemucs_ft`."""
    from demucs.states import get_state, save_with_checksum

    from stemflow_dev.models import make_production_htdemucs

    repo.mkdir(parents=True, exist_ok=True)
    model = make_production_htdemucs()
    args, kwargs = model._init_args_kwargs
    signatures = [f"benchft{index}" for index in range(BAG_SIZE)]
    for signature in ["benchhtd", *signatures]:
        if signature != "benchhtd":
            with torch.random.fork_rng():
                torch.manual_seed(int(signature[-1]) + 1)
                model = type(model)(*args, **kwargs).eval()
        package = {"klass": type(model), "args": args, "kwargs": kwargs, "state": get_state(model, None, half=True)}
        save_with_checksum(package, repo / f"{signature}.th")
    (repo / f"{MODEL}.yaml").write_text(yaml.safe_dump({"models": ["benchhtd"]}))
    weights = [[1.0 if source == index else 0.0 for source in range(4)] for index in range(BAG_SIZE)]
    (repo / f"{BAG}.yaml").write_text(yaml.safe_dump({"models": signatures, "weights": weights}))
    return repo


def load(repo: Path, name: str = MODEL) -> LoadedModel:
    from separator.models import ModelCache

    return ModelCache(repo, "cpu").get(name)


def write_song(path: Path, seconds: float, seed: int = 0) -> Path:
    """A synthetic song (chords, a beat, hiss), written a second at a time so no process holds it all."""
    rng = np.random.default_rng(seed)
    notes = 110 * 2 ** (rng.integers(0, 24, size=6) / 12)
    with sf.SoundFile(path, "w", SAMPLERATE, 2, "FLOAT") as file:
        for second in range(int(np.ceil(seconds))):
            count = min(SAMPLERATE, int(seconds * SAMPLERATE) - second * SAMPLERATE)
            t = (second * SAMPLERATE + np.arange(count)) / SAMPLERATE
            tone = sum(0.08 * np.sin(2 * np.pi * f * t + i) for i, f in enumerate(notes))
            beat = 0.3 * np.exp(-20 * (t % 0.5)) * np.sin(2 * np.pi * 60 * t)
            hiss = 0.02 * rng.standard_normal((2, count))
            file.write((np.stack([tone + beat, 0.8 * tone + beat]) + hiss).T.astype(np.float32))
    return path


def worker_job(
    engine: SegmentEngine, model: LoadedModel, song: Path, out_dir: Path, quality: str, fmt: str = "wav"
) -> tuple[Separated, dict[str, tuple[Path, int]]]:
    from separator.files import separate_file

    out_dir.mkdir(parents=True, exist_ok=True)
    return separate_file(engine, model, song, out_dir, fmt=fmt, quality=quality)


def apply_model_run(
    model: LoadedModel, mix: np.ndarray, shifts: int, overlap: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """Plain demucs, normalised as demucs.api.Separator does."""
    from demucs.apply import apply_model

    wav = torch.from_numpy(mix)
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    random.seed(seed)
    with torch.no_grad():
        out = apply_model(model.model, ((wav - mean) / std)[None], shifts=shifts, overlap=overlap, split=True)
    return {name: (source * std + mean).numpy() for name, source in zip(model.sources, out[0], strict=True)}


def engine_variant(name: str, model: LoadedModel, export_dir: Path, threads: int) -> tuple[SegmentEngine, LoadedModel]:
    """A started worker engine for one of ENGINE_VARIANTS, with the model it runs."""
    import copy
    import dataclasses

    from separator.engine import SegmentEngine

    engine, runs = SegmentEngine("cpu"), model
    if name in ("onnx", "openvino"):
        engine = SegmentEngine("cpu", backend=name, export_dir=export_dir, threads=threads)
    elif name == "bfloat16":
        engine = SegmentEngine("cpu", precision="bfloat16")
    elif name == "compile":
        engine = SegmentEngine("cpu", compile_models=True)
    elif name == "channels_last":
        runs = dataclasses.replace(model, model=copy.deepcopy(model.model).to(memory_format=torch.channels_last))
    elif name == "int8":
        from torch.ao.quantization import quantize_dynamic

        quantised = quantize_dynamic(copy.deepcopy(model.model), {torch.nn.Linear}, dtype=torch.qint8)
        runs = dataclasses.replace(model, model=quantised)
    return engine.start(), runs


def stem_errors_db(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per stem: the largest and the RMS difference, in dB relative to the reference's peak and RMS."""
    errors = {}
    for name, reference in expected.items():
        difference = got[name].astype(np.float64) - reference
        peak = max(float(np.abs(difference).max()), 1e-30) / float(np.abs(reference).max())
        rms = max(float(np.sqrt(np.mean(difference**2))), 1e-30) / float(
            np.sqrt(np.mean(reference.astype(np.float64) ** 2))
        )
        errors[name] = {"max_db": 20 * float(np.log10(peak)), "rms_db": 20 * float(np.log10(rms))}
    return errors


def bench_engines(
    repo: Path, tmp: Path, seconds: float, threads: int, names: list[str], rounds: int, model_name: str
) -> dict:
    """The CPU engines on one song in alternating rounds against torch eager; errors against torch's output."""
    from separator.plan import submodels
    from separator.separation import separate

    model = load(repo, model_name)
    song = write_song(tmp / "engines.wav", seconds)
    mix = sf.read(song, dtype="float32", always_2d=True)[0].T.copy()
    export_dir = tmp / f"exports-{model_name}"
    names = ["torch", *[name for name in names if name != "torch"]]
    engines, starts = {}, {}
    for name in names:
        started = time.perf_counter()
        engine, runs = engine_variant(name, model, export_dir, threads)
        # A worker has its networks exported (or compiled) and loaded before its first job.
        for sub in submodels(runs.model)[0]:
            engine.warm_up(sub)
        starts[name] = {"cold_s": time.perf_counter() - started}
        if name in ("onnx", "openvino"):
            engine.close()
            started = time.perf_counter()
            engine, runs = engine_variant(name, model, export_dir, threads)
            for sub in submodels(runs.model)[0]:
                engine.warm_up(sub)
            starts[name]["cached_s"] = time.perf_counter() - started
        engines[name] = (engine, runs)
        print(
            f"{model_name} {name}: ready in " + ", ".join(f"{k} {v:.1f} s" for k, v in starts[name].items()), flush=True
        )
    times: dict[str, list[float]] = {name: [] for name in names}
    # The process's CPU time too (every thread): on a shared machine it moves less with load than wall time.
    cpu: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for index in range(rounds):
        for name, (engine, runs) in engines.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            outputs[name] = separate(runs, mix, quality="fast", engine=engine)
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
        print(
            f"{model_name} round {index + 1}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()), flush=True
        )
    for engine, _ in engines.values():
        engine.close()
    table = {}
    for name in names:
        errors = stem_errors_db(outputs[name], outputs["torch"])
        ratio = sum(times["torch"]) / sum(times[name])
        worst = max(max(e["max_db"], e["rms_db"]) for e in errors.values()) if name != "torch" else None
        table[name] = {
            "what": ENGINE_VARIANTS[name],
            "seconds": times[name],
            # The ratio's baseline, measured in the same process, alternating with this engine.
            "torch_seconds": times["torch"],
            "speed_ratio": ratio,
            "cpu_seconds": cpu[name],
            "cpu_ratio": sum(cpu["torch"]) / sum(cpu[name]),
            "rtf": seconds * rounds / sum(times[name]),
            "errors_db": errors if name != "torch" else None,
            "worst_error_db": worst,
            "meets_goal": name != "torch"
            and ratio >= GOALS["engine_speed_ratio"]
            and worst is not None
            and worst <= GOALS["engine_error_db"],
            **starts[name],
        }
        stems = (
            ""
            if worst is None
            else "  " + ", ".join(f"{stem} {e['max_db']:.0f}/{e['rms_db']:.0f}" for stem, e in errors.items())
        )
        print(
            f"{model_name} {name:>13}: {ratio:.2f}x torch eager ({table[name]['cpu_ratio']:.2f}x in CPU time), "
            f"{table[name]['rtf']:.2f}x real time{stems}",
            flush=True,
        )
    return {
        "model": model_name,
        "seconds": seconds,
        "quality": "fast",
        "rounds": rounds,
        "threads": threads,
        "error_db": "per stem: max |difference| / max |torch|, RMS difference / RMS torch, 20 log10",
        "engines": table,
    }


def bench_rtf(repo: Path, tmp: Path, seconds: float) -> dict:
    from separator.engine import SegmentEngine
    from separator.options import QUALITY_PRESETS

    model = load(repo)
    song = write_song(tmp / "rtf.wav", seconds)
    mix = sf.read(song, dtype="float32", always_2d=True)[0].T.copy()
    started = time.perf_counter()
    apply_model_run(model, mix, **BASELINE)
    baseline_rtf = seconds / (time.perf_counter() - started)
    print(f"apply_model (shifts 1, overlap 0.25): {baseline_rtf:.2f}x real time", flush=True)
    presets = {}
    with SegmentEngine("cpu") as engine:
        for quality, preset in QUALITY_PRESETS.items():
            started = time.perf_counter()
            _, files = worker_job(engine, model, song, tmp / quality, quality)
            rtf = seconds / (time.perf_counter() - started)
            started = time.perf_counter()
            expected = apply_model_run(model, mix, int(preset["shifts"]), preset["overlap"])
            same_rtf = seconds / (time.perf_counter() - started)
            difference = max(
                float(np.abs(sf.read(path, dtype="float32", always_2d=True)[0].T - expected[name]).max())
                for name, (path, _) in files.items()
            )
            presets[quality] = {
                "rtf": rtf,
                "ratio": rtf / baseline_rtf,
                # apply_model with the preset's own settings, run right after the worker.
                "apply_model_same_settings_rtf": same_rtf,
                "ratio_same_settings": rtf / same_rtf,
                "max_difference": difference,
            }
            print(
                f"worker {quality}: {rtf:.2f}x real time, {rtf / baseline_rtf:.2f}x apply_model "
                f"({rtf / same_rtf:.2f}x with the same settings), max difference from apply_model {difference:.2e}",
                flush=True,
            )
    return {"seconds": seconds, "apply_model_rtf": baseline_rtf, "presets": presets}


def worker_engine(
    backend: str, repo: Path, threads: int, compiled: bool = False, precision: str = "float32"
) -> SegmentEngine:
    """A worker's engine as make_engine builds it: exports cached next to the weights."""
    from separator.engine import SegmentEngine
    from separator.export import default_cache_dir

    if backend == "torch":
        return SegmentEngine("cpu", precision=precision, compile_models=compiled)
    return SegmentEngine(
        "cpu", backend=backend, export_dir=default_cache_dir(repo), threads=threads, release_weights=True
    )


def bench_throughput(
    repo: Path, tmp: Path, songs: int, seconds: float, threads: int, compiled: bool, backend: str, with_torch: bool
) -> dict:
    """The worker against the CLI in alternating rounds of `in_flight` songs, so that load from
    other work on a shared machine weighs on both alike.

    The worker runs with the CPU default engine `backend`, and with `with_torch` also with torch
    eager in float32 (the worker before it); the engine's distance from torch's stems then too.
    """
    from separator.settings import Settings

    paths = [write_song(tmp / f"song{i}.wav", seconds, seed=i) for i in range(songs)]
    in_flight = Settings.model_fields["prefetch"].default
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "demucs", "--repo", str(repo), "-n", MODEL, "--shifts", "0", "--overlap", "0.1"]
    command += ["-d", "cpu", "--float32", "-o", str(tmp / "cli")]
    engines = {backend: worker_engine(backend, repo, threads, compiled)}
    if with_torch and backend != "torch":
        engines["torch"] = worker_engine("torch", repo, threads)
    # A model of its own per engine: a runtime's engine releases the torch weights it no longer needs.
    models = {name: load(repo) for name in engines}
    rounds = []
    with ThreadPoolExecutor(in_flight) as pool:
        for name, engine in engines.items():
            # A running worker has its model loaded (and compiled or exported) before the first job.
            engine.start().warm_up(models[name].model.models[0])
        for first in range(0, songs, in_flight):
            batch = paths[first : first + in_flight]
            times = {}
            for name, engine in engines.items():
                started = time.perf_counter()
                out = tmp / "worker" / name
                jobs = [pool.submit(worker_job, engine, models[name], p, out / p.stem, "fast") for p in batch]
                for job in jobs:
                    job.result()
                times[f"worker_{name}_s"] = time.perf_counter() - started
            started = time.perf_counter()
            for path in batch:
                subprocess.run([*command, str(path)], env=env, check=True, capture_output=True)
            times["cli_s"] = time.perf_counter() - started
            rounds.append({"songs": len(batch), **times})
            print(
                f"round of {len(batch)} songs: "
                + ", ".join(f"{name.removesuffix('_s')} {value:.1f} s" for name, value in times.items()),
                flush=True,
            )
        for engine in engines.values():
            engine.close()
    totals = {name: sum(r[name] for r in rounds) for name in rounds[0] if name.endswith("_s")}
    ratios = {name: totals["cli_s"] / totals[f"worker_{name}_s"] for name in engines}
    print(
        f"{songs} songs of {seconds:.0f} s, demucs CLI {totals['cli_s']:.1f} s; worker throughput "
        + ", ".join(f"{ratio:.2f}x the CLI with {name}" for name, ratio in ratios.items()),
        flush=True,
    )
    error_db = (
        _error_db(tmp / "worker" / backend, tmp / "worker" / "torch")
        if "torch" in ratios and backend != "torch"
        else None
    )
    if error_db is not None:
        print(f"{backend} stems are {error_db:.1f} dB (energy) away from torch's", flush=True)
    return {
        "songs": songs,
        "seconds": seconds,
        "in_flight": in_flight,
        "engine": backend,
        "worker_s": totals[f"worker_{backend}_s"],
        "cli_s": totals["cli_s"],
        "ratio": ratios[backend],
        "worker_torch_s": totals.get("worker_torch_s"),
        "ratio_torch": ratios.get("torch"),
        "error_db_against_torch": error_db,
        "rounds": rounds,
    }


def _error_db(stems: Path, reference: Path) -> float:
    """Energy of the difference between two folders of stem files, relative to the reference's, in dB."""
    difference = total = 0.0
    for path in sorted(reference.rglob("*.wav")):
        expected = sf.read(path, dtype="float64")[0]
        got = sf.read(stems / path.relative_to(reference), dtype="float64")[0]
        difference += float(np.sum((got - expected) ** 2))
        total += float(np.sum(expected**2))
    return 10 * float(np.log10(difference / total))


def bench_rss(
    repo: Path, tmp: Path, minutes: list[float], threads: int, compiled: bool, before: dict, backend: str
) -> dict:
    """Peak RSS per song length, merged into `before` (an earlier run's figures for the same model).

    The export cache is filled first, as a worker's start does, so the children measure a warm worker.
    """
    from separator.plan import submodels

    if backend != "torch":
        with worker_engine(backend, repo, threads) as engine:
            for sub in submodels(load(repo).model)[0]:
                engine.warm_up(sub)

    def child(*args: str) -> dict:
        command = [sys.executable, __file__, "--child", *args, "--repo", str(repo), "--threads", str(threads)]
        command += ["--compile"] if compiled else []
        command += ["--engine", backend]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return json.loads(done.stdout.splitlines()[-1])

    baseline = child("apply_model", str(write_song(tmp / "rss-baseline.wav", 60)))
    print(
        f"apply_model on 60 s: peak RSS {baseline['peak_rss_mb']:.0f} MB "
        f"(while separating {baseline.get('separation_peak_rss_mb') or 0:.0f} MB)",
        flush=True,
    )
    sizes = dict(before.get("worker", {}))
    for size in minutes:
        song = write_song(tmp / f"rss{size:g}.wav", size * 60)
        sizes[f"{size:g}"] = child("worker", str(song))
        song.unlink()
        figures = sizes[f"{size:g}"]
        print(
            f"worker on {size:g} min: peak RSS {figures['peak_rss_mb']:.0f} MB "
            f"(while separating {figures.get('separation_peak_rss_mb') or 0:.0f} MB) in {figures['seconds_taken']:.0f} s",
            flush=True,
        )
    lengths = sorted(sizes, key=float)
    first, last = sizes[lengths[0]]["peak_rss_mb"], sizes[lengths[-1]]["peak_rss_mb"]
    print(f"peak RSS {lengths[-1]} min / {lengths[0]} min: {last / first:.3f}", flush=True)
    during = [sizes[size].get("separation_peak_rss_mb") for size in (lengths[0], lengths[-1])]
    separation_ratio = during[1] / during[0] if None not in during else None
    if separation_ratio is not None:
        print(f"peak RSS while separating (after loading): {during[0]:.0f} -> {during[1]:.0f} MB", flush=True)
    return {
        "apply_model_60s": baseline,
        "worker": {size: sizes[size] for size in lengths},
        "torch_compile": compiled,
        "engine": backend,
        "quality": "fast",
        "output_format": "flac",
        "long_over_short": {
            "minutes": [float(lengths[0]), float(lengths[-1])],
            "ratio": last / first,
            "separation_ratio": separation_ratio,
        },
    }


def write_tiny_repo(repo: Path) -> Path:
    """The tests' tiny untrained models, `htdemucs` among them."""
    from stemflow_dev.models import make_tiny_repo

    return make_tiny_repo(repo)


def run_child(kind: str, song: Path, repo: Path, compiled: bool, backend: str, threads: int) -> None:
    """One measurement in a fresh process: its peak RSS, printed as JSON."""
    from separator.plan import submodels

    model = load(repo)
    engine = worker_engine(backend if kind == "worker" else "torch", repo, threads, compiled).start()
    if kind == "worker" and backend != "torch":
        # The worker's start: its networks loaded from the export cache.
        for sub in submodels(model.model)[0]:
            engine.warm_up(sub)
    loaded_rss = _reset_peak_rss()
    started = time.perf_counter()
    if kind == "apply_model":
        engine.close()
        apply_model_run(model, sf.read(song, dtype="float32", always_2d=True)[0].T.copy(), **BASELINE)
    else:
        with tempfile.TemporaryDirectory() as out, engine:
            worker_job(engine, model, song, Path(out), "fast", fmt="flac")
    taken = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"peak_rss_mb": peak, "seconds_taken": taken, "rss_after_loading_mb": loaded_rss}
    if loaded_rss is not None:
        figures["separation_peak_rss_mb"] = _status_mb("VmHWM")
    print(json.dumps(figures))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak_rss() -> float | None:
    """Restart the kernel's peak-RSS count (Linux), so the separation's own peak can be read; the RSS now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="engines,rtf,throughput,rss")
    parser.add_argument(
        "--engine", default="auto", help="the worker's engine in throughput and rss (auto: CPU default)"
    )
    parser.add_argument("--engines", default=",".join(ENGINE_VARIANTS), help="engines measured on htdemucs")
    parser.add_argument("--bag-engines", default="torch,onnx,openvino", help="engines measured on the htdemucs_ft bag")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the engines section")
    parser.add_argument("--throughput-torch", action="store_true", help="throughput also of the torch eager worker")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--songs", type=int, default=10)
    parser.add_argument("--song-seconds", type=float, default=30.0)
    parser.add_argument("--minutes", default="1,10,60")
    parser.add_argument("--rss-model", choices=RSS_MODELS, default="production", help="model of the rss section")
    parser.add_argument("--compile", action="store_true", help="torch.compile the worker's model (throughput, rss)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SONG"), help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine == "auto":
        from separator.device import pick_engine

        args.engine = pick_engine("auto", "cpu", "float32", args.compile)
    if args.child:
        run_child(args.child[0], Path(args.child[1]), args.repo, args.compile, args.engine, args.threads)
        return
    sections = args.only.split(",")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "separator.json"
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-separator-") as tmp_name:
        tmp = Path(tmp_name)
        repo = write_repo(tmp / "repo")
        # The machine's cores may be shared with other work: each section records the load it started under.
        common = {
            "threads": args.threads,
            "model": "htdemucs (production architecture, random weights)",
            "device": "cpu",
            "precision": "float32",
            "engine": args.engine,
            "torch": torch.__version__,
            "goals": GOALS,
        }
        results.update(common)
        if "engines" in sections:
            engines: dict = {}
            for model_name, names in ((MODEL, args.engines), (BAG, args.bag_engines)):
                if names:
                    engines[model_name] = {
                        "load_average_at_start": os.getloadavg(),
                        **bench_engines(
                            repo, tmp, args.seconds, args.threads, names.split(","), args.rounds, model_name
                        ),
                    }
            results["engines"] = engines
        if "rtf" in sections:
            results["rtf"] = {"load_average_at_start": os.getloadavg(), **bench_rtf(repo, tmp, args.seconds)}
        if "throughput" in sections:
            results["throughput"] = {
                "load_average_at_start": os.getloadavg(),
                **bench_throughput(
                    repo,
                    tmp,
                    args.songs,
                    args.song_seconds,
                    args.threads,
                    args.compile,
                    args.engine,
                    args.throughput_torch,
                ),
            }
        if "rss" in sections:
            before = json.loads(out.read_text()).get("rss", {}) if out.is_file() else {}
            # Figures from before results were kept per model are dropped, not mixed in.
            rss = {name: before[name] for name in RSS_MODELS if name in before}
            rss_repo = repo if args.rss_model == "production" else write_tiny_repo(tmp / "tiny-repo")
            minutes = [float(m) for m in args.minutes.split(",")]
            rss[args.rss_model] = {
                "model": RSS_MODELS[args.rss_model],
                "load_average_at_start": os.getloadavg(),
                **bench_rss(
                    rss_repo, tmp, minutes, args.threads, args.compile, rss.get(args.rss_model, {}), args.engine
                ),
            }
            results["rss"] = rss
        # Read again just before writing: runs of other sections may have finished meanwhile.
        merged = json.loads(out.read_text()) if out.is_file() else {}
        out.write_text(json.dumps(merge(merged, results), indent=2))
    print(f"wrote {out}")


def merge(old: dict, new: dict) -> dict:
    """`old` updated with `new`, nested dicts merged, so runs of some engines keep the others' figures."""
    for key, value in new.items():
        old[key] = merge(old[key], value) if isinstance(value, dict) and isinstance(old.get(key), dict) else value
    return old


if __name__ == "__main__":
    main()
