"""An evaluation corpus for the analyzer: songs rendered with real instrument sounds, and their exact truth.

Arrangements (drums, bass, chords, a lead line) are written here in the
styles users bring (backbeat rock and pop, half-time, four-on-the-floor,
shuffle, ballads, punk, 3/4 and 6/8, "live" songs with humanised timing and
tempo drift), with intros without drums and breakdowns; real compositions
are Bach chorales from music21's corpus (when music21 is installed). Each
song is a General MIDI score rendered by FluidSynth with a GM SoundFont, one
instrument group at a time, so its stems are exact and the mix is their sum.

Truth, per song (JSON beside the audio): beat and downbeat times, meter,
tempo (median of the tempo curve), the key (as mir_eval reads it, e.g.
"Eb major") and chord segments in Harte syntax ("Bb:min7", "N").

Nothing is committed: songs are rendered on demand into a cache folder
(default `.stemflow/corpus`), keyed by their spec, so a second run is free.

    python -m stemflow_dev.corpus [--out DIR] [--set bench|small] [--stems] [--split tuning|heldback]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

RATE = 44100
DEFAULT_OUT = Path(".stemflow/corpus")
SOUNDFONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
)
# Bumped whenever the generator's output changes, so that cached songs are rendered again.
VERSION = 4

NOTE_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Chord qualities: intervals above the root, by Harte shorthand.
QUALITIES = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "dim": (0, 3, 6),
    "hdim7": (0, 3, 6, 10),
    "dim7": (0, 3, 6, 9),
    "aug": (0, 4, 8),
    "sus4": (0, 5, 7),
    "sus2": (0, 2, 7),
}
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)

# Progressions as (semitones above the tonic, quality), one chord per step. No loop may be another
# mode's loop from another chord: until version 4 the major vi-IV-I-V was the minor i-bVI-bIII-bVII
# note for note, and the minor i7-iv7-bVII7-bIIImaj7 was the relative major's vi-ii-V-I (a cadence
# on the major tonic), so their truth was a coin toss.
PROGRESSIONS = {
    "major": (
        ((0, "maj"), (7, "maj"), (9, "min"), (5, "maj")),
        ((0, "maj"), (9, "min"), (5, "maj"), (7, "maj")),
        ((0, "maj"), (5, "maj"), (7, "maj"), (5, "maj")),
        ((0, "maj"), (5, "maj"), (9, "min"), (7, "sus4")),
        ((0, "maj7"), (9, "min7"), (2, "min7"), (7, "7")),
        ((0, "maj"), (4, "min"), (5, "maj"), (7, "7")),
        ((2, "min7"), (7, "7"), (0, "maj7"), (5, "maj7")),
        ((0, "maj"), (7, "maj"), (5, "maj"), (5, "min"), (0, "maj"), (9, "min"), (2, "min"), (7, "7")),
    ),
    "minor": (
        ((0, "min"), (8, "maj"), (3, "maj"), (10, "maj")),
        ((0, "min"), (5, "min"), (7, "7"), (0, "min")),
        ((0, "min"), (10, "maj"), (8, "maj"), (7, "7")),
        ((0, "min"), (5, "min"), (8, "maj"), (7, "maj")),
        ((0, "min"), (2, "dim"), (7, "7"), (0, "min")),
        ((0, "min7"), (8, "maj7"), (5, "min7"), (7, "7")),
        ((0, "min"), (3, "maj"), (10, "maj"), (5, "min"), (0, "min"), (8, "maj"), (2, "hdim7"), (7, "7")),
    ),
}

# General MIDI programs (0-based) by role; drum kits are presets of bank 128.
CHORD_PROGRAMS = {"piano": 0, "bright piano": 1, "electric piano": 4, "organ": 16, "rock organ": 18,
                  "nylon guitar": 24, "clean guitar": 27, "overdrive guitar": 29, "strings": 48,
                  "synth strings": 50, "warm pad": 89}  # fmt: skip
BASS_PROGRAMS = {"acoustic bass": 32, "finger bass": 33, "pick bass": 34, "fretless": 35, "synth bass": 38}
LEAD_PROGRAMS = {"trumpet": 56, "alto sax": 65, "flute": 73, "square lead": 80, "violin": 40, "vibraphone": 11,
                 "steel guitar": 25, "clarinet": 71}  # fmt: skip
KITS = {"standard": 0, "room": 8, "power": 16, "electronic": 24, "808": 25, "jazz": 32, "brush": 40}
# General MIDI drum notes.
KICK, STICK, SNARE, CLAP, HAT, OPEN_HAT, RIDE, CRASH, TOM = 36, 37, 38, 39, 42, 46, 51, 49, 45

# Style: tempo range (BPM of the beat), beats per bar, the unit's subdivisions (2 simple, 3 compound),
# humanising (ms, standard deviation) and tempo drift (share over the song).
STYLES: dict[str, dict[str, Any]] = {
    "rock": {"bpm": (88, 140), "meter": "4/4", "humanise": (0, 4)},
    "pop16": {"bpm": (80, 118), "meter": "4/4", "humanise": (0, 3)},
    "halftime": {"bpm": (130, 160), "meter": "4/4", "humanise": (0, 4)},
    "four_floor": {"bpm": (118, 130), "meter": "4/4", "humanise": (0, 0)},
    "shuffle": {"bpm": (84, 124), "meter": "4/4", "humanise": (0, 5)},
    "ballad": {"bpm": (60, 85), "meter": "4/4", "humanise": (2, 6)},
    "punk": {"bpm": (170, 200), "meter": "4/4", "humanise": (0, 4)},
    "waltz": {"bpm": (90, 160), "meter": "3/4", "humanise": (0, 5)},
    "six_eight": {"bpm": (55, 95), "meter": "6/8", "humanise": (0, 5)},
    "live": {"bpm": (70, 150), "meter": "4/4", "humanise": (5, 15), "drift": 0.03},
}
SPLITS = ("tuning", "heldback")
# Seeds: the tuning split's and the held-back split's never overlap.
_SPLIT_SEED = {"tuning": 0, "heldback": 100_000}
# Songs per style and split, and chorales drawn (alternating between splits, about four in five state
# their key by their ending). The first 3 per style and 28 chorales were the corpus of version 3.
_PER_STYLE = {"tuning": 8, "heldback": 6}
_CHORALES = 64


@dataclass
class Note:
    start: float
    end: float
    pitch: int
    velocity: int


@dataclass
class Part:
    """One instrument on one channel of a stem."""

    program: int
    notes: list[Note] = field(default_factory=list)
    drums: bool = False


@dataclass
class Song:
    """A score (parts grouped by stem) and its truth."""

    truth: dict[str, Any]
    stems: dict[str, list[Part]]


# --- time ------------------------------------------------------------------


class Clock:
    """Beat positions to seconds under a tempo that drifts linearly from `bpm` to `bpm * (1 + drift)`."""

    def __init__(self, bpm: float, beats: int, drift: float = 0.0, start: float = 0.0) -> None:
        local = bpm * (1 + drift * np.arange(beats + 1) / max(beats, 1))
        self.times = start + np.concatenate([[0.0], np.cumsum(60.0 / local)])

    def __call__(self, position: float) -> float:
        i = int(np.clip(np.floor(position), 0, self.times.size - 2))
        return float(self.times[i] + (position - i) * (self.times[i + 1] - self.times[i]))


# --- arrangements ------------------------------------------------------------


def arrangement(style: str, seed: int, seconds: float = 30.0, split: str = "tuning") -> Song:
    """A song in `style`, fully determined by `seed`."""
    rng = np.random.default_rng([seed, sorted(STYLES).index(style)])
    params = STYLES[style]
    meter = params["meter"]
    beats_per_bar = {"4/4": 4, "3/4": 3, "6/8": 2}[meter]
    sub = 3 if meter == "6/8" or style == "shuffle" else 2
    bpm = float(np.round(rng.uniform(*params["bpm"]), 1))
    drift = float(rng.uniform(-1, 1) * params.get("drift", 0.0))
    humanise_ms = float(rng.uniform(*params["humanise"]))
    mode = "major" if rng.random() < 0.55 else "minor"
    tonic = int(rng.integers(12))
    progression = PROGRESSIONS[mode][int(rng.integers(len(PROGRESSIONS[mode])))]
    # Chords change once a bar, or twice in 4/4 songs at slow tempi.
    per_bar = 2 if beats_per_bar == 4 and bpm < 90 and rng.random() < 0.5 else 1
    bar_beats = beats_per_bar
    mean_bpm = bpm * (1 + drift / 2)
    bars = int(np.ceil(seconds / (bar_beats * 60.0 / mean_bpm)))
    total_beats = bars * bar_beats
    clock = Clock(bpm, total_beats, drift, start=float(rng.uniform(0.05, 0.6)))
    intro = int(rng.choice([0, 0, 2, 4])) if bars > 10 else 0
    breakdown = int(rng.integers(bars // 2, bars - 4)) if bars > 12 and rng.random() < 0.4 else -1
    drums_on = [not (bar < intro or breakdown <= bar < breakdown + 2) for bar in range(bars)]

    chords: list[tuple[float, int, str]] = []  # (beat position, root pitch class, quality)
    step = bar_beats / per_bar
    for i in range(bars * per_bar):
        offset, quality = progression[i % len(progression)]
        chords.append((i * step, (tonic + offset) % 12, quality))

    kit = str(
        rng.choice(list(KITS)[:5] if style not in {"ballad", "shuffle"} else ["standard", "jazz", "brush", "room"])
    )
    if style == "four_floor":
        kit = str(rng.choice(["electronic", "808", "standard"]))
    comp_name = str(rng.choice(_comp_instruments(style)))
    bass_name = str(rng.choice(list(BASS_PROGRAMS)))
    lead_name = str(rng.choice(list(LEAD_PROGRAMS)))
    jitter = _humaniser(rng, humanise_ms)

    drums = Part(KITS[kit], _drum_notes(style, bars, bar_beats, sub, drums_on, rng), drums=True)
    bass = Part(BASS_PROGRAMS[bass_name], _bass_notes(style, chords, step, bar_beats, rng))
    comp = Part(CHORD_PROGRAMS[comp_name], _comp_notes(style, chords, step, bar_beats, sub, rng))
    lead = Part(LEAD_PROGRAMS[lead_name], _lead_notes(chords, step, tonic, mode, bars, bar_beats, sub, intro, rng))
    stems = {"drums": [drums], "bass": [bass], "other": [comp], "lead": [lead]}
    for parts in stems.values():
        for part in parts:
            part.notes = [_place(n, clock, jitter) for n in part.notes]

    beat_times = [clock(b) for b in range(total_beats)]
    truth = {
        "kind": "arrangement",
        "style": style,
        "split": split,
        "seed": seed,
        "tempo_bpm": round(float(np.median(60.0 / np.diff(clock.times))), 3),
        "tempo_drift": drift,
        "humanise_ms": round(humanise_ms, 2),
        "meter": meter,
        "beats_per_bar": beats_per_bar,
        "beats": [round(t, 4) for t in beat_times],
        "downbeats": [round(beat_times[b], 4) for b in range(0, total_beats, bar_beats)],
        "key": f"{NOTE_NAMES[tonic]} {mode}",
        "chords": _chord_segments([(clock(p), root, q) for p, root, q in chords], clock(total_beats)),
        "instruments": {"drums": kit, "bass": bass_name, "other": comp_name, "lead": lead_name},
        "intro_bars": intro,
        "breakdown_bar": breakdown,
        "duration_s": round(clock(total_beats) + 0.5, 3),
    }
    return Song(truth, stems)


def _comp_instruments(style: str) -> list[str]:
    if style in {"rock", "punk", "live", "halftime"}:
        return ["overdrive guitar", "clean guitar", "rock organ", "piano", "bright piano"]
    if style in {"ballad", "six_eight", "waltz"}:
        return ["piano", "electric piano", "strings", "nylon guitar", "warm pad"]
    if style == "four_floor":
        return ["synth strings", "electric piano", "warm pad", "bright piano"]
    return ["piano", "electric piano", "clean guitar", "organ"]


def _humaniser(rng: np.random.Generator, ms: float) -> Callable[[], float]:
    def jitter() -> float:
        return float(np.clip(rng.normal(0.0, ms / 1000), -2.5 * ms / 1000, 2.5 * ms / 1000)) if ms else 0.0

    return jitter


def _place(note: Note, clock: Clock, jitter: Callable[[], float]) -> Note:
    """A note whose start and end are beat positions, placed in seconds with human timing."""
    start = max(0.0, clock(note.start) + jitter())
    return Note(start, max(start + 0.03, clock(note.end)), note.pitch, note.velocity)


def _hits(positions: Iterable[float], pitch: int, velocity: tuple[int, int], rng: np.random.Generator) -> list[Note]:
    return [Note(p, p + 0.25, pitch, int(rng.integers(*velocity))) for p in positions]


def _drum_notes(style: str, bars: int, beats: int, sub: int, on: list[bool], rng: np.random.Generator) -> list[Note]:
    """The kit's pattern for `style`, bar by bar, with a crash on the first bar of each section."""
    grid = [i / sub for i in range(beats * sub)]
    swing = [b + (2 / 3 if i % 2 else 0) for b in range(beats) for i in range(2)] if style == "shuffle" else None
    sixteenth = rng.random() < 0.5
    patterns: dict[str, tuple[list[float], list[float], list[float], int]] = {
        # kick, snare, hats, hat note
        "rock": ([0, 2, 2.5], [1, 3], grid, HAT),
        "live": ([0, 2, 2.5], [1, 3], grid, HAT),
        "pop16": ([0, 1.75, 2], [1, 3], [i / 4 for i in range(16)], HAT),
        "halftime": ([0, 1.5], [2], grid, HAT),
        "four_floor": ([0, 1, 2, 3], [1, 3], [0.5, 1.5, 2.5, 3.5], OPEN_HAT),
        "shuffle": ([0, 2], [1, 3], swing or grid, RIDE if rng.random() < 0.5 else HAT),
        "ballad": ([0, 2.5], [1, 3], grid, HAT),
        "punk": ([0, 2] if sixteenth else [0, 1.5, 2], [1, 3], grid if sixteenth else [0, 1, 2, 3], HAT),
        "waltz": ([0], [1, 2], [0, 1, 2], HAT),
        "six_eight": ([0], [1], grid, HAT),
    }
    kick, snare, hats, hat = patterns[style]
    snare_note = STICK if style == "ballad" and rng.random() < 0.5 else SNARE
    notes: list[Note] = []
    for bar in range(bars):
        if not on[bar]:
            continue
        base = bar * beats
        notes += _hits([base + k for k in kick], KICK, (96, 118), rng)
        notes += _hits([base + s for s in snare], CLAP if style == "four_floor" else snare_note, (92, 116), rng)
        for h in hats:
            accent = abs(h - round(h)) < 1e-9
            notes += _hits([base + h], hat, (66, 84) if accent else (44, 64), rng)
        if bar == 0 or not on[bar - 1]:
            notes += _hits([base], CRASH, (90, 110), rng)
    return notes


def _bass_notes(
    style: str, chords: list[tuple[float, int, str]], step: float, beats: int, rng: np.random.Generator
) -> list[Note]:
    """Roots (and fifths) under each chord, in the style's rhythm."""
    rhythm = {
        "rock": [0, 1, 2, 3], "live": [0, 1, 2, 3], "punk": [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5],
        "pop16": [0, 1.5, 2, 3.5], "halftime": [0, 1.5, 3.5], "four_floor": [0.5, 1.5, 2.5, 3.5],
        "shuffle": [0, 1, 2, 3], "ballad": [0, 2], "waltz": [0], "six_eight": [0, 1],
    }[style]  # fmt: skip
    notes = []
    for start, root, quality in chords:
        pitch = 36 + (root - 36) % 12
        if pitch > 43:
            pitch -= 12
        fifth = pitch + QUALITIES[quality][2]
        for i, r in enumerate(p for p in rhythm if p < step):
            use_fifth = style in {"shuffle", "waltz", "ballad"} and i % 2 == 1
            length = min(step - r, 1.0 if style != "waltz" else 3.0) * 0.9
            notes.append(Note(start + r, start + r + length, fifth if use_fifth else pitch, int(rng.integers(84, 108))))
    return notes


def _voicing(root: int, quality: str) -> list[int]:
    """Chord tones in close position between G3 and G4 (and the root again an octave up for triads)."""
    pitches = sorted(55 + (root + i - 55) % 12 for i in QUALITIES[quality])
    return pitches


def _comp_notes(
    style: str, chords: list[tuple[float, int, str]], step: float, beats: int, sub: int, rng: np.random.Generator
) -> list[Note]:
    """The chords, struck in the style's rhythm (sustained, pushed, off-beat stabs or arpeggios)."""
    notes = []
    for start, root, quality in chords:
        voice = _voicing(root, quality)
        if style in {"ballad", "six_eight"}:
            arpeggio = [voice[i % len(voice)] + (12 if i >= len(voice) else 0) for i in range(int(step * sub))]
            for i, pitch in enumerate(arpeggio):
                notes.append(Note(start + i / sub, start + step, pitch, int(rng.integers(58, 78))))
            continue
        strikes = {
            "rock": [0, 1, 2, 3], "live": [0, 1.5, 2, 3.5], "punk": [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5],
            "pop16": [0, 1.5, 3], "halftime": [0], "four_floor": [0.5, 1.5, 2.5, 3.5],
            "shuffle": [0, 1 + 2 / 3, 3], "waltz": [1, 2],
        }[style]  # fmt: skip
        times = [s for s in strikes if s < step] or [0]
        for i, s in enumerate(times):
            end = times[i + 1] if i + 1 < len(times) else step
            length = (end - s) * (0.45 if style == "four_floor" else 0.95)
            velocity = int(rng.integers(62, 86))
            notes += [Note(start + s, start + s + length, p, velocity) for p in voice]
    return notes


def _lead_notes(
    chords: list[tuple[float, int, str]], step: float, tonic: int, mode: str, bars: int, beats: int, sub: int,
    intro: int, rng: np.random.Generator,
) -> list[Note]:  # fmt: skip
    """A melody of chord tones on the beats and scale steps between, resting now and then."""
    scale = [(tonic + s) % 12 for s in (MAJOR_SCALE if mode == "major" else MINOR_SCALE)]
    notes: list[Note] = []
    pitch = 72 + (tonic - 72) % 12
    for start, root, quality in chords:
        if start < intro * beats:
            continue
        tones = [(root + i) % 12 for i in QUALITIES[quality]]
        position = 0.0
        while position < step:
            length = float(rng.choice([1.0, 0.5, 1 / sub * 2, 2.0] if sub == 2 else [1.0, 2 / 3, 1 / 3]))
            length = min(length, step - position)
            if rng.random() < 0.15:
                position += length
                continue
            on_beat = abs(position - round(position)) < 1e-9
            allowed = tones if on_beat else scale
            candidates = [p for p in range(pitch - 5, pitch + 6) if p % 12 in allowed and 62 <= p <= 84]
            if candidates:
                pitch = int(rng.choice(candidates))
            notes.append(Note(start + position, start + position + length * 0.9, pitch, int(rng.integers(70, 96))))
            position += length
    return notes


def _chord_segments(changes: list[tuple[float, int, str]], end: float) -> list[list[Any]]:
    """[start, end, "Eb:min7"] segments, with "N" before the first chord."""
    segments: list[list[Any]] = []
    if changes and changes[0][0] > 0:
        segments.append([0.0, round(changes[0][0], 4), "N"])
    for i, (start, root, quality) in enumerate(changes):
        stop = changes[i + 1][0] if i + 1 < len(changes) else end
        segments.append([round(start, 4), round(stop, 4), f"{NOTE_NAMES[root]}:{quality}"])
    return segments


# --- real compositions ---------------------------------------------------------


def chorale_names() -> list[str]:
    """Bach chorales in music21's corpus (empty without music21)."""
    try:
        from music21 import corpus
    except ImportError:
        return []
    return sorted(str(Path(p).stem) for p in corpus.getComposer("bach") if Path(p).stem.startswith("bwv"))


def chorale(name: str, seed: int, split: str = "tuning") -> Song | None:
    """A Bach chorale from music21's corpus played by an ensemble; None when its key is not stated by its ending.

    The key is the key signature's major or relative minor whose tonic the
    final bass note is (pieces ending elsewhere, in a church mode, are left
    out); chords are read from the sonority at each beat, "X" where it is no
    chord the analyzer could name.
    """
    from music21 import corpus

    score = corpus.parse(f"bach/{name}")
    parts = list(score.parts)
    if len(parts) != 4:
        return None
    signatures = score.flatten().getElementsByClass("KeySignature")
    time_signatures = score.flatten().getElementsByClass("TimeSignature")
    if not signatures or not time_signatures:
        return None
    major_tonic = (7 * signatures[0].sharps) % 12
    bass_notes = list(parts[-1].flatten().notes)
    if not bass_notes:
        return None
    last = bass_notes[-1].pitches[0].pitchClass
    if last == major_tonic:
        key = f"{NOTE_NAMES[major_tonic]} major"
    elif last == (major_tonic + 9) % 12:
        key = f"{NOTE_NAMES[(major_tonic + 9) % 12]} minor"
    else:
        return None
    ts = time_signatures[0]
    beats_per_bar = int(ts.numerator) if ts.denominator == 4 else None
    rng = np.random.default_rng([seed, 7])
    bpm = float(np.round(rng.uniform(66, 96), 1))
    clock = Clock(bpm, int(score.highestTime) + 2, start=0.3)
    ensembles = {
        "strings": (40, 40, 41, 42), "organ": (19, 19, 19, 19), "choir": (52, 52, 52, 52),
        "winds": (73, 68, 71, 70), "piano": (0, 0, 0, 0), "brass": (56, 56, 57, 58),
    }  # fmt: skip
    ensemble = str(rng.choice(list(ensembles)))
    stems: dict[str, list[Part]] = {"other": [], "bass": []}
    for i, part in enumerate(parts):
        notes = []
        for n in part.flatten().notes:
            for p in n.pitches:
                notes.append(Note(float(n.offset), float(n.offset + n.quarterLength) - 0.02, int(p.midi), 80))
        stems["bass" if i == 3 else "other"].append(Part(ensembles[ensemble][i], notes))
    for parts_ in stems.values():
        for part in parts_:
            part.notes = [_place(n, clock, lambda: 0.0) for n in part.notes]
    end_beat = float(score.highestTime)
    beats = [clock(b) for b in range(int(np.ceil(end_beat)))]
    measures = parts[0].getElementsByClass("Measure")
    downbeats = [clock(float(m.offset)) for m in measures if m.duration.quarterLength == ts.barDuration.quarterLength]
    chords = _sonorities(score, int(np.ceil(end_beat)))
    truth = {
        "kind": "composition",
        "style": "chorale",
        "split": split,
        "seed": seed,
        "piece": f"bach/{name}",
        "ensemble": ensemble,
        "tempo_bpm": bpm,
        "tempo_drift": 0.0,
        "humanise_ms": 0.0,
        "meter": f"{ts.numerator}/{ts.denominator}",
        "beats_per_bar": beats_per_bar,
        "beats": [round(t, 4) for t in beats],
        "downbeats": [round(t, 4) for t in downbeats],
        "key": key,
        "chords": _merge([[round(clock(b), 4), round(clock(b + 1), 4), label] for b, label in enumerate(chords)]),
        "duration_s": round(clock(end_beat) + 1.0, 3),
    }
    return Song(truth, stems)


def _sonorities(score: Any, beats: int) -> list[str]:
    """The chord sounding at the start of each beat (quarter note), in Harte syntax."""
    sounding: list[set[int]] = [set() for _ in range(beats)]
    bass: list[int | None] = [None] * beats
    for i, part in enumerate(score.parts):
        for n in part.flatten().notes:
            first, last = float(n.offset), float(n.offset + n.quarterLength)
            for b in range(int(np.ceil(first - 1e-6)), min(beats, int(np.ceil(last - 1e-6)))):
                sounding[b] |= {p.pitchClass for p in n.pitches}
                if i == 3:
                    bass[b] = n.pitches[0].pitchClass
    return [name_chord(pcs, low) for pcs, low in zip(sounding, bass, strict=True)]


def name_chord(pitch_classes: set[int], bass: int | None = None) -> str:
    """A Harte label for a set of pitch classes: exact templates first, then triads missing their fifth."""
    if not pitch_classes:
        return "N"
    roots = sorted(range(12), key=lambda r: r != bass)
    for root in roots:
        intervals = {(p - root) % 12 for p in pitch_classes}
        for quality, template in QUALITIES.items():
            if intervals == set(template):
                return f"{NOTE_NAMES[root]}:{quality}"
    for root in roots:
        intervals = {(p - root) % 12 for p in pitch_classes}
        if intervals in ({0, 4}, {0, 4, 10}):
            return f"{NOTE_NAMES[root]}:{'maj' if 10 not in intervals else '7'}"
        if intervals in ({0, 3}, {0, 3, 10}):
            return f"{NOTE_NAMES[root]}:{'min' if 10 not in intervals else 'min7'}"
    return "X"


def _merge(segments: list[list[Any]]) -> list[list[Any]]:
    merged: list[list[Any]] = []
    for start, end, label in segments:
        if merged and merged[-1][2] == label and abs(merged[-1][1] - start) < 1e-6:
            merged[-1][1] = end
        else:
            merged.append([start, end, label])
    return merged


# --- sets ------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What to render: an arrangement (style, seed) or a composition (piece, seed)."""

    kind: str
    name: str
    seed: int
    split: str
    seconds: float = 30.0

    @property
    def id(self) -> str:
        return f"{self.split}-{self.name.replace('/', '_')}-{self.seed}"


def specs(which: str = "bench", split: str | None = None) -> list[Spec]:
    """The songs of a set: "bench" (every style and chorales, both splits) or "small" (a few, for tests)."""
    if which == "small":
        chosen = [Spec("arrangement", s, 1 + i, "tuning", 16.0) for i, s in enumerate(("rock", "ballad", "waltz"))]
        chosen += [Spec("arrangement", "punk", 2, "tuning", 16.0)]
    else:
        chosen = [
            Spec("arrangement", style, _SPLIT_SEED[part] + i, part)
            for part in SPLITS
            for style in STYLES
            for i in range(_PER_STYLE[part])
        ]
        names = chorale_names()
        rng = np.random.default_rng(20)
        picked = list(rng.permutation(names)) if names else []
        # Chorales alternate between splits; ones whose ending does not state the key are skipped at render.
        for i, name in enumerate(picked[:_CHORALES]):
            part = SPLITS[i % 2]
            chosen.append(Spec("composition", str(name), _SPLIT_SEED[part] + i, part))
    return [s for s in chosen if split is None or s.split == split]


def make(spec: Spec) -> Song | None:
    if spec.kind == "composition":
        return chorale(spec.name, spec.seed, spec.split)
    return arrangement(spec.name, spec.seed, spec.seconds, spec.split)


# --- rendering ---------------------------------------------------------------


def soundfont() -> str | None:
    return next((p for p in SOUNDFONTS if Path(p).exists()), None)


def available() -> bool:
    """Whether songs can be rendered here: FluidSynth and a General MIDI SoundFont."""
    return shutil.which("fluidsynth") is not None and soundfont() is not None


def render(out: Path, spec: Spec, stems: bool = False) -> dict[str, Any] | None:
    """Render one song into `out` (cached); its truth with "audio" (and "stems") paths, None if skipped."""
    digest = hashlib.sha1(json.dumps([VERSION, asdict(spec)]).encode()).hexdigest()[:10]
    folder = out / f"{spec.id}-{digest}"
    truth_path = folder / "truth.json"
    if truth_path.exists():
        truth = json.loads(truth_path.read_text())
        if truth is None or not stems or all(Path(p).exists() for p in truth.get("stems", {}).values()):
            return truth
    song = make(spec)
    folder.mkdir(parents=True, exist_ok=True)
    if song is None:
        truth_path.write_text("null")
        return None
    font = soundfont()
    if font is None or shutil.which("fluidsynth") is None:
        raise RuntimeError(
            "rendering needs fluidsynth and a GM SoundFont (apt-get install fluidsynth fluid-soundfont-gm)"
        )
    n = round(song.truth["duration_s"] * RATE)
    rendered = {name: _render_parts(parts, font, n) for name, parts in song.stems.items()}
    rng = np.random.default_rng([spec.seed, 99])
    gains = {name: 10 ** (rng.uniform(-3, 3) / 20) for name in rendered}
    mix = sum(gains[name] * audio for name, audio in rendered.items())
    scale = 0.89 / max(float(np.abs(mix).max()), 1e-9)
    truth = {**song.truth, "id": spec.id, "audio": str(folder / "mix.flac")}
    sf.write(folder / "mix.flac", (mix * scale).T, RATE, subtype="PCM_16")
    if stems:
        truth["stems"] = {}
        for name, audio in rendered.items():
            path = folder / f"{name}.flac"
            sf.write(path, (gains[name] * scale * audio).T, RATE, subtype="PCM_16")
            truth["stems"][name] = str(path)
    truth_path.write_text(json.dumps(truth, indent=1))
    return truth


def build(out: Path = DEFAULT_OUT, chosen: Iterable[Spec] | None = None, stems: bool = False) -> list[dict[str, Any]]:
    """Render every spec (default: the bench set) into `out`; the truths of those rendered."""
    out.mkdir(parents=True, exist_ok=True)
    truths = [render(out, spec, stems) for spec in (specs() if chosen is None else chosen)]
    return [t for t in truths if t is not None]


def _render_parts(parts: list[Part], font: str, n: int) -> np.ndarray:
    """(2, n) float audio of the parts played together by FluidSynth."""
    with tempfile.TemporaryDirectory() as tmp:
        midi, wav = Path(tmp) / "song.mid", Path(tmp) / "song.wav"
        midi.write_bytes(write_midi(parts))
        command = ["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(RATE), "-F", str(wav), font, str(midi)]
        subprocess.run(command, check=True, capture_output=True)
        audio, _ = sf.read(wav, dtype="float32", always_2d=True)
    audio = audio.T[:, :n]
    return np.pad(audio, ((0, 0), (0, n - audio.shape[1])))


# Ticks of 0.1 ms: 5000 per quarter at the default 120 BPM (500,000 us per quarter).
_DIVISION = 5000
_TICK_S = 0.5 / _DIVISION


def write_midi(parts: list[Part]) -> bytes:
    """A format-0 Standard MIDI File of the parts (one channel each, drums on channel 10), times in seconds."""
    events: list[tuple[int, int, bytes]] = []  # (tick, order, message): offs before ons at the same tick
    melodic = iter(c for c in range(16) if c != 9)
    for part in parts:
        channel = 9 if part.drums else next(melodic)
        events.append((0, 0, bytes([0xC0 | channel, part.program & 0x7F])))
        for note in part.notes:
            on, off = round(note.start / _TICK_S), round(note.end / _TICK_S)
            velocity = int(np.clip(note.velocity, 1, 127))
            events.append((on, 2, bytes([0x90 | channel, note.pitch & 0x7F, velocity])))
            events.append((max(off, on + 1), 1, bytes([0x80 | channel, note.pitch & 0x7F, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    track = bytearray(b"\x00\xff\x51\x03" + (500_000).to_bytes(3, "big"))
    now = 0
    for tick, _, message in events:
        track += _varlen(tick - now) + message
        now = tick
    track += b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, _DIVISION) + b"MTrk" + struct.pack(">I", len(track)) + track


def _varlen(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--set", choices=("bench", "small"), default="bench")
    parser.add_argument("--split", choices=SPLITS)
    parser.add_argument("--stems", action="store_true", help="also write each instrument group alone")
    args = parser.parse_args(argv)
    truths = build(args.out, specs(args.set, args.split), args.stems)
    print(f"{len(truths)} songs in {args.out}")


if __name__ == "__main__":
    main()
