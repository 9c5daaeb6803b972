"""Separator speed and memory on the production htdemucs architecture with random weights.

Speed does not depend on weight values. Every figure is a ratio against plain demucs measured in
the same run, on this machine's cores:
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

    .venv/bin/python bench/separator.py [--threads 2] [--only rtf,throughput,rss] [--minutes 1,10,60]
        [--rss-model production|tiny]
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
GOALS = {"fast_rtf": 1.0, "peak_rss_mb": 1536, "throughput_ratio": 1.3, "long_rss_ratio": 1.2}
PRECISIONS = ("float32", "bfloat16")
RSS_MODELS = {
    "production": "htdemucs (production architecture, random weights)",
    "tiny": "tiny untrained htdemucs of the tests (stemflow_dev.models.make_tiny_repo)",
}


def write_repo(repo: Path) -> Path:
    """A demucs model repository holding the production htdemucs architecture as `htdemucs`."""
    from demucs.states import get_state, save_with_checksum

    from stemflow_dev.models import make_production_htdemucs

    repo.mkdir(parents=True, exist_ok=True)
    model = make_production_htdemucs()
    args, kwargs = model._init_args_kwargs
    package = {"klass": type(model), "args": args, "kwargs": kwargs, "state": get_state(model, None, half=True)}
    save_with_checksum(package, repo / "benchhtd.th")
    (repo / f"{MODEL}.yaml").write_text(yaml.safe_dump({"models": ["benchhtd"]}))
    return repo


def load(repo: Path) -> LoadedModel:
    from separator.models import ModelCache

    return ModelCache(repo, "cpu").get(MODEL)


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


def bench_throughput(repo: Path, tmp: Path, songs: int, seconds: float, threads: int, compiled: bool) -> dict:
    """The worker against the CLI in alternating rounds of `in_flight` songs, so that load from
    other work on a shared machine weighs on both alike.

    The worker runs twice per round: in float32 (the CPU default, output equal to apply_model's) and
    with the opt-in PRECISION=bfloat16 setting, whose distance from float32 is reported too.
    """
    from separator.engine import SegmentEngine
    from separator.settings import Settings

    model = load(repo)
    paths = [write_song(tmp / f"song{i}.wav", seconds, seed=i) for i in range(songs)]
    in_flight = Settings.model_fields["prefetch"].default
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "demucs", "--repo", str(repo), "-n", MODEL, "--shifts", "0", "--overlap", "0.1"]
    command += ["-d", "cpu", "--float32", "-o", str(tmp / "cli")]
    engines = {
        precision: SegmentEngine("cpu", precision=precision, compile_models=compiled) for precision in PRECISIONS
    }
    rounds = []
    with ThreadPoolExecutor(in_flight) as pool:
        for engine in engines.values():
            # A running worker has its model loaded (and compiled) before the first job.
            engine.start().warm_up(model.model.models[0])
        for first in range(0, songs, in_flight):
            batch = paths[first : first + in_flight]
            times = {}
            for precision, engine in engines.items():
                started = time.perf_counter()
                out = tmp / "worker" / precision
                for job in [pool.submit(worker_job, engine, model, p, out / p.stem, "fast") for p in batch]:
                    job.result()
                times[f"worker_{precision}_s"] = time.perf_counter() - started
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
    ratios = {precision: totals["cli_s"] / totals[f"worker_{precision}_s"] for precision in PRECISIONS}
    print(
        f"{songs} songs of {seconds:.0f} s, demucs CLI {totals['cli_s']:.1f} s; worker throughput "
        + ", ".join(f"{ratio:.2f}x the CLI in {precision}" for precision, ratio in ratios.items()),
        flush=True,
    )
    bfloat16_error_db = _error_db(tmp / "worker" / "bfloat16", tmp / "worker" / "float32")
    print(f"bfloat16 stems are {bfloat16_error_db:.1f} dB (energy) away from float32's", flush=True)
    return {
        "songs": songs,
        "seconds": seconds,
        "in_flight": in_flight,
        "worker_s": totals["worker_float32_s"],
        "cli_s": totals["cli_s"],
        "ratio": ratios["float32"],
        "worker_bfloat16_s": totals["worker_bfloat16_s"],
        "ratio_bfloat16": ratios["bfloat16"],
        "bfloat16_error_db": bfloat16_error_db,
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


def bench_rss(repo: Path, tmp: Path, minutes: list[float], threads: int, compiled: bool, before: dict) -> dict:
    """Peak RSS per song length, merged into `before` (an earlier run's figures for the same model)."""

    def child(*args: str) -> dict:
        command = [sys.executable, __file__, "--child", *args, "--repo", str(repo), "--threads", str(threads)]
        command += ["--compile"] if compiled else []
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

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


def run_child(kind: str, song: Path, repo: Path, compiled: bool) -> None:
    """One measurement in a fresh process: its peak RSS, printed as JSON."""
    from separator.engine import SegmentEngine

    model = load(repo)
    loaded_rss = _reset_peak_rss()
    started = time.perf_counter()
    if kind == "apply_model":
        apply_model_run(model, sf.read(song, dtype="float32", always_2d=True)[0].T.copy(), **BASELINE)
    else:
        with tempfile.TemporaryDirectory() as out, SegmentEngine("cpu", compile_models=compiled) as engine:
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
    parser.add_argument("--only", default="rtf,throughput,rss")
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
    if args.child:
        run_child(args.child[0], Path(args.child[1]), args.repo, args.compile)
        return
    sections = args.only.split(",")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "separator.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="bench-separator-") as tmp_name:
        tmp = Path(tmp_name)
        repo = write_repo(tmp / "repo")
        # The machine's cores may be shared with other work: each section records the load it started under.
        common = {
            "threads": args.threads,
            "model": "htdemucs (production architecture, random weights)",
            "device": "cpu",
            "precision": "float32",
            "torch": torch.__version__,
            "goals": GOALS,
        }
        results.update(common)
        if "rtf" in sections:
            results["rtf"] = {"load_average_at_start": os.getloadavg(), **bench_rtf(repo, tmp, args.seconds)}
        if "throughput" in sections:
            results["throughput"] = {
                "load_average_at_start": os.getloadavg(),
                **bench_throughput(repo, tmp, args.songs, args.song_seconds, args.threads, args.compile),
            }
        if "rss" in sections:
            rss = results.get("rss", {})
            # Figures from before results were kept per model are dropped, not mixed in.
            rss = {name: rss[name] for name in RSS_MODELS if name in rss}
            rss_repo = repo if args.rss_model == "production" else write_tiny_repo(tmp / "tiny-repo")
            minutes = [float(m) for m in args.minutes.split(",")]
            rss[args.rss_model] = {
                "model": RSS_MODELS[args.rss_model],
                "load_average_at_start": os.getloadavg(),
                **bench_rss(rss_repo, tmp, minutes, args.threads, args.compile, rss.get(args.rss_model, {})),
            }
            results["rss"] = rss
        out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
