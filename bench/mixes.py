"""Practice mixes: render time per minute of audio, plain and stretched/shifted, and how exactly stems mix back.

A synthetic song (drums, bass, chords, a vocal-like melody; 24-bit WAV stems, with the residual stem so
the stems sum to the normalised float audio, as a job with `residual: true` has them) is mixed by
`analyzer.mixer.render_mix`, the function the analyzer's worker processes run, each case in a fresh
process pinned to one core with one thread per library:
- plain mixes (karaoke gains) as WAV 24, FLAC 16 and MP3;
- tempo and pitch with Rubber Band: 0.75x and -2 semitones at each quality (fast: R2; balanced: R3 short
  window, the default; best: R3 full), tempo only, pitch only, and a looped 4-bar section with a click;
  the goal case also as the baseline, "1 pass": pitch shifted inside Rubber Band's pass instead of by soxr;
- unity: every stem at gain 1 against the original, as the residual in dB (goal <= -60 dB).
Goal: a 4-minute song's practice mix at 0.75x tempo, -2 semitones, ready in <= 10 s on one core
(CPU seconds of the worker process; wall seconds are printed too, and differ on a busy machine).

    .venv/bin/python bench/mixes.py [--seconds 240] [--runs 3] [--core N] [--only plain,stretch,unity] [--cases A,B]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

RESULTS = Path(__file__).resolve().parent / "results"
SR = 44100
BPM = 96.0
GOALS = {"stretch_4min_s": 10.0, "unity_residual_db": -60.0}
ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
KARAOKE = {"vocals": 0.0}
CASES: dict[str, dict[str, Any]] = {
    "plain wav24": {"gains": KARAOKE, "format": "wav", "bit_depth": 24},
    "plain flac16": {"gains": KARAOKE, "format": "flac", "bit_depth": 16},
    "plain mp3": {"gains": KARAOKE, "format": "mp3", "bit_depth": None},
    "0.75x -2st fast": {"gains": KARAOKE, "tempo": 0.75, "semitones": -2.0, "quality": "fast"},
    "0.75x -2st balanced": {"gains": KARAOKE, "tempo": 0.75, "semitones": -2.0, "quality": "balanced"},
    # The baseline: pitch shifted inside Rubber Band's pass (its own resampler) instead of by soxr after it.
    "0.75x -2st balanced 1 pass": {
        "gains": KARAOKE,
        "tempo": 0.75,
        "semitones": -2.0,
        "quality": "balanced",
        "one_pass": True,
    },
    "0.75x -2st best": {"gains": KARAOKE, "tempo": 0.75, "semitones": -2.0, "quality": "best"},
    "0.75x balanced": {"gains": KARAOKE, "tempo": 0.75, "quality": "balanced"},
    "-2st balanced": {"gains": KARAOKE, "semitones": -2.0, "quality": "balanced"},
    # 4 bars (10 s at 96 BPM) from a quarter of the way in, looped 4 times, slower, with the click.
    "4 bars x4 0.75x click": {"gains": KARAOKE, "tempo": 0.75, "section_at": 0.25, "loops": 4, "click": True},
}
GOAL_CASE = "0.75x -2st balanced"


def write_song(folder: Path, seconds: float) -> dict[str, Any]:
    """Stems (24-bit WAV, residual included) and the float original they sum to; beats and downbeats."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(5)
    n = round(seconds * SR)
    t = np.arange(n) / SR
    beat = 60.0 / BPM
    beats = np.arange(0.0, seconds, beat)
    drums = np.zeros(n)
    for i, at in enumerate(beats):
        start = round(at * SR)
        length = min(round(0.25 * SR), n - start)
        tail = np.arange(length) / SR
        kick = np.sin(2 * np.pi * (50 + 60 * np.exp(-tail / 0.03)) * tail) * np.exp(-tail / 0.12)
        hat = rng.uniform(-1, 1, length) * np.exp(-tail / 0.01) * (0.5 if i % 2 else 0.2)
        drums[start : start + length] += 0.5 * kick * (i % 2 == 0) + 0.25 * hat
    roots = np.array([45, 41, 48, 43])  # A, F, C, G (MIDI), one per bar
    bar = np.minimum((t / (4 * beat)).astype(int) % 4, 3)
    freq = 440 * 2 ** ((roots[bar] - 69) / 12)
    bass = 0.25 * np.sin(2 * np.pi * np.cumsum(freq) / SR)
    chords = sum(0.06 * np.sin(2 * np.pi * np.cumsum(freq * 2 ** (k / 12) * 4) / SR) for k in (0, 4, 7))
    melody_notes = 440 * 2 ** (rng.choice([0, 2, 3, 5, 7, 9], size=int(seconds / beat) + 1) / 12)
    melody = melody_notes[(t / beat).astype(int)] * (1 + 0.004 * np.sin(2 * np.pi * 5.5 * t))
    vocals = 0.15 * np.sin(2 * np.pi * np.cumsum(melody) / SR)
    stems = {
        "drums": np.stack([drums, drums]),
        "bass": np.stack([bass, bass]),
        "other": np.stack([chords, 0.7 * chords]),  # a little to the left
        "vocals": np.stack([vocals, vocals]),
    }
    stems = {name: 0.6 * samples for name, samples in stems.items()}  # peaks near -1 dBFS, as a master
    original = sum(stems.values()) + np.stack([0.01 * rng.uniform(-1, 1, n)] * 2)
    paths = {}
    written = np.zeros_like(original)
    for name, samples in stems.items():
        paths[name] = str(folder / f"{name}.wav")
        sf.write(paths[name], samples.T, SR, subtype="PCM_24")
        written += sf.read(paths[name], always_2d=True)[0].T
    paths["residual"] = str(folder / "residual.wav")
    sf.write(paths["residual"], (original - written).T, SR, subtype="FLOAT")
    sf.write(folder / "audio.wav", original.T.astype(np.float32), SR, subtype="FLOAT")
    return {
        "seconds": seconds,
        "stems": paths,
        "original": str(folder / "audio.wav"),
        "beats": [round(float(b), 4) for b in beats],
        "downbeats": [round(float(b), 4) for b in beats[::4]],
    }


def run_case(song: dict[str, Any], case: dict[str, Any], out: str) -> dict[str, Any]:
    """Child process: render one mix as the worker does; its CPU and wall seconds and the facts."""
    from analyzer import mixing
    from analyzer.mixer import render_mix
    from analyzer.mixing import MixPlan

    if case.get("one_pass"):
        mixing.stretch = one_pass_stretch

    gains = case.get("gains", {})
    plan = MixPlan(
        stems=[(path, gains.get(name, 1.0)) for name, path in song["stems"].items()],
        original=song["original"],
        tempo=case.get("tempo", 1.0),
        semitones=case.get("semitones", 0.0),
        start=None if "section_at" not in case else case["section_at"] * song["seconds"],
        end=None if "section_at" not in case else case["section_at"] * song["seconds"] + 16 * 60.0 / BPM,
        loops=case.get("loops", 1),
        click=case.get("click", False),
        beats=song["beats"],
        downbeats=song["downbeats"],
        format=case.get("format", "wav"),
        bit_depth=case.get("bit_depth", 24),
        quality=case.get("quality", "balanced"),
    )
    wall, cpu = time.perf_counter(), time.process_time()
    rendered = render_mix(plan, out)
    return {
        "cpu_s": round(time.process_time() - cpu, 3),
        "wall_s": round(time.perf_counter() - wall, 3),
        "out_s": round(rendered.duration_s, 2),
        "loudness_lufs": rendered.loudness_lufs,
        "gain_db": rendered.gain_db,
        "steps": rendered.steps,
    }


def one_pass_stretch(samples: Any, sr: int, tempo: float, semitones: float, quality: str, progress: Any = None) -> Any:
    """The baseline: tempo and pitch in one Rubber Band pass (pitch by its internal resampler)."""
    import numpy as np
    from pylibrb import RubberBandStretcher

    from analyzer import mixing

    channels, frames = samples.shape
    stretcher = RubberBandStretcher(
        sample_rate=sr,
        channels=channels,
        options=mixing.COMMON | mixing.ENGINES[quality],
        initial_time_ratio=1.0 / tempo,
        initial_pitch_scale=2.0 ** (semitones / 12.0),
    )
    stretcher.set_expected_input_duration(frames)
    stretcher.set_max_process_size(mixing.BLOCK)
    for at in range(0, frames, mixing.BLOCK):
        stretcher.study(samples[:, at : at + mixing.BLOCK], final=at + mixing.BLOCK >= frames)
    chunks = []
    for at in range(0, frames, mixing.BLOCK):
        stretcher.process(samples[:, at : at + mixing.BLOCK], final=at + mixing.BLOCK >= frames)
        chunks.extend(mixing._drain(stretcher))
    chunks.extend(mixing._drain(stretcher))
    return mixing._fit(np.concatenate(chunks, axis=1), (channels, round(frames / tempo)))


def unity(song: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Child process: every stem at gain 1, against the original, for each output format."""
    import numpy as np
    import soundfile as sf

    from analyzer.mixing import MixPlan, render

    original = sf.read(song["original"], always_2d=True)[0].T
    found = {}
    for fmt, depth in (("wav", 32), ("wav", 24), ("flac", 24), ("flac", 16)):
        out = folder / f"unity-{depth}.{fmt}"
        plan = MixPlan(
            stems=[(p, 1.0) for p in song["stems"].values()], original=song["original"], format=fmt, bit_depth=depth
        )
        render(plan, out)
        mixed = sf.read(out, always_2d=True)[0].T
        residual = 20 * np.log10(np.sqrt(np.mean((mixed - original) ** 2)) / np.sqrt(np.mean(original**2)))
        found[f"{fmt}{depth}"] = round(float(residual), 1)
    return found


def child(section: str, core: int, payload: dict[str, Any]) -> None:
    os.sched_setaffinity(0, {core})
    if section == "case":
        result = run_case(payload["song"], payload["case"], payload["out"])
    else:
        result = unity(payload["song"], Path(payload["folder"]))
    print(json.dumps(result))


def in_child(section: str, core: int, payload: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", section, "--core", str(core), "--payload", json.dumps(payload)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{section} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=240.0, help="the song's length")
    parser.add_argument("--runs", type=int, default=3, help="runs per case (the median is kept)")
    parser.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="the one core to run on")
    parser.add_argument("--only", default="plain,stretch,unity")
    parser.add_argument("--cases", default="", help="comma-separated case names to run (default: all of --only)")
    parser.add_argument("--child")
    parser.add_argument("--payload")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.core, json.loads(args.payload))
        return 0
    only = set(args.only.split(","))
    minutes = args.seconds / 60
    report: dict[str, Any] = {"seconds": args.seconds, "runs": args.runs, "core": args.core, "goals": GOALS}
    load = os.getloadavg()[0]
    report["load_average"] = round(load, 2)
    print(
        f"song: {args.seconds:.0f} s synthetic, 5 stems (24-bit WAV + residual); one core ({args.core}); load {load:.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="stemflow-bench-mixes-") as tmp:
        folder = Path(tmp)
        song = write_song(folder, args.seconds)
        cases = {}
        wanted = [
            name
            for name in CASES
            if ("plain" in only and name.startswith("plain")) or ("stretch" in only and not name.startswith("plain"))
            if not args.cases or name in args.cases.split(",")
        ]
        print(f"{'case':<24} {'cpu s':>7} {'wall s':>7} {'cpu s/min':>10} {'out s':>7}  steps (cpu s)")
        for name in wanted:
            runs = [
                in_child(
                    "case",
                    args.core,
                    {"song": song, "case": CASES[name], "out": str(folder / f"out.{CASES[name].get('format', 'wav')}")},
                )
                for _ in range(args.runs)
            ]
            best = sorted(runs, key=lambda r: r["cpu_s"])[len(runs) // 2]
            best["cpu_s_per_min"] = round(best["cpu_s"] / minutes, 3)
            best["wall_s_median"] = round(statistics.median(r["wall_s"] for r in runs), 3)
            cases[name] = best
            steps = ", ".join(f"{k} {v:.2f}" for k, v in best["steps"].items())
            print(
                f"{name:<24} {best['cpu_s']:>7.2f} {best['wall_s_median']:>7.2f} {best['cpu_s_per_min']:>10.2f} {best['out_s']:>7.1f}  {steps}"
            )
        report["cases"] = cases
        if GOAL_CASE in cases:
            per_4min = cases[GOAL_CASE]["cpu_s_per_min"] * 4
            report["stretch_4min_s"] = round(per_4min, 2)
            verdict = "meets" if per_4min <= GOALS["stretch_4min_s"] else "misses"
            print(
                f"goal: a 4-minute song at 0.75x, -2 st ({GOAL_CASE}): {per_4min:.1f} s CPU on one core, {verdict} <= 10 s"
            )
            baseline = cases.get(f"{GOAL_CASE} 1 pass")
            if baseline:
                report["stretch_vs_one_pass"] = round(cases[GOAL_CASE]["cpu_s"] / baseline["cpu_s"], 3)
                print(f"  {report['stretch_vs_one_pass']:.2f}x the CPU of one Rubber Band pass for tempo and pitch")
        if "unity" in only:
            found = in_child("unity", args.core, {"song": song, "folder": tmp})
            report["unity_residual_db"] = found
            worst = max(found.values())
            verdict = "meets" if worst <= GOALS["unity_residual_db"] else "misses"
            print(f"unity: stems at gain 1 against the original, residual dB: {found} ({verdict} <= -60 dB)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixes.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {RESULTS / 'mixes.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
