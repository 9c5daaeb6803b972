"""How right the analyzer is on rendered music, side by side with Essentia and a librosa baseline.

The corpus (`stemflow_dev.corpus`: arrangements in ten styles and Bach
chorales, rendered with FluidSynth, exact truth) is rendered on demand into
.stemflow/corpus. Every tool reads the same mix, on one thread:
- stemflow: `analyzer.features.analyze` (tempo, beats, bars, key, chords);
- essentia: RhythmExtractor2013 (multifeature), KeyExtractor with the edma,
  bgate and temperley profiles, ChordsDetection on HPCP;
- librosa: `beat_track`, Krumhansl-Kessler profiles on CQT chroma, and
  major/minor chord templates on beat-synchronous chroma.

Scored with mir_eval: tempo Acc1 (within 4%) and Acc2 (also at 2x, 3x, 1/2,
1/3), beat F-measure (70 ms), downbeat F-measure (songs in 3/4 and 4/4),
the MIREX weighted key score (Essentia's is its best profile's mean over
the group; "key_oracle", the best profile picked per song, is in the JSON),
chord overlap (majmin and sevenths); and each tool's seconds per song. Rows per split (tuning: seen while tuning the
analyzer; heldback: never) and per style.

    .venv/bin/python bench/analysis_accuracy.py [--set bench|small] [--split heldback] [--tools stemflow,essentia]
        [--stems] [--only rock,chorale]

`--stems` also scores stemflow given the mix and the corpus' true stems, as
the service is given a separated job's (rhythm also from drums+bass, chords
from the tonal stems, each combined with the mix's reading): the upper bound
of what separation adds. Needs fluidsynth, a GM SoundFont and the packages
of bench/requirements-accuracy.txt.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# librosa's gufuncs crashed loading the shared venv's numba cache beside essentia; a private cache does not.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".stemflow", "numba-cache"))

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script, this file's folder comes first on sys.path and its analyzer.py would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("acc1", "acc2", "beat_f", "downbeat_f", "key", "chords_majmin", "chords_sevenths", "seconds")
KK_MAJOR = (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88)
KK_MINOR = (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17)
SHARPS = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
ESSENTIA_PROFILES = ("edma", "bgate", "temperley")


def ascii_spelling(name: str) -> str:
    """ "E♭ major" -> "Eb major": mir_eval reads ASCII accidentals."""
    return name.replace("♭", "b").replace("♯", "#")


# --- tools: each takes (mono or stereo samples, rate) and returns its readings -------------------


def stemflow(samples: np.ndarray, sr: int) -> dict[str, Any]:
    from analyzer.features import analyze

    facts = analyze(samples, sr)
    chords = [[c.start, c.end, harte(c)] for c in getattr(facts, "chords", [])]
    return {
        "tempo": facts.tempo_bpm,
        "beats": facts.beats,
        "downbeats": facts.downbeats,
        "key": ascii_spelling(facts.key),
        "chords": chords or None,
    }


def harte(chord: Any) -> str:
    """A Stemflow chord segment in Harte syntax ("Eb:min7", "N")."""
    if chord.root is None:
        return "N"
    return f"{ascii_spelling(chord.root)}:{chord.quality}"


def essentia(samples: np.ndarray, sr: int) -> dict[str, Any]:
    import essentia.standard as es

    mono = np.ascontiguousarray(samples.mean(axis=0), dtype=np.float32)
    bpm, ticks, *_ = es.RhythmExtractor2013(method="multifeature")(mono)
    keys = {}
    for profile in ESSENTIA_PROFILES:
        tonic, scale, _ = es.KeyExtractor(profileType=profile, sampleRate=sr)(mono)
        keys[profile] = f"{tonic} {scale}"
    window, spectrum = es.Windowing(type="blackmanharris62"), es.Spectrum()
    peaks = es.SpectralPeaks(orderBy="magnitude", magnitudeThreshold=1e-5, minFrequency=20, maxFrequency=3500,
                             maxPeaks=60, sampleRate=sr)  # fmt: skip
    hpcp = es.HPCP(sampleRate=sr)
    hop = 2048
    frames = [hpcp(*peaks(spectrum(window(f)))) for f in es.FrameGenerator(mono, frameSize=4096, hopSize=hop)]
    labels, _ = es.ChordsDetection(hopSize=hop, sampleRate=sr)(np.array(frames))
    # ChordsDetection's frame i covers the window centred on frame i.
    step = hop / sr
    chords = [[i * step, (i + 1) * step, _essentia_chord(label)] for i, label in enumerate(labels)]
    return {"tempo": float(bpm), "beats": list(map(float, ticks)), "downbeats": None, "key": keys, "chords": chords}


def _essentia_chord(label: str) -> str:
    if label.endswith("m"):
        return f"{label[:-1]}:min"
    return f"{label}:maj"


def librosa_baseline(samples: np.ndarray, sr: int) -> dict[str, Any]:
    import librosa

    y = librosa.resample(np.asarray(samples.mean(axis=0)), orig_sr=sr, target_sr=22050)
    tempo, beats = librosa.beat.beat_track(y=y, sr=22050)
    beat_times = librosa.frames_to_time(beats, sr=22050)
    chroma = librosa.feature.chroma_cqt(y=y, sr=22050)
    profile = chroma.mean(axis=1)
    templates = [np.roll(p, tonic) for p in (KK_MAJOR, KK_MINOR) for tonic in range(12)]
    best = int(np.argmax([np.corrcoef(profile, t)[0, 1] for t in templates]))
    key = f"{SHARPS[best % 12]} {'major' if best < 12 else 'minor'}"
    # Major and minor triad templates on beat-synchronous chroma.
    synced = librosa.util.sync(chroma, beats, aggregate=np.median)
    edges = np.concatenate([[0.0], beat_times, [y.size / 22050]])
    triads = np.array([np.roll([1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0], r) for r in range(12)]
                      + [np.roll([1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0], r) for r in range(12)], float)  # fmt: skip
    picks = np.argmax(triads @ synced, axis=0)
    chords = [
        [float(edges[i]), float(edges[i + 1]), f"{SHARPS[p % 12]}:{'maj' if p < 12 else 'min'}"]
        for i, p in enumerate(picks[: edges.size - 1])
    ]
    return {"tempo": float(np.atleast_1d(tempo)[0]), "beats": list(beat_times), "downbeats": None, "key": key,
            "chords": chords}  # fmt: skip


TOOLS: dict[str, Callable[[np.ndarray, int], dict[str, Any]]] = {
    "stemflow": stemflow,
    "essentia": essentia,
    "librosa": librosa_baseline,
}


# --- scoring ------------------------------------------------------------------------------


def score(truth: dict[str, Any], reading: dict[str, Any]) -> dict[str, float | None]:
    """Every metric this reading can be scored on (None where the tool gives no such fact)."""
    import mir_eval

    ref_bpm, est_bpm = truth["tempo_bpm"], reading["tempo"] or 0.0
    ratio = est_bpm / ref_bpm
    scores: dict[str, float | None] = {
        "acc1": float(abs(ratio - 1) <= 0.04),
        "acc2": float(any(abs(ratio / f - 1) <= 0.04 for f in (1, 2, 3, 1 / 2, 1 / 3))),
    }
    ref_beats = mir_eval.beat.trim_beats(np.array(truth["beats"]))
    scores["beat_f"] = mir_eval.beat.f_measure(ref_beats, mir_eval.beat.trim_beats(np.array(reading["beats"])))
    simple_meter = truth["meter"] in ("3/4", "4/4") and truth["kind"] == "arrangement"
    if reading.get("downbeats") is not None and simple_meter:
        est = mir_eval.beat.trim_beats(np.array(reading["downbeats"]))
        scores["downbeat_f"] = mir_eval.beat.f_measure(mir_eval.beat.trim_beats(np.array(truth["downbeats"])), est)
    else:
        scores["downbeat_f"] = None
    keys = reading["key"] if isinstance(reading["key"], dict) else {"": reading["key"]}
    for profile, key in keys.items():
        name = "key" if not profile else f"key_{profile}"
        scores[name] = mir_eval.key.weighted_score(truth["key"], key) if key != "unknown" else 0.0
    if isinstance(reading["key"], dict):
        # Per song, the best of the profiles is an oracle's choice; a group's "key" is its best profile's mean.
        scores["key_oracle"] = max(scores[f"key_{p}"] or 0.0 for p in ESSENTIA_PROFILES)
    if reading.get("chords"):
        scores.update(chord_scores(truth["chords"], reading["chords"]))
    else:
        scores["chords_majmin"] = scores["chords_sevenths"] = None
    return scores


def chord_scores(ref: list[list[Any]], est: list[list[Any]]) -> dict[str, float | None]:
    import mir_eval

    ref_intervals = np.array([[s, e] for s, e, _ in ref])
    ref_labels = [label for *_, label in ref]
    est_intervals = np.array([[s, e] for s, e, _ in est])
    est_labels = [label for *_, label in est]
    est_intervals, est_labels = mir_eval.util.adjust_intervals(
        est_intervals, est_labels, ref_intervals.min(), ref_intervals.max(), "N", "N"
    )
    intervals, ref_l, est_l = mir_eval.util.merge_labeled_intervals(
        ref_intervals, ref_labels, est_intervals, est_labels
    )
    durations = mir_eval.util.intervals_to_durations(intervals)
    out: dict[str, float | None] = {}
    for name, compare in (("chords_majmin", mir_eval.chord.majmin), ("chords_sevenths", mir_eval.chord.sevenths)):
        comparisons = compare(ref_l, est_l)
        out[name] = mir_eval.chord.weighted_accuracy(comparisons, durations) if (comparisons >= 0).any() else None
    return out


# --- running ------------------------------------------------------------------------------


def load(path: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    samples, sr = sf.read(path, dtype="float32", always_2d=True)
    return np.ascontiguousarray(samples.T), sr


def stems_mix(truth: dict[str, Any], names: tuple[str, ...]) -> tuple[np.ndarray, int]:
    parts = [load(truth["stems"][n]) for n in names if n in truth.get("stems", {})]
    return sum(p for p, _ in parts), parts[0][1]


def warm_up(tools: list[str]) -> None:
    """Each tool once on a few seconds of clicks, so that no song pays a tool's compiling or loading."""
    t = np.arange(6 * 44100) / 44100
    clicks = (np.sin(2 * np.pi * 440 * t) * (t % 0.5 < 0.05)).astype(np.float32)
    for tool in tools:
        TOOLS[tool](np.stack([clicks, clicks]), 44100)


def run(truths: list[dict[str, Any]], tools: list[str], with_stems: bool) -> list[dict[str, Any]]:
    rows = []
    for i, truth in enumerate(truths):
        samples, sr = load(truth["audio"])
        for tool in tools:
            started = time.process_time()
            reading = TOOLS[tool](samples, sr)
            seconds = time.process_time() - started
            rows.append({"song": truth["id"], "split": truth["split"], "style": truth["style"], "tool": tool,
                         **score(truth, reading), "seconds": seconds, "tempo": reading["tempo"],
                         "key_read": reading["key"], "truth_tempo": truth["tempo_bpm"], "truth_key": truth["key"]})  # fmt: skip
        if with_stems and truth.get("stems"):
            rows.append(_stems_row(truth))
        print(f"[{i + 1}/{len(truths)}] {truth['id']}", file=sys.stderr, flush=True)
    return rows


def _stems_row(truth: dict[str, Any]) -> dict[str, Any]:
    """Stemflow given the mix and the true stems, as the service is given a separated job's (`analyze(stems=...)`).

    The corpus' lead line joins "other", where a 4-stem separation puts a melody instrument.
    """
    from analyzer.features import analyze

    samples, sr = load(truth["audio"])
    names = {"drums": ("drums",), "bass": ("bass",), "other": ("other", "lead")}
    present = truth.get("stems", {})
    stems = {name: stems_mix(truth, parts)[0] for name, parts in names.items() if any(p in present for p in parts)}
    started = time.process_time()
    facts = analyze(samples, sr, stems=stems)
    seconds = time.process_time() - started
    reading = {
        "tempo": facts.tempo_bpm,
        "beats": facts.beats,
        "downbeats": facts.downbeats,
        "key": ascii_spelling(facts.key),
        "chords": [[c.start, c.end, harte(c)] for c in facts.chords] or None,
    }
    return {"song": truth["id"], "split": truth["split"], "style": truth["style"], "tool": "stemflow (true stems)",
            **score(truth, reading), "seconds": seconds, "tempo": reading["tempo"], "key_read": reading["key"],
            "truth_tempo": truth["tempo_bpm"], "truth_key": truth["key"], "sources": facts.sources}  # fmt: skip


def summarise(rows: list[dict[str, Any]], by: Callable[[dict[str, Any]], str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{group: {tool: {metric: mean or None}}}."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[by(row)][row["tool"]].append(row)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for group, tools in sorted(groups.items()):
        out[group] = {}
        for tool, members in tools.items():
            means: dict[str, Any] = {"songs": len(members)}
            for metric in (*METRICS, *(f"key_{p}" for p in ESSENTIA_PROFILES), "key_oracle"):
                values = [r[metric] for r in members if r.get(metric) is not None]
                means[metric] = statistics.fmean(values) if values else None
            profiles = [means[f"key_{p}"] for p in ESSENTIA_PROFILES if means[f"key_{p}"] is not None]
            if profiles:
                means["key"] = max(profiles)
            out[group][tool] = means
    return out


def table(summary: dict[str, dict[str, dict[str, Any]]], title: str) -> str:
    header = ["group", "tool", "songs", *METRICS]
    lines = [f"\n{title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, tools in summary.items():
        for tool, means in tools.items():
            cells = [f"{means[m]:.3f}" if means[m] is not None else "-" for m in METRICS]
            lines.append(f"| {group} | {tool} | {means['songs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from stemflow_dev import corpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("bench", "small"), default="bench")
    parser.add_argument("--split", choices=corpus.SPLITS)
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--only", help="comma-separated styles")
    parser.add_argument("--stems", action="store_true")
    parser.add_argument("--corpus", type=Path, default=ROOT / corpus.DEFAULT_OUT)
    parser.add_argument("--out", type=Path, default=RESULTS / "analysis_accuracy.json")
    args = parser.parse_args()
    chosen = corpus.specs(args.set, args.split)
    if args.only:
        chosen = [
            s for s in chosen if s.name in args.only.split(",") or (s.kind == "composition" and "chorale" in args.only)
        ]
    truths = corpus.build(args.corpus, chosen, stems=args.stems)
    tools = args.tools.split(",")
    warm_up(tools)
    rows = run(truths, tools, args.stems)
    overall = summarise(rows, lambda r: r["split"] + (" compositions" if r["style"] == "chorale" else " arrangements"))
    totals = summarise(rows, lambda r: r["split"])
    styles = summarise(rows, lambda r: f"{r['split']} {r['style']}")
    print(table(totals, "By split (all songs)"))
    print(table(overall, "By split and kind"))
    print(table(styles, "By split and style"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"totals": totals, "kinds": overall, "styles": styles, "songs": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
