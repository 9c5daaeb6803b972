"""Analyzer speed, the cold start its warm-up avoids, and ingest's decode speed, each against a baseline.

Every measurement runs in a fresh process pinned to one core with one thread per library, as a
worker of the analyzer runs; songs are the tests' synthetic pop loops (known tempo and key).
- rtf: real-time factor of a full analysis (`analyzer.handlers.analyze_file`: read the normalised
  WAV, then tempo, beats, bars, key, loudness, true peak, energy) of 60 s and 180 s songs in a worker
  warmed by `start_worker`, against a textbook librosa analysis of the same file in the same process
  (`librosa.load` at 22.05 kHz, `librosa.beat.beat_track`, Krumhansl-Kessler key on
  `librosa.feature.chroma_stft`, `pyloudnorm` integrated loudness), also warmed; median of --runs.
  `rtf` divides by wall-clock time, `rtf_cpu` by the process's CPU time (on a loaded machine the
  pinned core is shared, and only the wall clock counts the other processes' turns).
- cold_start: the first analysis of a 60 s song in a fresh process without `warm_up` against one
  with it (and what `warm_up` itself costs, paid once before the worker takes jobs); numba's
  on-disk cache is primed by a throwaway process first, as a worker that has run once would find it.
- ingest: real-time factor of `ingest.audio.normalise` (decode, mix to stereo, resample to
  44.1 kHz, hash, write float WAV) on FLAC and MP3 files, against the ffmpeg command line doing the
  same conversion (`-threads 1`, process start paid) and against `librosa.load(sr=44100)` + write.

    .venv/bin/python bench/analyzer.py [--only rtf,cold_start,ingest] [--runs 5] [--core N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# analyzer package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# The synthetic songs of the analyzer's tests, whose tempo and key are known by construction.
SYNTH = ROOT / "services" / "analyzer" / "tests"
SAMPLERATE = 44100
SONG = {"bpm": 123.0, "tonic": 9, "mode": "minor", "key": "A minor"}
GOALS = {"analysis_rtf": 150.0, "ingest_rtf": 100.0}
ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
# Krumhansl & Kessler (1982) probe-tone ratings, the textbook key profiles.
KK_MAJOR = (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88)
KK_MINOR = (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17)
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


# --- songs (parent process) -------------------------------------------------------


def write_songs(tmp: Path, durations: list[float]) -> dict[str, Any]:
    """The normalised WAV of each duration, and FLAC (44.1 and 48 kHz) and MP3 copies for ingest."""
    import soundfile as sf
    import soxr

    sys.path.insert(0, str(SYNTH))
    import synth

    files: dict[str, Any] = {}
    for seconds in durations:
        samples = synth.song(SONG["bpm"], SONG["tonic"], SONG["mode"], seconds=seconds, seed=1)
        name = f"{seconds:g}s"
        wav = tmp / f"{name}.wav"
        sf.write(wav, samples.T, SAMPLERATE, subtype="FLOAT")
        flac, flac48, mp3 = tmp / f"{name}.flac", tmp / f"{name}-48k.flac", tmp / f"{name}.mp3"
        sf.write(flac, samples.T, SAMPLERATE, format="FLAC", subtype="PCM_16")
        sf.write(flac48, soxr.resample(samples.T, SAMPLERATE, 48000), 48000, format="FLAC", subtype="PCM_24")
        sf.write(mp3, samples.T, SAMPLERATE, format="MP3")
        files[name] = {
            "seconds": seconds,
            "wav": str(wav),
            "ingest": {"FLAC 44.1 kHz 16-bit": str(flac), "FLAC 48 kHz 24-bit": str(flac48), "MP3 44.1 kHz": str(mp3)},
        }
    return files


def run_child(section: str, core: int, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one section in a fresh process on one core; its figures."""
    env = {**os.environ, **ONE_THREAD}
    command = [sys.executable, __file__, "--child", section, "--core", str(core), "--payload", json.dumps(payload)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{section} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- measurements (child processes) -----------------------------------------------


def median_time(fn: Any, runs: int) -> tuple[float, Any]:
    wall, _, result = median_times(fn, runs)
    return wall, result


def median_times(fn: Any, runs: int) -> tuple[float, float, Any]:
    """Median wall-clock and process CPU seconds of `fn` over `runs`, and its last result.

    On a shared machine the pinned core is shared too, so the wall clock counts the other processes' turns
    and the CPU time does not: both are reported.
    """
    walls, cpus, result = [], [], None
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - started_cpu)
    return statistics.median(walls), statistics.median(cpus), result


def librosa_analysis(path: str) -> dict[str, Any]:
    """The textbook analysis: librosa beat tracker and chroma key, pyloudnorm loudness."""
    import librosa
    import numpy as np
    import pyloudnorm
    import soundfile as sf

    y, sr = librosa.load(path, sr=22050)
    tempo, beats = librosa.beat.beat_track(y=y, sr=sr)
    profile = librosa.feature.chroma_stft(y=y, sr=sr).mean(axis=1)
    templates = [np.roll(p, tonic) for p in (KK_MAJOR, KK_MINOR) for tonic in range(12)]
    best = int(np.argmax([np.corrcoef(profile, t)[0, 1] for t in templates]))
    stereo, rate = sf.read(path, dtype="float32", always_2d=True)
    loudness = pyloudnorm.Meter(rate).integrated_loudness(stereo)
    key = f"{PITCH_CLASSES[best % 12]} {'major' if best < 12 else 'minor'}"
    return {"tempo_bpm": float(np.atleast_1d(tempo)[0]), "key": key, "beat_count": len(beats), "lufs": loudness}


def bench_rtf(files: dict[str, Any], runs: int) -> dict[str, Any]:
    from analyzer.handlers import analyze_file, start_worker

    start_worker()
    figures: dict[str, Any] = {}
    for name, song in files.items():
        librosa_analysis(song["wav"])  # its numba functions compile on the first call
        ours_s, ours_cpu_s, (facts, _) = median_times(lambda song=song: analyze_file(song["wav"]), runs)
        base_s, base_cpu_s, base = median_times(lambda song=song: librosa_analysis(song["wav"]), runs)
        seconds = song["seconds"]
        figures[name] = {
            "analysis_s": round(ours_s, 4),
            "rtf": round(seconds / ours_s, 1),
            "analysis_cpu_s": round(ours_cpu_s, 4),
            "rtf_cpu": round(seconds / ours_cpu_s, 1),
            "baseline_s": round(base_s, 4),
            "baseline_rtf": round(seconds / base_s, 1),
            "baseline_rtf_cpu": round(seconds / base_cpu_s, 1),
            "speedup_vs_baseline": round(base_s / ours_s, 1),
            "goal_met": seconds / ours_s >= GOALS["analysis_rtf"],
            "truth": {"tempo_bpm": SONG["bpm"], "key": SONG["key"]},
            "analysis": {
                "tempo_bpm": round(facts["tempo_bpm"], 2),
                "key": facts["key"],
                "meter": facts["meter"],
                "beat_count": facts["beat_count"],
                "tempo_alternatives": [round(a["bpm"], 1) for a in facts["tempo_alternatives"]],
                "key_alternatives": [a["key"] for a in facts["key_alternatives"]],
            },
            "baseline": {
                "tempo_bpm": round(base["tempo_bpm"], 2),
                "key": base["key"],
                "beat_count": base["beat_count"],
            },
        }
    return figures


def bench_cold(song: str, warm: bool) -> dict[str, Any]:
    """One fresh process: import, optionally warm up, then two analyses of the same song."""
    started = time.perf_counter()
    from analyzer.features import warm_up
    from analyzer.handlers import analyze_file

    figures = {"import_s": time.perf_counter() - started}
    if warm:
        started = time.perf_counter()
        warm_up()
        figures["warm_up_s"] = time.perf_counter() - started
    for call in ("first_call_s", "second_call_s"):
        started = time.perf_counter()
        analyze_file(song)
        figures[call] = time.perf_counter() - started
    return figures


def bench_ingest(files: dict[str, Any], runs: int, tmp: str) -> dict[str, Any]:
    import librosa
    import soundfile as sf

    from ingest.audio import normalise

    ffmpeg = shutil.which("ffmpeg")
    out = Path(tmp) / "out.wav"
    figures: dict[str, Any] = {}
    for name, song in files.items():
        seconds = song["seconds"]
        for fmt, path in song["ingest"].items():
            src = Path(path)
            normalise(src, out)  # first call pays imports and caches
            ours_s, _ = median_time(lambda src=src: normalise(src, out), runs)

            def librosa_load(src: Path = src) -> None:
                y, sr = librosa.load(src, sr=SAMPLERATE, mono=False)
                sf.write(out, y.T, sr, subtype="FLOAT")

            librosa_s, _ = median_time(librosa_load, runs)
            entry = {
                "normalise_s": round(ours_s, 4),
                "rtf": round(seconds / ours_s, 1),
                "goal_met": seconds / ours_s >= GOALS["ingest_rtf"],
                "librosa_load_rtf": round(seconds / librosa_s, 1),
                "ratio_vs_librosa_load": round(librosa_s / ours_s, 2),
            }
            if ffmpeg:
                command = [ffmpeg, "-nostdin", "-v", "error", "-threads", "1", "-y", "-i", str(src)]
                command += ["-ar", str(SAMPLERATE), "-ac", "2", "-c:a", "pcm_f32le", str(out)]
                ffmpeg_s, _ = median_time(lambda command=command: subprocess.run(command, check=True), runs)
                entry |= {
                    "ffmpeg_cli_rtf": round(seconds / ffmpeg_s, 1),
                    "ratio_vs_ffmpeg_cli": round(ffmpeg_s / ours_s, 2),
                }
            figures[f"{name} {fmt}"] = entry
    return figures


def child(section: str, core: int, payload: dict[str, Any]) -> None:
    os.sched_setaffinity(0, {core})
    if section == "rtf":
        figures = bench_rtf(payload["files"], payload["runs"])
    elif section in ("cold", "warm"):
        figures = bench_cold(payload["song"], warm=section == "warm")
    else:
        figures = bench_ingest(payload["files"], payload["runs"], payload["tmp"])
    print(json.dumps(figures))


# --- report -------------------------------------------------------------------------


def cold_start(core: int, song: str, seconds: float, runs: int) -> dict[str, Any]:
    run_child("warm", core, {"song": song})  # primes numba's on-disk cache
    cold = [run_child("cold", core, {"song": song}) for _ in range(runs)]
    warm = [run_child("warm", core, {"song": song}) for _ in range(runs)]

    def med(results: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(r[key] for r in results), 4)

    first_cold, first_warm, steady = med(cold, "first_call_s"), med(warm, "first_call_s"), med(cold, "second_call_s")
    return {
        "song_seconds": seconds,
        "processes_each": runs,
        "import_s": med(cold, "import_s"),
        "warm_up_s": med(warm, "warm_up_s"),
        "first_call_without_warm_up_s": first_cold,
        "first_call_after_warm_up_s": first_warm,
        "steady_call_s": steady,
        "cold_start_avoided_s": round(first_cold - first_warm, 4),
        "first_call_ratio_without_vs_with_warm_up": round(first_cold / first_warm, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="rtf,cold_start,ingest")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (the median is kept)")
    parser.add_argument("--seconds", default="60,180", help="song durations")
    parser.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="the one core to run on")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.core, json.loads(args.payload))
        return
    sections = args.only.split(",")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "analyzer.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="bench-analyzer-") as tmp:
        files = write_songs(Path(tmp), [float(s) for s in args.seconds.split(",")])
        # The machine's cores may be shared with other work: each section records the load it started under.
        results.update({"core": args.core, "threads": 1, "song": SONG, "goals": GOALS})
        if "rtf" in sections:
            load = os.getloadavg()
            results["rtf"] = {
                "load_average_at_start": load,
                **run_child("rtf", args.core, {"files": files, "runs": args.runs}),
            }
        if "cold_start" in sections:
            load = os.getloadavg()
            first = files[next(iter(files))]
            figures = cold_start(args.core, first["wav"], first["seconds"], max(3, args.runs // 2))
            results["cold_start"] = {"load_average_at_start": load, **figures}
        if "ingest" in sections:
            load = os.getloadavg()
            payload = {"files": files, "runs": args.runs, "tmp": tmp}
            results["ingest"] = {"load_average_at_start": load, **run_child("ingest", args.core, payload)}
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
